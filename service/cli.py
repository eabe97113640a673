"""The `turngate` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="turngate: gate every turn of an LLM agent with a trained critic.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          workers: int = typer.Option(1, help="Worker processes."),
          log_level: str = typer.Option("info")) -> None:
    """Run the proxy on the settings from TURNGATE_* variables (embedded defaults otherwise)."""
    import uvicorn

    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)


@app.command()
def demo(turns: int = typer.Option(4, help="How many recorded turns to run through the gate.")) -> None:
    """Run the gate against a local simulated actor that replays recorded candidates."""
    from service.demo.run import run_demo

    run_demo(turns)


from service import cli_critic, cli_store  # noqa: E402 - sub-commands, after the root app exists

app.add_typer(cli_critic.app, name="critic")
cli_store.register(app)

if __name__ == "__main__":
    app()

"""The `turngate` command line. A failing command prints one line (service/cli_errors.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from service.gate.replay import DEFAULT_THRESHOLDS

app = typer.Typer(help="turngate: gate every turn of an LLM agent with a trained critic.",
                  no_args_is_help=True, add_completion=False)


def _print_version(asked: bool) -> None:
    if asked:
        from service import installed_version

        typer.echo(f"turngate {installed_version()}")
        raise typer.Exit()


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="On failure, show the traceback instead of one "
                                                               "line (also TURNGATE_DEBUG=1)."),
            version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="Print turngate's version and exit.")) -> None:
    """Options for every command (--debug is read by cli_errors.run)."""


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          workers: int = typer.Option(1, help="Worker processes."),
          log_level: str | None = typer.Option(None, help="debug|info|warning|error; default TURNGATE_LOG_LEVEL "
                                                          "(info)."),
          log_format: str | None = typer.Option(None, help="plain|json; default TURNGATE_LOG_FORMAT (plain).")) -> None:
    """Run the proxy on the settings from TURNGATE_* variables (embedded defaults otherwise)."""
    import logging.config

    import uvicorn

    from service.api import onewrite
    from service.critic.threads import WORKERS_ENV
    from service.preflight import check_before_serving
    from service.settings import Settings
    from service.telemetry.logs import log_config
    from service.telemetry.multiproc import for_workers

    overrides: dict[str, Any] = {k: v for k, v in (("log_level", log_level), ("log_format", log_format))
                                 if v is not None}
    settings = Settings(**overrides)
    # Settings, database, critic bundle and spool checked once here, before any worker starts (and
    # before logging is set up: a refusal is the one line cli_errors prints, not log lines around it).
    for warning in check_before_serving(settings):
        typer.echo(f"turngate: warning: {warning}", err=True)
    logging_config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(logging_config)

    # Several workers: metrics go through files in a shared directory, set up before they start;
    # each worker's critic takes its share of the cores (service/critic/threads.py).
    os.environ[WORKERS_ENV] = str(workers)
    try:
        with for_workers(workers):
            uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers,
                        log_config=logging_config, log_level=settings.log_level, http=onewrite.NAME)
    finally:
        os.environ.pop(WORKERS_ENV, None)


@app.command()
def demo(turns: int = typer.Option(4, help="How many recorded turns to run through the gate.")) -> None:
    """Run the gate against a local simulated actor that replays recorded candidates."""
    from service.demo.run import run_demo

    run_demo(turns)


@app.command()
def replay(files: list[Path] = typer.Argument(..., help="Trajectory JSONL files."),
           thresholds: str = typer.Option(",".join(map(str, DEFAULT_THRESHOLDS)), help="Comma-separated."),
           critic: Path | None = typer.Option(None, help="Critic bundle; default: the configured one."),
           out: Path = typer.Option(Path("replay-report"), help="Folder for report.json and curve.png."),
           cascade: list[str] | None = typer.Option(
               None, "--cascade", help="A cascade setting to replay on `turngate export` files instead, e.g. "
                                       "\"margin=0.1,min_agreement=0.5,on_write=true,max_share=0.2\" (repeat it, or "
                                       "separate settings with ';', to compare them). Reads the logged scores: no "
                                       "critic runs.")) -> None:
    """What the gate would have flagged on recorded conversations, per threshold; with --cascade,
    what each cascade setting would have sent to the LLM critic, cost and changed."""
    import asyncio
    import json

    from service.critic.registry import load_critic
    from service.gate import replay as rp
    from service.settings import Settings

    if cascade:
        _replay_cascade(files, cascade, out)
        return

    settings = Settings(critic=str(critic)) if critic else Settings()
    scorer = load_critic(settings)
    rows = rp.load_rows(files)
    turns = asyncio.run(rp.score_turns(rows, scorer))
    table = rp.report(turns, [float(t) for t in thresholds.split(",")])
    typer.echo(f"critic: {scorer.name} {scorer.version} on {scorer.provider}")
    typer.echo(rp.format_table(table, turns))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"critic": [scorer.name, scorer.version], "rows": table,
                                                 "unlabelled": rp.unlabelled(turns)}, indent=2))
    if rp.plot(table, out / "curve.png"):
        typer.echo(f"wrote {out / 'report.json'} and {out / 'curve.png'}")
    else:
        typer.echo(f"wrote {out / 'report.json'} (no PNG: matplotlib comes with the `train` extra)")


def _replay_cascade(files: list[Path], values: list[str], out: Path) -> None:
    import json

    from service.gate import replay as rp
    from service.gate import replay_cascade as rc

    try:
        settings = rc.parse_settings(values)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--cascade") from None
    if not settings:
        raise typer.BadParameter("no setting given", param_hint="--cascade")
    turns = rc.load_turns(rp.load_rows(files))
    if not turns:
        raise typer.BadParameter("no assistant turns in these files", param_hint="FILES")
    results = [rc.replay(turns, cfg) for cfg in settings]
    typer.echo(rc.format_table(results))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps({"results": results}, indent=2))
    typer.echo(f"wrote {out / 'cascade.json'}")


from service import cli_critic, cli_errors, cli_keys, cli_routes, cli_store  # noqa: E402 - sub-commands, after the root app exists

app.add_typer(cli_critic.app, name="critic")
app.add_typer(cli_keys.app, name="keys")
app.add_typer(cli_routes.app, name="routes")
cli_store.register(app)


def main() -> None:
    """The `turngate` entry point."""
    cli_errors.run(app)


if __name__ == "__main__":
    main()

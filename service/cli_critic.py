"""`turngate critic ...`: train, export, evaluate and score with critic bundles.

Training and export need the `train` extra (torch); they import it inside the command, so the
rest of the CLI and the service never load torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Train, export, evaluate and run the learned critic.", no_args_is_help=True)


DATA_HELP = "Trajectory / best-of-N JSONL files or folders holding them."


@app.command()
def train(data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
          out: Path = typer.Option(..., "--out", help="Run folder (model.pt, train.json, ...)."),
          freeze_encoder: bool = typer.Option(True, "--freeze-encoder/--fine-tune",
                                              help="Fit only the head on the frozen base model (minutes "
                                                   "on CPU), or fine-tune every weight (a GPU's job)."),
          head_epochs: int = typer.Option(300, help="Full-batch passes of the head fit (frozen encoder)."),
          layers: int = typer.Option(0, help="Keep only the base model's first N layers (0 = all 6)."),
          int8_noise_weight: float = typer.Option(100.0, help="Head fit: weight of the penalty on the logit "
                                                              "error int8 quantization would add (0 = off)."),
          ranking_pointwise_weight: float = typer.Option(0.0, help="Pointwise (BCE) weight of ranking-set answers; "
                                                                   "0 = they teach through pairs only."),
          folds: int = typer.Option(0, help="Frozen encoder: also cross-validate the head recipe in K folds "
                                            "over all the data, from the same encoder pass (0 = off)."),
          epochs: int = typer.Option(1, help="Passes over the data when fine-tuning."),
          max_length: int = typer.Option(256, help="Tokens per (context, candidate) pair."),
          seed: int = typer.Option(0, help="Seeds the split, the subsampling and the model."),
          max_minutes: float | None = typer.Option(None, help="Stop fine-tuning after this long."),
          batch_size: int = typer.Option(16),
          lr: float = typer.Option(4e-5, help="Encoder learning rate when fine-tuning."),
          head_lr: float = typer.Option(3e-3),
          val_fraction: float = typer.Option(0.2, help="Tasks / prompts held out for evaluation."),
          turns_per_conversation: int = typer.Option(0, help="0 = all turns."),
          candidates_per_prompt: int = typer.Option(0, help="Ranking-set answers per prompt; 0 = all.")) -> None:
    """Train a cross-encoder critic (needs the `train` extra)."""
    from critic_models.train import TrainConfig
    from critic_models.train import train as run_training

    cfg = TrainConfig(data=[str(p) for p in data], out=str(out), epochs=epochs, max_length=max_length,
                      seed=seed, max_minutes=max_minutes, batch_size=batch_size, lr=lr, head_lr=head_lr,
                      val_fraction=val_fraction, turns_per_conversation=turns_per_conversation or None,
                      candidates_per_prompt=candidates_per_prompt or None, freeze_encoder=freeze_encoder,
                      head_epochs=head_epochs, layers=layers or None, int8_noise_weight=int8_noise_weight,
                      folds=folds, ranking_pointwise_weight=ranking_pointwise_weight)
    run = run_training(cfg)
    cv = json.loads((run / "train.json").read_text())["crossval"]
    if cv:
        from critic_models.evaluate import format_table

        typer.echo(format_table(cv))
    typer.echo(f"wrote {run}")


@app.command()
def export(run: Path = typer.Argument(..., help="Training run folder."),
           out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
           precision: str = typer.Option("int8", help="int8 (CPU) | fp32 | fp16 (GPU)."),
           name: str = typer.Option("turngate-minilm-critic"),
           version: str | None = typer.Option(None, help="Default: the model file's sha256, 12 digits.")) -> None:
    """Export a run to an ONNX bundle, BERT-fused, parity-checked against torch."""
    from critic_models.export import export_bundle

    card = export_bundle(run, out, precision, name, version)
    ex = card["export"]
    typer.echo(f"fused operators: {ex['fused_operators']}")
    typer.echo(f"parity: {ex['parity']}")
    typer.echo(f"wrote {out} ({ex['size_bytes'] / 1e6:.1f} MB, {precision}, version {card['version']})")


@app.command("train-head")
def train_head(data: list[Path] = typer.Option(..., "--data", help=DATA_HELP + " Tool-call sets and store "
                                                                         "exports (`turngate export`) too."),
               out: Path = typer.Option(..., "--out", help="Bundle folder to write (format 2: encoder + head)."),
               encoder: Path | None = typer.Option(None, help="Bundle whose encoder the head sits on; "
                                                              "default: the shipped one."),
               folds: int = typer.Option(5, help="Cross-validate the recipe in K folds by question/prompt/task "
                                                 "on the training side (0 = off)."),
               draws: int = typer.Option(10, help="Sampled candidate groups per tool-call question."),
               seed: int = typer.Option(0, help="Seeds the split and the draws."),
               val_fraction: float = typer.Option(0.2, help="Questions / prompts / tasks held out."),
               pointwise: float = typer.Option(0.5, help="Weight of the pointwise (calibration) loss."),
               steps: int = typer.Option(400, help="Full-batch optimisation steps."),
               agent_head: bool = typer.Option(False, help="Fit a head of its own for agent turns from "
                                                           "trajectories and logged agent turns (else the tool "
                                                           "head scores them)."),
               logits_cache: Path | None = typer.Option(None, help="JSON file of the encoder's logits, read "
                                                                   "and updated: a rerun skips the encoder pass.")
               ) -> None:
    """Fit the feature head (agreement, grounding, ... and the encoder's logit) over an encoder
    bundle; numpy only, no torch. Prints the cross-validated and held-out pick figures."""
    from critic_models.head_fit import FitConfig
    from critic_models.head_train import HeadConfig
    from critic_models.head_train import train_head as run_head
    from critic_models.pick_eval import format_table
    from service.critic.registry import shipped_bundle

    base = encoder or shipped_bundle()
    if base is None:
        raise typer.BadParameter("no encoder bundle given and none shipped", param_hint="--encoder")
    report = run_head(HeadConfig(encoder=str(base), data=[str(p) for p in data], out=str(out), seed=seed,
                                 val_fraction=val_fraction, draws=draws, folds=folds,
                                 fit=FitConfig(pointwise=pointwise, steps=steps), agent_head=agent_head,
                                 logits_cache=str(logits_cache) if logits_cache else None))
    if report.get("crossval"):
        typer.echo(f"cross-validated on the training side ({folds} folds by key):\n" + format_table(report["crossval"]))
    typer.echo("\nheld out:\n" + format_table(report["held_out"]))
    typer.echo(f"\nwrote {out} ({report['minutes']} min)")


@app.command("eval")
def evaluate(bundle: Path = typer.Argument(..., help="Critic bundle folder."),
             data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
             out: Path = typer.Option(..., "--out", help="Folder for eval.json, picks.json and the PNGs."),
             split: str = typer.Option("val", help="val (held-out tasks/prompts/questions) | train | all."),
             draws: int = typer.Option(10, help="Groups drawn per tool-call question."),
             set_size: int = typer.Option(4, help="Candidates per drawn tool-call group (the gate's N)."),
             record: bool = typer.Option(False, help="Write the figures and threshold hints into critic.json."),
             ) -> None:
    """Does rank mode pay? The bundle, as served, against the first candidate, a majority vote, the
    longest reply, random and the oracle, with bootstrap 95% intervals; and AUCs per source."""
    from critic_models.evaluate import format_table, run

    result = run(bundle, data, out, split, record, draws, set_size)
    typer.echo(format_table(result))
    typer.echo(f"\nwrote {out / 'eval.json'}, {out / 'picks.json'}, {out / 'picks.png'} and "
               f"{out / 'calibration.png'}")


@app.command()
def score(file: Path = typer.Argument(..., help="Score requests: one JSON object, a JSON list of them, or JSONL "
                                                  "({\"messages\", \"candidates\", \"tools\"?} as POST "
                                                  "/v1/critic/score)."),
          bundle: Path | None = typer.Option(None, "--bundle", help="Critic bundle; default: the configured "
                                                                     "(TURNGATE_CRITIC) or shipped one.")) -> None:
    """Score candidate replies with a critic bundle; prints one JSON line of scores per request."""
    import asyncio

    from service.critic.registry import close_critic, load_critic
    from service.settings import Settings

    text = file.read_text()
    try:
        parsed = json.loads(text)
        requests = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        requests = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, req in enumerate(requests):
        if not isinstance(req, dict) or not req.get("messages") or not req.get("candidates"):
            raise typer.BadParameter(f"request {i}: needs non-empty 'messages' and 'candidates'", param_hint="FILE")
    critic = load_critic(Settings(critic=str(bundle)) if bundle else Settings())
    typer.echo(f"critic: {critic.name} {critic.version} on {critic.provider}", err=True)

    async def score_all() -> list[list[float]]:
        # All at once: the micro-batcher merges them into as few inference runs as fit.
        return await asyncio.gather(*(critic.score(r["messages"], r["candidates"], r.get("tools"))
                                      for r in requests))

    try:
        for scores in asyncio.run(score_all()):
            typer.echo(json.dumps({"scores": [round(s, 6) for s in scores]}))
    finally:
        close_critic(critic)

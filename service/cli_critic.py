"""`turngate critic ...`: train, export, evaluate and score with critic bundles.

Training and export need the `train` extra (torch); they import it inside the command, so the
rest of the CLI and the service never load torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from service.cli_errors import CommandFailed

app = typer.Typer(help="Train, export, evaluate and run the learned critic.", no_args_is_help=True)


DATA_HELP = "Trajectory / best-of-N JSONL files or folders holding them."
DATABASE_URL = typer.Option(None, "--database-url", help="The store; default TURNGATE_DATABASE_URL.")


def _database_url(url: str | None) -> str:
    from service.cli_store import _url

    return _url(url)


def _labelled_turns(url: str | None, labelers: list[str]) -> list:
    from service.store.engine import make_sync_engine
    from service.store.labels import Window, labelled_turns

    engine = make_sync_engine(_database_url(url))
    try:
        return labelled_turns(engine, Window(), labelers)
    finally:
        engine.dispose()


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
def train_head(data: list[Path] = typer.Option([], "--data", help=DATA_HELP + " Tool-call sets and store "
                                                                        "exports (`turngate export`) too."),
               from_store: str | None = typer.Option(None, "--from-store", help="Database URL: train on its logged "
                                                     "candidate groups and their labels (`turngate critic label`), "
                                                     "holding out a slice of conversations for `promote`."),
               labeler: list[str] = typer.Option([], "--labeler", help="With --from-store: only labels whose "
                                                 "labeller starts with this (judge:, veto, outcome, "
                                                 "judge:MODEL@V); repeatable. Default: all."),
               holdout: float = typer.Option(0.2, "--holdout", help="With --from-store: share of conversations "
                                             "held out (by a hash of their id), never trained on."),
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
                                                                   "and updated: a rerun skips the encoder pass."),
               no_encoder: bool = typer.Option(False, "--no-encoder", help="Leave the encoder's logit out: a "
                                               "head of the turn features alone, whose critic never runs the "
                                               "encoder (no encoder pass here either).")
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
    if not data and not from_store:
        raise typer.BadParameter("give --data files, --from-store URL, or both", param_hint="--data")
    extra = held = None
    if from_store:
        from critic_models.store_data import Holdout
        from critic_models.store_data import split as store_split

        if not 0 < holdout < 1:
            raise typer.BadParameter("a share in (0, 1)", param_hint="--holdout")
        rule = Holdout(holdout, seed)
        turns = _labelled_turns(from_store, labeler)
        store_train, store_val, held = store_split(turns, rule)
        if not store_train:
            raise CommandFailed(f"no labelled logged turn with 2+ candidates on the training side ({len(turns)} "
                                "labelled turns in all): label some with `turngate critic label` first")
        extra = (store_train, store_val)
        typer.echo(f"store: {len(store_train)} logged turns to train on, {len(store_val)} held out "
                   f"({len(held)} conversations)", err=True)
    report = run_head(HeadConfig(encoder=str(base), data=[str(p) for p in data], out=str(out), seed=seed,
                                 val_fraction=val_fraction, draws=draws, folds=folds,
                                 fit=FitConfig(pointwise=pointwise, steps=steps), agent_head=agent_head,
                                 logits_cache=str(logits_cache) if logits_cache else None,
                                 without_encoder=no_encoder), extra)
    if from_store and extra is not None and held is not None:
        from critic_models.store_data import write_holdout

        write_holdout(out, rule, held, {"labelers": labeler, "train_turns": len(extra[0]),
                                        "held_out_turns": len(extra[1])})
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


@app.command()
def label(judge_url: str | None = typer.Option(None, "--judge-url", help="The judge: an OpenAI-compatible base URL "
                                               "(…/v1). Without it, only --vetoes and --outcomes are written."),
          judge_model: str | None = typer.Option(None, "--judge-model", help="The judge's model name."),
          judge_key_env: str | None = typer.Option(None, "--judge-key-env", help="Environment variable holding "
                                                   "the judge's API key (none: no key sent)."),
          rubric: str = typer.Option("", "--rubric", help="What the judge checks, beside the built-in instructions."),
          rubric_file: Path | None = typer.Option(None, "--rubric-file", help="Read the rubric from this file."),
          rubric_version: str = typer.Option("1", "--rubric-version", help="Recorded in the labeller's name: "
                                             "judge:MODEL@VERSION; a new version labels every turn again."),
          since: str | None = typer.Option(None, "--since", help="Turns from this ISO date/time or age (7d)."),
          until: str | None = typer.Option(None, "--until", help="Turns before this ISO date/time or age."),
          route: str | None = typer.Option(None, "--route", help="Only turns on this route alias."),
          limit: int | None = typer.Option(None, "--limit", min=1, help="Judge at most this many turns this run."),
          rate: float = typer.Option(2.0, "--rate", min=0, help="Judge requests started per second (0 = no limit)."),
          concurrency: int = typer.Option(4, "--concurrency", min=1, help="Judge requests in flight at most."),
          timeout_s: float = typer.Option(60.0, "--timeout", min=0.1, help="Seconds per judge request."),
          vetoes: bool = typer.Option(True, "--vetoes/--no-vetoes", help="Write structural vetoes as labels "
                                      "(labeller veto, score 0)."),
          outcomes: bool = typer.Option(True, "--outcomes/--no-outcomes", help="Write rewarded turns' chosen "
                                        "candidates as labels (labeller outcome, score = the reward)."),
          database_url: str | None = DATABASE_URL) -> None:
    """Label logged candidates: a teacher judge scores every candidate of each logged turn (one request per
    turn), stored with the judge's name and rubric version. Resumable: turns that judge already labelled
    are skipped, and a turn the judge failed on is left for the next run."""
    import asyncio
    import os
    from datetime import UTC, datetime

    from critic_models import teacher
    from service.cli_store import _when
    from service.store.labels import Window

    url = _database_url(database_url)
    now = datetime.now(UTC)
    window = Window(_when(since, now) if since else None, _when(until, now) if until else None, route)
    if judge_url and not judge_model:
        raise typer.BadParameter("the judge's model name", param_hint="--judge-model")
    if judge_model and not judge_url:
        raise typer.BadParameter("--judge-model needs --judge-url", param_hint="--judge-url")
    if rubric_file is not None:
        rubric = rubric_file.read_text()
    if vetoes or outcomes:
        counts = teacher.label_structural(url, window)
        parts = [f"{counts['veto']} vetoes" if vetoes else "", f"{counts['outcome']} outcomes" if outcomes else ""]
        typer.echo("structural labels: " + ", ".join(p for p in parts if p), err=True)
    if not judge_url or not judge_model:
        return
    key = None
    if judge_key_env:
        key = os.environ.get(judge_key_env)
        if not key:
            raise CommandFailed(f"--judge-key-env {judge_key_env}: that variable is not set")
    judge = teacher.Judge(judge_url, judge_model, key, rubric, rubric_version, timeout_s)
    done = asyncio.run(teacher.label_turns(url, judge, window, limit=limit, rate=rate or None,
                                           concurrency=concurrency, on_progress=teacher.stderr_progress))
    failures = ", ".join(f"{n} {kind}" for kind, n in sorted(done.failures.items()))
    typer.echo(f"{judge.labeler}: labelled {done.labelled} of {done.total} turns"
               + (f"; {done.failed} failed ({failures}): rerun to retry them" if done.failed else ""))


@app.command()
def promote(bundle: Path = typer.Argument(..., help="The new bundle (from `train-head --from-store`)."),
            url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The gateway (any replica)."),
            active: Path | None = typer.Option(None, "--active", help="The active bundle's folder here, when the "
                                               "gateway's path to it is not readable on this machine."),
            min_turns: int = typer.Option(20, "--min-turns", help="Refuse with fewer held-out labelled turns."),
            force: bool = typer.Option(False, "--force", help="Activate even with too few held-out turns "
                                       "(never when the new bundle is worse)."),
            labeler: list[str] = typer.Option([], "--labeler", help="Judge both by these labels (labeller prefixes, "
                                              "as train-head); default: those BUNDLE was trained on."),
            database_url: str | None = DATABASE_URL) -> None:
    """Evaluate BUNDLE and the gateway's active critic on the logged turns BUNDLE's training held out;
    activate BUNDLE on every replica unless it is worse (or the turns are too few)."""
    from critic_models import promotion
    from critic_models.store_data import HOLDOUT_FILE, read_holdout
    from service.cli_routes import _call
    from service.critic.bundle import read_bundle

    read_bundle(bundle)  # a bundle the gateway can load, before anything else
    found = read_holdout(bundle)
    if found is None:
        raise CommandFailed(f"{bundle} has no {HOLDOUT_FILE}, so no logged turns are known to be unseen by it: "
                            "train it with `turngate critic train-head --from-store URL`")
    rule, info = found
    status = _call(url, "GET", "/critic")
    active_path = active or Path(((status.get("critic") or {}).get("bundle") or {}).get("path")
                                 or ((status.get("activation") or {}).get("path")) or "")
    if not str(active_path) or not (active_path / "critic.json").is_file():
        raise CommandFailed(f"the active critic's bundle ({active_path or 'no path given'}) is not readable here: "
                            "pass --active PATH")
    turns = [t for t in _labelled_turns(database_url, labeler or list(info.get("labelers") or []))
             if rule.held(t.conversation_id)]
    turns = promotion.evaluable(turns)
    new_q, active_q = promotion.quality(bundle, turns), promotion.quality(active_path, turns)
    typer.echo(promotion.table(new_q, active_q))
    reason = promotion.worse(new_q, active_q)
    if reason:
        raise CommandFailed(f"not promoted: {bundle} is worse on {len(turns)} held-out turns: {reason}")
    if len(turns) < min_turns and not force:
        raise CommandFailed(f"not promoted: only {len(turns)} held-out labelled turns (--min-turns {min_turns}): "
                            "label more turns, or pass --force")
    done = _call(url, "POST", "/critic/activate", {"path": str(bundle.resolve())})
    critic, previous = done.get("critic") or {}, done.get("previous") or {}
    typer.echo(f"activated {critic.get('name')} {critic.get('version')} on every replica (was "
               f"{previous.get('name')} {previous.get('version')})")

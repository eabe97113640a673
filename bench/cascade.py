"""What a cascade would send to the judge, and how often the encoder alone agrees with the judge.

On the held-out questions of the BFCL tool-call set (the split `turngate critic eval` uses: the
one recorded in the bundle, by question text), each question drawn ``--draws`` times as groups of
``--set-size`` replies exactly as eval draws them, scored by the bundle as eval scores them (the
int8 encoder through onnxruntime, the turn features, the head); and on the held-out τ-bench
airline tasks, each write turn among the same turn's calls in the task's other trials (the
``write-siblings`` groups of critic_models/head_data.py). For each cascade setting of the grid,
service.gate.cascade.doubt (the gate's one rule) decides per group whether the judge is called.

The judge is the data's own labels (BFCL's valid/invalid; for τ-bench writes, whether the call
matches a gold action): a *perfect* judge. No LLM judge is reachable here, so every figure that
involves the judge is an upper bound on what a real one adds. Per setting:

- sent: the share of groups in doubt (before the budget: max_share is not applied, the groups have
  no order in time), and by reason (margin / agreement / write: the first that applies);
- encoder: the mean label of the encoder's pick (the gate's: structural veto first, then the
  highest score); cascade: judged groups take the judge's best, the others the encoder's pick;
  oracle: the judge on every group;
- agree: how often the encoder's pick is among the judge's best, on all groups and on the groups
  the cascade trusts the encoder on (not sent): the number that says whether trusting is safe.

Lone turns (the trajectories, one reply a turn): only on_write can apply; the share of assistant
turns that make a write call is printed per file (all tasks: the share involves no critic), with,
where the task has gold actions, the share of those writes matching none (what a perfect judge
would catch).

    python bench/cascade.py [--data ../shared/data/tool-calls ../shared/data/trajectories]
                            [--bundle critic_models/default] [--logits-cache runs/cascade-logits.json]

Deterministic (seeded draws, no timing): nothing to take a median of.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from critic_models import data, head_data, head_fit
from critic_models.evaluate import Bundle
from service import installed_version
from service.critic.features import TOOL_FEATURES
from service.critic.head import sigmoid
from service.critic.onnx_critic import cpu_description
from service.gate.actions import gold_of, matches_gold, write_calls
from service.gate.cascade import doubt, writes
from service.settings import CascadeSettings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
DATA = [SHARED / "tool-calls", SHARED / "trajectories"]
_AT = {n: i for i, n in enumerate(TOOL_FEATURES)}


@dataclass
class Group:
    """One turn's candidates as the cascade sees them."""

    source: str
    scores: np.ndarray  # the bundle's, as served
    ok: np.ndarray  # passed the structural checks
    agreement: np.ndarray  # call_support of each candidate (nan: a text turn)
    is_text: np.ndarray
    replies: list[dict]  # the candidates' messages
    labels: np.ndarray  # the judge's: 1 valid / gold match, 0 not


def encoder_pick(g: Group) -> int:
    """The gate's pick: the best score among candidates that passed the checks (ties to the earlier)."""
    pickable = np.flatnonzero(g.ok) if g.ok.any() else np.arange(len(g.scores))
    return int(pickable[int(np.argmax(g.scores[pickable]))])


def reason(g: Group, cfg: CascadeSettings) -> str | None:
    """service.gate.cascade.doubt on the candidates the gate could pick."""
    top = encoder_pick(g)
    pickable = np.flatnonzero(g.ok) if g.ok.any() else np.arange(len(g.scores))
    n = len(g.scores)
    agreement = (None if n < 2 or np.isnan(g.agreement[top]) or g.is_text[top] else float(g.agreement[top]))
    return doubt([float(s) for s in g.scores[pickable]], int(np.flatnonzero(pickable == top)[0]), agreement,
                 writes(g.replies[top]), cfg, [g.replies[i] for i in pickable])


def figures(groups: list[Group], cfg: CascadeSettings) -> dict[str, float | int]:
    why = [reason(g, cfg) for g in groups]
    enc = np.array([g.labels[encoder_pick(g)] for g in groups])
    best = np.array([g.labels.max() for g in groups])
    sent = np.array([w is not None for w in why])
    agree = enc == best
    first = np.array([g.labels[0] for g in groups])
    casc = np.where(sent, best, enc)
    mixed = np.array([g.labels.min() < g.labels.max() for g in groups])
    nan = float("nan")
    return {"groups": len(groups), "sent": float(sent.mean()),
            **{f"sent_{r}": float(np.mean([w == r for w in why])) for r in ("margin", "agreement", "write")},
            "encoder": float(enc.mean()), "cascade": float(casc.mean()),
            # against the first candidate (what passthrough returns): right where it was wrong, and the reverse
            "benefit": float(((casc >= 0.5) & (first < 0.5)).mean()),
            "harm": float(((casc < 0.5) & (first >= 0.5)).mean()),
            "oracle": float(best.mean()), "agree": float(agree.mean()),
            "trusted": int((~sent).sum()), "agree_trusted": float(agree[~sent].mean()) if (~sent).any() else nan,
            "mixed_trusted": int((~sent & mixed).sum()),
            "agree_mixed_trusted": float(agree[~sent & mixed].mean()) if (~sent & mixed).any() else nan}


def scored_groups(bundle: Bundle, files: list[Path], draws: int, set_size: int, seed: int, limit: int | None,
                  cache_path: Path | None) -> list[Group]:
    """The held-out groups of critic_models.evaluate.pick_figures, scored as it scores them."""
    sp = bundle.card.get("split") or {"seed": 0, "val_fraction": 0.2}
    _, val = head_data.split(head_data.load_items(files), sp.get("seed", 0), sp.get("val_fraction", 0.2))
    items = [it for it in val if it.sample or it.category == "write-siblings"]
    if limit:
        keep = {src: sorted({it.key for it in items if it.source == src})[:limit] for src in {i.source for i in items}}
        items = [it for it in items if it.key in keep[it.source]]
    cache: dict[str, float] = {}
    encoder_id = bundle.card.get("encoder_version") or bundle.card.get("version")
    if cache_path and cache_path.is_file():
        saved = json.loads(cache_path.read_text())
        cache = saved["logits"] if saved.get("encoder") == encoder_id else {}
    head_data.fill_logits(items, bundle.encoder_scores, cache)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps({"encoder": encoder_id, "logits": cache}))
    if bundle.head is None:
        raise SystemExit("a format-2 bundle (encoder + head) is needed: the cascade reads the served scores")
    out = []
    for g in head_data.groups(items, draws, seed + 1, sizes=(set_size,)):  # eval's draws: seed + 1
        scores = np.array([sigmoid(x) for x in head_fit.logits(bundle.head.linear(g.kind), g.rows)])
        if np.isnan(g.labels).any() or g.kind == "text":
            continue
        out.append(Group(g.source, scores, g.rows[:, _AT["schema_ok"]] > 0.5, g.rows[:, _AT["call_support"]],
                         g.rows[:, _AT["is_text"]] > 0.5, g.replies or [], g.labels))
    return out


def lone_turns(files: list[Path]) -> list[dict[str, object]]:
    """Per trajectory file: assistant turns, the share making a write call, and of those judged
    against gold actions, the share matching none."""
    out: list[dict[str, object]] = []
    for f in files:
        rows = [json.loads(line) for line in f.open() if line.strip()]
        if not rows or "messages" not in rows[0] or "candidates" in rows[0]:
            continue
        turns = wrote = judged = bad = 0
        for row in rows:
            gold = gold_of(row)
            for i, m in enumerate(row["messages"]):
                if m.get("role") != "assistant" or i == 0:
                    continue
                turns += 1
                if writes(m):
                    wrote += 1
                    if gold:
                        judged += 1
                        bad += not all(matches_gold(c, gold) for c in write_calls(m))
        out.append({"file": f.name, "turns": turns, "write_share": wrote / turns if turns else 0.0,
                    "writes_judged": judged, "bad_share": bad / judged if judged else None})
    return out


def grid(margins: list[float], agreements: list[float]) -> list[CascadeSettings]:
    return [CascadeSettings(margin=m, min_agreement=a, on_write=w, max_share=1.0)
            for w, m, a in itertools.product((False, True), margins, agreements)]


def free_picks(groups: list[Group]) -> str:
    """What costs nothing beside the cascade, as critic_models/pick_eval.py defines it: the first
    candidate (passthrough), the majority vote (the most-shared call, ties to the first), the longest
    reply, random (the mean label)."""
    first = np.array([g.labels[0] for g in groups])
    majority = np.array([g.labels[int(np.argmax(np.nan_to_num(g.agreement, nan=0.0)))] for g in groups])
    longest = np.array([g.labels[int(np.argmax([len(json.dumps(r, ensure_ascii=False)) for r in g.replies]))]
                        for g in groups])
    random = np.array([g.labels.mean() for g in groups])
    return (f"free picks on these groups: first {first.mean():.3f}, majority {majority.mean():.3f}, "
            f"longest {longest.mean():.3f}, random {random.mean():.3f}")


def table(groups: list[Group], settings: list[CascadeSettings]) -> str:
    head = ("| margin | min_agreement | on_write | sent | margin / agreement / write | encoder valid | "
            "cascade valid | benefit / harm vs first | oracle | encoder = judge, all | encoder = judge, trusted | "
            "trusted, mixed groups |")
    lines = [head, "|" + "---:|" * 12]
    for cfg in settings:
        f = figures(groups, cfg)
        lines.append(f"| {cfg.margin:g} | {cfg.min_agreement:g} | {'on' if cfg.on_write else 'off'} | "
                     f"{f['sent']:.3f} | {f['sent_margin']:.3f} / {f['sent_agreement']:.3f} / {f['sent_write']:.3f} | "
                     f"{f['encoder']:.3f} | {f['cascade']:.3f} | {f['benefit']:.3f} / {f['harm']:.3f} | "
                     f"{f['oracle']:.3f} | {f['agree']:.3f} | "
                     f"{f['agree_trusted']:.3f} ({f['trusted']}) | {f['agree_mixed_trusted']:.3f} "
                     f"({f['mixed_trusted']}) |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, default=DATA)
    ap.add_argument("--bundle", type=Path, default=ROOT / "critic_models" / "default")
    ap.add_argument("--draws", type=int, default=10, help="groups drawn per question (eval's default)")
    ap.add_argument("--set-size", type=int, default=4, help="candidates per group (the gate's N)")
    ap.add_argument("--seed", type=int, default=0, help="eval's seed (its draws use seed + 1)")
    ap.add_argument("--margins", default="0.05,0.1,0.2")
    ap.add_argument("--agreements", default="0.5,0.75")
    ap.add_argument("--limit", type=int, default=None, help="held-out questions/tasks per file (a quick look)")
    ap.add_argument("--logits-cache", type=Path, default=None, help="JSON file of encoder logits, read and updated")
    args = ap.parse_args(argv)
    started = time.monotonic()
    files = data.data_files(args.data)
    bundle = Bundle.load(args.bundle)
    groups = scored_groups(bundle, files, args.draws, args.set_size, args.seed, args.limit, args.logits_cache)
    settings = grid([float(x) for x in args.margins.split(",")], [float(x) for x in args.agreements.split(",")])
    print("command: python bench/cascade.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {cpu_description()}; Python {platform.python_version()}, onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}, turngate {installed_version()} at {_commit()}")
    print(f"critic: {bundle.card.get('name')} {bundle.card.get('version')} {bundle.card.get('precision')} on "
          f"{bundle.session.get_providers()[0]}; split {bundle.card.get('split')}")
    print("judge: the data's own labels (a perfect judge: an upper bound on what a real one adds); "
          "max_share not applied (no order in time)")
    for source in sorted({g.source for g in groups}):
        sub = [g for g in groups if g.source == source]
        kind = ("write turns among the task's other trials' calls" if "tau" in source
                else f"held-out questions drawn {args.draws} times as {args.set_size} replies")
        mixed = sum(g.labels.min() < g.labels.max() for g in sub)
        print(f"\n{source}: {len(sub)} groups ({kind}; {mixed} with both right and wrong candidates)\n")
        print(free_picks(sub) + "\n")
        print(table(sub, settings))
    print("\nlone turns (one reply a turn: only on_write applies; all tasks)\n")
    print("| file | assistant turns | share a write-only cascade sends | writes vs gold: matching none |")
    print("|---|---:|---:|---:|")
    for r in lone_turns(files):
        bad = "-" if r["bad_share"] is None else f"{r['bad_share']:.3f} of {r['writes_judged']}"
        print(f"| {r['file']} | {r['turns']} | {r['write_share']:.3f} | {bad} |")
    print(f"\n{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Critic inference: the service path against raw onnxruntime (the limit) and torch eager.

For N candidates x T tokens per (context, candidate) pair, side by side in one run, interleaved
rep by rep so that a noisy neighbour hits all three alike:

- service: ``OnnxCritic.score`` (service/critic/onnx_critic.py) from the event loop: tokenization
  in its thread pool, the micro-batcher (its bounded wait included), the run in the inference
  pool, sigmoid, back to the loop;
- raw:     ``session.run`` of the SAME onnxruntime session on the same inputs, pre-tokenized;
- torch:   the same architecture in torch eager (critic_models.model.CrossEncoder with the
  all-MiniLM-L6-v2 weights; the bundle's fine-tuned weights exist only as ONNX, the compute is
  the same), fp32, ``torch.set_num_threads(cores)``. Skipped when torch is not importable.

Then throughput with 16 concurrent turns of 8 candidates: service turns/s against raw runs of
the same turns back to back (one run per turn), and raw runs of the turns merged 8 at a time
(what the batcher does), interleaved round by round.

    python bench/critic.py [--bundle DIR] [--provider cpu|cuda] [--sizes 1,4,8,16]
                           [--lengths 128,256,512] [--seconds 3] [--concurrency 16] [--max-batch 64]
                           [--max-tokens N]
    python bench/critic.py --build-standin DIR --standin-precision fp16   # a bundle for a GPU

With a provider other than the CPU in use, a line first compares it with the CPU on the same bundle
(the encoder's logits, the scores, the picks of 16 turns).

--bundle defaults to the shipped critic_models/default/ when it exists, else a stand-in bundle
is built: all-MiniLM-L6-v2 exported with critic_models/export.py (BERT fusions, int8), an
untrained head, the same compute as the shipped critic. Every pair is exactly T tokens (the
critic's max_length is set to T, the context is longer and cut from the left). The machine may
be shared: say so when reporting, and rerun when a number looks off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.critic import render
from service.critic.bundle import is_bundle
from service.critic.onnx_critic import CPU, CUDA, OnnxCritic, cores, cpu_description
from service.critic.registry import shipped_bundle

WORDS = ["the", "order", "was", "shipped", "to", "customer", "yesterday", "and", "refund", "will", "arrive",
         "within", "five", "business", "days", "please", "confirm", "reservation", "number", "before", "we",
         "cancel", "any", "flight", "segment", "baggage", "policy", "allows", "two", "checked", "bags", "for",
         "gold", "members", "while", "basic", "economy", "passengers", "pay", "each", "bag"]


def text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def turn(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A conversation longer than any T, and n candidates of about 40 words."""
    messages = [{"role": "system", "content": "You are a customer service agent. " + text(60, seed)},
                *[{"role": "user" if i % 2 == 0 else "assistant", "content": text(80, seed * 100 + i)}
                  for i in range(8)]]
    candidates = [{"role": "assistant", "content": text(40, seed * 1000 + k)} for k in range(n)]
    return messages, candidates


def build_standin(out: Path, precision: str = "int8") -> Path:
    """all-MiniLM-L6-v2 as a bundle, the way critic_models/export.py builds the real one: int8 for
    a CPU, fp16 for a GPU. The shipped encoder's fine-tuned fp32 weights are not kept (only its int8
    export), so an fp16 bundle of the shipped critic's compute starts from the base weights; with
    the shipped head.json beside it when there is one, it is served as the shipped bundle is
    (format 2: encoder, features, head)."""
    import tokenizers
    import torch

    from critic_models.export import export_onnx, optimize, quantize_int8
    from critic_models.model import load_pretrained
    from critic_models.train import default_base

    torch.manual_seed(0)
    model = load_pretrained(default_base()).eval()
    tok = tokenizers.Tokenizer.from_file(str(default_base() / "tokenizer.json"))
    sample = render.encode_batch(tok, *turn(2, 0), None, 128)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, sample, out / "raw.onnx")
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    if precision == "int8":
        optimize(out / "raw.onnx", out / "fp32.onnx", heads, hidden, False)
        quantize_int8(out / "fp32.onnx", out / "model.onnx")
        (out / "fp32.onnx").unlink()
    else:
        optimize(out / "raw.onnx", out / "model.onnx", heads, hidden, precision == "fp16")
    (out / "raw.onnx").unlink()
    tok.save(str(out / "tokenizer.json"))
    card = {"name": "minilm-standin", "version": f"base-weights-{precision}",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2", "format": render.FORMAT_VERSION,
            "max_length": 512, "precision": precision}
    shipped = shipped_bundle()
    if shipped is not None and (Path(shipped) / "head.json").is_file():
        shutil.copyfile(Path(shipped) / "head.json", out / "head.json")
        manifest = json.loads((Path(shipped) / "critic.json").read_text())
        card |= {"bundle_format": manifest["bundle_format"], "head": manifest["head"],
                 "max_length": manifest["max_length"]}
    (out / "critic.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def torch_model(provider: str):
    try:
        import torch

        from critic_models.model import load_pretrained
        from critic_models.train import default_base
    except ImportError as e:
        print(f"torch eager: skipped ({e}); install the `train` extra to compare", file=sys.stderr)
        return None, None
    torch.set_num_threads(cores())
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    model = load_pretrained(default_base()).eval().to(device)

    def run(feed):
        with torch.inference_mode():
            args = [torch.from_numpy(feed[k]).to(device) for k in ("input_ids", "attention_mask", "token_type_ids")]
            out = model(*args)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
    return run, device


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def latency_cell(critic: OnnxCritic, torch_run, n: int, length: int, seconds: float,
                       min_reps: int) -> dict:
    """``length``: tokens per pair; the conversations are longer and cut to fit."""
    critic.max_length = length
    cases = [turn(n, seed) for seed in range(8)]
    feeds = [critic.encode(m, c, None) for m, c in cases]
    assert all(f["input_ids"].shape == (n, length) for f in feeds), [f["input_ids"].shape for f in feeds]
    sess = critic.open_session()
    # warm this shape on every path
    await critic.score(*cases[0])
    sess.run(["logits"], feeds[0])
    if torch_run:
        torch_run(feeds[0])
    times: dict[str, list[float]] = {"service": [], "raw": [], "torch": []}
    started, i = time.perf_counter(), 0
    while i < min_reps or (time.perf_counter() - started < seconds and i < 200):
        k = i % len(cases)
        t = time.perf_counter()
        await critic.score(*cases[k])
        times["service"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sess.run(["logits"], feeds[k])
        times["raw"].append(time.perf_counter() - t)
        if torch_run:
            t = time.perf_counter()
            torch_run(feeds[k])
            times["torch"].append(time.perf_counter() - t)
        i += 1
    return {"n": n, "length": length, "reps": i,
            **{f"{p}_{stat}": (1000 * fn(v) if v else None) for p, v in times.items()
               for stat, fn in (("p50", statistics.median), ("p99", lambda s: pct(s, 0.99)))}}


async def throughput(critic: OnnxCritic, n: int, length: int, concurrency: int, rounds: int) -> dict:
    """``rounds`` rounds, each: ``concurrency`` turns at once through the service, the same turns
    through raw onnxruntime one run per turn, then merged into runs as large as the batcher's caps
    allow.
    Interleaved round by round, so that load from elsewhere hits all three alike."""
    critic.max_length = length
    cases = [turn(n, seed) for seed in range(concurrency)]
    feeds = [critic.encode(m, c, None) for m, c in cases]
    sess = critic.open_session()
    group = next((k for k in range(concurrency, 0, -1) if critic.batcher.fits(k * n, length)), 1)
    merged_feeds = [{k: np.concatenate([f[k] for f in feeds[j:j + group]]) for k in feeds[0]}
                    for j in range(0, concurrency, group)]
    spent = {"service": 0.0, "raw": 0.0, "merged": 0.0}
    await asyncio.gather(*(critic.score(*c) for c in cases))  # warm: the merged shapes
    for _ in range(rounds):
        t = time.perf_counter()
        await asyncio.gather(*(critic.score(*c) for c in cases))
        spent["service"] += time.perf_counter() - t
        t = time.perf_counter()
        for f in feeds:
            sess.run(["logits"], f)
        spent["raw"] += time.perf_counter() - t
        t = time.perf_counter()
        for f in merged_feeds:
            sess.run(["logits"], f)
        spent["merged"] += time.perf_counter() - t
    total = concurrency * rounds
    return {"n": n, "length": length, "concurrency": concurrency, "turns": total,
            "service_tps": total / spent["service"], "raw_tps": total / spent["raw"],
            "raw_merged_tps": total / spent["merged"], "merged_turns_per_run": group}


async def parity(critic: OnnxCritic, n: int = 8, turns: int = 16) -> str:
    """The same bundle on the CPU against the provider in use: the encoder's logits, the scores
    the service returns (the head's, which may not read the encoder for every kind of turn) and
    the pick."""
    cpu = OnnxCritic.load(critic.bundle.path, CPU)
    cpu.encoder_unread = frozenset()
    try:
        cpu.max_length = critic.max_length
        cases = [turn(n, 100 + seed) for seed in range(turns)]
        here = [await critic.assess(*c) for c in cases]
        there = [await cpu.assess(*c) for c in cases]
    finally:
        cpu.close()

    def worst(read) -> float:
        return max(abs(read(a) - read(b)) for x, y in zip(here, there) for a, b in zip(x, y))
    logit, score = worst(lambda a: a.features["encoder"]), worst(lambda a: a.score)
    same = sum(int(np.argmax([a.score for a in x]) == np.argmax([a.score for a in y])) for x, y in zip(here, there))
    return (f"{critic.provider} against {CPU} on the same bundle, {turns} turns of {n} at {critic.max_length} "
            f"tokens: largest difference of the encoder's logit {logit:.2e}, of the score {score:.2e}; "
            f"same pick in {same}/{turns}")


def machine() -> str:
    return f"{cpu_description()}, onnxruntime {ort.__version__}, Python {platform.python_version()}"


def fmt(v: float | None, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    return format(v, ".3f") if 0 < v < 0.1 else format(v, spec)  # a tiny model's runs are sub-0.1 ms


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


async def main_async(args) -> None:
    providers = f"{CUDA},{CPU}" if args.provider == "cuda" else CPU
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or shipped_bundle()
        if bundle is None:
            print("no shipped bundle (critic_models/default/critic.json): building a stand-in from "
                  "all-MiniLM-L6-v2 (int8, untrained head)", file=sys.stderr)
            bundle = build_standin(Path(tmp) / "standin")
        elif not is_bundle(bundle):
            sys.exit(f"{bundle}: not a critic bundle")
        critic = OnnxCritic.load(bundle, providers, max_wait_s=args.wait_ms / 1000, max_batch=args.max_batch,
                                 max_tokens=args.max_tokens)
        critic.encoder_unread = frozenset()  # the bench's text turns read the encoder, as tool and agent turns do
        torch_run, torch_device = torch_model(args.provider) if not args.no_torch else (None, None)
        b = critic.bundle
        print(f"# bench/critic.py — {' '.join(sys.argv[1:]) or '(defaults)'}")
        print(f"machine: {machine()}")
        print(f"bundle: {b.path} ({b.name} {b.version}, {b.precision}); provider in use: {critic.provider}; "
              f"batcher wait {args.wait_ms} ms, cap {critic.batcher.max_batch} rows / "
              f"{critic.batcher.max_tokens or 'no'} tokens; torch: {torch_device or 'skipped'}")
        if critic.provider != CPU:
            print(await parity(critic))
        print()
        print("| N | tokens | reps | service p50 | service p99 | raw ORT p50 | raw ORT p99 | torch p50 | torch p99 "
              "| service/raw (p50) | torch/raw (p50) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        # The service cuts every pair to the bundle's max_length, so the row at that length is
        # what any longer turn costs in production; it is added when --lengths lacks it.
        lengths = args.lengths + ([b.max_length] if b.max_length not in args.lengths else [])
        for length in lengths:
            label = f"{length} (bundle max_length)" if length == b.max_length else str(length)
            for n in args.sizes:
                r = await latency_cell(critic, torch_run, n, length, args.seconds, args.min_reps)
                print(f"| {n} | {label} | {r['reps']} | {fmt(r['service_p50'])} | {fmt(r['service_p99'])} "
                      f"| {fmt(r['raw_p50'])} | {fmt(r['raw_p99'])} | {fmt(r['torch_p50'])} | {fmt(r['torch_p99'])} "
                      f"| {ratio(r['service_p50'], r['raw_p50'])} | {ratio(r['torch_p50'], r['raw_p50'])} |",
                      flush=True)
        print("\n(latencies in ms)\n")
        print("| N | tokens | concurrent turns | turns | service turns/s | raw ORT turns/s (one run per turn) "
              "| service/raw | raw ORT turns/s (merged runs) | service/raw merged |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for length in args.throughput_lengths:
            r = await throughput(critic, args.throughput_n, length, args.concurrency, args.rounds)
            print(f"| {r['n']} | {length} | {r['concurrency']} | {r['turns']} | {r['service_tps']:.1f} "
                  f"| {r['raw_tps']:.1f} | {ratio(r['service_tps'], r['raw_tps'])} "
                  f"| {r['raw_merged_tps']:.1f} ({r['merged_turns_per_run']} turns/run) "
                  f"| {ratio(r['service_tps'], r['raw_merged_tps'])} |", flush=True)
        critic.close()


def main(argv: list[str] | None = None) -> None:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=ints, default=[1, 4, 8, 16])
    ap.add_argument("--lengths", type=ints, default=[128, 256, 512])
    ap.add_argument("--seconds", type=float, default=3.0, help="per cell, after --min-reps")
    ap.add_argument("--min-reps", type=int, default=8)
    ap.add_argument("--wait-ms", type=float, default=2.0, help="the batcher's bounded wait")
    ap.add_argument("--max-batch", type=int, default=64, help="the batcher's cap, sequences per run")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="the batcher's cap, padded tokens per run (default: the service's, 2048 on CPU)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="throughput: bursts of --concurrency turns")
    ap.add_argument("--throughput-n", type=int, default=8)
    ap.add_argument("--throughput-lengths", type=ints, default=[128, 256])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--build-standin", type=Path, metavar="DIR",
                    help="write the stand-in bundle (base weights, the shipped head) to DIR and exit")
    ap.add_argument("--standin-precision", choices=["int8", "fp16", "fp32"], default="int8")
    args = ap.parse_args(argv)
    if args.build_standin:
        print(f"wrote {build_standin(args.build_standin, args.standin_precision)}")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

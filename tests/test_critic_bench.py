"""bench/critic.py runs end to end on a tiny bundle and prints every cell it was asked for."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
from pathlib import Path

import pytest

from tests.test_critic_serving_bundles import build_bundle

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "critic.py"


def load_bench(name: str = "critic.py"):
    spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}", BENCH.with_name(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_latency_and_throughput_tables(tmp_path, capsys):
    bundle = build_bundle(tmp_path / "tiny", max_length=40)
    load_bench().main(["--bundle", str(bundle), "--sizes", "1,3", "--lengths", "32,48", "--seconds", "0",
                       "--min-reps", "2", "--concurrency", "4", "--rounds", "1", "--throughput-n", "2",
                       "--throughput-lengths", "32"])
    out = capsys.readouterr().out
    assert "tiny-critic 1" in out and "provider in use: CPUExecutionProvider" in out
    cells = re.findall(r"^\| (\d+) \| (\d+)(?: \(bundle max_length\))? \| (\d+) \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| "
                       r"[\d.]+ \| ([\d.-]+) \|", out,
                       re.MULTILINE)
    assert {(n, t) for n, t, *_ in cells} == {("1", "32"), ("3", "32"), ("1", "48"), ("3", "48"),
                                               ("1", "40"), ("3", "40")}  # + the bundle's own max_length
    assert all(int(reps) >= 2 and float(service) > 0 and float(raw) > 0 for _, _, reps, service, raw, _ in cells)
    assert all(torch_p50 != "-" for *_, torch_p50 in cells)  # torch eager measured beside them
    throughput = re.findall(r"^\| 2 \| 32 \| 4 \| 4 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.MULTILINE)
    assert len(throughput) == 1 and all(float(v) > 0 for v in throughput[0])


def test_profile_prints_operator_shares_and_cost_per_batch(tmp_path, capsys):
    bundle = build_bundle(tmp_path / "tiny", max_length=40)
    load_bench("critic_profile.py").main(["--bundle", str(bundle), "--n", "3", "--tokens", "16", "--lengths", "8,16",
                                          "--batches", "1,4", "--reps", "2"])
    out = capsys.readouterr().out
    shares = [float(s) for s in re.findall(r"^\| \w+ \| ([\d.]+)% \| [\d.e-]+ \|$", out, re.MULTILINE)]
    assert shares and 99.0 <= sum(shares) <= 101.0  # every operator of the run, rounding aside
    cells = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.e-]+) \| ([\d.e-]+) \|$", out, re.MULTILINE)
    assert [(t, b) for t, b, *_ in cells] == [("8", "1"), ("8", "4"), ("16", "1"), ("16", "4")]
    assert all(float(run) > 0 and abs(float(run) / int(b) / float(seq) - 1) < 0.01 for _, b, run, seq in cells)


def test_fp16_standin_is_served_with_the_shipped_head(tmp_path, capsys):
    """The GPU bundle bench/critic.py builds: base weights in fp16, the shipped head beside them."""
    from service.critic.bundle import read_bundle
    from service.critic.onnx_critic import OnnxCritic
    from service.critic.registry import shipped_bundle

    load_bench().main(["--build-standin", str(tmp_path / "fp16"), "--standin-precision", "fp16"])
    critic = OnnxCritic.load(tmp_path / "fp16", "cpu")
    try:
        assert critic.bundle.precision == "fp16" and critic.bundle.head is not None
        assert critic.bundle.max_length == read_bundle(shipped_bundle()).max_length
        tools = [{"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}]
        turn = ([{"role": "user", "content": "Refund order 12?"}],
                [{"role": "assistant", "content": "Done, refunded."},
                 {"role": "assistant", "content": "I cannot help."}], tools)
        served = asyncio.run(critic.assess(*turn))  # the shipped head reads no encoder: not run
        critic.encoder_unread = frozenset()  # the fp16 encoder itself, read as a head that weights it would
        read = asyncio.run(critic.assess(*turn))
        assert len(served) == 2 and all(0 < a.score < 1 and "encoder" not in a.features for a in served)
        assert [a.score for a in read] == [a.score for a in served]
        assert all(math.isfinite(a.features["encoder"]) for a in read)
    finally:
        critic.close()


def test_http_bench_prints_the_service_beside_raw_onnxruntime(tmp_path, capsys):
    bundle = build_bundle(tmp_path / "tiny", max_length=40)
    load_bench("critic_http.py").main(["--bundle", str(bundle), "--n", "3", "--tokens", "32", "--requests", "5",
                                       "--seconds", "0.5", "--concurrency", "2"])
    out = capsys.readouterr().out
    assert "service critic: CPUExecutionProvider" in out
    rows = dict(re.findall(r"^\| (POST /v1/critic/score|raw onnxruntime)[^|]* \| ([\d.]+) \| [\d.]+ \|$", out,
                           re.MULTILINE))
    assert len(rows) == 2 and all(float(v) > 0 for v in rows.values())
    assert re.search(r"2 clients at once for 0.5 s: [\d.]+ requests/s", out)

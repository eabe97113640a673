"""bench/overhead.py and bench/gateways.py run end to end, briefly, and print the added latency
against the upstream's own service time (LiteLLM's rows only where the bench extra is installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.test_critic_unread_encoder import shipped_reading_the_encoder

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_measures_added_latency_against_the_upstreams_service_time(capsys):
    load_bench("overhead").main(["--seconds", "0.5", "--concurrency", "1", "--targets", "direct,pass"])
    out = capsys.readouterr().out
    row = re.search(r"^turngate passthrough\s+1\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+"
                    r"(-?[\d.]+)\s+(-?[\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert row, out
    rps, _, _, added50, added99, st50, _, cpu = map(float, row.groups())
    # 50 ms +- 20% upstream: what the proxy adds is a few ms, not the upstream's time, and not negative.
    assert rps > 0 and 0 < added50 < 25 and added50 <= added99 and cpu > 0
    assert 0 <= st50 < 25  # Server-Timing's upstream is within the upstream's own time


def test_overhead_rank_rows_show_latency_over_the_slowest_candidate_call(capsys):
    load_bench("overhead").main(["--seconds", "0.5", "--concurrency", "1", "--targets", "rank"])
    out = capsys.readouterr().out
    assert "/slowest p50" in out, out
    row = re.search(r"^turngate rank N=4\s+1\s+(\d+)" + r"\s+(-?[\d.]+)" * 9 + r"$", out, re.MULTILINE)
    assert row, out
    p50, p99, cpu, ratio50, ratio99 = (float(row.group(i)) for i in (2, 3, 8, 9, 10))
    # A turn takes at least its slowest call, and with a 2 ms stub critic not twice that.
    assert 1.0 <= ratio50 <= ratio99 and ratio50 < 2.0 and 0 < p50 <= p99 and cpu > 0


def test_overhead_agent_turns_make_the_critic_score_distinct_candidates(capsys, tmp_path, monkeypatch):
    # The plain rank row's four candidates are one reply, scored once; agent turns get replies that
    # differ from call to call (tool calls with other arguments, texts), so the critic scores more
    # rows a turn, each with the agent's conversation before it. The shipped head runs no encoder,
    # so the proxy serves a copy whose tool head weights it.
    monkeypatch.setenv("TURNGATE_CRITIC", str(shipped_reading_the_encoder(tmp_path / "bundle", "tool")))
    load_bench("overhead").main(["--seconds", "1", "--concurrency", "2", "--targets", "rank,rank-agent",
                                 "--shipped-critic", "--tools"])
    out = capsys.readouterr().out
    assert "critic rows/turn" in out, out
    rows = {}
    for name in ("turngate rank N=4", "rank N=4, agent turns"):
        row = re.search("^" + re.escape(name) + r"\s+2\s+(\d+)" + r"\s+(-?[\d.]+)" * 10 + r"$", out, re.MULTILINE)
        assert row, out
        rows[name] = [float(x) for x in row.groups()]
    plain, agent = rows["turngate rank N=4"], rows["rank N=4, agent turns"]
    assert plain[10] == 1.0  # identical candidates: one critic row a turn
    assert 2.0 <= agent[10] <= 4.0  # 4 calls of 7 rotating replies: mostly distinct, never more than 4
    assert agent[7] > plain[7]  # and they cost the proxy more CPU a turn (longer rows, more of them)


def test_overhead_on_postgres_prints_the_store_and_the_databases_cpu_and_drops_its_database(capsys):
    import psycopg

    from tests.test_store_support import PG_ADMIN

    def bench_databases() -> set[str]:
        with psycopg.connect(PG_ADMIN) as conn:
            return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'turngate_bench_%'")}

    before = bench_databases()
    # Rows long enough for the database's work to show in /proc's 10 ms clock ticks.
    load_bench("overhead").main(["--seconds", "1.5", "--concurrency", "16", "--rounds", "2",
                                 "--targets", "pass,pass-norec", "--database", "postgres"])
    out = capsys.readouterr().out
    assert "store: postgres" in out and "db cpu/req ms" in out, out
    row = re.search(r"^turngate passthrough\s+16" + r"\s+(-?[\d.]+)" * 9 + r"$", out, re.MULTILINE)
    assert row, out
    proxy_cpu, db_cpu = float(row.group(8)), float(row.group(9))
    assert proxy_cpu > 0 and db_cpu > 0  # the turns were written to PostgreSQL, whose work is counted apart
    added = re.search(r"^concurrency 16: the store adds (-?\d+)% to the proxy's CPU a request \(.*: (.*)\)$", out,
                      re.MULTILINE)
    assert added and len(added.group(2).split(", ")) == 2, out  # one figure a round, and their median
    assert bench_databases() == before  # its database is gone


def test_gateways_bench_prints_turngate_rows_and_litellm_where_installed(capsys):
    have_litellm = importlib.util.find_spec("litellm") is not None
    targets = "turngate,litellm" if have_litellm else "turngate"
    load_bench("gateways").main(["--seconds", "0.5", "--concurrency", "1", "--rounds", "1", "--targets", targets])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\S+) \| 1 \| (json|sse) \| (\d+) \| ([\d.-]+) \| ([\d.-]+) \| ([\d.]+) \|", out,
                      re.MULTILINE)
    assert {(r[0], r[1]) for r in rows} >= {("turngate", "json"), ("turngate", "sse")}, out
    for name, _, rps, p50, p99, cpu in rows:
        assert int(rps) > 0 and 0 < float(p50) <= float(p99) and float(cpu) > 0, (name, out)
    if have_litellm:
        assert {r[0] for r in rows} == {"turngate", "litellm"}
        assert re.search(r"^\| turngate \| 1 \| json \|.*\| [\d.]+x \| [\d.]+x \|$", out, re.MULTILINE), out
    else:
        pytest.skip("litellm not installed: its rows checked where the bench extra is")

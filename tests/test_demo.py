"""`turngate demo` runs recorded τ-bench turns through the real gate and client."""

from service.demo.run import run_demo


def test_demo_runs_every_turn_and_never_returns_the_broken_candidate():
    lines: list[str] = []
    rows = run_demo(4, print_fn=lines.append)
    assert len(rows) == 4
    assert all(r["decision"] in {"ranked", "all_vetoed"} for r in rows)
    assert not any(r["chosen_synthetic"] for r in rows)  # its arguments are cut-off JSON: vetoed
    assert sum("bad_json" in line for line in lines) == 4

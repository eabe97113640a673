"""bench/ranking_ceiling.py fits its text-statistics rankers on held-out folds and prints them."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "ranking_ceiling.py"
DEFAULT = ROOT / "critic_models" / "default"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_ranking_ceiling", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ranking_sets(n: int) -> list[dict]:
    """Every prompt: the answer laid out as a list wins; it is neither the shortest nor the longest."""
    rows = []
    for i in range(n):
        listed = "\n".join(f"{k}. step {k} of task {i}" for k in range(1, 4))
        prose = " ".join(f"word{j} about task {i}." for j in range(40 + i % 7))
        terse = f"Do task {i}."
        rows.append({"id": f"p{i}", "instruction": f"How do I do task {i}?", "reference": "ref",
                     "candidates": [{"sample": 0, "text": terse, "win_prob_vs_reference": 0.1},
                                    {"sample": 1, "text": listed, "win_prob_vs_reference": 0.9},
                                    {"sample": 2, "text": prose, "win_prob_vs_reference": 0.2}]})
    return rows


def test_fitted_statistics_learn_what_length_misses(tmp_path, capsys):
    path = tmp_path / "bon.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ranking_sets(40)))
    load_bench().main(["--data", str(path), "--bundle", str(tmp_path / "none")])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|$", out, re.MULTILINE))
    assert out.startswith("40 prompts, 5-fold")
    assert float(rows["longest answer"]) == 0.2  # the longer prose
    assert float(rows["best possible"]) == 0.9
    assert float(rows["fitted: log_chars + list_lines"]) == 0.9  # learned on the other folds
    assert float(rows["fitted: log_chars"]) < 0.9  # a length rule picks the shortest or the longest
    assert not any(name.startswith("critic") for name in rows)  # no bundle, no critic row


def test_critic_rows_show_what_its_input_cut_hides(tmp_path, capsys):
    """With a bundle, the longest answer is also measured as the critic sees it: at 20 tokens the
    list and the prose are both cut to the same size, so that ranker can only guess between them."""
    bundle = tmp_path / "short-critic"
    bundle.mkdir()
    shutil.copy(DEFAULT / "tokenizer.json", bundle / "tokenizer.json")
    (bundle / "critic.json").write_text(json.dumps({"max_length": 20, "crossval": {"ranking": {"critic_pick": 0.42}}}))
    path = tmp_path / "bon.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ranking_sets(10)))
    load_bench().main(["--data", str(path), "--bundle", str(bundle)])
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|$", capsys.readouterr().out, re.MULTILINE))
    assert float(rows["longest answer"]) == 0.2
    assert float(rows["longest within the critic's view (20 tokens, 67% of answers cut)"]) == 0.55  # (0.9 + 0.2) / 2
    assert float(rows["critic short-critic (its --folds figure)"]) == 0.42

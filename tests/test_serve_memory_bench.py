"""bench/serve_memory.py starts `turngate serve` on its embedded defaults and prints its memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_memory.py"


def test_bench_prints_the_memory_of_a_ready_server():
    out = subprocess.run([sys.executable, str(BENCH), "--workers", "1", "--repeats", "1"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = re.findall(r"^this\s+1\s+(\d+)\s+(\d+)\s+([\d.]+)$", out, re.MULTILINE)
    assert len(rows) == 1, out
    rss, pss, ready_s = (float(v) for v in rows[0])
    # A Python process with onnxruntime and the app imported holds tens of MB; none holds a GB here.
    assert 50 < pss <= rss < 1000 and 0 < ready_s < 60

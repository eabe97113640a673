"""prometheus-client multiprocess mode for `turngate serve --workers N`.

With several uvicorn workers each process keeps its own counters; a scrape lands on one worker
at random. prometheus-client's multiprocess mode has every worker write its values to files in
PROMETHEUS_MULTIPROC_DIR and the /metrics handler sums them. The directory must be set before the
workers import the metric objects, and must start empty: stale files from an earlier run would be
added to this run's counters.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def for_workers(workers: int) -> AbstractContextManager:
    """Multiprocess mode when there are several workers, or when the operator asked for it."""
    return multiprocess_dir() if workers > 1 or enabled() else nullcontext()


@contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """Set up PROMETHEUS_MULTIPROC_DIR for the worker processes started inside the block.

    An operator-chosen directory (the variable already set, e.g. an emptyDir in Kubernetes) is
    emptied and kept; otherwise a fresh temporary directory is created and removed afterwards.
    """
    preset = os.environ.get(ENV)
    if preset:
        path = Path(preset)
        path.mkdir(parents=True, exist_ok=True)
        wipe(path)
    else:
        path = Path(tempfile.mkdtemp(prefix="turngate-metrics-"))
        os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        if not preset:
            os.environ.pop(ENV, None)
            shutil.rmtree(path, ignore_errors=True)


def wipe(path: Path) -> None:
    """Remove the value files an earlier run left behind."""
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)

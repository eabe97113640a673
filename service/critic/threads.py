"""How many threads the critic takes in this process: onnxruntime's intra-op threads per run, the
runs at once, the tokenizer pool.

`turngate serve --workers N` runs N processes on the same cores. Each one spreading its runs over
every core would oversubscribe the box N times over (N x cores busy threads fighting for cores,
each run slowed by the others' preemption). So a process gets its share, ``cores // N`` (at least
1), unless the operator set the threads (TURNGATE_CRITIC_THREADS,
TURNGATE_CRITIC_TOKENIZER_THREADS). ``turngate serve`` tells its workers N through
TURNGATE_WORKERS; a process started otherwise (plain uvicorn, tests) counts as the only one.

A CPU run takes ``intra_op`` threads; the share left over runs other turns' batches at once
(``runs``): with one thread a run, two cores run two batches side by side instead of splitting each
small run over both (which costs CPU to hand out and join: docs/critic-serving.md, "Cost").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

WORKERS_ENV = "TURNGATE_WORKERS"
TOKENIZER_THREADS = 2  # a turn's tokenizing is short; two threads keep it off one slow turn's back


@dataclass(frozen=True)
class CriticThreads:
    intra_op: int  # threads one onnxruntime run spreads over
    runs: int  # inference runs at once on a CPU
    tokenizer: int  # the tokenizer pool


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def serve_workers(environ: Mapping[str, str] = os.environ) -> int:
    """The worker processes ``turngate serve`` started (1 when unset or not a positive number)."""
    try:
        return max(1, int(environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def plan(cores: int, workers: int = 1, intra_op: int | None = None, tokenizer: int | None = None) -> CriticThreads:
    """The critic's threads in one of ``workers`` processes sharing ``cores``; ``intra_op`` and
    ``tokenizer``: the operator's settings where given (kept as set)."""
    share = max(1, cores // max(1, workers))
    intra = intra_op or share
    return CriticThreads(intra_op=intra, runs=max(1, share // intra),
                         tokenizer=tokenizer or min(TOKENIZER_THREADS, share))

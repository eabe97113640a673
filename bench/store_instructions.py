"""Instructions a turn for each part of the embedded store's work, counted by valgrind's callgrind
(deterministic, whatever the machine's load; bench/store_cpu.py gives the CPU time in the running sink).

    python bench/store_instructions.py [--turns 1000] [--parts encode,keys,rows,prepare,write] [--batch 125]

Each part runs in a process of its own under callgrind over the same passthrough-sized turns
(bench/store_cpu.py's), beside a process that builds the turns and does nothing else; the difference,
divided by the turns, is the part's cost. encode: the journal line (the event loop's share); keys: the
prefix hashes (`thread_keys`); rows: the turn and candidate rows built and fitted by the record
boundary, column by column (in prepare's chunks, GIL_CHUNK turns); prepare: all of a batch's Python
preparation; write: a batch prepared, inserted and committed into SQLite (batches of --batch turns,
125 by default: the writer's batches at a few hundred turns a second; fewer under light load).
Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("encode", "keys", "rows", "prepare", "write")


def run_part(part: str, n: int, batch: int) -> None:
    """In the counted process: build n turns, then do `part` over them ("none": nothing)."""
    sys.path.insert(0, str(ROOT))
    from bench.store_cpu import passthrough_turn
    from service.store import lines
    from service.store.boundary import fit_columns
    from service.store.conversations import ThreadKeys, thread_keys
    from service.store.migrate import upgrade
    from service.store.models import Candidate, Turn
    from service.store.sqlite_batch import SqliteBatchWriter
    from service.store.writer import GIL_CHUNK, LinkCache, candidate_columns, prepare, turn_columns

    # Every process, "none" included, makes the same store: only the part itself differs.
    db = f"{tempfile.mkdtemp(prefix='tg-store-ir-')}/store.db"
    upgrade(f"sqlite:///{db}")
    writer, cache = SqliteBatchWriter(db), LinkCache()
    turns = [passthrough_turn(i) for i in range(n)]
    if part == "encode":
        for t in turns:
            lines.encode_turn(t)
    elif part == "keys":
        for t in turns:
            thread_keys(t)
    elif part == "rows":
        for i in range(0, n, GIL_CHUNK):
            chunk = turns[i:i + GIL_CHUNK]
            keys = [ThreadKeys(None, None, None, None, 0)] * len(chunk)  # the hashes are `keys`'s part
            fit_columns(Turn.__table__, turn_columns(chunk, keys), True)
            fit_columns(Candidate.__table__, candidate_columns(chunk), True)
    elif part == "prepare":
        for i in range(0, n, batch):
            prepare(turns[i:i + batch], True)
    elif part == "write":
        for i in range(0, n, batch):
            writer._write(turns[i:i + batch], cache, set())


def counted(part: str, n: int, batch: int) -> int:
    """Instructions of a whole process doing `part` over n turns."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          __file__, "--run", part, "--turns", str(n), "--batch", str(batch)],
                         capture_output=True, text=True, check=True)
    return int(re.search(r"Collected : ([\d,]+)", out.stderr).group(1).replace(",", ""))  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--batch", type=int, default=125, help="turns a batch (prepare, write)")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # inside the counted process
    args = ap.parse_args()
    if args.run:
        run_part(args.run, args.turns, args.batch)
        return
    base = counted("none", args.turns, args.batch)
    for part in args.parts.split(","):
        cost = (counted(part, args.turns, args.batch) - base) / args.turns
        print(f"{part:<16} {cost:>10,.0f} instructions/turn", flush=True)


if __name__ == "__main__":
    main()

"""How often a scan for foreign journal segments deletes a segment that is being opened: the sink's
threads, reproduced. One thread appends and rotates (the spool's sync task), one claims and replays
foreign segments (each writer iteration), one keeps the GIL busy (the event loop serving requests).
A rotation whose new segment no longer exists right after it has its turns in no file: a kill
loses them.

    python bench/spool_race.py [--seconds 10]

It uses only Spool's interface, so the same command under another checkout's PYTHONPATH measures
that checkout.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

from service.store.spool import Spool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    spool = Spool(tempfile.mkdtemp(prefix="tg-spool-race-"))
    spool.open()
    stop = time.monotonic() + args.seconds

    def scan() -> None:
        while time.monotonic() < stop:
            for reader in spool.claim_foreign():
                reader.done()

    def busy() -> None:
        while time.monotonic() < stop:
            sum(range(1000))

    threads = [threading.Thread(target=scan), threading.Thread(target=busy)]
    for t in threads:
        t.start()
    rotations = deleted = 0
    while time.monotonic() < stop:
        spool.append(b'{"v": 2}\n', keep=True)
        spool.rotate()
        rotations += 1
        current = spool.current
        if current is not None and not current.path.exists():
            deleted += 1
    for t in threads:
        t.join()
    spool.release_all()
    print(f"{rotations} rotations, {deleted} new segments deleted by a scan (their turns in no file)")


if __name__ == "__main__":
    main()

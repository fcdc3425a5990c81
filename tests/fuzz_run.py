"""Running one fuzzed input: a hang deadline, and (with PEFTDECL_FUZZ_STATS) one JSON line per input with its
entry point, outcome, seconds, peak traced memory and the process's peak RSS.

``python tests/fuzz_run.py STATS_DIR [STATS_DIR ...]`` prints the totals of a long run and each escaped exception
with its smallest input.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftdecl.errors import PeftdeclError

HANG_S = float(os.environ.get("PEFTDECL_FUZZ_HANG_S", "20"))
"""An input still running after this many seconds is a hang (the test fails with FuzzHangError)."""


class FuzzHangError(Exception):
    """An input ran past HANG_S seconds."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise FuzzHangError in this (main) thread if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise FuzzHangError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame inside peftdecl or its backends (else the innermost frame)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/peftdecl" in f.filename and "/tests/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    return "?" if frame is None else f"{frame.filename.rsplit('/work/main/', 1)[-1]}:{frame.lineno}"


def run_entry(entry: str, case: tuple, call: Callable[[], Any]) -> None:
    """Run one entry point on one input: return on a result or a PeftdeclError; anything else propagates
    (with PEFTDECL_FUZZ_KEEP_GOING=1 and PEFTDECL_FUZZ_STATS set it is recorded instead, so a long run counts
    every escape rather than stopping at the first)."""
    stats = os.environ.get("PEFTDECL_FUZZ_STATS")
    keep_going = bool(stats) and os.environ.get("PEFTDECL_FUZZ_KEEP_GOING") == "1"
    if stats:
        tracemalloc.start()
    start = time.perf_counter()
    record: dict[str, Any] = {"entry": entry, "outcome": "result"}
    try:
        with deadline(HANG_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except PeftdeclError as exc:
        record["outcome"] = f"PeftdeclError:{type(exc).__name__}"
    except Exception as exc:
        record.update(outcome=f"OTHER:{type(exc).__name__}", where=_where(exc), message=str(exc)[:300])
        record["case"] = repr(case)[:2000]
        if not keep_going:
            raise
    finally:
        record["seconds"] = time.perf_counter() - start
        if stats:
            record["peak_bytes"] = tracemalloc.get_traced_memory()[1]
            record["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak
            tracemalloc.stop()
            Path(stats).mkdir(parents=True, exist_ok=True)
            with open(Path(stats) / f"{entry}-{os.getpid()}.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")


def summary(*folders: str) -> str:
    """Totals of PEFTDECL_FUZZ_STATS folders (several runs add up): inputs, results, clean errors, other
    exceptions, hangs, worst seconds, peak traced memory and peak RSS per entry point, then each escape."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(p for folder in folders for p in Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.setdefault(record["entry"], []).append(record)
    lines = [
        f"{'entry':<14} {'inputs':>7} {'results':>8} {'clean':>7} {'other':>6} {'hangs':>6} {'worst s':>8} "
        f"{'traced MiB':>10} {'max RSS MiB':>11}"
    ]
    for entry, records in sorted(rows.items()):
        clean = sum(r["outcome"].startswith("PeftdeclError") for r in records)
        other = sum(r["outcome"].startswith("OTHER") for r in records)
        results = sum(r["outcome"] == "result" for r in records)
        worst = max(r["seconds"] for r in records)
        hangs = sum(r["outcome"] == "OTHER:FuzzHangError" for r in records)
        peak = max(r["peak_bytes"] for r in records) / 2**20
        rss = max(r.get("max_rss_kib", 0) for r in records) / 2**10
        lines.append(
            f"{entry:<14} {len(records):>7} {results:>8} {clean:>7} {other:>6} {hangs:>6} {worst:>8.3f} "
            f"{peak:>10.1f} {rss:>11.0f}"
        )
    escapes: dict[tuple[str, str], list[dict]] = {}
    for records in rows.values():
        for r in records:
            if r["outcome"].startswith("OTHER"):
                escapes.setdefault((r["outcome"], r.get("where", "?")), []).append(r)
    for (outcome, where), found in sorted(escapes.items(), key=lambda item: -len(item[1])):
        smallest = min(found, key=lambda r: len(r.get("case", "")))
        lines.append(f"{len(found):>6} {outcome} at {where}: {smallest.get('message', '')[:120]}")
        lines.append(f"       e.g. {smallest.get('case')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(*sys.argv[1:]) if len(sys.argv) > 1 else __doc__)

"""The job log's work line: how many subjects a chunk did and the seconds of work (read by benchmarks)."""

from __future__ import annotations

import re

WORK_LINE = "chunk of {n} subject(s) done: {seconds:.3f} s of work"


_WORK_PATTERN = re.compile(r"chunk of (\d+) subject\(s\) done: ([0-9.]+) s of work")


def work_line(n: int, seconds: float) -> str:
    """The line a chunk job logs at its end; :func:`parse_work` reads it back (benchmarks)."""
    return WORK_LINE.format(n=n, seconds=seconds)


def parse_work(text: str) -> tuple[int, float] | None:
    """(subjects, seconds of work) from a chunk job's log, or None when it has no such line."""
    matches = _WORK_PATTERN.findall(text)
    if not matches:
        return None
    n, seconds = matches[-1]
    return int(n), float(seconds)


def failed_in_chunk(subject: str, n: int) -> str:
    """What a failed subject adds to its error: the chunk's other outputs are not kept."""
    return (f"(in a chunk of {n} subject(s): none of them is kept, the next run redoes the chunk; "
            f"fix or exclude {subject} first)")

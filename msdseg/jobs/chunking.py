"""Chunks of subjects: which subjects a resample or infer job does, the same in the DAG and in the job."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from msdseg.errors import ConfigError, DatasetError
from msdseg.jobs.cohort import Cohort, Subject, read_cohort

T = TypeVar("T")


def split(items: Sequence[T], size: int) -> list[list[T]]:
    """Chunk ``k`` = ``items[k*size:(k+1)*size]``."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def auto_size(costs: Sequence[float], target_s: float) -> int:
    """Subjects per job so that each job holds about ``target_s`` of estimated work or more.

    As many chunks as the total fills with ``target_s`` each (at least one), subjects shared out
    evenly: 21 s of work and a 10 s target give 2 chunks of half the subjects, not 10 + 10 + 1.
    """
    if not costs:
        return 1
    chunks = max(1, math.floor(sum(costs) / target_s))
    return max(1, math.ceil(len(costs) / chunks))


def chunk_size(setting: int | str, costs: Sequence[float], target_s: float) -> int:
    """``subjects_per_job`` as configured: a number as it is, ``auto`` from the estimated ``costs``."""
    if setting == "auto":
        return auto_size(costs, target_s)
    size = int(setting)
    if size < 1:
        raise ConfigError(f"subjects_per_job must be at least 1 or 'auto', got {setting!r}; "
                          "set resample.subjects_per_job or infer.subjects_per_job to a positive number or auto.")
    return size


def chunk_name(index: int) -> str:
    """The ``{chunk}`` wildcard of chunk ``index``: zero-padded, so folders list in order."""
    return f"{index:04d}"


@dataclass(frozen=True)
class Chunks:
    """A stage's chunks: their members and which chunk each member is in."""

    members: tuple[tuple[str, ...], ...]
    of: dict[str, str]  # member -> chunk name
    size: int  # members per chunk (the last may hold fewer)

    @classmethod
    def build(cls, names: Sequence[str], size: int) -> Chunks:
        members = tuple(tuple(chunk) for chunk in split(list(names), size))
        return cls(members, {name: chunk_name(k) for k, chunk in enumerate(members) for name in chunk}, size)

    def span(self, chunk: str) -> slice:
        """Where chunk ``chunk``'s members are in the list it was built from."""
        start = int(chunk) * self.size
        return slice(start, start + len(self[chunk]))

    def __getitem__(self, chunk: str) -> tuple[str, ...]:
        index = int(chunk)
        if not 0 <= index < len(self.members):
            raise KeyError(f"no chunk {chunk!r} (there are {len(self.members)})")
        return self.members[index]

    def __len__(self) -> int:
        return len(self.members)

    def names(self) -> list[str]:
        return [chunk_name(k) for k in range(len(self.members))]


def chunk_of(members: Sequence[T], size: int, chunk: str, what: str) -> list[T]:
    """Chunk ``chunk`` of ``members`` in chunks of ``size``: the members :meth:`Chunks.build` gives it."""
    parts = split(members, size)
    index = int(chunk)
    if not 0 <= index < len(parts):
        raise KeyError(f"no chunk {chunk!r} of {what} (there are {len(parts)})")
    return parts[index]


def role_chunk(cohort: Cohort, role: str, size: int, chunk: str) -> list[Subject]:
    """Chunk ``chunk`` of the ``role`` subjects in chunks of ``size``: the members :meth:`Chunks.build` gives it.

    For a job that finds its subjects in manifest.csv itself: its command line then stays short
    for any chunk size (a shell command is one argument of at most 128 KiB on Linux).
    """
    return chunk_of(cohort.role(role), size, chunk, f"the {role} subjects")


def infer_members(cohort: Cohort, fold: int | None, with_test: bool = False) -> list[Subject]:
    """The subjects an inference rule predicts, in order, before they are cut into chunks.

    ``fold``: its validation subjects, then the test list where ``with_test`` (the fold's model
    alone predicts it: one process, one model load for both); None: the test list (infer_test).
    """
    if fold is None:
        return cohort.role("test")
    validation = cohort.validation(fold)
    return validation + cohort.role("test") if with_test else validation


def infer_chunk(
    manifest: str | os.PathLike[str],
    fold: int | None,
    with_test: bool,
    size: int,
    chunk: str,
    first: str,
    count: int,
) -> list[Subject]:
    """The subjects of an inference job, read from ``manifest`` as the DAG did, checked against its plan.

    ``first`` and ``count`` are what the DAG found: a different answer means manifest.csv was
    rewritten since, and the job stops instead of predicting subjects its outputs do not promise.
    """
    what = "the test subjects" if fold is None else f"fold {fold}'s validation subjects"
    if fold is not None and with_test:
        what += " and the test subjects"
    return planned_chunk(infer_members(read_cohort(manifest), fold, with_test), size, chunk, first, count,
                         what, manifest)


def planned_chunk(
    members: Sequence[Subject],
    size: int,
    chunk: str,
    first: str,
    count: int,
    what: str,
    manifest: str | os.PathLike[str],
) -> list[Subject]:
    """:func:`chunk_of`, or a DatasetError naming the fix where it is not the planned ``count`` from ``first``."""
    try:
        found = chunk_of(members, size, chunk, what)
    except KeyError:
        found = []
    if len(found) != count or not found or found[0].subject != first:
        raise DatasetError(
            f"{manifest}: chunk {chunk} of {what} is {len(found)} subject(s) from "
            f"{found[0].subject if found else None}, but the workflow planned {count} from {first}; "
            "manifest.csv changed while the workflow ran: run it again."
        )
    return found

"""Writing files so that a rerun never trusts a half-written one, and reading checked JSON."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from msdseg.errors import DiskFullError

if TYPE_CHECKING:  # for annotations only: reading and resampling images does not need pandas
    import pandas as pd


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A crash, a full disk or an exception leaves no file at ``final`` that a rerun would trust.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes so writers that look at them (".nii.gz") still pick the right format
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as error:
        disk_full = _disk_full(error, final.parent)
        tmp.unlink(missing_ok=True)
        if disk_full:
            raise _disk_full_error(final, "file") from error
        raise


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it replaces ``final`` only on success (the folder
    counterpart of :func:`atomic_path`: a failure leaves no folder at ``final`` that a rerun would trust)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        yield staging
        replace_folder(staging, final)
    except BaseException as error:
        if _disk_full(error, final.parent):
            raise _disk_full_error(final, "folder") from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> bool:
    """Rename ``source`` onto ``destination``; an older ``destination`` is removed only afterwards (and
    put back if the rename fails). Returns whether one was replaced."""
    source, destination = Path(source), Path(destination)
    if not destination.exists():
        os.rename(source, destination)
        return False
    old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
    os.rename(destination, old / destination.name)
    try:
        os.rename(source, destination)
    except OSError:
        os.rename(old / destination.name, destination)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return True


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` came from a full disk: ENOSPC, or a writer's own words (torch: "iostream
    error") while ``folder``'s disk has (almost) no space left."""
    if isinstance(error, KeyboardInterrupt):
        return False
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _nearly_full(folder)


def _disk_full_error(final: Path, what: str) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device while writing {final}: free space on {final.parent} and run again "
        f"(nothing half-written was left; the previous version of the {what}, if any, is intact)",
    )


def _nearly_full(folder: Path, margin_bytes: int = 1 << 20) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < margin_bytes


def write_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a table atomically, without the index; floats in pandas' default format."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a small text file (JSON, a checksum) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_checked_json(path: str | os.PathLike[str], keys: Sequence[str]) -> dict:
    """A JSON file a rule wrote (plan.json), checked for the ``keys`` its reader needs: a file from
    another version fails here, naming the fix, not deep inside a job."""
    import json

    from msdseg.errors import DatasetError

    with open(path) as handle:
        content = json.load(handle)
    missing = [key for key in keys if key not in content]
    if missing:
        raise DatasetError(f"{path}: plan lacks {missing}; delete it so the plan rule writes it again.")
    return content

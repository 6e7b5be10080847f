"""Extract a task archive safely and atomically.

Every member is checked before a byte is written (no absolute paths, no ``..``, no links that
leave the target, no devices), Python's ``filter="data"`` checks again while extracting, and the
result appears at ``destination`` only by a final rename: a failed extraction leaves nothing a
rerun would take for a finished one.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from msdseg import files
from msdseg.errors import ArchiveError

log = logging.getLogger(__name__)


_BLOCK = tarfile.BLOCKSIZE


_MAC_JUNK_PREFIXES = ("._", ".DS_Store")


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # Python >= 3.10.12


def _broken(archive: Path, problem: str) -> ArchiveError:
    return ArchiveError(
        f"{archive}: {problem}. The archive is incomplete or corrupt: delete it and download it "
        "again (a rerun of the workflow fetches and verifies it)."
    )


def _hostile(archive: Path, member: tarfile.TarInfo, problem: str) -> ArchiveError:
    return ArchiveError(
        f"{archive}: member {member.name!r} {problem}; refusing to extract anything. "
        "Use an archive from a trusted source (the official MSD mirror) or repack it."
    )


def _normalized(name: str) -> str:
    """Member name without leading './' and with '.' components collapsed (keeps '..')."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    return "/".join(parts)


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Reject anything that could write outside the target or create special files."""
    symlinks: set[str] = set()
    for member in members:
        name = member.name
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
            raise _hostile(archive, member, "has an absolute path")
        normalized = _normalized(name)
        if ".." in normalized.split("/"):
            raise _hostile(archive, member, "contains a '..' component")
        parents = normalized.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            if "/".join(parents[:depth]) in symlinks:
                raise _hostile(archive, member, "lies below a symbolic link of the archive")
        if member.issym() or member.islnk():
            target = member.linkname
            if target.startswith("/") or not target:
                raise _hostile(archive, member, f"is a link to the absolute path {target!r}")
            # a symlink resolves beside itself, a hard link from the archive root
            base = posixpath.dirname(normalized) if member.issym() else ""
            resolved = posixpath.normpath(posixpath.join(base, target))
            if resolved == ".." or resolved.startswith("../"):
                raise _hostile(archive, member, f"is a link to {target!r}, outside the target folder")
            if member.issym():
                symlinks.add(normalized)
        elif not (member.isfile() or member.isdir()):
            raise _hostile(archive, member, "is a device, FIFO or other special file")


def _check_complete(archive: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> None:
    """An uncompressed tar cut at a header boundary reads as a shorter archive: catch that.

    tarfile stops quietly at a missing header, so compare the end of the last member's data and
    the end-of-archive marker with the file size. Compressed archives fail while decompressing.
    """
    with open(archive, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(_COMPRESSED_MAGIC):
        return
    size = archive.stat().st_size
    for member in members:
        if member.isfile() and member.offset_data + member.size > size:
            raise _broken(archive, f"member {member.name!r} is cut off at byte {size}")
    if tar.offset + _BLOCK > size:
        raise _broken(archive, f"it ends at byte {size} without the end-of-archive marker (truncated)")


def _single_top_folder(names: list[str]) -> str | None:
    """The top-level folder when every member (macOS junk aside) lies inside one."""
    tops: set[str] = set()
    nested = False
    for name in names:
        if not name:
            continue
        first, _, rest = name.partition("/")
        if not rest and first.startswith(_MAC_JUNK_PREFIXES):
            continue
        tops.add(first)
        nested = nested or bool(rest)
    if len(tops) == 1 and nested:
        return tops.pop()
    return None


def safe_extract(archive: Path, destination: Path) -> Path:
    """Extract ``archive`` (tar, tar.gz, tar.bz2, tar.xz) to ``destination`` and return it.

    When the archive holds one top-level folder (``Task04_Hippocampus/``), that folder's content
    becomes ``destination``, so ``destination/dataset.json`` exists. An existing ``destination``
    is replaced only after the new extraction succeeded.
    """
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: not found; download it first (or fix source.archive).")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.errorlevel = 2
                members = tar.getmembers()
                if not members:
                    raise _broken(archive, "it holds no files")
                _check_members(archive, members)
                _check_complete(archive, tar, members)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # Python < 3.10.12 has no filters; the checks above already ran
                    tar.extractall(staging, members=members)
        except _FILTER_ERROR as error:
            raise ArchiveError(
                f"{archive}: rejected by the tar data filter ({error}); refusing to extract it. "
                "Use an archive from a trusted source (the official MSD mirror) or repack it."
            ) from None
        except _READ_ERRORS as error:
            raise _broken(archive, f"cannot be read as a tar archive ({error})") from None

        top = _single_top_folder([_normalized(m.name) for m in members])
        source = staging / top if top and (staging / top).is_dir() else staging
        _replace_dir(source, destination)
        os.utime(destination)  # the tar's 2018 mtime would look older than the archive
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: extracted to %s", archive, destination)
    return destination


def _replace_dir(source: Path, destination: Path) -> None:
    if files.replace_folder(source, destination):
        log.warning("%s: replaced the folder that was there", destination)

"""Fetch a task archive: resumable, retried, verified before anything downstream may trust it.

The transfer streams into ``<destination>.part``; only an archive whose digests match is renamed
onto ``destination``. A ``.part`` left by a failed transfer is resumed with an HTTP Range request;
one that fails verification is deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from msdseg.errors import ChecksumError, DownloadError

log = logging.getLogger(__name__)


CHUNK_BYTES = 1 << 20


_MAX_BACKOFF_S = 60.0


_USER_AGENT = "msdseg-download/1"


class _Retryable(Exception):
    """A failure worth another attempt (network, truncated body, 5xx)."""


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks so multi-GB archives never sit in memory."""
    return _digests(Path(path), [algorithm])[algorithm]


def _digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    """Several digests in one pass over the file."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            for digest in hashes.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def verify_checksum(path: str | os.PathLike[str], *, md5: str | None = None, sha256: str | None = None) -> None:
    """Check a local archive (source.archive) against its digests; never deletes the user's file."""
    expected = {name: value.lower() for name, value in (("md5", md5), ("sha256", sha256)) if value}
    actual = _digests(Path(path), sorted(expected))
    for name, want in expected.items():
        if actual[name] != want:
            raise ChecksumError(
                f"{path}: {name} mismatch: expected {want}, got {actual[name]}. The archive is "
                f"corrupted or not the one you meant: fetch it again, or fix source.{name}."
            )
    log.info("%s: verified %s", path, ", ".join(f"{n} {v}" for n, v in sorted(expected.items())))


def _part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def download(
    url: str,
    destination: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` (http, https or file) to ``destination`` and verify its digests.

    Retries ``retries`` times after the first attempt, waiting ``backoff_s * 2**attempt``, and
    resumes from the bytes already in ``<destination>.part``. Raises :class:`DownloadError` when
    the transfer cannot be completed (the ``.part`` is kept for a later resume) and
    :class:`ChecksumError` when the bytes are not the expected ones (the ``.part`` is deleted).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(destination)
    expected = {name: value.lower() for name, value in (("md5", md5), ("sha256", sha256)) if value}

    attempts = retries + 1
    for attempt in range(attempts):
        try:
            _transfer(url, part, timeout_s=timeout_s, progress=progress, label=destination.name)
            break
        except _Retryable as error:
            if attempt + 1 >= attempts:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: gave up after {attempts} attempt(s), last error: {error}. "
                    f"{kept} bytes are kept in {part}; run again to resume, or set source.url "
                    "to a mirror (source.retries sets the number of attempts)."
                ) from error
            wait = min(backoff_s * 2**attempt, _MAX_BACKOFF_S)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", url, error, wait, attempt + 2, attempts)
            time.sleep(wait)

    _verify(url, part, expected)
    os.replace(part, destination)
    log.info("%s: saved as %s", url, destination)
    return destination


def download_task(source: dict[str, str | None], destination: Path, retries: int = 5,
                  demo_files: list[str] | tuple[str, ...] = ()) -> Path:
    """Rule download: the task's archive from ``source`` (url, md5, sha256), verified.

    ``demo_files`` (the generated demo's ``.tar`` and its ``.md5``) replace the source by a
    ``file://`` URL, so the demo goes through the same transfer and verification as a real task.
    """
    source = dict(source)
    if demo_files:
        archive = next(path for path in demo_files if path.endswith(".tar"))
        md5_file = next(path for path in demo_files if path.endswith(".md5"))
        source["url"] = Path(archive).resolve().as_uri()
        source["md5"] = Path(md5_file).read_text().strip()
    return download(str(source["url"]), Path(destination), md5=source.get("md5"), sha256=source.get("sha256"),
                    retries=retries)


def _verify(url: str, part: Path, expected: dict[str, str]) -> None:
    """Compare digests; a mismatch deletes the ``.part`` so no rerun ever trusts it."""
    actual = _digests(part, sorted({"sha256", *expected}))
    for name, want in expected.items():
        if actual[name] != want:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{url}: {name} mismatch: expected {want}, got {actual[name]} "
                f"(the partial file {part} was deleted). Run again to download afresh; if it "
                f"fails the same way the mirror serves a different or corrupted file: use another "
                f"source.url, or, if the file changed on purpose, update source.{name}."
            )
    if expected:
        log.info("%s: verified %s", url, ", ".join(f"{n} {v}" for n, v in sorted(expected.items())))
    else:
        log.warning(
            "%s: no checksum given, the archive is not verified. Its sha256 is %s; "
            "pin it with source.sha256: %s",
            url,
            actual["sha256"],
            actual["sha256"],
        )


def _transfer(url: str, part: Path, *, timeout_s: float, progress: bool, label: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        _copy_local(url, part, progress=progress, label=label)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, timeout_s=timeout_s, progress=progress, label=label)
    else:
        raise DownloadError(
            f"{url}: unsupported URL scheme {scheme!r}; use http://, https:// or file:// "
            "(or set source.archive to a local file)."
        )


def _copy_local(url: str, part: Path, *, progress: bool, label: str) -> None:
    """file:// URL: copy, resuming from the ``.part`` like an HTTP Range request would."""
    parsed = urllib.parse.urlsplit(url)
    source = Path(urllib.request.url2pathname(parsed.path))
    if not source.is_file():
        raise DownloadError(f"{url}: {source} does not exist or is not a file; fix source.url.")
    total = source.stat().st_size
    offset = part.stat().st_size if part.exists() else 0
    if offset > total:
        offset = 0
    with open(source, "rb") as reader, open(part, "ab" if offset else "wb") as writer:
        reader.seek(offset)
        with _bar(total, offset, progress, label) as bar:
            while chunk := reader.read(CHUNK_BYTES):
                writer.write(chunk)
                bar.update(len(chunk))


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _fetch_http(url: str, part: Path, *, timeout_s: float, progress: bool, label: str) -> None:
    """One attempt: request the missing bytes and append them; raise _Retryable when short."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            match = _UNSATISFIED_RANGE.match(error.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                log.info("%s: %s already holds all %d bytes", url, part, offset)
                return
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 for a resume from byte {offset}; starting over") from None
        if error.code >= 500:
            raise _Retryable(f"HTTP {error.code} {error.reason}") from None
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason}. Check the URL (source.url) and that "
            "the file is public; a 4xx status is not retried."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Retryable(f"cannot connect: {getattr(error, 'reason', error)}") from None

    with response:
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"the server answered the resume from byte {offset} with a different range")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
            log.info("%s: resuming at byte %d", url, offset)
        else:
            if offset:
                log.info("%s: the server ignored the resume request (HTTP %d); starting over", url, status)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"

        received = offset
        with open(part, mode) as writer, _bar(total, offset, progress, label) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    writer.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise _Retryable(f"connection lost after {received} bytes ({error})") from None
    if total is not None and received < total:
        raise _Retryable(f"the server closed the connection after {received} of {total} bytes")


def _bar(total: int | None, initial: int, progress: bool, label: str) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
        leave=False,
    )

"""download(): real transfers over a loopback HTTP server and file:// URLs."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from pathlib import Path

import pytest

from loopback import LoopbackServer
from msdseg.data.download import download, file_digest
from msdseg.errors import ChecksumError, DownloadError

FAST = {"backoff_s": 0.01, "timeout_s": 10.0, "progress": False}


def _sums(shared_data: Path, name: str) -> dict[str, str]:
    result = {}
    for line in (shared_data / name).read_text().splitlines():
        digest, file = line.split()
        result[file.lstrip("*")] = digest
    return result


@pytest.fixture(scope="module")
def hippocampus_digests(shared_data: Path) -> dict[str, str]:
    name = "Task04_Hippocampus.tar"
    return {"md5": _sums(shared_data, "MD5SUMS")[name], "sha256": _sums(shared_data, "SHA256SUMS")[name]}


def test_file_digest_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    payload = bytes(range(256)) * 9000  # spans several read chunks
    path.write_bytes(payload)
    assert file_digest(path, "md5") == hashlib.md5(payload).hexdigest()
    assert file_digest(path) == hashlib.sha256(payload).hexdigest()


def test_http_download_verifies_md5_and_sha256(
    http_server: LoopbackServer, hippocampus_tar: Path, hippocampus_digests: dict[str, str], tmp_path: Path
) -> None:
    destination = tmp_path / "out" / "Task04_Hippocampus.tar"
    result = download(http_server.url_for(hippocampus_tar), destination, **hippocampus_digests, **FAST)
    assert result == destination
    assert file_digest(destination, "sha256") == hippocampus_digests["sha256"]
    assert not destination.with_name(destination.name + ".part").exists()
    assert [(r.range, r.status) for r in http_server.requests] == [(None, 200)]


def test_file_url(hippocampus_tar: Path, hippocampus_digests: dict[str, str], tmp_path: Path) -> None:
    destination = tmp_path / "copy.tar"
    download(hippocampus_tar.as_uri(), destination, md5=hippocampus_digests["md5"], **FAST)
    assert file_digest(destination, "md5") == hippocampus_digests["md5"]


def test_file_url_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tar"
    with pytest.raises(DownloadError, match="nowhere.tar"):
        download(missing.as_uri(), tmp_path / "out.tar", **FAST)


def test_wrong_checksum_leaves_nothing(http_server: LoopbackServer, tmp_path: Path) -> None:
    payload = b"not the archive you expected\n" * 1000
    (http_server.root / "task.tar").write_bytes(payload)
    destination = tmp_path / "task.tar"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as caught:
        download(http_server.url_for("task.tar"), destination, md5=wrong, **FAST)
    message = str(caught.value)
    assert wrong in message and hashlib.md5(payload).hexdigest() in message
    assert http_server.url_for("task.tar") in message and "source.md5" in message
    assert not destination.exists()
    assert not destination.with_name("task.tar.part").exists()


def test_cut_transfer_is_resumed_with_range(
    http_server: LoopbackServer, hippocampus_tar: Path, hippocampus_digests: dict[str, str], tmp_path: Path
) -> None:
    http_server.cut_after(5_000_000, requests=1)
    destination = tmp_path / "Task04_Hippocampus.tar"
    download(http_server.url_for(hippocampus_tar), destination, retries=2, **hippocampus_digests, **FAST)
    first, second = http_server.requests
    assert (first.range, first.bytes_sent) == (None, 5_000_000)
    assert (second.range, second.status) == ("bytes=5000000-", 206)
    assert file_digest(destination, "md5") == hippocampus_digests["md5"]


def test_truncated_beyond_retries_keeps_part_then_resumes(
    http_server: LoopbackServer, hippocampus_tar: Path, hippocampus_digests: dict[str, str], tmp_path: Path
) -> None:
    http_server.cut_after(1_000_000, requests=100)
    url = http_server.url_for(hippocampus_tar)
    destination = tmp_path / "Task04_Hippocampus.tar"
    part = tmp_path / "Task04_Hippocampus.tar.part"
    with pytest.raises(DownloadError) as caught:
        download(url, destination, retries=2, **hippocampus_digests, **FAST)
    assert url in str(caught.value) and "3 attempt" in str(caught.value)
    assert not destination.exists()
    assert part.stat().st_size == 3_000_000  # each attempt resumed and added 1 MB

    http_server.cut_after(0, requests=0)
    download(url, destination, **hippocampus_digests, **FAST)
    assert http_server.requests[-1].range == "bytes=3000000-"
    assert file_digest(destination, "sha256") == hippocampus_digests["sha256"]
    assert not part.exists()


def test_404_fails_at_once(http_server: LoopbackServer, tmp_path: Path) -> None:
    url = http_server.url_for("missing.tar")
    with pytest.raises(DownloadError) as caught:
        download(url, tmp_path / "missing.tar", retries=3, **FAST)
    assert "404" in str(caught.value) and url in str(caught.value)
    assert len(http_server.requests) == 1


def test_5xx_is_retried(http_server: LoopbackServer, tmp_path: Path) -> None:
    payload = b"x" * 10_000
    (http_server.root / "a.tar").write_bytes(payload)
    http_server.fail_with(503, requests=2)
    destination = download(
        http_server.url_for("a.tar"), tmp_path / "a.tar", md5=hashlib.md5(payload).hexdigest(), retries=3, **FAST
    )
    assert destination.read_bytes() == payload
    assert [r.status for r in http_server.requests] == [503, 503, 200]


def test_server_ignoring_range_starts_over(http_server: LoopbackServer, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400
    (http_server.root / "a.tar").write_bytes(payload)
    (tmp_path / "a.tar.part").write_bytes(b"garbage that must not survive")
    http_server.ignore_range = True
    download(http_server.url_for("a.tar"), tmp_path / "a.tar", sha256=hashlib.sha256(payload).hexdigest(), **FAST)
    assert (tmp_path / "a.tar").read_bytes() == payload
    assert http_server.requests[0].range == "bytes=29-"


def test_complete_part_answered_416_is_verified(http_server: LoopbackServer, tmp_path: Path) -> None:
    payload = b"complete archive" * 100
    (http_server.root / "a.tar").write_bytes(payload)
    (tmp_path / "a.tar.part").write_bytes(payload)
    download(http_server.url_for("a.tar"), tmp_path / "a.tar", md5=hashlib.md5(payload).hexdigest(), **FAST)
    assert (tmp_path / "a.tar").read_bytes() == payload
    assert [r.status for r in http_server.requests] == [416]


def test_no_digest_logs_sha256(
    http_server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payload = b"unpinned"
    (http_server.root / "a.tar").write_bytes(payload)
    with caplog.at_level(logging.WARNING, logger="msdseg.data.download"):
        download(http_server.url_for("a.tar"), tmp_path / "a.tar", **FAST)
    assert hashlib.sha256(payload).hexdigest() in caplog.text


def test_connection_refused_exhausts_retries(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="2 attempt"):
        download(f"http://127.0.0.1:{port}/a.tar", tmp_path / "a.tar", retries=1, **FAST)


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="ftp"):
        download("ftp://example.org/a.tar", tmp_path / "a.tar", **FAST)


def test_served_folder_file(http_server: LoopbackServer, hippocampus_tar: Path, tmp_path: Path) -> None:
    """url_for also serves files copied under the server's root (relative paths)."""
    shutil.copyfile(hippocampus_tar, http_server.root / "sub.tar")
    download(http_server.url_for("sub.tar"), tmp_path / "sub.tar", **FAST)
    assert (tmp_path / "sub.tar").stat().st_size == hippocampus_tar.stat().st_size


def test_verify_checksum_of_a_local_archive_names_both_digests_and_keeps_the_file(tmp_path):
    from msdseg.data.download import verify_checksum
    from msdseg.errors import ChecksumError

    archive = tmp_path / "mine.tar"
    archive.write_bytes(b"not what you expected")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    verify_checksum(archive, md5=md5)
    with pytest.raises(ChecksumError) as error:
        verify_checksum(archive, md5="0" * 32)
    assert "0" * 32 in str(error.value) and md5 in str(error.value)
    assert archive.exists()

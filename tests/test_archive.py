"""safe_extract(): the real archive, hostile members, broken files; nothing half-written."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from msdseg.data.archive import safe_extract
from msdseg.errors import ArchiveError


def _member(name: str, *, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_tar(path: Path, members: list[tuple], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A folder with a sentinel sibling: hostile members aim at ../sentinel/."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    return tmp_path


def _assert_nothing_written(workspace: Path, archive: Path) -> None:
    assert sorted(p.name for p in (workspace / "sentinel").iterdir()) == ["keep.txt"]
    # only the archive and the sentinel: no destination, no leftover staging folder
    assert sorted(p.name for p in workspace.iterdir()) == sorted([archive.name, "sentinel"])


def test_real_hippocampus_extracts_with_dataset_json(hippocampus_dir: Path) -> None:
    assert (hippocampus_dir / "dataset.json").is_file()
    images = [p for p in (hippocampus_dir / "imagesTr").iterdir() if not p.name.startswith("._")]
    assert len(images) == 200
    assert len(list((hippocampus_dir / "imagesTs").glob("hippocampus_*.nii.gz"))) == 10
    assert not list(hippocampus_dir.parent.glob(".*.part"))


def test_archive_without_directory_entries(liver_ct_tar: Path, tmp_path: Path) -> None:
    """Task90 lists files only (no 'Task90_LiverCT/' entry); the top folder is still unwrapped."""
    out = safe_extract(liver_ct_tar, tmp_path / "liver")
    assert (out / "dataset.json").is_file() and (out / "imagesTr" / "liverct_001.nii.gz").is_file()


HOSTILE = {
    "dotdot": [_member("Task/ok.txt", data=b"ok"), _member("../sentinel/pwned.txt", data=b"x")],
    "dotdot_nested": [_member("Task/imagesTr/../../../sentinel/pwned.txt", data=b"x")],
    "absolute": [_member("/tmp/msdseg-pwned.txt", data=b"x")],
    "symlink_out": [_member("Task/evil", kind=tarfile.SYMTYPE, link="../../sentinel")],
    "symlink_absolute": [_member("Task/evil", kind=tarfile.SYMTYPE, link="/etc")],
    "hardlink_out": [_member("Task/evil", kind=tarfile.LNKTYPE, link="../sentinel/keep.txt")],
    "through_symlink": [
        _member("Task/sub/ok.txt", data=b"ok"),
        _member("Task/evil", kind=tarfile.SYMTYPE, link="sub"),
        _member("Task/evil/pwned.txt", data=b"x"),
    ],
    "fifo": [_member("Task/pipe", kind=tarfile.FIFOTYPE)],
    "device": [_member("Task/dev", kind=tarfile.CHRTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_rejected(case: str, workspace: Path) -> None:
    archive = _write_tar(workspace / f"{case}.tar", HOSTILE[case])
    bad_name = HOSTILE[case][-1][0].name
    with pytest.raises(ArchiveError) as caught:
        safe_extract(archive, workspace / "out")
    assert bad_name in str(caught.value) and str(archive) in str(caught.value)
    _assert_nothing_written(workspace, archive)


def test_links_inside_the_target_are_fine(tmp_path: Path) -> None:
    archive = _write_tar(
        tmp_path / "ok.tar",
        [
            _member("Task/imagesTr/a.nii.gz", data=b"a"),
            _member("Task/latest", kind=tarfile.SYMTYPE, link="imagesTr/a.nii.gz"),
            _member("Task/copy.nii.gz", kind=tarfile.LNKTYPE, link="Task/imagesTr/a.nii.gz"),
        ],
    )
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "latest").read_bytes() == b"a" and (out / "copy.nii.gz").read_bytes() == b"a"


@pytest.mark.parametrize("where", ["inside_data", "at_a_header"])
def test_truncated_tar(where: str, hippocampus_tar: Path, workspace: Path) -> None:
    """A cut at a member header reads as a valid shorter archive to tarfile: it must still fail."""
    if where == "inside_data":
        cut = 7_000_123
    else:
        with tarfile.open(hippocampus_tar) as tar:
            members = tar.getmembers()
        cut = members[len(members) // 2].offset
    archive = workspace / "Task04_Hippocampus.tar"
    with open(hippocampus_tar, "rb") as source:
        archive.write_bytes(source.read(cut))
    with pytest.raises(ArchiveError) as caught:
        safe_extract(archive, workspace / "out")
    assert str(archive) in str(caught.value) and "download it again" in str(caught.value)
    _assert_nothing_written(workspace, archive)


def test_truncated_tar_gz(workspace: Path) -> None:
    full = _write_tar(workspace / "full.tar.gz", [_member("Task/a.bin", data=bytes(range(256)) * 4000)], "w:gz")
    archive = workspace / "cut.tar.gz"
    archive.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    with pytest.raises(ArchiveError, match="cut.tar.gz"):
        safe_extract(archive, workspace / "out")
    _assert_nothing_written(workspace, archive)


def test_not_a_tar(workspace: Path) -> None:
    archive = workspace / "Task04_Hippocampus.tar"
    archive.write_text("<html><body>403 Forbidden</body></html>\n")
    with pytest.raises(ArchiveError) as caught:
        safe_extract(archive, workspace / "out")
    assert str(archive) in str(caught.value) and "delete it" in str(caught.value)
    _assert_nothing_written(workspace, archive)


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not found"):
        safe_extract(tmp_path / "absent.tar", tmp_path / "out")


def test_existing_destination_is_replaced(tmp_path: Path) -> None:
    archive = _write_tar(tmp_path / "t.tar", [_member("Task/dataset.json", data=b"{}")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    safe_extract(archive, out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.tar"]


def test_several_top_level_entries_are_kept_as_is(tmp_path: Path) -> None:
    archive = _write_tar(
        tmp_path / "t.tar", [_member("dataset.json", data=b"{}"), _member("imagesTr/a.nii.gz", data=b"a")]
    )
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "dataset.json").is_file() and (out / "imagesTr" / "a.nii.gz").is_file()


def test_top_level_mac_junk_does_not_hide_the_task_folder(tmp_path: Path) -> None:
    archive = _write_tar(
        tmp_path / "t.tar", [_member("._Task", data=b"junk"), _member("Task/dataset.json", data=b"{}")]
    )
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "dataset.json").is_file()
    shutil.rmtree(out)

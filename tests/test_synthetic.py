"""The demo task: reproducible bytes, a real Decathlon layout, CT-like geometry and labels."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from msdseg.data.synthetic import make_synthetic_task
from msdseg.decathlon import SYNTHETIC_TASK, read_dataset_json


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = make_synthetic_task(tmp_path / "a.tar", n_train=2, n_test=1, seed=3)
    second = make_synthetic_task(tmp_path / "b.tar", n_train=2, n_test=1, seed=3)
    other = make_synthetic_task(tmp_path / "c.tar", n_train=2, n_test=1, seed=4)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first == second == hashlib.md5((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar", "c.tar"]  # no temporaries


def test_tar_layout_and_fixed_metadata(tmp_path: Path) -> None:
    archive = tmp_path / "t.tar"
    make_synthetic_task(archive, n_train=2, n_test=1)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        gz_headers = {m.name: tar.extractfile(m).read(10) for m in members if m.name.endswith(".nii.gz")}
    assert names[0] == SYNTHETIC_TASK and all(n.startswith(f"{SYNTHETIC_TASK}/") for n in names[1:])
    assert names == sorted(names)
    assert f"{SYNTHETIC_TASK}/imagesTs" in names and f"{SYNTHETIC_TASK}/imagesTs/liver_003.nii.gz" in names
    assert f"{SYNTHETIC_TASK}/imagesTr/._liver_001.nii.gz" in names
    assert f"{SYNTHETIC_TASK}/labelsTr/._liver_001.nii.gz" in names
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(946684800, 0, 0, "")}
    for name, header in gz_headers.items():
        if "/._" in name:
            assert header[:2] != b"\x1f\x8b"  # AppleDouble junk, not an image
        else:
            assert header[:2] == b"\x1f\x8b" and header[4:8] == bytes(4), name  # gzip mtime 0


def test_round_trip_geometry_and_labels(synthetic_dir: Path) -> None:
    info = read_dataset_json(synthetic_dir)
    assert info.labels == {0: "background", 1: "liver", 2: "cancer"} and info.modality == {0: "CT"}
    assert len(info.training) == 4 and len(info.test) == 1
    assert not [s for s in info.subjects if s.subject.startswith("._")]

    shapes, origins, seen_labels = set(), set(), set()
    for subject in info.subjects:
        image = sitk.ReadImage(str(subject.image))
        assert image.GetPixelID() == sitk.sitkInt16
        assert np.allclose(image.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-5)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        assert not np.allclose(direction, np.eye(3), atol=1e-3)
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-5)
        size = image.GetSize()
        assert 56 <= size[0] <= 72 and 56 <= size[1] <= 72 and 20 <= size[2] <= 28
        shapes.add(size)
        origins.add(tuple(np.round(image.GetOrigin(), 3)))

        # nibabel (RAS) and SimpleITK (LPS) read the same geometry
        affine = nib.load(subject.image).affine
        lps = np.diag([-1.0, -1.0, 1.0])
        assert np.allclose(lps @ affine[:3, 3], image.GetOrigin(), atol=1e-3)
        assert np.allclose(lps @ affine[:3, :3], direction @ np.diag(image.GetSpacing()), atol=1e-4)

        pixels = sitk.GetArrayFromImage(image)
        assert pixels.min() <= -900 and 0 < np.median(pixels[pixels > -500]) < 120
        if subject.label is None:
            continue
        label = sitk.ReadImage(str(subject.label))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label.GetSize() == image.GetSize()
        assert label.GetOrigin() == image.GetOrigin()
        assert label.GetSpacing() == image.GetSpacing()
        assert label.GetDirection() == image.GetDirection()
        values = np.unique(sitk.GetArrayFromImage(label))
        assert 1 in values and set(values) <= {0, 1, 2}
        seen_labels |= set(values.tolist())
    assert seen_labels == {0, 1, 2}
    assert len(shapes) > 1 and len(origins) == len(info.subjects)

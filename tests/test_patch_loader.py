"""The preprocessed store and the patch loader: what is stored, what is refused, what a patch is."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from msdseg.data import preprocessed as store
from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import IMAGE, subjects_from_paths
from msdseg.errors import DiskFullError, SubjectError
from msdseg.train.patch_augmentation import (
    GAMMA_P,
    LOG_GAMMA,
    PatchAugmentation,
    affine_grid,
    rotation,
    sample_patch,
)
from msdseg.train.patches import PatchStream, make_patch_loader

PLAN = {"normalization": "zscore", "labels": {"0": "background", "1": "a", "2": "b"}, "n_channels": 1}
NO_AUGMENTATION = {"flip": False, "flip_axes": [0, 1, 2], "affine": False, "elastic": False, "bias_field": False,
                   "gamma": False, "noise": False}
ALL_AUGMENTATION = {**NO_AUGMENTATION, "flip": True, "affine": True, "gamma": True, "noise": True}


def _subject(folder: Path, k: int, shape: tuple[int, int, int] = (40, 44, 30)) -> dict[str, str]:
    """A volume with a zero border (so the crop shows) and two small labelled blocks."""
    rng = np.random.default_rng(k)
    image = np.zeros(shape, np.float32)
    image[4:-4, 6:-6, 3:-3] = rng.normal(100, 20, (shape[0] - 8, shape[1] - 12, shape[2] - 6))
    label = np.zeros(shape, np.uint8)
    label[10:14, 12:18, 8:12] = 1
    label[20:23, 25:30, 15:19] = 2
    image_path, label_path = folder / f"s{k}.nii.gz", folder / f"s{k}_label.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), image_path)
    nib.save(nib.Nifti1Image(label, np.eye(4)), label_path)
    return {"subject": f"s{k}", "image": str(image_path), "label": str(label_path)}


@pytest.fixture
def prepared(tmp_path: Path) -> list[dict[str, Any]]:
    rows = [_subject(tmp_path, k) for k in range(3)]
    return store.preprocess_subjects(rows, PLAN, tmp_path / "pre")


def _train(**changes: Any) -> dict[str, Any]:
    return {"patch_size": [16, 16, 8], "sampler": "label", "label_probabilities": None, "samples_per_volume": 2,
            "queue_length": 4, "augmentation": ALL_AUGMENTATION, **changes}


def test_stored_arrays_are_the_normalised_volume_cropped_to_its_nonzero_box(prepared: list[dict[str, Any]]) -> None:
    row = prepared[0]
    subject = store.open_subject(row["preprocessed"], store.plan_hash(PLAN))
    whole = preprocessing(PLAN)(subjects_from_paths([row])[0])[IMAGE].data.numpy()
    np.testing.assert_array_equal(subject.image, whole[:, 4:-4, 6:-6, 3:-3])  # normalised whole, then cropped
    label = np.asarray(nib.load(row["label"]).dataobj)[4:-4, 6:-6, 3:-3]
    np.testing.assert_array_equal(subject.label, label)
    assert subject.counts == {"0": int((label == 0).sum()), "1": 96, "2": 60}
    for value in ("1", "2"):
        coordinates = subject.locations[value]
        assert len(coordinates) == subject.counts[value]
        assert (label[tuple(coordinates.T)] == int(value)).all()


def test_other_plan_truncated_or_unfinished_folders_are_refused_and_rebuilt(
        prepared: list[dict[str, Any]], tmp_path: Path) -> None:
    folder = Path(prepared[0]["preprocessed"])
    other = {**PLAN, "normalization": "none"}
    with pytest.raises(SubjectError, match="s0.*preprocessed for plan .*rerun"):
        store.open_subject(folder, store.plan_hash(other))
    image = folder / "image.npy"
    image.write_bytes(image.read_bytes()[:-100])  # a truncated file
    with pytest.raises(SubjectError, match="s0.*unreadable preprocessed arrays.*rerun"):
        store.open_subject(folder, store.plan_hash(PLAN))
    store.preprocess_subject(prepared[0], PLAN, folder.parent)  # rebuilt, not trusted
    assert store.open_subject(folder, store.plan_hash(PLAN)).image.shape == (1, 32, 32, 24)
    (folder / store.META).unlink()
    with pytest.raises(SubjectError, match="no readable meta.json.*did not finish"):
        store.open_subject(folder)


def test_a_failed_write_leaves_nothing_a_later_run_trusts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = _subject(tmp_path, 0)
    real_save = np.save

    def disk_full(path: Any, array: Any) -> None:
        if str(path).endswith("label.npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*pre/[^ ]+: free space"):
        store.preprocess_subject(row, PLAN, tmp_path / "pre")
    assert list((tmp_path / "pre").iterdir()) == []  # no subject folder, no staging folder


def test_same_batches_with_any_number_of_workers_and_after_a_resume(prepared: list[dict[str, Any]]) -> None:
    stream = PatchStream([r["preprocessed"] for r in prepared], store.plan_hash(PLAN), _train(), 3, seed=5)
    inline = [b for _, b in zip(range(6), make_patch_loader(stream, 3, 0, 0))]
    workers = [b for _, b in zip(range(6), make_patch_loader(stream, 3, 0, 2))]
    resumed = [b for _, b in zip(range(2), make_patch_loader(stream, 3, 4, 1))]
    for a, b in zip(inline, workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(inline[4:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = PatchStream([r["preprocessed"] for r in prepared], store.plan_hash(PLAN), _train(), 3, seed=6)
    assert not torch.equal(other[0][0], stream[0][0])


def test_label_sampler_aims_at_the_asked_class_and_uniform_stays_inside(prepared: list[dict[str, Any]]) -> None:
    folders = [r["preprocessed"] for r in prepared]
    aimed = PatchStream(folders, store.plan_hash(PLAN), _train(label_probabilities={0: 0, 1: 0, 2: 1},
                                                               augmentation=NO_AUGMENTATION), 3, seed=0)
    for n in range(40):
        image, label = aimed[n]
        assert image.shape == (1, 16, 16, 8) and (label == 2).any()
    uniform = PatchStream(folders, store.plan_hash(PLAN), _train(sampler="uniform", augmentation=NO_AUGMENTATION),
                          3, seed=0)
    volume = store.open_subject(folders[0]).image
    for n in range(20):  # without augmentation a patch is a crop of the stored volume
        image, _ = uniform[n]
        if uniform.subject_of(n) == 0:
            windows = np.lib.stride_tricks.sliding_window_view(volume[0], (16, 16, 8))
            assert (windows == image[0].numpy()).all(axis=(-3, -2, -1)).any()


def test_affine_sampling_with_identity_is_the_crop_and_a_quarter_turn_rotates_it() -> None:
    region = torch.arange(2 * 9 * 9 * 9, dtype=torch.float32).reshape(2, 9, 9, 9)
    label = (region[0] % 3).to(torch.uint8)
    centre = np.array([4.0, 4.0, 4.0])
    image, labels = sample_patch(region, label, np.eye(3), centre, (5, 5, 5))
    torch.testing.assert_close(image, region[:, 2:7, 2:7, 2:7])
    assert torch.equal(labels, label[2:7, 2:7, 2:7])
    quarter = rotation(np.radians([0.0, 0.0, 90.0]))
    turned, _ = sample_patch(region, label, quarter, centre, (5, 5, 5))
    crop = region[:, 2:7, 2:7, 2:7]
    expected = torch.stack([torch.rot90(c, k=1, dims=(1, 0)) for c in crop])  # out(x, y) reads in(-y, x)
    torch.testing.assert_close(turned, expected, atol=1e-4, rtol=0)


def test_the_broadcast_grid_is_torchs_affine_grid() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in [(7, 5, 9), (16, 16, 1), (1, 3, 4)]:  # a unit axis sits at 0, as in torch
        theta = torch.randn(3, 4, generator=generator)
        expected = torch.nn.functional.affine_grid(theta[None], [1, 1, *size], align_corners=True)
        torch.testing.assert_close(affine_grid(theta, size), expected, atol=1e-6, rtol=0)


def test_gamma_is_torchios_sign_x_abs_x_to_the_gamma_and_keeps_zeros() -> None:
    augmentation = PatchAugmentation({**NO_AUGMENTATION, "gamma": True}, 3)
    image = np.linspace(-3, 3, 2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    image[0, 0, 0, 0] = 0.0
    applied = 0
    for seed in range(20):
        replay = np.random.default_rng(seed)  # apply's draws: whether, then log gamma
        if replay.random() >= GAMMA_P:
            continue
        gamma = float(np.exp(replay.uniform(-LOG_GAMMA, LOG_GAMMA)))
        out, _ = augmentation.apply(image.copy(), np.zeros((4, 4, 4), np.uint8), np.zeros(3), (4, 4, 4), None,
                                    np.random.default_rng(seed))
        np.testing.assert_allclose(out.numpy(), np.sign(image) * np.abs(image) ** gamma, rtol=1e-5, atol=1e-6)
        applied += 1
    assert applied >= 3


def test_planar_patches_rotate_in_plane_only(prepared: list[dict[str, Any]]) -> None:
    stream = PatchStream([r["preprocessed"] for r in prepared], store.plan_hash(PLAN),
                         _train(patch_size=[16, 16, 1], augmentation={**ALL_AUGMENTATION, "flip_axes": [0, 1, 2]}),
                         2, seed=0)
    augmentation = PatchAugmentation(ALL_AUGMENTATION, 2)
    matrices = [m for m in (augmentation.draw_matrix(np.random.default_rng(k)) for k in range(50)) if m is not None]
    assert matrices and all(np.allclose(m[2], [0, 0, 1]) and np.allclose(m[:, 2], [0, 0, 1]) for m in matrices)
    assert augmentation.mirrored == (0, 1)
    for n in range(10):
        image, label = stream[n]
        assert image.shape == (1, 16, 16, 1) and label.shape == (16, 16, 1)


def test_ranks_share_each_pass_without_overlap(prepared: list[dict[str, Any]], tmp_path: Path) -> None:
    rows = prepared + store.preprocess_subjects([_subject(tmp_path, 3)], PLAN, tmp_path / "pre")
    folders = [r["preprocessed"] for r in rows]
    ranks = [PatchStream(folders, store.plan_hash(PLAN), _train(), 3, seed=1, rank=r, world=2) for r in (0, 1)]
    for epoch in range(3):
        first, second = (set(stream.share(epoch)) for stream in ranks)
        assert not first & second and first | second == {0, 1, 2, 3}
    assert ranks[0].subjects_drawn(2 * 2 * 2) == [[Path(folders[i]).name for i in ranks[0].share(e)] for e in (0, 1)]
    assert json.dumps(ranks[0].subjects_drawn(4))  # the DDP diagnostics write it as JSON

"""A chunk of subjects in one process: predict_chunk, predict_cases (new images), resample_chunk.

Tiny random-weight models on real hippocampus MRI; what matters is that loading the models once
changes no byte, and that a failing subject or image names itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import HIPPOCAMPUS_LABELS, plan
from msdseg.data.resample import resample_subject
from msdseg.decathlon import label_json
from msdseg.errors import ModelError, SubjectError
from msdseg.infer.predict import predict_subject
from msdseg.jobs.infer_jobs import Item, predict_cases, predict_chunk
from msdseg.jobs.resample_jobs import resample_chunk
from msdseg.jobs.worklog import parse_work
from msdseg.model.unet import UNet, save_model

torch.set_num_threads(1)

INFER = {"patch_size": None, "overlap": None, "overlap_mode": "hann", "batch_size": 2, "tta": False}
SUBJECTS = ("hippocampus_001", "hippocampus_003", "hippocampus_004")


def _plan() -> dict:
    return plan("Task04_Hippocampus", HIPPOCAMPUS_LABELS, modality="MRI", target_spacing=[1.5, 1.5, 1.5])


def _model(path: Path, seed: int, in_channels: int = 1) -> Path:
    torch.manual_seed(seed)
    model = UNet(3, in_channels, len(HIPPOCAMPUS_LABELS), base_channels=4, depth=2)
    save_model(path, model, {"labels": label_json(HIPPOCAMPUS_LABELS), "plan": {**_plan(), "n_channels": in_channels},
                             "patch_size": [16, 16, 16], "fold": seed})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    return [_model(folder / f"fold{seed}.pt", seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def resampled(hippocampus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resampled")
    resample_chunk(SUBJECTS, [hippocampus_dir / "imagesTr" / f"{s}.nii.gz" for s in SUBJECTS], out, _plan(),
                   folders={"image": "images"})
    return out / "images"


def test_predict_chunk_writes_the_bytes_of_predict_subject(hippocampus_dir, models, resampled, tmp_path, caplog):
    items = [Item(s, resampled / f"{s}.nii.gz", hippocampus_dir / "imagesTr" / f"{s}.nii.gz",
                  tmp_path / "chunk" / f"{s}.nii.gz") for s in SUBJECTS]
    with caplog.at_level(logging.INFO):
        work = predict_chunk(models, items, INFER, device="cpu")
    assert parse_work(caplog.text) == (3, pytest.approx(work, abs=1e-3))
    for item in items:
        alone = tmp_path / "alone" / item.out.name
        predict_subject(models, item.image, item.reference, alone, INFER, device="cpu")
        assert item.out.read_bytes() == alone.read_bytes(), item.name


def test_a_failing_subject_names_itself_and_its_chunk(hippocampus_dir, models, resampled, tmp_path):
    broken = tmp_path / "hippocampus_999.nii.gz"
    broken.write_bytes(b"not an image")
    items = [Item("hippocampus_001", resampled / "hippocampus_001.nii.gz",
                  hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz", tmp_path / "out" / "a.nii.gz"),
             Item("hippocampus_999", broken, broken, tmp_path / "out" / "b.nii.gz")]
    with pytest.raises(SubjectError, match=r"hippocampus_999.*in a chunk of 2 subject") as raised:
        predict_chunk(models, items, INFER, device="cpu")
    assert raised.value.subject == "hippocampus_999"


def test_resample_chunk_names_a_failing_subject(hippocampus_dir, tmp_path):
    images = [hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz", tmp_path / "missing.nii.gz"]
    with pytest.raises(SubjectError, match=r"subject hippocampus_002: .*missing.nii.gz.*in a chunk of 2"):
        resample_chunk(["hippocampus_001", "hippocampus_002"], images, tmp_path / "out", _plan(),
                       folders={"image": "images"})


def test_predict_cases_equals_resample_then_predict(hippocampus_dir, models, tmp_path):
    image = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    predict_cases(models, [("new", [str(image)])], tmp_path / "folder", INFER, device="cpu")
    resample_subject(image, tmp_path / "resampled.nii.gz", _plan())
    predict_subject(models, tmp_path / "resampled.nii.gz", image, tmp_path / "direct.nii.gz", INFER, device="cpu")
    assert (tmp_path / "folder" / "new.nii.gz").read_bytes() == (tmp_path / "direct.nii.gz").read_bytes()
    assert not [p for p in (tmp_path / "folder").iterdir() if p.name.startswith(".")], "scratch files left behind"


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_mismatched_images_are_named_before_anything_is_predicted(hippocampus_dir, models, tmp_path):
    source = nib.load(str(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"))
    data = np.asarray(source.dataobj)
    good = _write(tmp_path / "good.nii.gz", data, source.affine)
    two = _write(tmp_path / "two.nii.gz", np.stack([data, data], -1), source.affine)
    flat = _write(tmp_path / "flat.nii.gz", data[:, :, 0], source.affine)
    out = tmp_path / "out"
    with pytest.raises(ModelError) as raised:
        predict_cases(models, [("good", [good]), ("two", [two]), ("flat", [flat])], out, INFER, device="cpu")
    message = str(raised.value)
    assert "2 image(s) do not fit" in message
    assert "two.nii.gz has 2" in message and "expects 1 input channel" in message
    assert "flat.nii.gz" in message and "2D image" in message
    assert not list(out.glob("*.nii.gz"))


def test_nnunet_channel_files_equal_one_4d_image(hippocampus_dir, tmp_path):
    two_channel = [_model(tmp_path / f"m{seed}.pt", seed, in_channels=2) for seed in (0,)]
    source = nib.load(str(hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz"))
    data = np.asarray(source.dataobj).astype(np.float32)
    channel0 = _write(tmp_path / "case_0000.nii.gz", data, source.affine)
    channel1 = _write(tmp_path / "case_0001.nii.gz", data[::-1].copy(), source.affine)
    four = _write(tmp_path / "case4d.nii.gz", np.stack([data, data[::-1]], -1), source.affine)
    predict_cases(two_channel, [("case", [channel0, channel1]), ("case4d", [four])], tmp_path / "out", INFER,
                  device="cpu")
    by_files = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    by_4d = nib.load(str(tmp_path / "out" / "case4d.nii.gz"))
    assert by_files.shape == data.shape
    np.testing.assert_array_equal(np.asarray(by_files.dataobj), np.asarray(by_4d.dataobj))
    np.testing.assert_allclose(by_files.affine, source.affine, atol=1e-5)

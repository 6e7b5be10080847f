"""predict_subject on real hippocampus MRI and liver CT with tiny random-weight models."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from helpers import HIPPOCAMPUS_LABELS as HIPPO_LABELS
from helpers import plan, predicted_volumes, shared_archive
from msdseg.data.normalize import preprocessing
from msdseg.data.resample import resample_subject
from msdseg.decathlon import label_json
from msdseg.errors import ConfigError, ModelError
from msdseg.infer.predict import _attempts, grid_settings, predict_subject, tta_axes
from msdseg.model import sliding_window
from msdseg.model.unet import UNet, load_model, save_model

torch.set_num_threads(1)

INFER = {"patch_size": None, "overlap": None, "overlap_mode": "hann", "batch_size": 2, "tta": False}


def _plan(task: str, labels: dict[int, str], spacing: list[float] | None, **overrides) -> dict:
    """An MRI plan (the hippocampus's modality) at ``spacing``."""
    return plan(task, labels, modality="MRI", target_spacing=spacing, **overrides)


def _extract(tmp: Path, archive: str, names: list[str]) -> Path:
    with tarfile.open(shared_archive(archive)) as tar:
        members = [tar.getmember(name) for name in names]
        tar.extractall(tmp, members=members, filter="data")
    return tmp


@pytest.fixture(scope="module")
def hippo(tmp_path_factory) -> Path:
    names = [f"Task04_Hippocampus/{kind}/hippocampus_{n}.nii.gz"
             for kind in ("imagesTr", "labelsTr") for n in ("001", "003")]
    root = _extract(tmp_path_factory.mktemp("hippo"), "Task04_Hippocampus.tar", names)
    return root / "Task04_Hippocampus"


def _model(path: Path, spatial_dims: int, patch: list[int], labels=HIPPO_LABELS, seed=0, task="Task04_Hippocampus",
           spacing=(1.5, 1.5, 1.5)) -> Path:
    torch.manual_seed(seed)
    model = UNet(spatial_dims, 1, len(labels), base_channels=4, depth=2, norm="instance")
    save_model(path, model, {"labels": label_json(labels),
                             "plan": _plan(task, labels, list(spacing)), "patch_size": patch, "fold": seed,
                             "versions": {"torch": str(torch.__version__)}})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "3d": _model(folder / "fold0" / "model.pt", 3, [16, 16, 16], seed=0),
        "3d_b": _model(folder / "fold1" / "model.pt", 3, [16, 16, 16], seed=1),
        "2d": _model(folder / "fold2" / "model.pt", 2, [24, 24, 1], seed=2),
        "other": _model(folder / "other" / "model.pt", 3, [16, 16, 16], labels={0: "background", 1: "liver"}),
    }


@pytest.fixture(scope="module")
def resampled(hippo, tmp_path_factory) -> Path:
    """hippocampus_001 at 1.5 mm: 23x34x23, no axis a multiple of the 16-voxel patch."""
    out = tmp_path_factory.mktemp("resampled") / "hippocampus_001.nii.gz"
    resample_subject(hippo / "imagesTr" / "hippocampus_001.nii.gz", out,
                     _plan("Task04_Hippocampus", HIPPO_LABELS, [1.5, 1.5, 1.5]))
    return out


def _assert_same_geometry(prediction: Path, reference: Path) -> np.ndarray:
    out, ref = nib.load(str(prediction)), nib.load(str(reference))
    assert out.shape == ref.shape[:3]
    assert np.array_equal(out.affine, ref.affine)
    assert np.array_equal(out.header.get_qform(), ref.header.get_qform())
    assert np.array_equal(out.header.get_sform(), ref.header.get_sform())
    assert int(out.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(out.header["sform_code"]) == int(ref.header["sform_code"])
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    assert out.get_data_dtype() == np.uint8
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.uint8
    return data


def test_3d_model_back_to_original_geometry(hippo, models, resampled, tmp_path):
    reference = hippo / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "pred" / "hippocampus_001.nii.gz"
    predict_subject([models["3d"]], resampled, reference, out, INFER)
    data = _assert_same_geometry(out, reference)
    assert set(np.unique(data)) <= {0, 1, 2}
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary left behind
    volumes = predicted_volumes([out], HIPPO_LABELS)
    assert list(volumes.columns) == ["subject", "label", "class_name", "volume_ml"]
    assert volumes["volume_ml"].sum() == pytest.approx(np.count_nonzero(data) / 1000.0)


def test_2d_model(hippo, models, resampled, tmp_path):
    reference = hippo / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "hippocampus_001.nii.gz"
    assert grid_settings(INFER, {"patch_size": [24, 24, 1]}) == ([24, 24, 1], [12, 12, 0])
    assert grid_settings({**INFER, "overlap": [8, 8, 8]}, {"patch_size": [24, 24, 1]}) == ([24, 24, 1], [8, 8, 0])
    with pytest.raises(ConfigError, match="infer.overlap"):
        grid_settings({**INFER, "overlap": [24, 8, 0]}, {"patch_size": [24, 24, 1]})
    predict_subject([models["2d"]], resampled, reference, out, INFER)
    assert set(np.unique(_assert_same_geometry(out, reference))) <= {0, 1, 2}


def test_tta_mirrors_only_trained_axes(hippo, models, resampled, tmp_path):
    assert tta_axes({"tta": False}, {"mirror_axes": [0]}) is False
    assert tta_axes({"tta": True}, {"mirror_axes": [0]}) == [0]
    assert tta_axes({"tta": True}, {"mirror_axes": []}) is False
    assert tta_axes({"tta": True}, {}) is True
    reference = hippo / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "hippocampus_001.nii.gz"
    predict_subject([models["3d"]], resampled, reference, out, {**INFER, "tta": True})
    assert set(np.unique(_assert_same_geometry(out, reference))) <= {0, 1, 2}


def test_fold_ensemble_is_argmax_of_mean_probabilities(hippo, models, tmp_path):
    """Same grid in and out (the original as "resampled" image): the output is exactly the argmax."""
    image = hippo / "imagesTr" / "hippocampus_003.nii.gz"
    out = tmp_path / "hippocampus_003.nii.gz"
    settings = {**INFER, "overlap": [8, 8, 8], "overlap_mode": "average"}
    predict_subject([models["3d"], models["3d_b"]], image, image, out, settings)
    data = _assert_same_geometry(out, image)

    subject = tio.Subject(image=tio.ScalarImage(image))
    tensor = preprocessing(_plan("x", HIPPO_LABELS, None))(subject)["image"].data.float()
    mean = sum(sliding_window.predict_probabilities(load_model(models[k])[0], tensor, [16, 16, 16], [8, 8, 8], 2, "cpu",
                                               overlap_mode="average") for k in ("3d", "3d_b")) / 2
    expected = mean.argmax(0).numpy()
    assert (data == expected).mean() > 0.999  # linear resampling onto the same grid is (near) identity


def test_model_of_another_task_is_refused(hippo, models, resampled, tmp_path):
    out = tmp_path / "hippocampus_001.nii.gz"
    reference = hippo / "imagesTr" / "hippocampus_001.nii.gz"
    with pytest.raises(ModelError) as error:
        predict_subject([models["3d"], models["other"]], resampled, reference, out, INFER)
    assert str(models["other"]) in str(error.value) and str(models["3d"]) in str(error.value)
    with pytest.raises(ModelError, match="input channel"):
        two_channels = tmp_path / "two.nii.gz"
        image = nib.load(str(resampled))
        nib.save(nib.Nifti1Image(np.stack([image.get_fdata()] * 2, -1).astype(np.float32), image.affine),
                 str(two_channels))
        predict_subject([models["3d"]], two_channels, reference, out, INFER)
    assert not out.exists()


def test_out_of_memory_retries_with_half_batch(hippo, models, resampled, tmp_path, monkeypatch, caplog):
    """Fault injection: the first forward pass raises CUDA's out-of-memory error."""
    calls = {"n": 0}
    original = UNet.forward

    def flaky_forward(self, x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, x)

    monkeypatch.setattr(UNet, "forward", flaky_forward)
    out = tmp_path / "hippocampus_001.nii.gz"
    with caplog.at_level(logging.WARNING, logger="msdseg.infer.predict"):
        predict_subject([models["3d"]], resampled, hippo / "imagesTr" / "hippocampus_001.nii.gz", out, INFER)
    assert "out of GPU memory" in caplog.text and "batch size 1" in caplog.text
    assert out.exists()
    assert _attempts("cuda", 4) == [("cuda", 4), ("cuda", 2), ("cpu", 2)]
    assert _attempts("cuda:1", 1) == [("cuda:1", 1), ("cpu", 1)]
    assert _attempts("cpu", 1) == [("cpu", 1)]


def test_killed_write_leaves_no_file(hippo, models, resampled, tmp_path, monkeypatch):
    def broken_save(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(nib, "save", broken_save)
    out = tmp_path / "out" / "hippocampus_001.nii.gz"
    with pytest.raises(OSError, match="injected"):
        predict_subject([models["3d"]], resampled, hippo / "imagesTr" / "hippocampus_001.nii.gz", out, INFER)
    assert list(out.parent.iterdir()) == []


def test_real_ct_oblique_origin_kept(tmp_path):
    """Real CT (3 mm, RAS, non-zero origin) resampled to 4 mm and predicted back onto 3 mm."""
    root = _extract(tmp_path, "Task90_LiverCT.tar", ["Task90_LiverCT/imagesTr/liverct_001.nii.gz"])
    reference = root / "Task90_LiverCT" / "imagesTr" / "liverct_001.nii.gz"
    labels = {0: "background", 1: "liver", 2: "cancer"}
    ct_plan = plan("Task90_LiverCT", labels, modality="CT", target_spacing=[4.0, 4.0, 4.0])
    resampled = tmp_path / "resampled.nii.gz"
    resample_subject(reference, resampled, ct_plan)
    model = _model(tmp_path / "model.pt", 3, [32, 32, 16], labels=labels, spacing=(4.0, 4.0, 4.0))
    out = tmp_path / "liverct_001.nii.gz"
    predict_subject([model], resampled, reference, out, {**INFER, "batch_size": 4})
    assert set(np.unique(_assert_same_geometry(out, reference))) <= {0, 1, 2}


def test_multichannel_4d_reference(tmp_path):
    """A 4D (x, y, z, 2) original like BrainTumour/Prostate: the prediction is 3D on its grid."""
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -0.9, 0.0, 40.0], [0.0, 0.0, 3.0, -20.0], [-0.9, 0.0, 0.0, 12.0], [0, 0, 0, 1]])
    original = tmp_path / "prostate_01.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(22, 18, 10, 2)).astype(np.float32), affine), str(original))
    labels = {0: "background", 1: "PZ", 2: "TZ"}
    prostate_plan = _plan("Task05_Prostate", labels, [1.2, 1.2, 3.0], n_channels=2)
    resampled = tmp_path / "resampled.nii.gz"
    resample_subject(original, resampled, prostate_plan)
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    save_model(model_path, UNet(3, 2, 3, base_channels=4, depth=2),
               {"labels": label_json(labels), "plan": prostate_plan, "patch_size": [16, 16, 8],
                "versions": {"torch": str(torch.__version__)}})
    out = tmp_path / "pred" / "prostate_01.nii.gz"
    predict_subject([model_path], resampled, original, out, INFER)
    assert set(np.unique(_assert_same_geometry(out, original))) <= {0, 1, 2}
    assert nib.load(str(out)).ndim == 3

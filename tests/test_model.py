"""msdseg.model.unet: one U-Net for 2D and 3D, and the model.pt contract (weights_only loading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msdseg.errors import ModelError
from msdseg.model.unet import FORMAT, UNet, load_model, save_model

torch.set_num_threads(1)


class Custom:
    """Picklable, but not something weights_only loading accepts."""


@pytest.mark.parametrize("shape", [(2, 1, 16, 16, 16), (1, 1, 20, 23, 17), (1, 1, 5, 7, 3)])
def test_unet_3d_any_size(shape: tuple[int, ...]) -> None:
    """Sizes that are not multiples of 2**depth are padded inside and cropped back."""
    model = UNet(3, 1, 3, base_channels=4, depth=2)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_unet_2d_takes_5d_input_and_segments_slices_independently() -> None:
    model = UNet(2, 2, 3, base_channels=4, depth=3).eval()
    assert model(torch.randn(2, 2, 20, 24, 1)).shape == (2, 3, 20, 24, 1)
    volume = torch.randn(2, 2, 18, 21, 3)
    with torch.no_grad():
        out = model(volume)
        per_slice = torch.stack([model(volume[..., k:k + 1])[..., 0] for k in range(3)], dim=-1)
    assert out.shape == (2, 3, 18, 21, 3)
    torch.testing.assert_close(out, per_slice)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
def test_unet_norms_and_dropout(norm: str) -> None:
    model = UNet(3, 1, 2, base_channels=4, depth=1, norm=norm, dropout=0.1)
    assert model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 2, 8, 8, 8)


def test_unet_rejects_4d_input() -> None:
    with pytest.raises(ValueError, match="B, C, x, y, z"):
        UNet(2, 1, 2, base_channels=4, depth=1)(torch.randn(1, 1, 8, 8))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = UNet(3, 1, 3, base_channels=4, depth=2, norm="instance").eval()
    meta = {"labels": {"0": "background", "1": "a", "2": "b"}, "plan": {"normalization": "zscore"},
            "patch_size": [16, 16, 16], "fold": 1, "seed": 0, "config": {"train": {"x": [1, 2]}},
            "iterations": 5, "best_val_dice": {"a": 0.5, "b": float("nan")}}
    path = tmp_path / "fold1" / "model.pt"
    save_model(path, model, meta)
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"]  # no temporary left
    loaded, loaded_meta = load_model(path, "cpu")
    assert not loaded.training
    assert loaded_meta["format"] == FORMAT
    assert loaded_meta["model"] == model.hparams
    assert loaded_meta["fold"] == 1 and loaded_meta["patch_size"] == [16, 16, 16]
    assert set(loaded_meta["versions"]) >= {"torch", "torchio", "numpy", "python", "msdseg"}
    assert "git_commit" in loaded_meta and "state_dict" not in loaded_meta
    x = torch.randn(1, 1, 12, 16, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # the contract: plain torch.load with weights_only=True reads it
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_save_model_refuses_meta_weights_only_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with pytest.raises(ModelError, match="model.pt"):
        save_model(path, UNet(3, 1, 2, 4, 1), {"plan": Custom()})
    assert list(tmp_path.iterdir()) == []


def test_load_model_names_the_file_when_it_is_not_ours(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pt"
    with pytest.raises(ModelError, match="nothing.pt"):
        load_model(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="garbage.pt.*not an msdseg model"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    with pytest.raises(ModelError, match="foreign.pt.*not an msdseg model"):
        load_model(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(UNet(3, 1, 2, 4, 1), pickled)  # a whole pickled module: refused by weights_only
    with pytest.raises(ModelError, match="pickled.pt"):
        load_model(pickled)
    broken = tmp_path / "broken.pt"
    content = torch.load(_saved(tmp_path), weights_only=True)
    content["model"]["base_channels"] = 8
    torch.save(content, broken)
    with pytest.raises(ModelError, match="broken.pt.*do not match"):
        load_model(broken)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok" / "model.pt"
    save_model(path, UNet(3, 1, 2, 4, 1), {})
    return path


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 1, 20, 23, 17)), (2, (2, 1, 20, 23, 3))])
def test_deep_supervision_outputs_in_training_only(spatial_dims: int, shape: tuple[int, ...]) -> None:
    from msdseg.train.loss import segmentation_loss

    model = UNet(spatial_dims, 1, 3, base_channels=4, depth=3, deep_supervision=True)
    outputs = model(torch.randn(*shape))
    assert isinstance(outputs, list) and len(outputs) == 3

    def halve(s, k):
        return -(-s // 2**k)

    for k, out in enumerate(outputs):
        spatial = [halve(s, k) for s in shape[2:4]] + ([halve(shape[4], k)] if spatial_dims == 3 else [shape[4]])
        assert out.shape == (2, 3, *spatial)
    loss = segmentation_loss(outputs, torch.randint(0, 3, (shape[0], *shape[2:])), "ce+dice")
    loss.backward()
    assert model.deep_heads[0].weight.grad is not None
    assert model.eval()(torch.randn(*shape)).shape == (2, 3, *shape[2:])

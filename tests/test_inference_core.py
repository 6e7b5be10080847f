"""msdseg.model.sliding_window.predict_probabilities: grid sampling/aggregation, padding, 2D models, TTA."""

from __future__ import annotations

import pytest
import torch

from msdseg.errors import ConfigError
from msdseg.grid import default_overlap, grid_patch_count
from msdseg.model.sliding_window import grid_overlap, predict_probabilities
from msdseg.model.unet import UNet

torch.set_num_threads(1)


def _model(spatial_dims: int = 3, classes: int = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims, 1, classes, base_channels=4, depth=2).eval()


@pytest.mark.parametrize("mode", ["hann", "average", "crop"])
def test_shape_of_input_and_probabilities_sum_to_one(mode: str) -> None:
    image = torch.randn(1, 37, 45, 29)  # not a multiple of the patch on any axis
    probabilities = predict_probabilities(_model(), image, (24, 24, 16), None, batch_size=3, overlap_mode=mode)
    assert probabilities.shape == (3, 37, 45, 29)
    assert probabilities.dtype == torch.float32 and probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities.sum(0), torch.ones(37, 45, 29))
    assert probabilities.min() >= 0


def test_volume_smaller_than_patch_is_padded_and_cropped_back() -> None:
    image = torch.randn(1, 10, 12, 9)
    probabilities = predict_probabilities(_model(), image, (16, 16, 16), (8, 8, 8), batch_size=2)
    assert probabilities.shape == (3, 10, 12, 9)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(10, 12, 9))


def test_one_patch_equals_a_plain_forward_pass() -> None:
    model = _model()
    image = torch.randn(1, 16, 20, 12)
    with torch.no_grad():
        direct = torch.softmax(model(image[None]), dim=1)[0]
    torch.testing.assert_close(predict_probabilities(model, image, (16, 20, 12), None), direct)


def test_2d_model_assembles_slices() -> None:
    model = _model(spatial_dims=2)
    image = torch.randn(1, 30, 26, 7)
    probabilities = predict_probabilities(model, image, (30, 26, 1), None, batch_size=4)
    with torch.no_grad():
        direct = torch.softmax(model(image[None]), dim=1)[0]  # the 2D net segments every slice
    assert probabilities.shape == (3, 30, 26, 7)
    torch.testing.assert_close(probabilities, direct)
    tiled = predict_probabilities(model, image, (16, 16, 1), (8, 8, 0), batch_size=4)
    assert tiled.shape == (3, 30, 26, 7)
    torch.testing.assert_close(tiled.sum(0), torch.ones(30, 26, 7))


def test_tta_mirrors_and_undoes_the_mirroring() -> None:
    model = _model()
    image = torch.randn(1, 16, 20, 12)
    with torch.no_grad():
        plain = torch.softmax(model(image[None]), dim=1)[0]
        flipped = torch.softmax(model(image[None].flip(2)), dim=1)[0].flip(1)
    only_x = predict_probabilities(model, image, (16, 20, 12), None, tta=[0])
    torch.testing.assert_close(only_x, (plain + flipped) / 2)
    every_axis = predict_probabilities(model, image, (16, 20, 12), None, tta=True)
    torch.testing.assert_close(every_axis.sum(0), torch.ones(16, 20, 12))
    assert not torch.allclose(every_axis, only_x)


def test_default_overlap_is_half_the_patch_and_even() -> None:
    assert default_overlap((40, 56, 1)) == (20, 28, 0)
    assert default_overlap((5, 6, 7)) == (2, 2, 2)


def test_grid_overlap_from_the_infer_section() -> None:
    """infer.patch_size else the model's patch; infer.overlap else half; no overlap where the patch is 1."""
    unset = {"patch_size": None, "overlap": None}
    assert grid_overlap(unset, (40, 56, 1)) == ([40, 56, 1], [20, 28, 0])
    assert grid_overlap({"patch_size": [16, 16, 8], "overlap": None}, [64, 64, 64]) == ([16, 16, 8], [8, 8, 4])
    assert grid_overlap({"overlap": [8, 8, 8]}, [24, 24, 1]) == ([24, 24, 1], [8, 8, 0])
    for overlap in ([24, 8, 8], [7, 8, 8]):
        with pytest.raises(ConfigError, match="infer.overlap"):
            grid_overlap({"overlap": overlap}, [24, 24, 24])


def test_restores_training_mode() -> None:
    model = _model().train()
    predict_probabilities(model, torch.randn(1, 8, 8, 8), (8, 8, 8), None)
    assert model.training


@pytest.mark.parametrize("mode", ["average", "hann", "crop"])
def test_lean_aggregator_equals_torchio(mode: str) -> None:
    """The leaner aggregator (one weight channel, batched window) gives torchio's volume."""
    import torchio as tio

    from msdseg.model.sliding_window import LeanGridAggregator

    generator = torch.Generator().manual_seed(0)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 21, 18, 13, generator=generator)))
    sampler = tio.GridSampler(subject, (8, 10, 6), (4, 4, 2))
    patches = torch.rand(len(sampler.locations), 3, 8, 10, 6, generator=generator)
    locations = torch.as_tensor(sampler.locations, dtype=torch.int64)
    reference, lean = tio.GridAggregator(sampler, overlap_mode=mode), LeanGridAggregator(sampler, overlap_mode=mode)
    for start in range(0, len(patches), 4):  # batches of 4, the last one shorter
        for aggregator in (reference, lean):
            aggregator.add_batch(patches[start:start + 4], locations[start:start + 4])
    torch.testing.assert_close(lean.get_output_tensor(), reference.get_output_tensor(), rtol=1e-6, atol=1e-6)


def test_precision_on_cpu() -> None:
    """CPUs run fp32 unless bf16 is asked for and computed natively there (AVX512-BF16/AMX)."""
    from msdseg.devices import cpu_has_native_bf16
    from msdseg.model.sliding_window import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp16", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)


def _cpu_has_bf16() -> bool:
    from msdseg.devices import cpu_has_native_bf16

    return cpu_has_native_bf16()


NEEDS_BF16 = pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU computes bf16 only by emulation (no "
                                "AVX512-BF16/AMX): msdseg runs fp32 here, so there is no bf16 result to compare")


@NEEDS_BF16
def test_bf16_probabilities_agree_with_fp32() -> None:
    model = _model()
    image = torch.randn(1, 20, 24, 16, generator=torch.Generator().manual_seed(1))
    full = predict_probabilities(model, image, (16, 16, 16), amp="fp32")
    half = predict_probabilities(model, image, (16, 16, 16), amp="bf16")
    assert half.dtype == torch.float32
    assert not torch.equal(full, half), "bf16 was asked for and is native here, yet the result is fp32's"
    assert (full.argmax(0) == half.argmax(0)).float().mean() > 0.95


@pytest.mark.parametrize("shape, patch, overlap", [
    ((35, 51, 35), (32, 48, 32), None), ((100, 90, 7), (40, 56, 1), None),
    ((20, 20, 20), (32, 32, 32), None), ((64, 80, 48), (32, 32, 16), (8, 8, 4))])
def test_grid_patch_count_is_torchio_grid_samplers_length(shape, patch, overlap) -> None:
    """The one patch count (jobs' cost model, planner's validation cost) is what the GridSampler takes."""
    import torchio as tio

    from msdseg.data.subjects import PadToAtLeast

    laps = [0 if p == 1 else v for p, v in zip(patch, overlap or default_overlap(patch))]
    subject = PadToAtLeast(patch)(tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, *shape))))
    assert grid_patch_count(shape, patch, laps) == len(tio.GridSampler(subject, patch, laps))

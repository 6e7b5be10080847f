"""Predict one subject with one model or a fold ensemble and write it in the original geometry.

Steps: check that all checkpoints share labels and channels and fit the image -> intensity
preprocessing of the model's plan (:func:`msdseg.data.normalize.preprocessing`) -> grid-aggregated
probabilities on the resampled grid (:func:`msdseg.model.sliding_window.predict_probabilities`), averaged
over the models -> probabilities mapped onto the original grid, one class at a time, with a
running argmax -> uint8 NIfTI with the original header (affine, shape, orientation), written
atomically.

Many subjects in one process (a workflow job's chunk): :func:`predict_chunk` loads the models
once (:func:`load_models`) and runs the same steps per subject (:func:`predict_loaded`), byte for
byte what :func:`predict_subject` writes. New images (the ``predict_folder`` target):
:func:`predict_cases` checks every image against the models first, then resamples each with the
models' own plan from model.pt and predicts it the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch

from msdseg.config import section_defaults
from msdseg.data.normalize import preprocessing
from msdseg.data.resample import channels_on_reference
from msdseg.data.subjects import IMAGE, subjects_from_paths
from msdseg.decathlon import label_map, subject_id
from msdseg.errors import ModelError, SubjectError
from msdseg.images import read_image_header, spatial_geometry, write_labels
from msdseg.model.sliding_window import grid_overlap
from msdseg.model.unet import load_model

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


def _describe(meta: Mapping[str, Any]) -> str:
    hparams = meta.get("model", {})
    return (f"labels {label_map(meta.get('labels'))}, {hparams.get('in_channels')} input channel(s), "
            f"{hparams.get('out_channels')} output channel(s), task {meta.get('plan', {}).get('task')!r}")


def check_models(metas: Sequence[tuple[Path, Mapping[str, Any]]], image_path: Path, image_channels: int) -> None:
    """All checkpoints must share labels and channels, and fit the image's channel count.

    A checkpoint of another task would otherwise predict (and even ensemble) silently wrong
    classes; this check runs before any prediction and names both files.
    """
    first_path, first = metas[0]
    for path, meta in metas:
        hparams = meta.get("model", {})
        labels = label_map(meta.get("labels"))
        if int(hparams.get("out_channels", -1)) != len(labels):
            raise ModelError(
                f"{path}: {hparams.get('out_channels')} output channels but {len(labels)} labels "
                f"{labels}; the checkpoint is inconsistent, retrain the fold."
            )
        same_labels = labels == label_map(first.get("labels"))
        same_channels = all(
            int(hparams.get(key, -1)) == int(first.get("model", {}).get(key, -2))
            for key in ("in_channels", "out_channels")
        )
        if not (same_labels and same_channels):
            raise ModelError(
                f"{path} ({_describe(meta)}) does not match {first_path} ({_describe(first)}); "
                "a fold ensemble needs models of one task: remove the foreign model.pt or retrain it."
            )
        if int(hparams.get("in_channels", -1)) != image_channels:
            raise ModelError(
                f"{path} expects {hparams.get('in_channels')} input channel(s) but {image_path} has "
                f"{image_channels}; the model was trained on another task, use that task's images "
                "or retrain."
            )


def tta_axes(infer: Mapping[str, Any], meta: Mapping[str, Any]) -> bool | list[int]:
    """Mirroring for test-time augmentation: only the axes the model was flipped along in training.

    Mirroring along an axis the model never saw flipped (hippocampus: anterior and posterior lie
    along one axis, so only left-right is flipped in training) would average in predictions of
    an anatomy the model does not know. Checkpoints without ``mirror_axes`` mirror all axes.
    """
    if not infer["tta"]:
        return False
    axes = meta.get("mirror_axes")
    if axes is None:
        return True
    return [int(a) for a in axes] or False


def grid_settings(infer: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(patch size, overlap) for one model: :func:`msdseg.model.sliding_window.grid_overlap` with the model's patch."""
    return grid_overlap(infer, meta["patch_size"])


def _attempts(device: str, batch_size: int) -> list[tuple[str, int]]:
    """The (device, batch size) tries after out-of-memory: as asked, half the batch, then CPU."""
    tries = [(device, batch_size)]
    if batch_size > 1:
        tries.append((device, max(batch_size // 2, 1)))
    if torch.device(device).type != "cpu":
        tries.append(("cpu", tries[-1][1]))
    return tries


def predict_with_fallback(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: Sequence[int],
    infer: Mapping[str, Any],
    device: str,
    name: str = "model",
    tta: bool | Sequence[int] = False,
) -> torch.Tensor:
    """:func:`msdseg.model.sliding_window.predict_probabilities`, retried on out-of-GPU-memory.

    A shared GPU may be fuller than when the job was planned: a smaller batch, then the CPU,
    finish the job slower instead of failing it. Every kind of allocation failure counts
    (:func:`msdseg.devices.is_out_of_memory`: cuBLAS/cuDNN handles fail as plain RuntimeErrors);
    any other error is raised at once.
    """
    from msdseg.devices import is_out_of_memory, resolve_precision
    from msdseg.model import sliding_window

    infer = {**section_defaults("infer"), **infer}  # a partial section takes the schema's defaults
    precision = str(infer["precision"])
    resolve_precision(precision, torch.device(device), key="infer.precision")  # a wrong one fails here, named
    tries = _attempts(device, int(infer["batch_size"]))
    for attempt, (where, batch_size) in enumerate(tries):
        try:
            model.to(where)
            return sliding_window.predict_probabilities(
                model, image, patch_size, overlap, batch_size, where,
                overlap_mode=infer["overlap_mode"], tta=tta, amp=precision,
            )
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if attempt + 1 == len(tries):
                logger.error("%s: out of memory on %s with batch size %d, no fallback left", name, where, batch_size)
                raise
            next_where, next_batch = tries[attempt + 1]
            logger.warning(
                "%s: out of GPU memory on %s with batch size %d; retrying on %s with batch size %d",
                name, where, batch_size, next_where, next_batch,
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _grid(path: Path) -> sitk.ImageFileReader:
    """The header of ``path`` (its spatial grid; a 4D image's first 3 axes). No voxels are read:
    resampling needs only the grid, not the (possibly int32, multi-channel) original voxels."""
    try:
        return read_image_header(path)
    except OSError as error:
        raise SubjectError(subject_id(path), str(path), f"{error}; re-extract or re-resample the task") from error


def labels_in_reference_geometry(
    probabilities: torch.Tensor,
    source: sitk.Image | sitk.ImageFileReader,
    reference: sitk.Image | sitk.ImageFileReader,
) -> np.ndarray:
    """Argmax label map (uint8, (x, y, z)) on the reference grid from probabilities on ``source``.

    Why probabilities and not labels: interpolating each class's probability linearly and taking
    the argmax afterwards (nnU-Net's export) places boundaries between voxels of the coarse grid
    where the classes are equally likely, so they are smooth and follow the network; resampling an
    argmax label map with nearest neighbour instead copies the coarse grid's staircase onto the
    fine grid and shifts boundaries by up to half a coarse voxel.

    One class at a time with a running maximum (identical to a full argmax, first class wins ties)
    keeps the memory at two reference-sized float32 volumes instead of n_classes.
    """
    best: np.ndarray | None = None
    labels: np.ndarray | None = None
    for channel, values in enumerate(channels_on_reference(probabilities, source, reference)):
        if best is None:
            best = np.array(values, dtype=np.float32)  # a copy: ``values`` lives until the next channel
            labels = np.zeros(best.shape, dtype=np.uint8)
        else:
            better = values > best
            labels[better] = channel  # type: ignore[index]
            np.maximum(best, values, out=best)
            del better
        del values  # let the generator free this channel before it resamples the next
    assert labels is not None
    return labels


def _read_image(image_path: Path) -> Any:
    subject = subjects_from_paths([{"subject": subject_id(image_path), "image": str(image_path)}])[0]
    try:
        subject.load()
    except Exception as error:  # torchio/nibabel/ITK raise various types for broken files
        raise SubjectError(subject_id(image_path), str(image_path),
                           f"not a readable image ({error}); rerun the resample rule") from error
    return subject


def _check_spacing(meta: Mapping[str, Any], source: sitk.ImageFileReader, image_path: Path, model_path: Path) -> None:
    """Warn when the image was not resampled to the model's plan (other preset, stale file)."""
    plan = meta.get("plan") or {}
    target = plan.get("target_spacing")
    if target is None or plan.get("inplane_size"):
        return
    spacing = np.asarray(spatial_geometry(source).spacing, dtype=float)
    if not np.allclose(spacing, np.asarray(target, dtype=float), rtol=1e-3, atol=1e-3):
        logger.warning("%s has spacing %s but %s was trained at %s; check the resample step",
                       image_path, spacing.tolist(), model_path, list(target))


Loaded = list[tuple[Path, torch.nn.Module, dict[str, Any]]]
"""Models read once for a whole chunk: (model.pt path, network in eval mode, its meta)."""


def load_models(model_paths: Sequence[str | Path]) -> Loaded:
    """Read every model.pt once (on the CPU); a chunk predicts all its subjects with them."""
    if not model_paths:
        raise ModelError("no model given to predict with; train at least one fold.")
    return [(Path(path), *load_model(path, "cpu")) for path in model_paths]


def predict_subject(
    model_paths: Sequence[Path],
    image_path: Path,
    reference_path: Path,
    out_path: Path,
    infer: Mapping[str, Any],
    device: str | None = None,
    threads: int = 1,
) -> None:
    """Predict the resampled ``image_path`` and write labels on the grid of ``reference_path``.

    ``infer`` is the config section (patch_size, overlap, overlap_mode, batch_size, tta); several
    models average their probabilities (fold ensemble). The output is renamed into place only
    when complete, so a killed job leaves nothing a rerun would accept. For many subjects, load
    the models once: :func:`predict_chunk`.
    """
    if not model_paths:
        raise ModelError(f"no model given to predict {image_path}; train at least one fold.")
    torch.set_num_threads(max(int(threads), 1))
    predict_loaded(load_models(model_paths), image_path, reference_path, out_path, infer, _device(device))


def _device(device: str | None) -> str:
    from msdseg.devices import default_device

    return device or str(default_device())


def predict_loaded(
    loaded: Loaded,
    image_path: Path,
    reference_path: Path,
    out_path: Path,
    infer: Mapping[str, Any],
    device: str,
) -> None:
    """:func:`predict_subject` with models already loaded (:func:`load_models`): same steps, same bytes.

    ``infer`` may be partial; what it lacks takes the schema's default.
    """
    infer = {**section_defaults("infer"), **infer}
    subject = _read_image(Path(image_path))
    check_models([(path, meta) for path, _, meta in loaded], Path(image_path), int(subject[IMAGE].data.shape[0]))
    source = _grid(Path(image_path))
    reference = _grid(Path(reference_path))

    name = subject_id(image_path)
    # every distinct intensity plan once (folds of one run share one), then the raw image can go:
    # during aggregation only the preprocessed volume and the probabilities are held
    plan_keys = [json.dumps(meta.get("plan") or {}, sort_keys=True) for _, _, meta in loaded]
    plans = {key: meta.get("plan") or {} for key, (_, _, meta) in zip(plan_keys, loaded)}
    prepared: dict[str, torch.Tensor] = {}
    for plan_key, plan in plans.items():
        # a single plan may change the raw subject in place: it is not needed afterwards
        transformed = preprocessing(plan, copy=len(plans) > 1)(subject)
        prepared[plan_key] = transformed[IMAGE].data.to(torch.float32)
        del transformed
    del subject

    summed: torch.Tensor | None = None
    for (path, model, meta), plan_key in zip(loaded, plan_keys):
        _check_spacing(meta, source, Path(image_path), path)
        patch, overlap = grid_settings(infer, meta)
        logger.info("%s: %s, patch %s, overlap %s, %s, tta %s, device %s", name, path, patch, overlap,
                    infer["overlap_mode"], tta_axes(infer, meta), device)
        # inference mode also for the sums: the probabilities may be inference tensors, which
        # refuse in-place updates outside it (a clone would cost a probability volume)
        with torch.inference_mode():
            probabilities = predict_with_fallback(model, prepared[plan_key], patch, overlap, infer, device,
                                                  str(path), tta=tta_axes(infer, meta)).to(torch.float32)
            if summed is None:
                summed = probabilities
            else:
                summed += probabilities
            del probabilities
        model.to("cpu")
    del prepared
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    assert summed is not None
    if len(loaded) > 1:
        with torch.inference_mode():
            summed /= len(loaded)

    labels = labels_in_reference_geometry(summed, source, reference)
    del summed
    write_labels(labels, Path(reference_path), Path(out_path), reference)
    logger.info("%s: wrote %s %s", name, out_path, labels.shape)

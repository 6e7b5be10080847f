"""Training subjects preprocessed once: normalised, cropped, stored as arrays read patch by patch.

The patch loader (:mod:`msdseg.train.patches`) must not decompress, normalise or scan a whole
volume per patch. So each training subject is written once, after resampling, as

    <folder>/<subject>/image.npy      float32 (C, X, Y, Z), the plan's normalisation applied to the
                                      whole volume (as inference does), cropped to the bounding box
                                      of the raw image's non-zero voxels (nnU-Net's crop)
    <folder>/<subject>/label.npy      uint8 or int16 (X, Y, Z), the same crop
    <folder>/<subject>/locations.npz  per label, up to LOCATIONS voxel coordinates of that label
                                      (and ``weighted``: coordinates drawn from a sampling map)
    <folder>/<subject>/meta.json      plan hash, shapes, crop, voxel counts per label; written last

Plain ``.npy`` files are memory-mapped: a patch reads only its region (from the page cache after
the first pass), and workers share those pages instead of each holding every volume. A subject
folder appears whole or not at all (written beside, renamed into place), and a reader refuses a
folder whose plan hash, shapes or sizes are not what its meta.json says, naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdseg import files
from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import IMAGE, LABEL, SAMPLING_MAP, check_trainable, subjects_from_paths
from msdseg.decathlon import subject_id
from msdseg.errors import SubjectError

FORMAT = 1  # bump when the layout above changes: older folders are then rebuilt
LOCATIONS = 10_000  # coordinates kept per label (nnU-Net keeps 10,000 per class)
META = "meta.json"
WEIGHTED = "weighted"  # locations drawn in proportion to a sampling map (train.sampler: weighted)
FIX = "delete the folder and rerun (snakemake reruns rule preprocess_training; the API rebuilds it)"


def plan_hash(plan: Mapping[str, Any]) -> str:
    """sha256 of the plan's canonical JSON: a preprocessed subject belongs to exactly one plan."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preprocessed:
    """One preprocessed subject, opened (memory-mapped) and checked."""

    subject: str
    folder: Path
    image: np.ndarray  # (C, X, Y, Z), memory-mapped
    label: np.ndarray  # (X, Y, Z), memory-mapped
    locations: dict[str, np.ndarray]  # label value as text (or WEIGHTED) -> (n, 3) int32
    counts: dict[str, int]  # voxels per label value in the crop

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.label.shape)  # type: ignore[return-value]


def preprocess_subject(row: Mapping[str, Any], plan: Mapping[str, Any], folder: str | os.PathLike[str],
                       seed: int = 0) -> Path:
    """Write ``row``'s subject (keys subject, image, label, optional sampling_map) under ``folder``.

    Skips a subject whose folder already holds this plan's complete arrays. Returns its folder.
    """
    name = str(row["subject"])
    final = Path(folder) / name
    expected = plan_hash(plan)
    if _complete(final, expected):
        return final
    subject = subjects_from_paths([row])[0]
    check_trainable(name, str(row["image"]), LABEL in subject, True, "label")  # the sampler is the loader's
    raw = subject[IMAGE].data
    crop = nonzero_box(raw.numpy())
    normalised = preprocessing(plan, copy=False)(subject)
    image = np.ascontiguousarray(normalised[IMAGE].data.numpy()[(slice(None), *crop)], dtype=np.float32)
    label = normalised[LABEL].data.numpy()[0][crop]
    label = np.ascontiguousarray(label, dtype=np.uint8 if label.max(initial=0) < 256 else np.int16)
    if image.shape[1:] != label.shape:
        raise SubjectError(name, str(row["label"]), f"label shape {label.shape} differs from the image's "
                                                     f"{image.shape[1:]}; rebuild the manifest and resample.")
    rng = np.random.default_rng([int(seed), *name.encode()])
    locations, counts = label_locations(label, rng)
    if SAMPLING_MAP in subject:
        weights = subject[SAMPLING_MAP].data.numpy()[0][crop]
        locations[WEIGHTED] = weighted_locations(weights, rng)
    meta = {"format": FORMAT, "plan_hash": expected, "subject": name, "image_shape": list(image.shape),
            "image_dtype": str(image.dtype), "label_dtype": str(label.dtype), "crop": [[s.start, s.stop] for s in crop],
            "source_shape": list(raw.shape[1:]), "counts": counts}
    with files.atomic_folder(final) as staging:
        np.save(staging / "image.npy", image)
        np.save(staging / "label.npy", label)
        np.savez(staging / "locations.npz", **locations)
        (staging / META).write_text(json.dumps(meta, indent=1) + "\n")
    return final


def nonzero_box(image: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of voxels non-zero in any channel of (C, X, Y, Z); the whole volume if none is."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def label_locations(label: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Up to LOCATIONS coordinates per label value present, and each value's voxel count."""
    values, counts = np.unique(label, return_counts=True)
    locations = {}
    for value in values:
        coordinates = np.argwhere(label == value)
        if len(coordinates) > LOCATIONS:
            coordinates = coordinates[np.sort(rng.choice(len(coordinates), LOCATIONS, replace=False))]
        locations[str(int(value))] = coordinates.astype(np.int32)
    return locations, {str(int(v)): int(c) for v, c in zip(values, counts)}


def weighted_locations(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """LOCATIONS coordinates drawn with probability proportional to a sampling map (uniform if it is all 0)."""
    flat = np.clip(weights.astype(np.float64).ravel(), 0, None)
    total = flat.sum()
    probabilities = flat / total if total > 0 else None
    drawn = rng.choice(flat.size, LOCATIONS, p=probabilities)
    return np.stack(np.unravel_index(drawn, weights.shape), axis=1).astype(np.int32)


def open_subject(folder: str | os.PathLike[str], expected_hash: str | None = None) -> Preprocessed:
    """Memory-map one preprocessed subject, refusing an incomplete, truncated or other-plan folder."""
    folder = Path(folder)
    meta_path = folder / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise SubjectError(folder.name, str(meta_path), f"no readable meta.json ({error}): the preprocessing "
                                                        f"did not finish; {FIX}.") from error
    if meta.get("format") != FORMAT:
        raise SubjectError(folder.name, str(folder), f"preprocessed with format {meta.get('format')}, this "
                                                     f"version reads {FORMAT}; {FIX}.")
    if expected_hash is not None and meta["plan_hash"] != expected_hash:
        raise SubjectError(folder.name, str(folder), f"preprocessed for plan {meta['plan_hash']}, training "
                                                     f"uses plan {expected_hash}; {FIX}.")
    try:
        image = np.load(folder / "image.npy", mmap_mode="r")
        label = np.load(folder / "label.npy", mmap_mode="r")
        with np.load(folder / "locations.npz") as stored:
            locations = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError) as error:  # a truncated .npy cannot be mapped
        raise SubjectError(folder.name, str(folder), f"unreadable preprocessed arrays ({error}); {FIX}.") from error
    if list(image.shape) != meta["image_shape"] or image.shape[1:] != label.shape:
        raise SubjectError(folder.name, str(folder), f"arrays of shape {image.shape} / {label.shape}, meta.json "
                                                     f"says {meta['image_shape']}; {FIX}.")
    return Preprocessed(str(meta["subject"]), folder, image, label, locations, dict(meta["counts"]))


def _complete(folder: Path, expected_hash: str) -> bool:
    try:
        open_subject(folder, expected_hash)
    except SubjectError:
        return False
    return True


def preprocess_subjects(rows: Sequence[Mapping[str, Any]], plan: Mapping[str, Any],
                        folder: str | os.PathLike[str], seed: int = 0) -> list[dict[str, Any]]:
    """Preprocess every row under ``folder``; returns the rows with their ``preprocessed`` folder."""
    return [{**row, "preprocessed": str(preprocess_subject(row, plan, folder, seed))} for row in rows]


def preprocess_staged(staged: str | os.PathLike[str], plan: Mapping[str, Any], folder: str | os.PathLike[str],
                      seed: int = 0) -> list[dict[str, Any]]:
    """Rule preprocess_training: every subject of a resampled chunk's staging folder (imagesTr, labelsTr)."""
    staged = Path(staged)
    images = sorted(str(path) for path in (staged / "imagesTr").iterdir() if not path.name.startswith("."))
    labels = [str(staged / "labelsTr" / Path(image).name) for image in images]
    return preprocess_subjects(training_rows(images, labels), plan, folder, seed)


def training_rows(images: Sequence[str], labels: Sequence[str],
                  preprocessed_folders: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A train or plan_training job's rows from its inputs: subject, image, label and (patch loader) preprocessed."""
    index = preprocessed_index(preprocessed_folders)
    rows = []
    for image, label in zip(images, labels):
        row = {"subject": subject_id(image), "image": str(image), "label": str(label)}
        if index:
            row["preprocessed"] = index.get(row["subject"], "")
        rows.append(row)
    return rows


def preprocessed_index(folders: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """subject -> preprocessed folder, over the folders the preprocess_training jobs wrote."""
    return {path.name: str(path) for folder in folders for path in _subject_folders(Path(folder))}


def _subject_folders(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            yield path


def disk_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes the preprocessed files under ``folder`` take (benchmarks report it)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())

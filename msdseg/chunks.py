"""Subjects per job: the cohort from manifest.csv, cut into chunks that pay for their start-up.

A workflow job costs a process start and its imports before any work: measured on the 2-core
CPU machine this was written on, 0.2-0.5 s for a resampling job (Python, numpy, SimpleITK) and
2-3.5 s for an inference job (torch and torchio alone are 1.4-3 s; both kinds are run by a shell
command, without the 0.1-0.25 s of Snakemake's ``script:`` preamble), against
0.04 s of resampling and 0.15-1.5 s of inference for one hippocampus subject. One subject per
job therefore spends most of a stage starting processes. A job here processes a *chunk* of
subjects and loads its model(s) once; outputs stay one file per subject.

Chunks are a pure function of the manifest (and of the config for ``auto``): the subjects in
manifest order (sorted by id within a role), chunk ``k`` = ``subjects[k*n:(k+1)*n]``. A changed
subject (its image, its label) therefore reruns its own chunk only; adding or removing subjects
moves the chunk boundaries after them.

``subjects_per_job: auto`` estimates each subject's work from its size (the manifest's ``shape``
and ``spacing`` columns and the preprocessing/inference settings) with the rate constants
below, then takes as many chunks as the stage's total work fills with at least
:func:`target_seconds` each (start-up at most :data:`START_UP_SHARE` of a job, and at least
:data:`MIN_WORK_S` of work), all of the same size but the last.

This module is read by the Snakemake process when it builds the DAG (``common.smk``) for every
job, so it imports no numpy, pandas or torch, and :func:`cached_cohort` parses manifest.csv once
per file version instead of once per job.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from msdseg.errors import DatasetError

T = TypeVar("T")

# --------------------------------------------------------------------------- rate constants
# Measured on the 2-core x86 development CPU (December 2026) by timing resample_subject and
# predict_subject on Task04_Hippocampus and Task90_LiverCT (../shared/data) at several spacings
# and model widths, and the jobs' start-up from benchmarks/cohort_scale.py (rule benchmark minus
# logged work). Rough (+-50%), which is all choosing a chunk size needs; an underestimate only
# makes chunks larger. A GPU runs the network part much faster than these CPU rates: set
# infer.subjects_per_job to a number there if auto chunks finish too quickly.

START_UP_SHARE = 0.1
"""Largest share of a job that may go to its start-up when ``subjects_per_job: auto``."""
MIN_WORK_S = 10.0
"""Least estimated work per job with ``auto`` (where start-up alone would allow less)."""

RESAMPLE_STARTUP_S = 0.4
"""Start-up of a resampling job: Python, numpy, SimpleITK, manifest.csv (0.2-0.5 s measured, by load)."""
RESAMPLE_FIXED_S = 0.01
"""Per subject: opening, reading and writing the compressed NIfTIs (12x12x8 voxels: 0.010 s)."""
RESAMPLE_S_PER_VOXEL = 1.5e-7
"""Per output voxel and channel (read, linear interpolation, gzip write): hippocampus (63 k voxels,
image and label) 0.032 s; a 122x101x112 CT resampled to 37 M voxels 4.4 s (estimated 5.6 s)."""
RESAMPLE_LABEL_FACTOR = 0.3
"""A label map (nearest neighbour, uint8) costs this share of an image channel."""

INFER_STARTUP_S = 3.0
"""Start-up of an inference job: Python, torch, torchio, the msdseg modules, loading model.pt
(2.0 s measured in a workflow job on an idle machine, imports alone 2.2-3.1 s under load)."""
INFER_FIXED_S = 0.1
"""Per subject: reading the image, intensity preprocessing, writing the uint8 prediction."""
INFER_S_PER_ORIGINAL_VOXEL = 1.0e-7
"""Per voxel of the original image: class probabilities resampled back onto its grid, argmax."""
INFER_S_PER_PATCH_VOXEL = 1.0e-6
"""Per voxel of every grid patch, per model and mirrored pass, for a U-Net with 16 base channels
(1.0e-6 on hippocampus, 1.35e-6 on a 122x101x112 CT at 3 mm, 2.1e-6 on 244x202x224 at 1.5 mm).
Scaled by (base_channels / 16) ** :data:`INFER_WIDTH_EXPONENT`."""
INFER_WIDTH_EXPONENT = 1.25
"""Measured on hippocampus: 32 base channels (depth 3) 2.3x the time of 16 (depth 4), 4 channels 0.13x."""


def target_seconds(startup_s: float) -> float:
    """Work per job that keeps ``startup_s`` at most :data:`START_UP_SHARE` of it (and at least :data:`MIN_WORK_S`)."""
    return max(MIN_WORK_S, startup_s * (1.0 - START_UP_SHARE) / START_UP_SHARE)


# --------------------------------------------------------------------------- the cohort


@dataclass(frozen=True)
class Subject:
    """One row of manifest.csv, as much of it as scheduling needs."""

    subject: str
    role: str  # "train" | "test"
    fold: int  # -1 for test subjects
    image: str
    label: str  # "" for test subjects
    n_channels: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape[:3])


@dataclass
class Cohort:
    """The subjects of manifest.csv in its order, with dict lookups; ``memo`` caches what is derived."""

    subjects: tuple[Subject, ...]
    by_id: dict[str, Subject]
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def role(self, role: str) -> list[Subject]:
        return self.derived(("role", role), lambda: [s for s in self.subjects if s.role == role])

    def validation(self, fold: int) -> list[Subject]:
        """The training subjects of fold ``fold`` (the ones its model is validated on)."""
        fold = int(fold)
        return self.derived(("fold", fold), lambda: [s for s in self.subjects if s.role == "train" and s.fold == fold])

    def derived(self, key: Any, make: Callable[[], T]) -> T:
        """``make()`` once per cohort (one manifest version) and ``key``."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


_REQUIRED = ("subject", "role", "fold", "image", "label", "n_channels", "shape", "spacing")


def read_cohort(path: str | os.PathLike[str]) -> Cohort:
    """manifest.csv as a :class:`Cohort`, with the csv module (no pandas): 10,000 rows in about 0.1 s."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: lacks columns {missing}; delete it so the manifest rule writes it again.")
        subjects = tuple(
            Subject(
                subject=row["subject"],
                role=row["role"],
                fold=int(row["fold"]),
                image=row["image"],
                label=row["label"],
                n_channels=int(row["n_channels"]),
                shape=tuple(int(v) for v in json.loads(row["shape"])),
                spacing=tuple(float(v) for v in json.loads(row["spacing"])),
            )
            for row in reader
        )
    return Cohort(subjects, {s.subject: s for s in subjects})


_CACHE: dict[str, tuple[tuple[int, int], Cohort]] = {}


def cached_cohort(path: str | os.PathLike[str]) -> Cohort:
    """:func:`read_cohort`, parsed again only when the file's mtime or size changed.

    Snakemake calls the input functions once per job: parsing the whole manifest in each made
    building the DAG quadratic in the number of subjects.
    """
    key = os.fspath(path)
    stat = os.stat(key)
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _CACHE.get(key)
    if cached is None or cached[0] != version:
        cached = (version, read_cohort(key))
        _CACHE[key] = cached
    return cached[1]


# --------------------------------------------------------------------------- chunks


def split(items: Sequence[T], size: int) -> list[list[T]]:
    """Chunk ``k`` = ``items[k*size:(k+1)*size]``."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def auto_size(costs: Sequence[float], target_s: float) -> int:
    """Subjects per job so that each job holds about ``target_s`` of estimated work or more.

    As many chunks as the total fills with ``target_s`` each (at least one), subjects shared out
    evenly: 21 s of work and a 10 s target give 2 chunks of half the subjects, not 10 + 10 + 1.
    """
    if not costs:
        return 1
    chunks = max(1, math.floor(sum(costs) / target_s))
    return max(1, math.ceil(len(costs) / chunks))


def chunk_size(setting: int | str, costs: Sequence[float], target_s: float) -> int:
    """``subjects_per_job`` as configured: a number as it is, ``auto`` from the estimated ``costs``."""
    if setting == "auto":
        return auto_size(costs, target_s)
    size = int(setting)
    if size < 1:
        raise ValueError(f"subjects_per_job must be at least 1 or 'auto', got {setting!r}")
    return size


def chunk_name(index: int) -> str:
    """The ``{chunk}`` wildcard of chunk ``index``: zero-padded, so folders list in order."""
    return f"{index:04d}"


@dataclass(frozen=True)
class Chunks:
    """A stage's chunks: their members and which chunk each member is in."""

    members: tuple[tuple[str, ...], ...]
    of: dict[str, str]  # member -> chunk name
    size: int  # members per chunk (the last may hold fewer)

    @classmethod
    def build(cls, names: Sequence[str], size: int) -> Chunks:
        members = tuple(tuple(chunk) for chunk in split(list(names), size))
        return cls(members, {name: chunk_name(k) for k, chunk in enumerate(members) for name in chunk}, size)

    def span(self, chunk: str) -> slice:
        """Where chunk ``chunk``'s members are in the list it was built from."""
        start = int(chunk) * self.size
        return slice(start, start + len(self[chunk]))

    def __getitem__(self, chunk: str) -> tuple[str, ...]:
        index = int(chunk)
        if not 0 <= index < len(self.members):
            raise KeyError(f"no chunk {chunk!r} (there are {len(self.members)})")
        return self.members[index]

    def __len__(self) -> int:
        return len(self.members)

    def names(self) -> list[str]:
        return [chunk_name(k) for k in range(len(self.members))]


def chunk_of(members: Sequence[T], size: int, chunk: str, what: str) -> list[T]:
    """Chunk ``chunk`` of ``members`` in chunks of ``size``: the members :meth:`Chunks.build` gives it."""
    parts = split(members, size)
    index = int(chunk)
    if not 0 <= index < len(parts):
        raise KeyError(f"no chunk {chunk!r} of {what} (there are {len(parts)})")
    return parts[index]


def role_chunk(cohort: Cohort, role: str, size: int, chunk: str) -> list[Subject]:
    """Chunk ``chunk`` of the ``role`` subjects in chunks of ``size``: the members :meth:`Chunks.build` gives it.

    For a job that finds its subjects in manifest.csv itself: its command line then stays short
    for any chunk size (a shell command is one argument of at most 128 KiB on Linux).
    """
    return chunk_of(cohort.role(role), size, chunk, f"the {role} subjects")


def infer_members(cohort: Cohort, fold: int | None, with_test: bool = False) -> list[Subject]:
    """The subjects an inference rule predicts, in order, before they are cut into chunks.

    ``fold``: its validation subjects, then the test list where ``with_test`` (the fold's model
    alone predicts it: one process, one model load for both); None: the test list (infer_test).
    """
    if fold is None:
        return cohort.role("test")
    validation = cohort.validation(fold)
    return validation + cohort.role("test") if with_test else validation


def infer_chunk(
    manifest: str | os.PathLike[str],
    fold: int | None,
    with_test: bool,
    size: int,
    chunk: str,
    first: str,
    count: int,
) -> list[Subject]:
    """The subjects of an inference job, read from ``manifest`` as the DAG did, checked against its plan.

    ``first`` and ``count`` are what the DAG found: a different answer means manifest.csv was
    rewritten since, and the job stops instead of predicting subjects its outputs do not promise.
    """
    what = "the test subjects" if fold is None else f"fold {fold}'s validation subjects"
    if fold is not None and with_test:
        what += " and the test subjects"
    return planned_chunk(infer_members(read_cohort(manifest), fold, with_test), size, chunk, first, count,
                         what, manifest)


def planned_chunk(
    members: Sequence[Subject],
    size: int,
    chunk: str,
    first: str,
    count: int,
    what: str,
    manifest: str | os.PathLike[str],
) -> list[Subject]:
    """:func:`chunk_of`, or a DatasetError naming the fix where it is not the planned ``count`` from ``first``."""
    try:
        found = chunk_of(members, size, chunk, what)
    except KeyError:
        found = []
    if len(found) != count or not found or found[0].subject != first:
        raise DatasetError(
            f"{manifest}: chunk {chunk} of {what} is {len(found)} subject(s) from "
            f"{found[0].subject if found else None}, but the workflow planned {count} from {first}; "
            "manifest.csv changed while the workflow ran: run it again."
        )
    return found


RESAMPLED_FOLDERS = {"train": "imagesTr", "test": "imagesTs"}
"""Where the data stage places a subject's resampled image under results/<task>/resampled, by role."""


def resampled_image(root: str | os.PathLike[str], subject: Subject) -> str:
    """The resampled image of ``subject`` under ``root`` (results/<task>/resampled): the DAG's input, the job's file."""
    return os.path.join(os.fspath(root), RESAMPLED_FOLDERS[subject.role], f"{subject.subject}.nii.gz")


# --------------------------------------------------------------------------- work estimates


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], preprocess: Mapping[str, Any]) -> tuple[int, ...]:
    """The voxel grid an image is resampled onto, estimated from the preprocess config.

    A fixed ``spacing`` and ``inplane_size`` are exact (as :func:`msdseg.resample.target_geometry`);
    ``median`` (or anything else the planner decides) is taken as the image's own spacing, which
    the median of a cohort is close to on average.
    """
    target = preprocess.get("spacing")
    if isinstance(target, (list, tuple)) and len(target) == 3:
        size = [max(1, round(n * s / t)) for n, s, t in zip(shape[:3], spacing[:3], target)]
    else:
        size = [int(n) for n in shape[:3]]
    inplane = preprocess.get("inplane_size")
    if isinstance(inplane, (list, tuple)) and len(inplane) == 2:
        size[0], size[1] = int(inplane[0]), int(inplane[1])
    return tuple(size)


def resample_seconds(subject: Subject, preprocess: Mapping[str, Any], with_label: bool) -> float:
    """Estimated resampling time of one subject (image channels, and its label when ``with_label``)."""
    voxels = math.prod(resampled_shape(subject.shape, subject.spacing, preprocess))
    channels = max(subject.n_channels, 1) + (RESAMPLE_LABEL_FACTOR if with_label else 0.0)
    return RESAMPLE_FIXED_S + RESAMPLE_S_PER_VOXEL * voxels * channels


def grid_patches(shape: Sequence[int], patch: Sequence[int], overlap: Sequence[int] | None) -> int:
    """How many patches a grid sampler takes from ``shape`` (padded to at least the patch)."""
    count = 1
    for axis, (size, width) in enumerate(zip(shape, patch)):
        lap = overlap[axis] if overlap is not None else width // 2
        step = max(int(width) - int(lap), 1)
        count *= max(1, math.ceil((max(int(size), int(width)) - int(lap)) / step))
    return count


def mirrored_passes(config: Mapping[str, Any]) -> int:
    """Forward passes per patch: 1, or 2**axes with mirroring test-time augmentation."""
    if not config.get("infer", {}).get("tta", False):
        return 1
    augmentation = config.get("train", {}).get("augmentation", {})
    axes = augmentation.get("flip_axes", [0, 1, 2]) if augmentation.get("flip", True) else []
    return 2 ** len(axes) if axes else 1


def infer_seconds(shape: Sequence[int], spacing: Sequence[float], config: Mapping[str, Any], n_models: int) -> float:
    """Estimated inference time of one image of ``shape`` and ``spacing`` with ``n_models`` models."""
    infer, train, model = config.get("infer", {}), config.get("train", {}), config.get("model", {})
    grid = resampled_shape(shape, spacing, config.get("preprocess", {}))
    patch = list(infer.get("patch_size") or train.get("patch_size") or [64, 64, 32])
    patch_voxels = grid_patches(grid, patch, infer.get("overlap")) * math.prod(patch)
    width = (float(model.get("base_channels", 16)) / 16.0) ** INFER_WIDTH_EXPONENT
    network = INFER_S_PER_PATCH_VOXEL * patch_voxels * width * mirrored_passes(config) * max(n_models, 1)
    return INFER_FIXED_S + INFER_S_PER_ORIGINAL_VOXEL * math.prod(shape[:3]) + network


# --------------------------------------------------------------------------- images of a folder

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """An image to predict: its channel files (one 3D/4D file, or nnU-Net's ``_0000``, ``_0001``...)."""

    case: str
    files: tuple[str, ...]


def _case_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_images(source: str | Sequence[str]) -> list[str]:
    """NIfTI files of a folder (sorted; hidden and macOS ``._`` files skipped) or a given list."""
    if isinstance(source, str):
        folder = Path(source)
        if not folder.is_dir():
            raise DatasetError(
                f"predict.input: {source} is not a folder; give a folder of NIfTI images or a list of files."
            )
        files = sorted(str(folder / name) for name in os.listdir(folder)
                       if name.endswith(NIFTI_SUFFIXES) and not name.startswith("."))
        if not files:
            raise DatasetError(f"predict.input: {source} holds no .nii/.nii.gz image.")
        return files
    files = [str(path) for path in source]
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DatasetError(f"predict.input: no such image file(s) {missing[:5]}; fix the list.")
    bad = [path for path in files if not path.endswith(NIFTI_SUFFIXES)]
    if bad:
        raise DatasetError(f"predict.input: {bad[:5]} are not .nii/.nii.gz files; convert them to NIfTI first.")
    return files


def group_cases(files: Sequence[str], layout: str = "auto") -> list[Case]:
    """The cases of a list of image files, sorted by name.

    ``decathlon``: one file per case (3D, or 4D with the channels on the 4th axis), named
    ``<case>.nii.gz``. ``nnunet``: one 3D file per channel, ``<case>_0000.nii.gz``,
    ``<case>_0001.nii.gz``... ``auto``: nnunet where every file name ends in ``_NNNN`` and every
    case has the same channels 0000..C-1; decathlon otherwise.
    """
    if layout not in ("auto", "decathlon", "nnunet"):
        raise ValueError(f"predict.layout must be auto, decathlon or nnunet, got {layout!r}")
    if layout in ("auto", "nnunet"):
        grouped: dict[str, dict[int, str]] = {}
        for path in files:
            match = _NNUNET_CHANNEL.match(_case_name(path))
            if match is None:
                if layout == "nnunet":
                    raise DatasetError(
                        f"{path}: predict.layout nnunet needs files named <case>_0000.nii.gz (one per channel); "
                        "rename it or set predict.layout: decathlon."
                    )
                grouped = {}
                break
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
        channel_sets = {tuple(sorted(channels)) for channels in grouped.values()}
        same = next(iter(channel_sets)) if len(channel_sets) == 1 else ()
        if grouped and same == tuple(range(len(same))):
            return [Case(case, tuple(paths[k] for k in sorted(paths))) for case, paths in sorted(grouped.items())]
        if layout == "nnunet":
            found = {case: sorted(channels) for case, channels in list(grouped.items())[:5]}
            raise DatasetError(
                f"predict.layout nnunet: every case needs the channel files _0000 .. _C-1 (the same C); found {found}."
            )
    cases: dict[str, str] = {}
    for path in files:
        name = _case_name(path)
        if name in cases:
            raise DatasetError(f"predict.input: {cases[name]} and {path} are one case name {name!r}; rename one.")
        cases[name] = path
    return [Case(name, (path,)) for name, path in sorted(cases.items())]


def nifti_grid(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dimensions, spacing) from a NIfTI-1/2 header, reading only its first bytes (no nibabel).

    For estimating work while the DAG is built; the jobs check images properly.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable NIfTI file ({error})") from error
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            pixdim = struct.unpack(order + "8f", header[76:108])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            pixdim = struct.unpack(order + "8d", header[104:168])
            break
    else:
        raise DatasetError(f"{path}: not a NIfTI-1/2 file (header size field); give .nii/.nii.gz images.")
    rank = max(0, min(int(dims[0]), 7))
    return tuple(int(v) for v in dims[1:rank + 1]), tuple(abs(float(v)) or 1.0 for v in pixdim[1:rank + 1])


def case_seconds(case: Case, config: Mapping[str, Any], n_models: int) -> float:
    """Estimated time to resample and predict one folder case (its first file's grid)."""
    shape, spacing = nifti_grid(case.files[0])
    if len(shape) < 3:
        return INFER_FIXED_S  # the job refuses it, naming the file
    spatial, spacing3 = shape[:3], (tuple(spacing[:3]) + (1.0, 1.0, 1.0))[:3]
    channels = (shape[3] if len(shape) > 3 else 1) * len(case.files)
    resample = RESAMPLE_FIXED_S + RESAMPLE_S_PER_VOXEL * channels * math.prod(
        resampled_shape(spatial, spacing3, config.get("preprocess", {})))
    return resample + infer_seconds(spatial, spacing3, config, n_models)


def runtime_minutes(seconds: float, floor: int = 10) -> int:
    """A scheduler time limit for an estimated ``seconds`` of work: 3x the estimate, at least ``floor``."""
    return max(int(floor), math.ceil(3.0 * seconds / 60.0))


# --------------------------------------------------------------------------- the jobs' side

WORK_LINE = "chunk of {n} subject(s) done: {seconds:.3f} s of work"
_WORK_PATTERN = re.compile(r"chunk of (\d+) subject\(s\) done: ([0-9.]+) s of work")


def work_line(n: int, seconds: float) -> str:
    """The line a chunk job logs at its end; :func:`parse_work` reads it back (benchmarks)."""
    return WORK_LINE.format(n=n, seconds=seconds)


def parse_work(text: str) -> tuple[int, float] | None:
    """(subjects, seconds of work) from a chunk job's log, or None when it has no such line."""
    matches = _WORK_PATTERN.findall(text)
    if not matches:
        return None
    n, seconds = matches[-1]
    return int(n), float(seconds)


def failed_in_chunk(subject: str, n: int) -> str:
    """What a failed subject adds to its error: the chunk's other outputs are not kept."""
    return (f"(in a chunk of {n} subject(s): none of them is kept, the next run redoes the chunk; "
            f"fix or exclude {subject} first)")

"""Inference jobs: a chunk of subjects (or new cases) predicted with models loaded once, the chunk's work logged."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import SimpleITK as sitk
import torch

from msdseg.errors import ModelError, SubjectError
from msdseg.infer.folder import check_cases, resampling_plan
from msdseg.infer.predict import _device, load_models, predict_loaded

if TYPE_CHECKING:
    from msdseg.jobs.cohort import Subject

logger = logging.getLogger(__name__)



class Item(NamedTuple):
    """One prediction of a chunk: the resampled image, its original (the output grid), the output file."""

    name: str
    image: Path
    reference: Path
    out: Path


def _in_chunk(error: Exception, name: str, path: Path, n: int) -> Exception:
    """``error`` as the exception that names the failed subject and what happens to its chunk."""
    from msdseg.jobs.worklog import failed_in_chunk

    note = failed_in_chunk(name, n)
    if isinstance(error, SubjectError):
        return SubjectError(error.subject, error.path, f"{error.problem} {note}")
    if isinstance(error, ModelError):
        return ModelError(f"{name}: {error} {note}")
    return SubjectError(name, str(path), f"prediction failed ({type(error).__name__}: {error}) {note}")


def predict_chunk(
    model_paths: Sequence[str | Path],
    items: Sequence[Item],
    infer: Mapping[str, Any],
    device: str | None = None,
    threads: int = 1,
) -> float:
    """Predict every item with the same models, loaded once; return the seconds of work.

    The predictions are those of :func:`predict_subject` for each item alone, byte for byte. A
    failing item raises naming it (its chunk is then redone as a whole by the workflow).
    """
    import time

    from msdseg.jobs.worklog import work_line

    torch.set_num_threads(max(int(threads), 1))
    device = _device(device)
    loaded = load_models(model_paths)
    work = 0.0
    for item in items:
        start = time.perf_counter()
        try:
            predict_loaded(loaded, item.image, item.reference, item.out, infer, device)
        except Exception as error:
            raise _in_chunk(error, item.name, item.image, len(items)) from error
        seconds = time.perf_counter() - start
        work += seconds
        logger.info("%s: predicted in %.3f s", item.name, seconds)
    logger.info(work_line(len(items), work))
    return work


def predict_subjects(
    subjects: Sequence[Subject],
    resampled: str | Path,
    model_paths: Sequence[str | Path],
    out_dir: str | Path,
    infer: Mapping[str, Any],
    device: str | None = None,
    threads: int = 1,
) -> float:
    """:func:`predict_chunk` of manifest subjects (:func:`msdseg.jobs.chunking.infer_chunk`) into ``out_dir``.

    Each subject's image as the data stage placed it under ``resampled``
    (:func:`msdseg.jobs.cohort.resampled_image`), its prediction on its original image's grid,
    written as ``out_dir/<subject>.nii.gz``: the files the workflow's rules name.
    """
    from msdseg.jobs.cohort import resampled_image

    items = [Item(s.subject, Path(resampled_image(resampled, s)), Path(s.image), Path(out_dir) / f"{s.subject}.nii.gz")
             for s in subjects]
    return predict_chunk(model_paths, items, infer, device=device, threads=threads)


def predict_cases(
    model_paths: Sequence[str | Path],
    cases: Sequence[tuple[str, Sequence[str]]],
    out_dir: str | Path,
    infer: Mapping[str, Any],
    device: str | None = None,
    threads: int = 1,
) -> float:
    """New images (``(name, files)``: one 3D/4D file, or one 3D file per channel) -> ``out_dir/<name>.nii.gz``.

    The same steps as the workflow: resampled with the models' plan (from model.pt) as
    :func:`msdseg.data.resample.resample_subject` does, then :func:`predict_chunk`'s prediction in the
    original geometry (the first file's header). All cases are checked against the models before
    any is predicted. Returns the seconds of work.
    """
    import tempfile
    import time

    from msdseg.data.resample import resample_subject
    from msdseg.images import read_image, write_image
    from msdseg.jobs.worklog import work_line

    torch.set_num_threads(max(int(threads), 1))
    device = _device(device)
    loaded = load_models(model_paths)
    plan = resampling_plan(loaded)
    check_cases(loaded, cases)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = 0.0
    with tempfile.TemporaryDirectory(prefix=".resampled-", dir=out) as scratch:
        for name, files in cases:
            start = time.perf_counter()
            try:
                source = Path(files[0])
                if len(files) > 1:  # nnU-Net's one file per channel -> one 4D image
                    source = Path(scratch) / f"{name}_channels.nii"
                    write_image(sitk.JoinSeries([read_image(path) for path in files]), source, compress=False)
                resampled = Path(scratch) / f"{name}.nii"
                resample_subject(source, resampled, plan)
                predict_loaded(loaded, resampled, Path(files[0]), out / f"{name}.nii.gz", infer, device)
                for temporary in {source, resampled} - {Path(files[0])}:
                    temporary.unlink(missing_ok=True)
            except Exception as error:
                raise _in_chunk(error, name, Path(files[0]), len(cases)) from error
            seconds = time.perf_counter() - start
            work += seconds
            logger.info("%s: resampled and predicted in %.3f s", name, seconds)
    logger.info(work_line(len(cases), work))
    return work

"""A resampling job: a chunk of manifest subjects, each written atomically, the chunk's work logged."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msdseg.data.resample import read_resampling_plan, resample_subject


def resample_chunk(
    subjects: Sequence[str],
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    plan: Mapping[str, Any],
    labels: Sequence[str | os.PathLike[str]] | None = None,
    folders: Mapping[str, str] | None = None,
) -> float:
    """:func:`resample_subject` for each subject into ``out_dir/<folder>/<subject>.nii.gz``; seconds of work.

    ``folders`` names the subfolders (``{"image": "imagesTr", "label": "labelsTr"}``). Each file
    is written atomically; a subject that fails raises :class:`msdseg.errors.SubjectError` naming
    it, and the workflow then deletes the whole chunk folder (all trusted or all redone).
    """
    import logging
    import time

    from msdseg.errors import SubjectError
    from msdseg.jobs.worklog import failed_in_chunk, work_line

    logger = logging.getLogger(__name__)
    folders = dict(folders or {"image": "images", "label": "labels"})
    if labels is not None and len(labels) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects but {len(labels)} labels")
    if len(images) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects but {len(images)} images")
    out = Path(out_dir)
    work = 0.0
    for index, (subject, image) in enumerate(zip(subjects, images)):
        label = labels[index] if labels is not None else None
        start = time.perf_counter()
        try:
            resample_subject(
                image,
                out / folders["image"] / f"{subject}.nii.gz",
                plan,
                label_in=label,
                label_out=out / folders["label"] / f"{subject}.nii.gz" if label is not None else None,
            )
        except SubjectError as error:
            problem = f"{error.problem} {failed_in_chunk(subject, len(subjects))}"
            raise SubjectError(error.subject, error.path, problem) from error
        except Exception as error:
            raise SubjectError(subject, str(image), f"resampling failed ({type(error).__name__}: {error}) "
                               f"{failed_in_chunk(subject, len(subjects))}") from error
        seconds = time.perf_counter() - start
        work += seconds
        logger.info("%s: resampled in %.3f s", subject, seconds)
    logger.info(work_line(len(subjects), work))
    return work


ROLE_FOLDERS = {"train": {"image": "imagesTr", "label": "labelsTr"}, "test": {"image": "imagesTs"}}
"""The staging subfolders of a chunk of each manifest role (the workflow's resampled/<folder>)."""


def resample_role_chunk(
    manifest: str | os.PathLike[str],
    role: str,
    size: int,
    chunk: str,
    plan: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    first: str,
    count: int,
) -> float:
    """:func:`resample_chunk` of chunk ``chunk`` of the ``role`` subjects of ``manifest``, ``size`` per chunk.

    The job finds its subjects where the DAG did (:func:`msdseg.jobs.chunking.planned_chunk`), so its
    command needs no list of files; ``first`` and ``count`` are what the DAG found, and a
    different answer (manifest.csv rewritten since) stops the job instead of resampling others.
    ``plan`` is the path of plan.json (:func:`read_resampling_plan`).
    """
    from msdseg.jobs.chunking import planned_chunk
    from msdseg.jobs.cohort import read_cohort

    members = planned_chunk(read_cohort(manifest).role(role), size, chunk, first, count,
                            f"the {role} subjects", manifest)
    labelled = role == "train"
    return resample_chunk(
        [s.subject for s in members],
        [s.image for s in members],
        out_dir,
        read_resampling_plan(plan),
        labels=[s.label for s in members] if labelled else None,
        folders=ROLE_FOLDERS[role],
    )

"""The subject table (manifest.csv): every subject of dataset.json validated, measured and foldered.

Reading every image once is the price of catching broken subjects here, before hours of
training, instead of in a worker that crashes on subject 173. Subjects are read one at a time and
their voxels are scanned in slabs along z, so a large CT costs about its own size in memory.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from msdseg import files
from msdseg.data.manifest_format import (
    EXCLUDED_COLUMNS,
    LIST_COLUMNS,
    REBUILD_HINT,
    STAT_COLUMNS,
    decode_list,
    manifest_columns,
    read_rows,
    voxel_column_label,
    voxel_columns,
)
from msdseg.data.subject_checks import _SKIP_HINT, _inspect, _Invalid
from msdseg.decathlon import DatasetInfo, label_map
from msdseg.errors import ConfigError, DatasetError, SubjectError
from msdseg.logs import say

ON_INVALID = ("error", "skip")


def assign_folds(subjects: Sequence[str], n_folds: int, seed: int) -> dict[str, int]:
    """Fold per subject: sorted ids, a seeded permutation, then round-robin.

    Sorting first makes the result independent of the order dataset.json lists subjects in;
    round-robin makes fold sizes differ by at most one. Fewer subjects than folds make one fold
    per subject (leave-one-out): a small task of the user's own still runs with the defaults.
    """
    ids = sorted(str(s) for s in subjects)
    if len(set(ids)) != len(ids):
        duplicates = sorted(s for s, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"subject ids must be unique, got duplicates {duplicates}: "
                           "dataset.json lists these files twice; remove the repeated entries.")
    if n_folds < 2:
        raise ConfigError(f"config key 'manifest.n_folds': at least 2 folds are needed, got {n_folds}.")
    n_folds = min(n_folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[int(index)]: position % n_folds for position, index in enumerate(order)}


@dataclass(frozen=True)
class FoldSplit:
    """Who trains and who validates in one fold; ``held_out`` is False when they are the same subjects."""

    training: list[str]
    validation: list[str]
    held_out: bool


def split_fold(folds: Mapping[str, int], fold: int) -> FoldSplit:
    """The training and validation subjects of ``fold`` (``folds``: subject -> fold, -1 for test subjects).

    A task with a single labelled subject has one fold, and that subject is both: the model is
    trained and scored on it, and every report marks the Dice as not held out.
    """
    labelled = {subject: int(f) for subject, f in folds.items() if int(f) >= 0}
    validation = sorted(s for s, f in labelled.items() if f == int(fold))
    if not validation:
        existing = sorted(set(labelled.values()))
        raise ConfigError(
            f"config key 'train.folds': fold {fold} has no subjects; manifest.csv puts its {len(labelled)} "
            f"labelled subject(s) in folds {existing}. Train only those folds, or add labelled subjects."
        )
    training = sorted(s for s, f in labelled.items() if f != int(fold))
    if not training:
        return FoldSplit(validation, validation, held_out=False)
    return FoldSplit(training, validation, held_out=True)


def build_manifest(
    dataset: DatasetInfo,
    *,
    n_folds: int,
    seed: int,
    on_invalid: str = "error",
    affine_tolerance: float = 1e-3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, excluded) for every subject of ``dataset``; folds go to the surviving training subjects.

    ``on_invalid="error"`` raises SubjectError at the first broken subject; ``"skip"`` drops it
    and records (subject, role, file, reason) in ``excluded``. Rows are sorted: training
    subjects first, then test, each by subject id, so the table does not depend on the order of
    dataset.json.
    """
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"config key 'manifest.on_invalid': one of {ON_INVALID}, got {on_invalid!r}.")
    labels = label_map(dataset.labels)
    seen = Counter(s.subject for s in dataset.subjects)
    duplicates = sorted(s for s, n in seen.items() if n > 1)
    if duplicates:
        raise DatasetError(f"{dataset.root}/dataset.json: subjects listed twice: {duplicates}; list each once.")

    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    for subject_files in sorted(dataset.subjects, key=lambda s: (s.role != "train", s.subject)):
        try:
            rows.append(_inspect(subject_files, labels, affine_tolerance))
        except _Invalid as invalid:
            if on_invalid == "error":
                raise SubjectError(
                    subject_files.subject, invalid.path, f"{invalid.problem}. Fix: {invalid.fix}, {_SKIP_HINT}."
                ) from None
            excluded.append(
                {"subject": subject_files.subject, "role": subject_files.role, "file": invalid.path,
                 "reason": invalid.problem}
            )

    training = [row["subject"] for row in rows if row["role"] == "train"]
    if not training:
        raise DatasetError(
            f"{dataset.root}/dataset.json: no valid training subject left "
            f"({len(excluded)} excluded, see excluded.csv); a model needs labelled subjects."
        )
    folds = assign_folds(training, n_folds, seed)
    if len(training) < n_folds:
        say(f"only {len(training)} labelled subject(s) for manifest.n_folds={n_folds}: "
            + ("one fold per subject (leave-one-out)." if len(training) > 1 else
               "one fold that trains and validates on that subject, so its Dice is not held out."),
            name="msdseg.data.manifest")
    for row in rows:
        if row["role"] == "train":
            row["fold"] = folds[row["subject"]]

    manifest = _typed(pd.DataFrame(rows, columns=manifest_columns(labels)))
    excluded_table = pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS).astype(str)
    return manifest, excluded_table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """The one set of dtypes of a manifest, so build_manifest and read_manifest agree exactly."""
    table = table.reset_index(drop=True)
    for column in ("subject", "role", "image", "label"):
        table[column] = table[column].astype(str)
    for column in ("fold", "n_channels"):
        table[column] = table[column].astype(np.int64)
    for column in voxel_columns(table.columns):
        table[column] = table[column].astype("Int64")
    for column in STAT_COLUMNS:
        table[column] = table[column].astype(np.float64)
    for column in LIST_COLUMNS:
        table[column] = pd.Series([list(v) for v in table[column]], index=table.index, dtype=object)
    return table


def _cell(value: Any) -> str:
    """Text of one cell: JSON lists, repr floats (exact round trip), empty for missing."""
    if isinstance(value, (list, tuple)):
        return json.dumps([v.item() if isinstance(v, np.generic) else v for v in value])
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _csv_text(table: pd.DataFrame, columns: Sequence[str]) -> str:
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in table[list(columns)].itertuples(index=False, name=None):
        writer.writerow([_cell(v) for v in record])
    return buffer.getvalue()


def write_manifest(manifest: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write manifest.csv atomically; the same table always gives the same bytes."""
    columns = manifest_columns([voxel_column_label(c) for c in voxel_columns(manifest.columns)])
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    files.write_text(_csv_text(manifest, columns), path)


def write_excluded(excluded: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write excluded.csv (subject, role, file, reason) atomically; a header only when none was dropped."""
    files.write_text(_csv_text(excluded, EXCLUDED_COLUMNS), path)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read manifest.csv with its list cells decoded (``[0.8, 0.8, 2.5]`` -> list) and typed columns."""
    header, rows = read_rows(path, [])
    expected = manifest_columns([voxel_column_label(c) for c in voxel_columns(header)])
    if header != expected:
        raise DatasetError(f"{path}: columns {header} are not those of a manifest ({expected}); {REBUILD_HINT}.")
    table = pd.DataFrame(rows, columns=header, dtype=str)
    for column in LIST_COLUMNS:
        table[column] = pd.Series([decode_list(v) for v in table[column]], index=table.index, dtype=object)
    for column in ("fold", "n_channels"):
        table[column] = table[column].map(int)
    for column in voxel_columns(table.columns):
        table[column] = pd.array([int(v) if v != "" else pd.NA for v in table[column]], dtype="Int64")
    for column in STAT_COLUMNS:
        table[column] = [float(v) if v != "" else math.nan for v in table[column]]
    return _typed(table)

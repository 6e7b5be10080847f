"""What manifest.csv looks like on disk: its columns and cells, for both of its readers.

The data stage reads it into pandas (:func:`msdseg.data.manifest.read_manifest`); the
workflow's input functions and jobs read it without pandas (:func:`msdseg.jobs.cohort.read_cohort`,
10,000 rows in about 0.1 s). Both go through :func:`read_rows`, so they cannot disagree on the format.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from msdseg.errors import DatasetError

LIST_COLUMNS = ("shape", "spacing", "origin", "direction")
"""Cells holding a JSON list, e.g. ``[0.8, 0.8, 2.5]``."""

STAT_COLUMNS = (
    "intensity_mean",
    "intensity_std",
    "intensity_min",
    "intensity_max",
    "fg_mean",
    "fg_std",
    "fg_p00_5",
    "fg_p99_5",
    "zero_fraction",
)

SCHEDULING_COLUMNS = ("subject", "role", "fold", "image", "label", "n_channels", "shape", "spacing")
"""The columns the workflow's jobs need (a subset of :func:`manifest_columns`)."""

EXCLUDED_COLUMNS = ["subject", "role", "file", "reason"]
"""Columns of excluded.csv, the subjects the manifest left out and why."""

REBUILD_HINT = "delete it so the manifest rule writes it again"


def manifest_columns(labels: Mapping[int, str] | Sequence[int]) -> list[str]:
    """The fixed column order of manifest.csv for a dataset's labels (``voxels_<label value>``)."""
    voxel_columns = [f"voxels_{key}" for key in sorted(int(k) for k in labels)]
    return ["subject", "role", "fold", "image", "label", "n_channels", *LIST_COLUMNS, *voxel_columns, *STAT_COLUMNS]


def voxel_columns(columns: Sequence[str]) -> list[str]:
    """The ``voxels_<label>`` columns among ``columns``, in their order."""
    return [c for c in columns if c.startswith("voxels_")]


def voxel_column_label(column: str) -> int:
    """The label value a ``voxels_<label>`` column counts."""
    return int(column.split("_", 1)[1])


def read_rows(path: str | os.PathLike[str], required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as text) of manifest.csv; a file lacking a ``required`` column is refused with the fix."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path}: lacks columns {missing}, so it is not a manifest; {REBUILD_HINT}.")
        return header, list(reader)


def decode_list(cell: str) -> list[Any]:
    """A list cell's value (cells are written as JSON lists)."""
    return json.loads(cell)

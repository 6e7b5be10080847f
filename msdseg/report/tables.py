"""Per-fold metric tables and the Dice summary over folds.

``fold<k>/metrics.csv`` (:func:`fold_metrics`): one row per subject and foreground class, sorted
by subject then label. Computed in the original geometry against the original label.

| column | meaning |
|---|---|
| subject | subject id (file name without .nii.gz) |
| label | integer label of the class (dataset.json) |
| class_name | class name from dataset.json |
| dice | Dice; NaN when reference and prediction are both empty, 0 when only one is |
| hd95_mm | Hausdorff distance at `evaluate.hausdorff_percentile` (default 95) in mm; NaN both empty, inf one empty |
| nsd | normalised surface Dice at `evaluate.nsd_tolerance_mm`; NaN both empty, 0 one empty |
| volume_ref_ml | reference volume of the class in mL |
| volume_pred_ml | predicted volume of the class in mL |

``dice_summary.csv`` (:func:`dice_summary`): Dice statistics per fold and class, then over all
folds together (fold ``all``); folds in ascending order, then ``all``; classes by label.

| column | meaning |
|---|---|
| fold | fold number, or `all` for every fold's subjects together |
| label | integer label of the class |
| class_name | class name from dataset.json |
| n | number of subjects with a Dice (NaN, i.e. both empty, excluded) |
| mean, std, median, min, max | of those Dice values (std: sample standard deviation, ddof=1; NaN when n < 2) |
| held_out | false when the fold's model trained on the subjects it is scored on (one labelled subject) |
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from msdseg.metrics import METRIC_COLUMNS

SUMMARY_COLUMNS = ["fold", "label", "class_name", "n", "mean", "std", "median", "min", "max", "held_out"]


_METRIC_DTYPES = {
    "subject": "string",
    "label": "int64",
    "class_name": "string",
    "dice": "float64",
    "hd95_mm": "float64",
    "nsd": "float64",
    "volume_ref_ml": "float64",
    "volume_pred_ml": "float64",
}


def fold_metrics(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The metrics table of one fold from :func:`msdseg.metrics.evaluate_subject` rows."""
    frame = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
    frame = frame.astype(_METRIC_DTYPES)
    return frame.sort_values(["subject", "label"], kind="stable").reset_index(drop=True)


def read_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a ``metrics.csv`` back with the dtypes :func:`fold_metrics` gives ("inf" stays inf)."""
    frame = pd.read_csv(path, dtype={"subject": "string", "class_name": "string"})
    return fold_metrics(frame.to_dict("records"))


def _describe(values: pd.Series) -> dict[str, float | int]:
    finite = values.dropna().to_numpy(dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "std": nan, "median": nan, "min": nan, "max": nan}
    return {
        "n": n,
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if n > 1 else float("nan"),
        "median": float(np.median(finite)),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def dice_summary(metrics_by_fold: Mapping[int, pd.DataFrame],
                 held_out: Mapping[int, bool] | None = None) -> pd.DataFrame:
    """Dice statistics per fold and class, and over all folds (fold ``"all"``).

    The fold column holds strings (``"0"``, ``"1"``, ..., ``"all"``) so the table has one type
    per column and reads back the same from CSV. ``held_out`` (default: every fold) says which
    folds were scored on subjects their model never saw; ``all`` is held out only if each is.
    """
    held_out = {int(fold): bool((held_out or {}).get(int(fold), True)) for fold in metrics_by_fold}
    frames = []
    for fold in sorted(metrics_by_fold, key=int):
        frame = metrics_by_fold[fold][["label", "class_name", "dice"]].copy()
        frame["fold"] = str(int(fold))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    everything = pd.concat(frames, ignore_index=True)
    classes = (
        everything[["label", "class_name"]]
        .drop_duplicates("label")
        .sort_values("label", kind="stable")
        .itertuples(index=False)
    )
    classes = list(classes)
    rows = []
    for fold in [*(str(int(f)) for f in sorted(metrics_by_fold, key=int)), "all"]:
        scope = everything if fold == "all" else everything[everything["fold"] == fold]
        for label, class_name in classes:
            values = scope.loc[scope["label"] == label, "dice"]
            kept_apart = all(held_out.values()) if fold == "all" else held_out[int(fold)]
            rows.append({"fold": fold, "label": int(label), "class_name": str(class_name), **_describe(values),
                         "held_out": kept_apart})
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return summary.astype({"fold": "string", "label": "int64", "class_name": "string", "n": "int64",
                           "held_out": "bool"})

"""Report jobs: what the evaluate_fold and summarize rules do, from their inputs to their outputs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msdseg.decathlon import read_dataset_json
from msdseg.files import write_csv, write_text
from msdseg.metrics import evaluate_subject


def evaluate_fold_job(predictions: Sequence[str], references: Sequence[str], task_folder: str,
                      settings: Mapping[str, Any], out_metrics: str) -> None:
    """Rule evaluate_fold: metrics per subject and class of one fold's predictions, against the original labels."""
    from msdseg.report.tables import fold_metrics

    labels = read_dataset_json(Path(task_folder)).labels
    rows = []
    for prediction, reference in zip(predictions, references):
        rows += evaluate_subject(Path(prediction), Path(reference), labels,
                                 nsd_tolerance_mm=settings["nsd_tolerance_mm"],
                                 hausdorff_percentile=settings["hausdorff_percentile"])
    write_csv(fold_metrics(rows), out_metrics)


def summarize_job(metrics_by_fold: Mapping[int, str], manifest_path: str, prediction_pattern: str,
                  config: Mapping[str, Any], out_summary: str, out_boxplot: str, out_overlays: str,
                  out_provenance: str) -> None:
    """Rule summarize: the Dice summary over folds, the box plot, the best/worst overlays and the provenance.

    ``prediction_pattern`` has ``{fold}`` and ``{subject}`` fields: where each held-out prediction lies.
    """
    import pandas as pd

    from msdseg.data.manifest import read_manifest, split_fold
    from msdseg.provenance import provenance
    from msdseg.report.plots import overlay_cases, plot_dice_boxplot, plot_overlays
    from msdseg.report.tables import dice_summary, read_metrics

    by_fold = {int(fold): read_metrics(path) for fold, path in metrics_by_fold.items()}
    manifest = read_manifest(manifest_path).set_index("subject")
    fold_of = manifest["fold"].to_dict()
    held_out = {fold: split_fold(fold_of, fold).held_out for fold in by_fold}
    write_csv(dice_summary(by_fold, held_out), out_summary)
    metrics = pd.concat([table.assign(fold=fold) for fold, table in by_fold.items()], ignore_index=True)
    plot_dice_boxplot(metrics, out_boxplot)

    subjects = sorted(set(metrics["subject"]))
    cases = overlay_cases(
        metrics,
        images={s: manifest.loc[s, "image"] for s in subjects},
        references={s: manifest.loc[s, "label"] for s in subjects},
        predictions={s: prediction_pattern.format(fold=fold_of[s], subject=s) for s in subjects},
    )
    plot_overlays(cases, out_overlays, class_names=dict(zip(metrics["label"], metrics["class_name"])))
    record = provenance(config)
    write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", out_provenance)

"""Rule summarize: the Dice summary over folds, the box plot and the best/worst overlays."""

import _bootstrap  # noqa: F401

import json

import pandas as pd

from msdseg.data.manifest import read_manifest, split_fold
from msdseg.files import write_csv, write_text
from msdseg.logs import job_log
from msdseg.provenance import provenance
from msdseg.report.plots import overlay_cases, plot_dice_boxplot, plot_overlays
from msdseg.report.tables import dice_summary, read_metrics

with job_log(snakemake.log[0]):
    by_fold = {int(fold): read_metrics(path) for fold, path in zip(snakemake.params.folds, snakemake.input.metrics)}
    manifest = read_manifest(snakemake.input.manifest).set_index("subject")
    fold_of = manifest["fold"].to_dict()
    held_out = {fold: split_fold(fold_of, fold).held_out for fold in by_fold}
    write_csv(dice_summary(by_fold, held_out), snakemake.output.summary)
    metrics = pd.concat([table.assign(fold=fold) for fold, table in by_fold.items()], ignore_index=True)
    plot_dice_boxplot(metrics, snakemake.output.boxplot)

    subjects = sorted(set(metrics["subject"]))
    cases = overlay_cases(
        metrics,
        images={s: manifest.loc[s, "image"] for s in subjects},
        references={s: manifest.loc[s, "label"] for s in subjects},
        predictions={
            s: snakemake.params.prediction_pattern.format(fold=fold_of[s], subject=s) for s in subjects
        },
    )
    names = dict(zip(metrics["label"], metrics["class_name"]))
    plot_overlays(cases, snakemake.output.overlays, class_names=names)
    record = provenance(snakemake.config)
    write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", snakemake.output.provenance)

"""Paths, the archive source and input functions shared by every stage."""

import os
import shutil
from pathlib import Path

from msdseg.decathlon import SYNTHETIC_TASK, TASKS

TASK = config["task"]
RESULTS = Path(config["results"]) / TASK
SYNTHETIC = TASK == SYNTHETIC_TASK and not any(
    config["source"][key] for key in ("url", "archive", "folder")
)
FOLDS = sorted(set(config["train"]["folds"]))
ENV = "../../envs/msdseg.yaml"
# A job that will find a GPU asks for the `gpu` resource, so profiles/default's `gpu: 1` keeps two
# of them off one GPU. train.gpus / infer.gpus ask explicitly (a cluster's login node has none).
LOCAL_GPU = 1 if shutil.which("nvidia-smi") else 0


def train_gpus():
    """GPUs a train job asks for: at least train.devices when it trains with DDP."""
    devices = config["train"]["devices"]
    return max(config["train"]["gpus"] or LOCAL_GPU, devices if devices > 1 else 0)


def result(path):
    """A path under results/<task>/."""
    return str(RESULTS / path)


def log_path(rule_name, wildcards_part=""):
    """results/<task>/logs/<rule>[/<wildcards>].log"""
    return result(os.path.join("logs", rule_name, wildcards_part).rstrip(os.sep) + ".log")


def benchmark_path(rule_name, wildcards_part=""):
    return result(os.path.join("benchmarks", rule_name, wildcards_part).rstrip(os.sep) + ".tsv")


for fold in FOLDS:
    if fold >= config["manifest"]["n_folds"]:
        raise WorkflowError(
            f"config key 'train.folds': fold {fold} does not exist with "
            f"manifest.n_folds={config['manifest']['n_folds']}; use folds 0..{config['manifest']['n_folds'] - 1}."
        )


def archive_source():
    """Where the archive comes from: (url, md5, sha256). None for a local archive or folder."""
    source = config["source"]
    if source["folder"] or source["archive"]:
        return None
    if SYNTHETIC:
        return {"url": None, "md5": None, "sha256": None}  # filled from the generated archive
    if source["url"]:
        return {"url": source["url"], "md5": source["md5"], "sha256": source["sha256"]}
    official = TASKS[TASK]
    return {"url": official.url, "md5": source["md5"] or official.md5, "sha256": source["sha256"]}


def raw_folder():
    """The extracted task folder (dataset.json inside)."""
    if config["source"]["folder"]:
        return config["source"]["folder"]
    return result("raw")


def archive_path():
    if config["source"]["archive"]:
        return config["source"]["archive"]
    return result(f"download/{TASK}.tar")


def manifest_table():
    """The manifest, once the checkpoint has run (re-evaluates the DAG after it)."""
    from msdseg.manifest import read_manifest

    return read_manifest(checkpoints.manifest.get().output.manifest)


def subjects(role):
    table = manifest_table()
    return list(table.loc[table["role"] == role, "subject"])


def fold_subjects(fold):
    table = manifest_table()
    return list(table.loc[(table["role"] == "train") & (table["fold"] == int(fold)), "subject"])


def original_image(wildcards):
    table = manifest_table().set_index("subject")
    return table.loc[wildcards.subject, "image"]


def original_label(subject):
    table = manifest_table().set_index("subject")
    return table.loc[subject, "label"]


def training_inputs(wildcards):
    train = subjects("train")
    return {
        "images": expand(result("resampled/imagesTr/{subject}.nii.gz"), subject=train),
        "labels": expand(result("resampled/labelsTr/{subject}.nii.gz"), subject=train),
    }


def fold_predictions(wildcards):
    return expand(
        result("fold{fold}/predictions/{subject}.nii.gz"),
        fold=wildcards.fold,
        subject=fold_subjects(wildcards.fold),
    )


def fold_references(wildcards):
    return [original_label(subject) for subject in fold_subjects(wildcards.fold)]


def final_outputs(wildcards):
    outputs = [result("manifest.csv"), result("dice_summary.csv")]
    outputs += expand(result("fold{fold}/learning_curve.png"), fold=FOLDS)
    outputs += expand(result("predictions/test/{subject}.nii.gz"), subject=subjects("test"))
    outputs += [result("plots/dice_boxplot.png"), result("plots/overlays.png")]
    return outputs


wildcard_constraints:
    fold=r"\d+",
    subject=r"[^/]+",

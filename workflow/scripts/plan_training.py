"""Rule plan_training: network, patch, batch and iterations from the fingerprint, the device and the budget."""

import _bootstrap  # noqa: F401

import json
import logging

import torch

from msdseg.config import check_labels
from msdseg.decathlon import label_map, subject_id
from msdseg.devices import cpu_has_native_bf16, gpu_slot
from msdseg.io import write_text
from msdseg.logs import job_log
from msdseg.manifest import read_manifest
from msdseg.plan import read_plan
from msdseg.planner import (
    Fingerprint,
    TrainingPlan,
    apply_plan,
    detect_device,
    plan_training,
    settle_budget,
    torch_probe,
)
from msdseg.train.probe import pipeline_pace

# the probe runs on the GPU the train job will use: take a slot first (before CUDA starts)
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.devices)):
    plan = read_plan(snakemake.input.plan)
    user = snakemake.params.user
    check_labels({"class_weights": user.get("train.class_weights"),
                  "label_probabilities": user.get("train.label_probabilities")},
                 label_map(plan["labels"]), f"{snakemake.input.plan} (the task's labels)")
    fingerprint = Fingerprint.from_manifest(read_manifest(snakemake.input.manifest), plan)
    settings = snakemake.params.plan
    torch.set_num_threads(snakemake.threads)
    device, here = detect_device(settings["device"], snakemake.threads, settings["gpu_memory_gb"])
    native_bf16 = device.type == "cpu" and cpu_has_native_bf16()
    probe = None
    if here:
        precision = user.get("train.precision", "bf16" if native_bf16 else "auto")
        probe = torch_probe(fingerprint, torch.device(device.type), precision)
    training = plan_training(fingerprint, device, snakemake.params.budget_minutes, user, probe=probe,
                             n_folds=snakemake.params.n_folds, cpu_native_bf16=native_bf16)
    planned = training.as_dict()
    if here and "train.iterations" not in user:  # the step misses the data: settle from the pipeline's pace
        config = apply_plan({"seed": snakemake.params.seed, "model": snakemake.params.model,
                             "train": {**snakemake.params.train, "max_minutes": snakemake.params.budget_minutes}},
                            planned)
        rows = [{"subject": subject_id(image), "image": image, "label": label}
                for image, label in zip(snakemake.input.images, snakemake.input.labels)]
        pace = pipeline_pace(rows, plan, config, snakemake.threads, device.type)
        planned = settle_budget(planned, None, snakemake.params.n_folds, pace)
    settled = TrainingPlan.from_dict(planned)
    logging.getLogger("msdseg.plan").info("training plan for %s:\n%s", device.describe(), settled.table())
    write_text(json.dumps(planned, indent=2, sort_keys=True) + "\n", snakemake.output.plan)
    write_text(settled.csv(), snakemake.output.table)

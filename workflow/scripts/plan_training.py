"""Rule plan_training: network, patch, batch and iterations from the fingerprint, the device and the budget."""

import _bootstrap  # noqa: F401

import json
import logging

import torch

from msdseg.config import check_labels
from msdseg.decathlon import label_map
from msdseg.devices import cpu_has_native_bf16, gpu_slot
from msdseg.io import write_text
from msdseg.logs import job_log
from msdseg.manifest import read_manifest
from msdseg.plan import read_plan
from msdseg.planner import Fingerprint, detect_device, plan_training, torch_probe

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
    logging.getLogger("msdseg.plan").info("training plan for %s:\n%s", device.describe(), training.table())
    write_text(json.dumps(training.as_dict(), indent=2, sort_keys=True) + "\n", snakemake.output.plan)
    write_text(training.csv(), snakemake.output.table)

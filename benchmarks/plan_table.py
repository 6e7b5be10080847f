"""The planner's choices for the ten MSD tasks, from their published fingerprints, beside nnU-Net's plans.

Two devices: a 24 GB GPU at full resolution (memory estimate only; the iteration count is settled
by the train job's probe on the GPU) and this machine's CPU with a 15-minute budget (each plan
measures real training steps here, so the CPU column depends on this machine), with the validation
patches and the share of the budget they take, at the spacing the CPU budget affords (full
resolution, or coarser where it cannot afford a patch of half the median image:
msdseg.plan.resolution). A plan that cannot fit says why; each plan's reasons follow the table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/plan_table.py [--threads 2] [--minutes 15]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from msdseg.decathlon import NNUNET_PLANS, TASKS
from msdseg.devices import cpu_has_native_bf16
from msdseg.errors import PlanError
from msdseg.plan.budget import VALIDATIONS, patch_forward_seconds
from msdseg.plan.fingerprint import DeviceSpec, published_fingerprint
from msdseg.plan.resolution import plan_resolution
from msdseg.plan.training import plan_training
from msdseg.train.probe import torch_probe


def cpu_plan(fingerprint, threads: int, minutes: float, bf16: bool) -> tuple[str, dict[str, str] | None]:
    """The CPU column and the plan's reasons (None where the task does not fit, with the error), at the
    spacing the budget affords (msdseg.plan.resolution: the workflow's plan rule decides the same)."""
    resolution = plan_resolution(fingerprint.target_spacing, fingerprint.median_shape, fingerprint.n_channels,
                                 "cpu", threads, minutes)
    fingerprint = fingerprint.at_spacing(resolution.spacing)
    spacing = (f"{[round(v, 2) for v in resolution.spacing]} ({resolution.factor:.2f}x)"
               if resolution.factor > 1 else "full")
    try:
        probe = torch_probe(fingerprint, torch.device("cpu"), "bf16" if bf16 else "fp32")
        plan = plan_training(fingerprint, DeviceSpec("cpu", threads=threads), minutes, {}, probe=probe,
                             cpu_native_bf16=bf16)
    except PlanError as error:
        return f"{spacing}, does not fit: {error}", None
    batch, patches = plan.value("train.batch_size"), plan.value("train.validation_patches")
    validation_s = VALIDATIONS * patches * patch_forward_seconds(batch, plan.seconds_per_step)
    column = (f"{spacing}, {plan.value('train.patch_size')}, {plan.value('model.base_channels')}, "
              f"{plan.value('model.depth')}, "
              f"{batch}, {plan.seconds_per_step:.2f}, {plan.value('train.iterations')}, "
              f"{patches} ({validation_s / (minutes * 60):.1%})")
    return column, {"spacing": resolution.reason, **{key: setting.reason for key, setting in plan.settings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=15.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16()
    gpu = DeviceSpec("cuda", threads=8, memory_gb=24.0, name="24 GB")
    print(f"| task | target spacing (nnU-Net) | GPU 24 GB: patch, depth, batch (volume vs nnU-Net) | nnU-Net patch "
          f"| CPU {args.threads} threads, {args.minutes:g} min: spacing (coarsening), patch, width, depth, batch, "
          "s/step, iterations, validation patches (share of the budget) |")
    print("|---|---|---|---|---|")
    reasons: dict[str, dict[str, str]] = {}
    for name, info in TASKS.items():
        fingerprint = published_fingerprint(info)
        nn_patch, nn_spacing = NNUNET_PLANS[name]
        on_gpu = plan_training(fingerprint, gpu, 60, {})
        patch = on_gpu.value("train.patch_size")
        ratio = float(np.prod(patch)) / float(np.prod(nn_patch))
        cpu, why = cpu_plan(fingerprint, args.threads, args.minutes, bf16)
        if why is not None:
            reasons[name] = why
        spacing = [round(v, 2) for v in fingerprint.target_spacing]
        print(f"| {name} | {spacing} ({list(nn_spacing)}) | {patch}, {on_gpu.value('model.depth')}, "
              f"{on_gpu.value('train.batch_size')} ({ratio:.2f}x) | {list(nn_patch)} | {cpu} |", flush=True)
    print(f"\n{len(reasons)} of {len(TASKS)} tasks fit {args.minutes:g} minutes on {args.threads} CPU threads.\n")
    for name, why in reasons.items():
        print(f"{name}:")
        for key in ("spacing", "train.patch_size", "train.iterations", "train.validation_patches"):
            print(f"  {key}: {why[key]}")


if __name__ == "__main__":
    main()

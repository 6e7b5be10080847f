"""Measurements on the device the job runs on, and the iteration count settled from them.

A bare training step on random tensors (:func:`probe_step_seconds`, the planner's probe) misses
the data path; :func:`pipeline_pace` trains a throw-away copy for a few queue cycles. Both the
plan_training job and a train job of a plan made elsewhere settle the plan through one
function, :func:`settle_iterations`.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    import torch

from msdseg.devices import default_device
from msdseg.errors import PlanError
from msdseg.plan.budget import planned_network, settle_budget
from msdseg.plan.fingerprint import Fingerprint
from msdseg.plan.network import Network
from msdseg.plan.record import StepProbe, apply_plan
from msdseg.train.state import LOG
from msdseg.train.trainer import train

MAX_PROBE_STEPS = 48  # bounds the probe's time on a slow device
PROBE_SUBJECTS = 16  # enough volumes to cycle the queue a few times


@dataclass(frozen=True)
class Pace:
    """Seconds per training step in steady state, and the run's fixed cost before and after its steps."""

    step_s: float
    startup_s: float
    steps: int  # measured steps (after the warm-up)


def pipeline_pace(train_rows: Sequence[Mapping[str, Any]], plan: Mapping[str, Any], config: Mapping[str, Any],
                  threads: int, device: str | None = None) -> Pace:
    """Train a throw-away copy for a few queue cycles and time its steps after the first cycle.

    One cycle is the steps that empty the queue once (queue_length / batch); the first holds the
    queue's first fill and the workers' start, which ``startup_s`` accounts for instead.
    """
    cfg = config["train"]
    cycle = max(1, math.ceil(int(cfg["queue_length"]) / int(cfg["batch_size"])))
    # past the first fills and the cold start of the workers (Task04: 4 steps of warm-up read 1.9x the real pace)
    warmup, measured = max(2 * cycle, 8), min(max(3 * cycle, 16), MAX_PROBE_STEPS)
    probe = copy.deepcopy(dict(config))
    probe["train"] = {**cfg, "iterations": warmup + measured, "validate_every": 10**9, "settle_at": None,
                      "checkpoint_every": 10**9, "devices": 1,
                      "max_minutes": max(1.0, 0.1 * float(cfg["max_minutes"]))}
    rows = list(train_rows)[:PROBE_SUBJECTS]
    with tempfile.TemporaryDirectory(prefix="msdseg-probe-") as folder:
        started = time.perf_counter()
        train(rows, [], plan, probe, Path(folder), fold=0, threads=threads, device=device)
        total_s = time.perf_counter() - started
        steps = pd.read_csv(Path(folder) / LOG)["seconds_per_step"].to_numpy()
    if len(steps) < 2:
        raise PlanError(f"the pipeline probe ran {len(steps)} step(s) in {total_s:.0f} s: too slow to "
                        "measure the pace; raise train.max_minutes or set train.iterations.")
    steady = steps[warmup:] if len(steps) - warmup >= 3 else steps[1:]
    # the mean, not the fastest cycle: where the data bound the step, a cycle the worker had filled
    # ahead reads fast (Task04, 16x24x16: 0.098 s from the fastest cycle, 0.17 s in training)
    return Pace(float(steady.mean()), max(0.0, total_s - float(steps.sum())), int(len(steady)))


def probe_step_seconds(network: Network, batch: int, n_channels: int, n_classes: int, device: torch.device,
                       precision: str = "fp32", steps: int = 4, warmup: int = 2) -> float:
    """Median seconds of a real training step (forward, loss, backward, AdamW) on random data."""
    import torch  # the planner's table needs no torch; a probe does

    from msdseg.model.sliding_window import autocast_dtype
    from msdseg.model.unet import UNet
    from msdseg.train.loss import segmentation_loss

    model = UNet(network.spatial_dims, n_channels, n_classes, network.base_channels, network.depth,
                 strides=[list(s) for s in network.strides]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = autocast_dtype(precision, device)
    x = torch.randn(batch, n_channels, *network.patch, device=device)
    y = torch.randint(0, n_classes, (batch, *network.patch), device=device)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = segmentation_loss(logits, y, "ce+dice")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.item())
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def torch_probe(fingerprint: Fingerprint, device: torch.device, precision: str) -> StepProbe:
    """A probe for :func:`plan_training`: real training steps of a network on ``device``."""
    def probe(network: Network, batch: int) -> float:
        return probe_step_seconds(network, batch, fingerprint.n_channels, len(fingerprint.labels), device, precision)
    return probe


def settle_iterations(training_plan: Mapping[str, Any], train_rows: Sequence[Mapping[str, Any]],
                      plan: Mapping[str, Any], config: Mapping[str, Any], threads: int, n_folds: int,
                      device: str | None = None, probe_step: bool = False) -> dict[str, Any]:
    """``training_plan`` with its iterations and cadence settled from the whole pipeline's pace here.

    ``config`` holds the seed, model and train sections the job trains with (the plan's values
    are applied to it). ``probe_step``: the plan was made for another machine (a cluster's login
    node), so its step is measured here first. One function for the plan_training and train jobs.
    """
    if probe_step:
        settings, fp = training_plan["settings"], training_plan["fingerprint"]
        seconds = probe_step_seconds(planned_network(training_plan), int(settings["train.batch_size"]["value"]),
                                     int(fp["n_channels"]), len(fp["labels"]), default_device(),
                                     str(settings["train.precision"]["value"]))
        training_plan = settle_budget(training_plan, seconds, n_folds)
    pace = pipeline_pace(train_rows, plan, apply_plan(config, training_plan), threads, device)
    return settle_budget(training_plan, None, n_folds, pace)

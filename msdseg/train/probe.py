"""The training pipeline's real pace: a few steps of the planned network fed by the patch queue.

A step timed on random tensors misses what the data costs: loading and augmenting volumes in the
queue's workers, which on a CPU share the cores with the step (Task90 CT on 2 cores: 0.35 s probed,
1.3 s in training). Iterations planned from that step overrun the budget, and a run that stops
early never finishes its learning-rate schedule. So the budget is settled from the real thing.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from msdseg.train import train
from msdseg.train.state import LOG

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
    probe["train"] = {**cfg, "iterations": warmup + measured, "validate_every": 10**9,
                      "checkpoint_every": 10**9, "devices": 1,
                      "max_minutes": max(1.0, 0.1 * float(cfg["max_minutes"]))}
    rows = list(train_rows)[:PROBE_SUBJECTS]
    with tempfile.TemporaryDirectory(prefix="msdseg-probe-") as folder:
        started = time.perf_counter()
        train(rows, [], plan, probe, Path(folder), fold=0, threads=threads, device=device)
        total_s = time.perf_counter() - started
        steps = pd.read_csv(Path(folder) / LOG)["seconds_per_step"].to_numpy()
    if len(steps) < 2:
        raise RuntimeError(f"the pipeline probe ran {len(steps)} step(s) in {total_s:.0f} s; "
                           "raise train.max_minutes or set train.iterations.")
    steady = steps[warmup:] if len(steps) - warmup >= 3 else steps[1:]
    # the mean, not the fastest cycle: where the data bound the step, a cycle the worker had filled
    # ahead reads fast (Task04, 16x24x16: 0.098 s from the fastest cycle, 0.17 s in training)
    return Pace(float(steady.mean()), max(0.0, total_s - float(steps.sum())), int(len(steady)))

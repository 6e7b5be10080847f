"""The run's own iteration count: settled once, at a planned step, from the pace the run measured.

The planner's count comes from a short probe of the pipeline, which reads the pace high (its
queue has not reached steady state; Task04 at 3 minutes: 0.157 s/step probed, 0.121 s in the
run), so a budget ended with a fifth unused. At step ``train.settle_at`` the run takes its mean
step over the second half of the steps so far and fixes ``train.iterations`` to fill
:data:`TARGET_USE` of the budget. That is the one point where the clock enters a decision, and its
result is recorded: in the checkpoint (a resumed run continues with it) and in
``settled_iterations.json`` beside the model (a repeated run of the same identity reuses it
instead of measuring again), so the weights stay a function of recorded numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msdseg.files import write_text

RECORD = "settled_iterations.json"
TARGET_USE = 0.94  # of the budget: the rest absorbs the pace's drift (under load too) and writing the model


@dataclass(frozen=True)
class Settled:
    """What a run settled: the identity it belongs to, the step it settled at and the count."""

    identity: str
    at: int
    iterations: int
    planned: int
    pace_s: float


def read_record(out_dir: Path, identity: str) -> Settled | None:
    """The recorded settlement of this identity, if a run of it settled before."""
    path = Path(out_dir) / RECORD
    try:
        record = Settled(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if record.identity == identity else None


def write_record(out_dir: Path, settled: Settled) -> None:
    write_text(json.dumps(asdict(settled), indent=2, sort_keys=True) + "\n", Path(out_dir) / RECORD)


def settled_iterations(rows: Sequence[Mapping[str, Any]], at: int, elapsed_s: float, budget_s: float,
                       between_steps_s: float) -> tuple[int, float]:
    """(iterations, pace) that fill TARGET_USE of ``budget_s``, from the mean step of rows at/2..at.

    Each step also carries ``between_steps_s``: its share of the validations and checkpoints to
    come, which grow with the count being settled and are not in the steps' own times.
    """
    window = [float(row["seconds_per_step"]) for row in rows[at // 2:at]]
    pace = sum(window) / max(len(window), 1)
    per_step = pace + between_steps_s
    remaining = TARGET_USE * budget_s - elapsed_s
    return at + max(0, math.floor(remaining / max(per_step, 1e-9))), pace

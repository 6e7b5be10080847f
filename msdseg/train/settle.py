"""The run's own iteration count: settled at a planned step from the pace the run measured, and
checked once more later.

The planner's count comes from a short probe of the pipeline, which reads the pace high (its
queue has not reached steady state; Task04 at 3 minutes: 0.157 s/step probed, 0.121 s in the
run), so a budget ended with a fifth unused. At step ``train.settle_at`` the run takes its mean
step over the second half of the steps so far and fixes ``train.iterations`` to fill
:data:`TARGET_USE` of the budget. One window can mislead: a load that comes and goes while it is
measured (Task04, 14.5 min: 0.43 s/step read, 0.33 s after, 0.82 of the budget used), or a pace
that drifts later (the budget then stops the run short of its count). So the count is settled
again, once, at :data:`SECOND_AT` of the first count, from the mean step since the first
settlement. These are the only points where the clock enters a decision, and their results are
recorded: in the checkpoint (a resumed run continues with them) and in ``settled_iterations.json``
beside the model (a repeated run of the same identity reuses them instead of measuring again),
so the weights stay a function of recorded numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from msdseg.files import write_text

RECORD = "settled_iterations.json"
TARGET_USE = 0.94  # of the budget: the rest absorbs the pace's drift (under load too) and writing the model
SECOND_AT = 0.6  # of the first settled count: late enough to measure a long window, early enough to act on it
FIRST, SECOND = "first", "second"


@dataclass(frozen=True)
class Settled:
    """What a run settled: the identity it belongs to, the step it settled at and the count, and
    (once it got there) the second settlement's step, count and pace."""

    identity: str
    at: int
    iterations: int
    planned: int
    pace_s: float
    second_at: int | None = None
    second_iterations: int | None = None
    second_pace_s: float | None = None

    @property
    def final(self) -> int:
        """The count the run ends with (the second settlement's, once made)."""
        return self.iterations if self.second_iterations is None else self.second_iterations

    def at_step(self, step: int, which: str) -> tuple[int, float] | None:
        """(iterations, pace) recorded for settlement ``which`` at ``step``, if it was recorded there."""
        if which == FIRST and self.at == step:
            return self.iterations, self.pace_s
        if which == SECOND and self.second_at == step and self.second_iterations is not None:
            return self.second_iterations, float(self.second_pace_s or 0.0)
        return None


def second_point(settle_at: int, first: int) -> int | None:
    """The step of the second settlement: :data:`SECOND_AT` of the first count, if after the first step."""
    step = math.floor(SECOND_AT * first)
    return step if step > settle_at else None


def settlement_due(iteration: int, settle_at: int | None, settled: int | None, resettled: bool) -> str | None:
    """Which settlement falls on ``iteration`` (FIRST, SECOND), or None."""
    if settle_at is None:
        return None
    if settled is None:
        return FIRST if iteration == int(settle_at) else None
    if not resettled and iteration == second_point(int(settle_at), settled):
        return SECOND
    return None


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


def record_settlement(out_dir: Path, record: Settled | None, which: str, settled: Settled, fold: int,
                      window: tuple[int, int], before: int) -> str:
    """Write settlement ``which`` (``settled``: its identity, step, count, planned count, pace) into
    the record, beside ``record``'s first one for the second; return what to tell the user."""
    if which == SECOND:  # without a record of the first (a resumed run whose record was removed), its count
        base = record or replace(settled, at=window[0], iterations=before, pace_s=0.0)
        settled = replace(base, second_at=settled.at, second_iterations=settled.iterations,
                          second_pace_s=settled.pace_s)
    write_record(out_dir, settled)
    count = settled.final
    pace = settled.pace_s if which == FIRST else settled.second_pace_s
    return (f"fold {fold}: {pace:.3f} s/step over steps {window[0]}-{window[1]}: {count} iterations fill "
            f"{TARGET_USE:.0%} of train.max_minutes ({'planned' if which == FIRST else 'settled before'} "
            f"{before}); recorded in {RECORD}")


def settled_iterations(rows: Sequence[Mapping[str, Any]], at: int, elapsed_s: float, budget_s: float,
                       between_steps_s: float, since: int | None = None) -> tuple[int, float]:
    """(iterations, pace) that fill TARGET_USE of ``budget_s``, from the mean step of rows since..at
    (default: at/2..at).

    Each step also carries ``between_steps_s``: its share of the validations and checkpoints to
    come, which grow with the count being settled and are not in the steps' own times.
    """
    window = [float(row["seconds_per_step"]) for row in rows[(at // 2 if since is None else since):at]]
    pace = sum(window) / max(len(window), 1)
    per_step = pace + between_steps_s
    remaining = TARGET_USE * budget_s - elapsed_s
    return at + max(0, math.floor(remaining / max(per_step, 1e-9))), pace

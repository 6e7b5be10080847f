"""The training plan record: one setting per key with its value, reason and source;
its table and its application to a config."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.plan.fingerprint import DeviceSpec

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    pass



@dataclass
class Setting:
    """One planned value, where it came from and why."""

    value: Any
    source: str  # "planned" or "user"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "reason": self.reason}


@dataclass
class TrainingPlan:
    """Every planned key with its reason, plus what the planner measured."""

    settings: dict[str, Setting] = field(default_factory=dict)
    device: DeviceSpec = field(default_factory=lambda: DeviceSpec("cpu"))
    budget_minutes: float = 0.0
    seconds_per_step: float | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any, reason: str, user: Mapping[str, Any]) -> Any:
        """Record ``value`` for ``key`` unless the user set it; returns the value that holds."""
        if key in user:
            self.settings[key] = Setting(user[key], "user", "set in the config")
        else:
            self.settings[key] = Setting(value, "planned", reason)
        return self.settings[key].value

    def value(self, key: str) -> Any:
        return self.settings[key].value

    def as_dict(self) -> dict[str, Any]:
        return {"device": vars(self.device), "budget_minutes": self.budget_minutes,
                "seconds_per_step": self.seconds_per_step, "fingerprint": self.fingerprint,
                "settings": {k: s.as_dict() for k, s in self.settings.items()}}

    @classmethod
    def from_dict(cls, training_plan: Mapping[str, Any]) -> TrainingPlan:
        """Back from training_plan.json (what the table and the CSV show)."""
        return cls(settings={k: Setting(**s) for k, s in training_plan["settings"].items()},
                   device=DeviceSpec(**training_plan.get("device", {"type": "cpu"})),
                   budget_minutes=float(training_plan.get("budget_minutes", 0.0)),
                   seconds_per_step=training_plan.get("seconds_per_step"),
                   fingerprint=dict(training_plan.get("fingerprint", {})))

    def csv(self) -> str:
        """key,value,source,reason rows (the HTML report's table)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["key", "value", "source", "reason"])
        writer.writerows([k, json.dumps(s.value), s.source, s.reason] for k, s in self.settings.items())
        return buffer.getvalue()

    def table(self) -> str:
        """A fixed-width table for the job log."""
        rows = [(k, str(s.value), s.source, s.reason) for k, s in self.settings.items()]
        widths = [max(len(r[i]) for r in rows + [("key", "value", "source", "reason")]) for i in range(3)]
        lines = [f"{'key':<{widths[0]}}  {'value':<{widths[1]}}  {'source':<{widths[2]}}  reason"]
        lines += [f"{k:<{widths[0]}}  {v:<{widths[1]}}  {s:<{widths[2]}}  {r}" for k, v, s, r in rows]
        return "\n".join(lines)


StepProbe = Any  # Callable[[Network, int], float]: seconds per training step, measured


def apply_plan(config: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every setting of a training plan (training_plan.json) in its model/train sections."""
    result = {section: dict(config[section]) if isinstance(config.get(section), Mapping) else config[section]
              for section in config}
    for key, setting in plan["settings"].items():
        section, name = key.split(".", 1)
        if setting["value"] is not None or name in ("class_weights", "label_probabilities"):
            result[section][name] = setting["value"]
    return result


def plan_table(training_plan: Mapping[str, Any]) -> str:
    """training_plan.json as the fixed-width table the logs show."""
    return TrainingPlan.from_dict(training_plan).table()

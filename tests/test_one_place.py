"""One place per piece of knowledge: each of these fails when a second copy appears or the copies drift."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import pytest

from msdseg.config import (
    RESUMABLE_KEYS,
    identity_settings,
    load_config,
    load_schema,
    pace_settings,
    section_defaults,
    train_job_settings,
)
from msdseg.train.state import config_hash

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "msdseg").rglob("*.py"), *(ROOT / "workflow" / "scripts").glob("*.py")])


def _schema_defaults() -> dict[str, list[Any]]:
    """{property name: [its defaults anywhere in the schema]} for non-empty defaults."""
    found: dict[str, list[Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if isinstance(sub, dict) and sub.get("default") not in (None, {}, [], ""):
                    found.setdefault(name, []).append(sub["default"])
                walk(sub)
            for key in ("items", "oneOf", "anyOf"):
                for sub in node.get(key) or [] if isinstance(node.get(key), list) else [node.get(key)]:
                    walk(sub)

    walk(load_schema())
    return found


def _same(value: Any, default: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)  # noqa: E731
    return type(value) is type(default) and norm(value) == norm(default) or (
        isinstance(value, (tuple, list)) and isinstance(default, list) and list(value) == default)


def test_no_schema_default_is_typed_again_in_code() -> None:
    """``section.get("batch_size", 4)`` beside the schema's default is a copy that drifts (it had: 1 vs 4)."""
    defaults = _schema_defaults()
    copies = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "setdefault") and len(node.args) == 2):
                continue
            key = node.args[0]
            if not (isinstance(key, ast.Constant) and key.value in defaults):
                continue
            try:
                value = ast.literal_eval(node.args[1])
            except ValueError:
                continue
            if any(_same(value, d) for d in defaults[key.value]):
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno} .get({key.value!r}, {value!r})")
    assert not copies, "schema defaults typed again (use the validated config or config.section_defaults):\n" + \
        "\n".join(copies)


def test_section_defaults_are_what_validation_fills() -> None:
    validated = load_config({"task": "Task04_Hippocampus"})
    for section in ("train", "infer", "model", "preprocess"):
        assert section_defaults(section) == validated[section], section


def _string_collections(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            found.append((node.lineno, tuple(sorted(e.value for e in node.elts))))
    return found


@pytest.mark.parametrize("name, module, value", [
    ("NIfTI suffixes", "msdseg.decathlon", "NIFTI_SUFFIXES"),
    ("resampling keys", "msdseg.data.resample", "RESAMPLING_KEYS"),
    ("manifest list columns", "msdseg.data.manifest_format", "LIST_COLUMNS"),
    ("manifest statistics columns", "msdseg.data.manifest_format", "STAT_COLUMNS"),
    ("manifest columns the jobs read", "msdseg.data.manifest_format", "SCHEDULING_COLUMNS"),
    ("train keys that only schedule", "msdseg.config", "SCHEDULING_KEYS"),
    ("train keys that only pace", "msdseg.config", "CADENCE_KEYS"),
])
def test_a_list_of_names_is_written_once(name: str, module: str, value: str) -> None:
    import importlib

    target = tuple(sorted(getattr(importlib.import_module(module), value)))
    places = [f"{path.relative_to(ROOT)}:{line}" for path in SOURCES
              for line, names in _string_collections(path) if names == target]
    assert len(places) == 1, f"the {name} are written in {len(places)} places: {places}"


def test_train_rules_params_and_checkpoint_identity_read_the_same_key_sets() -> None:
    """A key that changes the trained model reruns the train rule and blocks resuming; the others do neither."""
    rules = (ROOT / "workflow" / "rules" / "train.smk").read_text()
    assert re.search(r"rule train:.*?params:.*?train=train_job_settings\(config\[\"train\"\]\)", rules, re.S)
    assert re.search(r"rule plan_training:.*?params:.*?train=pace_settings\(config\[\"train\"\]\)", rules, re.S)

    config = load_config({"task": "Task04_Hippocampus"})
    plan = {"target_spacing": [1.0, 1.0, 1.0]}

    def identity(cfg: dict[str, Any]) -> str:
        return config_hash(cfg, plan, 0, ["a"], ["b"])

    base = identity(config)
    for key in sorted(config["train"]):
        changed = copy.deepcopy(config)
        value = changed["train"][key]
        changed["train"][key] = ([*value, 7] if isinstance(value, list) else
                                 not value if isinstance(value, bool) else
                                 value + 1 if isinstance(value, (int, float)) else f"{value}x")
        in_params = train_job_settings(changed["train"]) != train_job_settings(config["train"])
        in_identity = identity(changed) != base
        assert in_identity == (key in identity_settings(config["train"])), key
        assert in_identity <= in_params, f"train.{key} changes the checkpoint's identity but not the rule's params"
        if key in RESUMABLE_KEYS:
            assert not in_identity, f"train.{key} only schedules or paces, yet blocks resuming"
        assert set(pace_settings(config["train"])) <= set(train_job_settings(config["train"]))
    # more DDP processes, each with its own batch: a larger step's batch, so another run
    assert identity({**config, "train": {**config["train"], "devices": 2}}) != base


@pytest.mark.parametrize("text", ["a training subject needs a label", "needs a 'sampling_map' path per subject",
                                  "tempfile.mkdtemp(prefix=f\".{final.name}."])
def test_what_a_training_subject_needs_and_the_staged_folder_are_written_once(text: str) -> None:
    """msdseg.data.subjects.check_trainable (both loaders), msdseg.files.atomic_folder (every staged folder)."""
    places = [str(path.relative_to(ROOT)) for path in SOURCES if text in path.read_text()]
    assert len(places) == 1, f"{text!r} is written in {places}"

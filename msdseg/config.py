"""Configuration: one JSON schema (with defaults) for the workflow and for library use.

The Snakefile first calls :func:`load_config` (the schema, then :func:`check_config` for the rules
a schema cannot express: a known task or a source for an unknown one, a 2D patch, overlaps that
fit the patch, class weights, folds that exist), so a mistake stops the run with one line naming
the key; then Snakemake's ``validate`` checks the same schema file and fills Snakemake's config
with its defaults.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from msdseg.decathlon import SYNTHETIC_LABELS, SYNTHETIC_TASK, TASKS, label_map
from msdseg.errors import ConfigError  # defined in msdseg.errors; importable from here as well

if TYPE_CHECKING:  # jsonschema is imported where a config is validated: jobs that only read plan.json skip it
    import jsonschema

# the keys the planner owns; a user who sets one keeps it (and it is marked "user")
PLANNED_KEYS = (
    "model.spatial_dims", "model.base_channels", "model.depth", "model.strides", "train.patch_size",
    "train.batch_size", "train.precision", "train.label_probabilities", "train.class_weights",
    "train.iterations", "train.validate_every", "train.checkpoint_every", "train.validation_cases",
    "train.samples_per_volume", "train.queue_length", "train.validation_patches", "train.settle_at",
)

# Which train.* keys change what: defined here once, read by the train rules' params
# (workflow/rules/train.smk) and by the checkpoint's identity (msdseg.train.state.config_hash).
SCHEDULING_KEYS = frozenset({"folds", "threads", "mem_mb", "gpus"})
"""What a train job asks the scheduler for: never a reason to rerun a job."""
CADENCE_KEYS = frozenset({"iterations", "max_minutes", "validate_every", "validation_cases", "validation_patches",
                          "checkpoint_every", "settle_at"})
"""The budget and its cadence: a step's pace does not depend on them, so a change keeps the measured plan."""
RESUMABLE_KEYS = SCHEDULING_KEYS | {"max_minutes", "checkpoint_every", "validate_every", "num_workers"}
"""Keys a checkpoint survives a change of: they do not change what the next step learns. Not
``devices``: each of the DDP processes takes its own batch, so the step's batch is batch_size x devices."""


def train_job_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """The train section as a train job reads it (its params): adding a fold or a thread retrains nothing."""
    return {k: v for k, v in train.items() if k not in SCHEDULING_KEYS}


def pace_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """The train keys a step's pace depends on (plan_training's params): not the scheduling, budget or cadence."""
    return {k: v for k, v in train_job_settings(train).items() if k not in CADENCE_KEYS}


def identity_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """The train keys a run's identity hashes: a checkpoint of a run that differs only elsewhere resumes."""
    return {k: v for k, v in train_job_settings(train).items() if k not in RESUMABLE_KEYS}


SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


def load_schema() -> dict[str, Any]:
    """The schema (a fresh copy each call): parsed once per process, with libyaml where installed.

    The Snakefile validates the config several times; parsing the schema in pure-Python YAML
    each time cost about 0.3 s of every dry run and no-op rerun.
    """
    return copy.deepcopy(_parsed_schema())


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=1)
def _validator_filling_defaults() -> type:
    """A Draft 2020-12 validator that writes each property's default into the instance (built once)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def section_defaults(section: str) -> dict[str, Any]:
    """Every default of one top-level config section, as the schema states it (the only copy).

    For callers of the Python API that pass a partial section, e.g. ``{"tta": True}`` as ``infer``:
    ``{**section_defaults("infer"), **infer}`` is what the workflow's validated config would hold.
    """
    return copy.deepcopy(_section_defaults(section))


@functools.cache
def _section_defaults(section: str) -> dict[str, Any]:
    subschema = _parsed_schema()["properties"][section]
    filled: dict[str, Any] = {}
    _validator_filling_defaults()(subschema).validate(filled)
    return filled


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def load_config(config: Mapping[str, Any] | str | Path | None = None,
                chosen: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a config (dict or YAML path), fill every default and run :func:`check_config`.

    ``chosen`` (dotted keys the user set, see :func:`layered_config`): the planner fills the
    others, so checks of a planned key's default are skipped.
    """
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, (str, Path)):
        with open(config) as handle:
            data = yaml.safe_load(handle) or {}
    else:
        data = copy.deepcopy(dict(config))
    data = apply_preset(data)
    validator = _validator_filling_defaults()(load_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise ConfigError(f"config key '{_key_path(first)}': {first.message}")
    check_config(data, chosen)
    return data


def coerce_strings(config: dict[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Numbers, booleans, lists and nulls given as text on the command line become what the schema wants.

    ``snakemake --config 'train={iterations: 301}'`` hands nested values over as strings; each
    string whose key the schema types as something else is read as YAML (``'301'`` -> 301).
    """
    schema = load_schema() if schema is None else schema
    properties = schema.get("properties", {})
    for key, value in list(config.items()):
        if key in properties:
            config[key] = _coerced(value, properties[key])
    return config


def _coerced(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` with its strings read as YAML where ``schema`` wants no string, inside lists and
    mappings too (``--config 'train={folds: [0, 1]}'`` hands over ``['0', '1']``)."""
    options = [schema, *schema.get("oneOf", [])]
    if isinstance(value, dict):
        if "properties" in schema:
            return coerce_strings(value, schema)
        values = next((o["additionalProperties"] for o in options if isinstance(o.get("additionalProperties"), dict)),
                      None)
        return value if values is None else {k: _coerced(v, values) for k, v in value.items()}
    if isinstance(value, list):
        items = next((o["items"] for o in options if isinstance(o.get("items"), dict)), None)
        return value if items is None else [_coerced(v, items) for v in value]
    if isinstance(value, str) and not _accepts_string(schema):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value  # leave it: the schema names the key and the type it wants
    return value


def _accepts_string(schema: Mapping[str, Any]) -> bool:
    kinds = schema.get("type")
    options = [kinds] if isinstance(kinds, str) else list(kinds or [])
    options += [option.get("type") for option in schema.get("oneOf", [])]
    return "string" in options or (not options and "enum" not in schema)


def set_keys(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf a config sets, by dotted key (``{"train": {"iterations": 5}}`` -> ``{"train.iterations": 5}``)."""
    keys: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, Mapping) and value and name not in _LEAF_MAPPINGS:
            keys.update(set_keys(value, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = value
    return keys


_LEAF_MAPPINGS = {"label_probabilities", "source", "synthetic"}  # mappings that are one value each


def layered_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config a run uses, and the keys its user set.

    ``presets`` (in the top-level config.yaml) holds settings tuned for one task each (the demo's);
    they apply to that task only, under whatever the user set. Strings from the command line become
    numbers where the schema wants them. The returned keys (dotted, with their values) are the
    user's and the preset's, before schema defaults: the planner keeps them and plans the rest.
    """
    layered = apply_preset(copy.deepcopy(dict(config)))
    coerce_strings(layered)
    chosen = set_keys(layered)
    return load_config(layered, chosen), chosen


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without ``presets``, over the preset of its task (if any): the user's keys win."""
    presets = data.pop("presets", None) or {}
    task = data.get("task", load_schema()["properties"]["task"]["default"])
    return _merge(copy.deepcopy(presets.get(task, {})), data)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and key not in _LEAF_MAPPINGS:
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def check_config(config: Mapping[str, Any], chosen: Mapping[str, Any] | None = None) -> None:
    """Checks across keys that JSON schema cannot express. Raises ConfigError naming the key.

    With ``chosen`` (workflow use) checks that involve planned keys run only on what the user set,
    and labels are checked against the task table for the known tasks.
    """
    task = config["task"]
    source = config["source"]
    if task not in TASKS and task != SYNTHETIC_TASK:
        if not (source.get("url") or source.get("archive") or source.get("folder")):
            known = ", ".join([SYNTHETIC_TASK, *TASKS])
            raise ConfigError(
                f"config key 'task': unknown task {task!r}. Use one of {known}, "
                "or set source.url, source.archive or source.folder for a task of your own."
            )

    patch = list(config["train"]["patch_size"])
    patch_planned = chosen is not None and "train.patch_size" not in chosen
    if config["model"]["spatial_dims"] == 2 and patch[2] != 1 and not patch_planned:
        raise ConfigError(
            f"config key 'train.patch_size': a 2D model trains on single slices, so the last "
            f"entry must be 1 (got {patch}); use e.g. [{patch[0]}, {patch[1]}, 1]."
        )
    overlap = config["infer"].get("overlap")
    if overlap is not None and (config["infer"].get("patch_size") or not patch_planned):
        check_overlap(overlap, config["infer"].get("patch_size") or patch)
    n_classes_weights = config["train"].get("class_weights")
    if n_classes_weights is not None and len(n_classes_weights) < 2:
        raise ConfigError("config key 'train.class_weights': give one weight per label (at least 2).")
    n_folds = config["manifest"]["n_folds"]
    for fold in sorted(set(config["train"]["folds"])):
        if fold >= n_folds:
            raise ConfigError(
                f"config key 'train.folds': fold {fold} does not exist with "
                f"manifest.n_folds={n_folds}; use folds 0..{n_folds - 1}."
            )
    known = known_labels(task)
    if known is not None:
        check_labels(config["train"], known, f"{task} (task table)")


def known_labels(task: str) -> dict[int, str] | None:
    """A known task's labels (the demo's included), None for a task of the user's own."""
    if task in TASKS:
        return dict(enumerate(TASKS[task].labels))
    if task == SYNTHETIC_TASK:
        return label_map(SYNTHETIC_LABELS)
    return None


def check_labels(train: Mapping[str, Any], labels: Mapping[int, str], where: str) -> None:
    """Per-class keys (class_weights, label_probabilities) against the task's labels, before any training."""
    names = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))
    weights = train.get("class_weights")
    if weights is not None and len(weights) != len(labels):
        raise ConfigError(f"config key 'train.class_weights': {len(weights)} weights for the {len(labels)} labels "
                          f"of {where} ({names}); give one weight per label or remove the key.")
    probabilities = train.get("label_probabilities")
    if probabilities is not None:
        unknown = sorted(str(k) for k in probabilities if int(k) not in labels)
        if unknown:
            raise ConfigError(f"config key 'train.label_probabilities': labels {', '.join(unknown)} are not in "
                              f"{where} ({names}); use those labels or remove the key.")


def check_overlap(overlap: Sequence[int], patch: Sequence[int]) -> None:
    """The one rule for a grid overlap: even (torchio's grid needs it) and smaller than the patch on every axis.

    An axis of patch size 1 (z of a 2D model) therefore takes overlap 0. Raises ConfigError
    naming ``infer.overlap``, the axis and both values.
    """
    for axis, (size, lap) in enumerate(zip(patch, overlap)):
        if lap >= size or lap % 2:
            raise ConfigError(
                f"config key 'infer.overlap': {list(overlap)} does not fit the patch {list(patch)} on axis {axis} "
                f"(overlap {lap}, patch {size}; each overlap must be even, as torchio's grid needs, and smaller "
                "than the patch); set infer.overlap to null (half the patch) or choose a smaller one."
            )


def schema_rows(schema: Mapping[str, Any] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every leaf key, for the README's reference table."""
    schema = load_schema() if schema is None else schema
    rows: list[tuple[str, str, str, str]] = []
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub:
            rows += schema_rows(sub, prefix=f"{key}.")
            continue
        declared = sub.get("type")
        kinds = (" or ".join(declared) if isinstance(declared, list) else declared) or " or ".join(
            str(option.get("type", "")) + (f" ({', '.join(map(str, option['enum']))})" if "enum" in option else "")
            for option in sub.get("oneOf", [])
        )
        if "enum" in sub:
            kinds = f"{kinds} ({', '.join(map(str, sub['enum']))})"
        default = yaml.safe_dump(sub.get("default"), default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, str(kinds), default, " ".join(str(sub.get("description", "")).split())))
    return rows


def schema_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {m} |" for k, t, d, m in schema_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())

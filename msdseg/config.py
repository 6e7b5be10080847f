"""Configuration: one JSON schema (with defaults) for the workflow and for library use.

The Snakefile validates with Snakemake's ``validate`` against the same file and then calls
:func:`check_config` for the rules a schema cannot express (overlap smaller than the patch,
a known task or a source for an unknown one).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what to do."""


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def _validator_filling_defaults() -> type:
    """A Draft 2020-12 validator that writes each property's default into the instance."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def load_config(config: Mapping[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """Validate a config (dict or YAML path), fill every default and run :func:`check_config`."""
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, (str, Path)):
        with open(config) as handle:
            data = yaml.safe_load(handle) or {}
    else:
        data = copy.deepcopy(dict(config))
    validator = _validator_filling_defaults()(load_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise ConfigError(f"config key '{_key_path(first)}': {first.message}")
    check_config(data)
    return data


def check_config(config: Mapping[str, Any]) -> None:
    """Checks across keys that JSON schema cannot express. Raises ConfigError naming the key."""
    from msdseg.decathlon import SYNTHETIC_TASK, TASKS

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
    if config["model"]["spatial_dims"] == 2 and patch[2] != 1:
        raise ConfigError(
            f"config key 'train.patch_size': a 2D model trains on single slices, so the last "
            f"entry must be 1 (got {patch}); use e.g. [{patch[0]}, {patch[1]}, 1]."
        )
    infer_patch = config["infer"].get("patch_size") or patch
    overlap = config["infer"].get("overlap")
    if overlap is not None:
        for axis, (size, lap) in enumerate(zip(infer_patch, overlap)):
            if lap >= size and not (size == 1 and lap == 0):
                raise ConfigError(
                    f"config key 'infer.overlap': overlap {overlap} must be smaller than the "
                    f"patch {infer_patch} on every axis (axis {axis}: {lap} >= {size})."
                )
            if lap % 2:
                raise ConfigError(
                    f"config key 'infer.overlap': torchio needs even overlaps, got {overlap}."
                )
    n_classes_weights = config["train"].get("class_weights")
    if n_classes_weights is not None and len(n_classes_weights) < 2:
        raise ConfigError("config key 'train.class_weights': give one weight per label (at least 2).")


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
            str(option.get("type", "")) + (f" ({', '.join(map(str, option['enum']))})" if "enum" in option else "") for option in sub.get("oneOf", [])
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

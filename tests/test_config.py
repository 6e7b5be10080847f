"""The config schema: defaults filled everywhere, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from msdseg.config import ConfigError, apply_preset, load_config

REPOSITORY = Path(__file__).resolve().parents[1]


def test_empty_config_gets_every_default():
    config = load_config({})
    assert config["task"] == "Task00_SyntheticLiver"
    assert config["train"]["augmentation"]["flip"] is True
    assert config["infer"]["overlap_mode"] == "hann"
    assert config["evaluate"]["nsd_tolerance_mm"] == 1.0


SHIPPED = ["config.yaml", *sorted(p.relative_to(REPOSITORY).as_posix() for p in REPOSITORY.glob("configs/*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_are_valid(path):
    load_config(REPOSITORY / path)


def test_snakemake_validate_fills_the_same_defaults():
    from snakemake.utils import validate

    raw = apply_preset(yaml.safe_load((REPOSITORY / "config.yaml").read_text()))  # as the Snakefile does
    validate(raw, str(REPOSITORY / "msdseg" / "schemas" / "config.schema.yaml"))
    assert raw == load_config(REPOSITORY / "config.yaml")


@pytest.mark.parametrize(
    "config, key",
    [
        ({"task": "Task99_Unknown"}, "'task'"),
        ({"train": {"patch_size": [-1, 8, 8]}}, "'train.patch_size.0'"),
        ({"train": {"batch_size": 2.5}}, "'train.batch_size'"),
        ({"infer": {"overlap": [64, 2, 2]}}, "'infer.overlap'"),
        ({"infer": {"overlap": [3, 2, 2]}}, "'infer.overlap'"),
        ({"model": {"spatial_dims": 2}, "train": {"patch_size": [32, 32, 1]}, "infer": {"overlap": [8, 8, 2]}},
         "'infer.overlap'"),
        ({"train": {"folds": [0, 5]}}, "'train.folds': fold 5 does not exist with manifest.n_folds=5"),
        ({"model": {"spatial_dims": 2}}, "'train.patch_size'"),
        ({"manifest": {"on_invalid": "ignore"}}, "'manifest.on_invalid'"),
        ({"trian": {}}, "'<top level>'"),
    ],
)
def test_errors_name_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        load_config(config)


def test_own_task_needs_a_source():
    assert load_config({"task": "Task42_Mine", "source": {"folder": "/data/Task42_Mine"}})["task"] == "Task42_Mine"

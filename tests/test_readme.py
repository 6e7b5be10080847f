"""The README documents what the code does: every config key, the commands CI runs."""

from __future__ import annotations

from pathlib import Path

from msdseg.config import schema_markdown

REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text()


def test_config_table_is_the_schema():
    assert schema_markdown() in README, "README config table is stale: paste `python -m msdseg.config` into it"


def test_ci_runs_the_readme_commands():
    ci = (REPOSITORY / ".ci" / "run").read_text()
    for command in ('python -m pip install -e ".[test]" torch==2.13.0', "python -m pytest"):
        assert command in README and command in ci
    assert "snakemake --cores 8" in README

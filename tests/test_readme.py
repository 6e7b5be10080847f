"""The README documents what the code does: every config key, the commands CI runs."""

from __future__ import annotations

import re
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


def test_readme_code_layout_lists_every_module_of_the_tree() -> None:
    """The table under "Code layout" names each module of each subpackage, and no module that is gone."""
    section = README.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    package = REPOSITORY / "msdseg"
    rows = {m.group(1) for m in re.finditer(r"^\| `msdseg/([a-z_]*)/?`", section, re.M)}
    assert rows == {""} | {p.parent.name for p in package.glob("*/__init__.py")}, rows
    for row in section.splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`msdseg/"):
            continue
        folder = package / re.match(r"`msdseg/([a-z_]*)/?`", cells[1].strip()).group(1)
        listed = {name.split(" ")[0] for name in re.findall(r"`([a-z_]+)`", cells[2])}
        present = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        assert listed == present, f"README's row for {folder.relative_to(REPOSITORY)}: {sorted(listed ^ present)}"

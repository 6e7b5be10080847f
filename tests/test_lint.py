"""Lint and format: ruff (pyproject.toml [tool.ruff]) on the Python code; snakefmt and
``snakemake --lint`` on the workflow.

Both tools come with the ``test`` extra (``pip install -e '.[test]'``); without them the tests
skip and say so. To fix: ``ruff check --fix <file>``; ``snakefmt Snakefile workflow/rules``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PYTHON_FOLDERS = ["msdseg", "workflow/scripts", "benchmarks", "tests"]


def _tool(name: str) -> str:
    """The executable ``name`` on PATH or beside this Python (a virtual environment not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(reason=f"{name} is not installed; pip install -e '.[test]' brings it")
    return found


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)


def test_ruff_check() -> None:
    result = _run(_tool("ruff"), "check", "--no-cache", "--output-format", "concise", *PYTHON_FOLDERS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check() -> None:
    rules = sorted(path.relative_to(REPOSITORY).as_posix() for path in REPOSITORY.glob("workflow/rules/*.smk"))
    files = ["Snakefile", *rules]
    assert len(files) > 1
    result = _run(_tool("snakefmt"), "--check", *files)
    if result.returncode != 0:
        diff = _run(_tool("snakefmt"), "--diff", *files)
        pytest.fail(f"snakefmt would reformat (run: snakefmt {' '.join(files)}):\n{diff.stdout}{diff.stderr}")


def test_snakemake_lint_is_clean() -> None:
    """Snakemake's own best practice: every rule a log, a conda env, no unused params (``snakemake --lint``)."""
    result = _run(_tool("snakemake"), "--lint")
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr

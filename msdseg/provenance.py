"""What made a result: config, seed, git commit and package versions (stored with models and reports)."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import msdseg

PACKAGES = ("torch", "torchio", "numpy", "SimpleITK", "nibabel", "pandas", "scipy", "snakemake")


def library_versions() -> dict[str, str]:
    """Versions of Python, msdseg and the packages that shape the numbers (plain strings)."""
    versions = {"python": platform.python_version(), "msdseg": str(msdseg.__version__)}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The commit of the msdseg checkout (with '-dirty' for uncommitted changes), or None."""
    folder = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if head.returncode != 0 or not commit:
        return None
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """The record written beside reports (provenance.json): deterministic, no timestamps."""
    return {"config": dict(config), "seed": config.get("seed"), "git_commit": git_commit(),
            "versions": library_versions()}

"""Run the real workflow with Snakemake in a subprocess, in a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
SNAKEFILE = REPOSITORY / "Snakefile"


def snakemake(
    workdir: Path,
    *args: str,
    config: dict | None = None,
    cores: int = 2,
    timeout: int = 1800,
) -> subprocess.CompletedProcess[str]:
    """``snakemake --snakefile <repo>/Snakefile --directory workdir ...``; never raises on failure.

    ``config`` is written to ``workdir/test_config.yaml`` and given with ``--configfile`` (it is
    merged over the shipped config.yaml, as a user's own file would be).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--cores", str(cores),
        "--nocolor",
        *args,
    ]
    if config:  # last: --configfile takes every following word as a file
        config_file = workdir / "test_config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        command += ["--configfile", str(config_file)]
    environment = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPOSITORY))
    return subprocess.run(
        command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=timeout
    )


def output_of(process: subprocess.CompletedProcess[str]) -> str:
    return process.stdout + process.stderr


def planned_jobs(process: subprocess.CompletedProcess[str] | str) -> dict[str, int]:
    """Job counts per rule from a dry run's summary table ("job  count" lines); a process or its output."""
    counts: dict[str, int] = {}
    in_table = False
    for line in (process if isinstance(process, str) else output_of(process)).splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table:
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            elif parts and not set(parts[0]) <= {"-"}:
                in_table = False
    return counts

"""The cases of predict.input: NIfTI files listed and grouped (Decathlon's 4D files or nnU-Net's ``_0000`` channels).

Light on purpose (no torch, no SimpleITK): the workflow reads it while building the DAG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from msdseg.decathlon import NIFTI_SUFFIXES, subject_id
from msdseg.errors import ConfigError, DatasetError

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """An image to predict: its channel files (one 3D/4D file, or nnU-Net's ``_0000``, ``_0001``...)."""

    case: str
    files: tuple[str, ...]


def list_images(source: str | Sequence[str]) -> list[str]:
    """NIfTI files of a folder (sorted; hidden and macOS ``._`` files skipped) or a given list."""
    if isinstance(source, str):
        folder = Path(source)
        if not folder.is_dir():
            raise DatasetError(
                f"predict.input: {source} is not a folder; give a folder of NIfTI images or a list of files."
            )
        files = sorted(str(folder / name) for name in os.listdir(folder)
                       if name.endswith(NIFTI_SUFFIXES) and not name.startswith("."))
        if not files:
            raise DatasetError(f"predict.input: {source} holds no .nii/.nii.gz image.")
        return files
    files = [str(path) for path in source]
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DatasetError(f"predict.input: no such image file(s) {missing[:5]}; fix the list.")
    bad = [path for path in files if not path.endswith(NIFTI_SUFFIXES)]
    if bad:
        raise DatasetError(f"predict.input: {bad[:5]} are not .nii/.nii.gz files; convert them to NIfTI first.")
    return files


def group_cases(files: Sequence[str], layout: str = "auto") -> list[Case]:
    """The cases of a list of image files, sorted by name.

    ``decathlon``: one file per case (3D, or 4D with the channels on the 4th axis), named
    ``<case>.nii.gz``. ``nnunet``: one 3D file per channel, ``<case>_0000.nii.gz``,
    ``<case>_0001.nii.gz``... ``auto``: nnunet where every file name ends in ``_NNNN`` and every
    case has the same channels 0000..C-1; decathlon otherwise.
    """
    if layout not in ("auto", "decathlon", "nnunet"):
        raise ConfigError(f"config key 'predict.layout': auto, decathlon or nnunet, got {layout!r}.")
    if layout in ("auto", "nnunet"):
        grouped: dict[str, dict[int, str]] = {}
        for path in files:
            match = _NNUNET_CHANNEL.match(subject_id(path))
            if match is None:
                if layout == "nnunet":
                    raise DatasetError(
                        f"{path}: predict.layout nnunet needs files named <case>_0000.nii.gz (one per channel); "
                        "rename it or set predict.layout: decathlon."
                    )
                grouped = {}
                break
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
        channel_sets = {tuple(sorted(channels)) for channels in grouped.values()}
        same = next(iter(channel_sets)) if len(channel_sets) == 1 else ()
        if grouped and same == tuple(range(len(same))):
            return [Case(case, tuple(paths[k] for k in sorted(paths))) for case, paths in sorted(grouped.items())]
        if layout == "nnunet":
            found = {case: sorted(channels) for case, channels in list(grouped.items())[:5]}
            raise DatasetError(
                f"predict.layout nnunet: every case needs the channel files _0000 .. _C-1 (the same C); found {found}."
            )
    cases: dict[str, str] = {}
    for path in files:
        name = subject_id(path)
        if name in cases:
            raise DatasetError(f"predict.input: {cases[name]} and {path} are one case name {name!r}; rename one.")
        cases[name] = path
    return [Case(name, (path,)) for name, path in sorted(cases.items())]

"""Reading and writing images and files: one place, atomic writes.

Arrays in msdseg are indexed (x, y, z) like nibabel and torchio; SimpleITK's GetArrayFromImage
returns (z, y, x), so every conversion goes through :func:`to_xyz` / :func:`image_from_xyz`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    import pandas as pd


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A crash, a full disk or an exception leaves no file at ``final`` that a rerun would trust.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes so writers that look at them (".nii.gz") still pick the right format
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv(table: "pd.DataFrame", path: str | os.PathLike[str]) -> None:
    """Write a table atomically, without the index, with a stable float format."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a small text file (JSON, a checksum) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a medical image with SimpleITK; an unreadable file raises OSError naming it."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise OSError(f"{path}: not a readable image ({first_line})") from error


def write_image(image: sitk.Image, path: str | os.PathLike[str], compress: bool = True) -> None:
    """Write atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def to_xyz(image: sitk.Image) -> np.ndarray:
    """Voxel array indexed (x, y, z[, channel]) from a SimpleITK image."""
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    return np.transpose(array, order)


def image_from_xyz(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """SimpleITK image from an (x, y, z) array, with the geometry of ``reference`` if given."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    if reference is not None:
        image.SetOrigin(reference.GetOrigin())
        image.SetSpacing(reference.GetSpacing())
        image.SetDirection(reference.GetDirection())
    return image

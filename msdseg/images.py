"""Image I/O and geometry: SimpleITK/NIfTI reading and writing, (x, y, z) arrays, headers, label volumes."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import SimpleITK as sitk

from msdseg.decathlon import NIFTI_SUFFIXES
from msdseg.errors import SubjectError
from msdseg.files import atomic_path

if TYPE_CHECKING:  # for annotations only: reading and resampling images does not need pandas
    pass


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a medical image with SimpleITK; an unreadable file raises OSError naming it."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise _unreadable(path, error) from error


def _unreadable(path: str | os.PathLike[str], error: RuntimeError) -> OSError:
    """OSError naming ``path`` with the last line of an ITK error, where ITK states the reason."""
    text = str(error).strip()
    reason = text.splitlines()[-1] if text else "unreadable"
    return OSError(f"{path}: not a readable image ({reason})")


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


def xyz_view(image: sitk.Image) -> np.ndarray:
    """Read-only (x, y, z[, channel]) view of the image's own buffer: no copy of a large CT.

    Valid only while ``image`` is alive; use :func:`to_xyz` for an array you keep.
    """
    array = sitk.GetArrayViewFromImage(image)
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


class Geometry(NamedTuple):
    """Spatial grid of an image (x, y, z): what two images must share to be voxel-aligned."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major, SimpleITK/LPS

    def same_as(self, other: Geometry, tolerance_mm: float = 1e-4) -> bool:
        """Same voxel grid: equal size, spacing and origin within ``tolerance_mm``, same direction."""
        return (tuple(self.size) == tuple(other.size)
                and np.allclose(self.spacing, other.spacing, rtol=0, atol=tolerance_mm)
                and np.allclose(self.origin, other.origin, rtol=0, atol=tolerance_mm)
                and np.allclose(self.direction, other.direction, rtol=0, atol=1e-6))


def spatial_geometry(image: sitk.Image | sitk.ImageFileReader) -> Geometry:
    """The (x, y, z) grid of a 3D or 4D image (or of a reader after ReadImageInformation).

    A 4D NIfTI (x, y, z, channel) keeps its spatial grid in the first three axes; the 4th axis'
    spacing/origin are not geometry and are dropped.
    """
    dimension = image.GetDimension()
    if dimension not in (3, 4):
        raise ValueError(f"expected a 3D or 4D image, got {dimension}D (size {tuple(image.GetSize())})")
    direction = image.GetDirection()
    spatial_direction = tuple(float(direction[row * dimension + col]) for row in range(3) for col in range(3))
    return Geometry(
        size=tuple(int(v) for v in image.GetSize()[:3]),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in image.GetSpacing()[:3]),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in image.GetOrigin()[:3]),  # type: ignore[arg-type]
        direction=spatial_direction,
    )


def channel_count(image: sitk.Image | sitk.ImageFileReader) -> int:
    """1 for a 3D scalar image, the 4th size of a 4D NIfTI, or the vector length of a vector image."""
    if image.GetDimension() == 4:
        return int(image.GetSize()[3])
    if isinstance(image, sitk.ImageFileReader):
        return int(image.GetNumberOfComponents())
    return int(image.GetNumberOfComponentsPerPixel())


def read_image_header(path: str | os.PathLike[str]) -> sitk.ImageFileReader:
    """Header only (size, spacing, origin, direction, pixel type): cheap, no voxels are read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _unreadable(path, error) from error
    return reader


class NiftiScan(NamedTuple):
    """What :func:`scan_nifti` found in a complete NIfTI file's voxel data."""

    n_nan: int
    n_inf: int


def _decompressed_blocks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The bytes of a file, gunzipped when it ends in .gz; OSError when the stream is cut or corrupt."""
    with open(path, "rb") as handle:
        if not str(path).lower().endswith(".gz"):
            while block := handle.read(1 << 22):
                yield block
            return
        decompressor = zlib.decompressobj(wbits=31)
        try:
            while chunk := handle.read(1 << 20):
                while chunk:
                    if decompressor.eof:  # another gzip member follows (concatenated .gz)
                        if not chunk.strip(b"\0"):
                            break  # trailing zero padding, as gzip tolerates
                        decompressor = zlib.decompressobj(wbits=31)
                    yield decompressor.decompress(chunk)
                    chunk = decompressor.unused_data if decompressor.eof else b""
        except zlib.error as error:
            raise OSError(f"{path}: corrupt gzip stream ({error})") from error
        if not decompressor.eof:
            raise OSError(f"{path}: truncated: the gzip stream ends before its end marker")


def scan_nifti(path: str | os.PathLike[str]) -> NiftiScan:
    """Check a NIfTI file is complete and count its NaN / infinite voxels, in one streaming pass.

    Both are invisible through SimpleITK (ITK 5.4): a truncated ``.nii.gz`` is read without an
    error with the missing voxels set to 0, and NaN/inf voxels also come back as 0, while
    nibabel (and so torchio) sees the truncation and the NaNs. The file is decompressed once in
    blocks; no image array is built. Other formats return zero counts unchecked.
    """
    import nibabel as nib

    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        return NiftiScan(0, 0)
    try:
        proxy = nib.load(str(path)).dataobj  # the loaded header's vox_offset is reset; the proxy keeps the file's
        offset = int(proxy.offset)
        dtype = np.dtype(proxy.dtype)
        data_bytes = int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize
    except Exception as error:  # nibabel raises several types for broken headers
        raise OSError(f"{path}: not a readable NIfTI header ({error})") from error
    floating = dtype.kind in "fc"
    position = n_nan = n_inf = 0
    carry = b""
    for block in _decompressed_blocks(path):
        if floating:
            start, stop = max(offset - position, 0), min(offset + data_bytes - position, len(block))
            if start < stop:
                part = carry + block[start:stop]
                usable = len(part) - len(part) % dtype.itemsize
                values = np.frombuffer(part, dtype=dtype, count=usable // dtype.itemsize)
                n_nan += int(np.count_nonzero(np.isnan(values)))
                n_inf += int(np.count_nonzero(np.isinf(values)))
                carry = part[usable:]
        position += len(block)
    if position < offset + data_bytes:
        raise OSError(f"{path}: truncated: {position} bytes, the header needs {offset + data_bytes}")
    return NiftiScan(n_nan, n_inf)


def iter_channels(image: sitk.Image) -> Iterator[sitk.Image]:
    """The 3D channels of an image, one at a time (a 3D scalar image is its own only channel)."""
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        for index in range(size[3]):
            yield sitk.Extract(
                image,
                size[:3] + [0],
                [0, 0, 0, index],
                sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX,
            )
    elif image.GetNumberOfComponentsPerPixel() > 1:
        for index in range(image.GetNumberOfComponentsPerPixel()):
            yield sitk.VectorIndexSelectionCast(image, index)
    else:
        yield image


def join_channels(channels: Sequence[sitk.Image]) -> sitk.Image:
    """One 3D image stays 3D; several become a 4D (x, y, z, c) image, which torchio reads as (C, x, y, z)."""
    if len(channels) == 1:
        return channels[0]
    return sitk.JoinSeries(list(channels))


def image_on_grid(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """SimpleITK image from an (x, y, z) array placed on ``geometry`` (e.g. a 4D image's spatial grid)."""
    if tuple(array.shape) != tuple(geometry.size):
        raise ValueError(f"array shape {tuple(array.shape)} does not match the grid size {geometry.size}")
    image = image_from_xyz(array)
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    return image




def label_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of a label map, where a 4D label with a single volume ``(x, y, z, 1)`` counts as 3D.

    The one rule for every reader of labels (nibabel arrays, SimpleITK headers and images); other
    shapes come back unchanged, for the caller to refuse.
    """
    shape = tuple(int(v) for v in shape)
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def read_label_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(labels (x, y, z) int16, affine 4x4, spacing (x, y, z) mm) of a label NIfTI via nibabel.

    nibabel, not SimpleITK: the affine compared here is the one every NIfTI reader sees.
    """
    import nibabel as nib

    from msdseg.decathlon import subject_id  # here: a resampling job need not import the task table

    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for broken files
        raise SubjectError(subject_id(path), str(path), f"not a readable NIfTI ({error})") from error
    data = np.asanyarray(image.dataobj)
    data = data.reshape(label_shape(data.shape))
    if data.ndim != 3:
        raise SubjectError(subject_id(path), str(path), f"a label map must be 3D, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        data = np.rint(data)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data.astype(np.int16, copy=False), np.asarray(image.affine, dtype=np.float64), spacing


def write_labels(labels: np.ndarray, reference_path: Path, out_path: Path,
                 reference: sitk.Image | sitk.ImageFileReader) -> None:
    """Write a uint8 label map with the reference's header: same affine, shape and orientation.

    NIfTI references are written with nibabel from the reference's own header (qform and sform
    copied as they are), so every reader sees exactly the original affine; other formats go
    through SimpleITK with the reference geometry.
    """
    import nibabel as nib

    if str(reference_path).endswith(NIFTI_SUFFIXES) and str(out_path).endswith(NIFTI_SUFFIXES):
        original = nib.load(str(reference_path))
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        image = nib.Nifti1Image(labels, original.affine, header)
        image.set_qform(original.get_qform(), code=int(original.header["qform_code"]))
        image.set_sform(original.get_sform(), code=int(original.header["sform_code"]))
        image.header.set_slope_inter(1.0, 0.0)
        image.header["cal_min"] = 0
        image.header["cal_max"] = 0
        image.header["descrip"] = b"msdseg prediction"
        image.header["intent_code"] = 0
        with atomic_path(out_path) as tmp:
            nib.save(image, str(tmp))
    else:
        write_image(image_on_grid(labels, spatial_geometry(reference)), out_path)

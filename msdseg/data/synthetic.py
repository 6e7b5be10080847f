"""The embedded demo task Task00_SyntheticLiver: a small, deterministic Decathlon-format archive.

It looks like MSD Task03 Liver on purpose so the demo runs the same code as real data: int16 CT
in Hounsfield units, anisotropic spacing, a flipped and slightly rotated direction, shapes and
origins that differ per subject, and macOS ``._*`` junk in imagesTr/labelsTr like the official
archives. The archive is byte-for-byte reproducible (sorted members, fixed tar metadata, gzip
mtime 0), so its MD5 can be pinned like a download's.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from msdseg.data.download import file_digest
from msdseg.decathlon import SYNTHETIC_LABELS, SYNTHETIC_TASK
from msdseg.files import atomic_path

SPACING = (0.8, 0.8, 2.5)


LABELS = SYNTHETIC_LABELS


_MTIME = 946684800  # 2000-01-01, fixed so the tar bytes never depend on the clock


_HU_AIR, _HU_BODY, _HU_BONE, _HU_LIVER, _HU_LESION = -1000.0, 40.0, 450.0, 60.0, 10.0


_NOISE_HU = 15.0


# a minimal AppleDouble header ("Mac OS X" resource fork stub), like the official archives' junk
_APPLE_DOUBLE = (
    bytes.fromhex("00051607" "00020000") + b"Mac OS X        " + (1).to_bytes(2, "big")
    + (9).to_bytes(4, "big") + (38).to_bytes(4, "big") + (32).to_bytes(4, "big") + bytes(32)
)


@dataclass(frozen=True)
class _Case:
    image: np.ndarray  # int16, (x, y, z)
    label: np.ndarray  # uint8, (x, y, z)
    affine: np.ndarray  # 4x4 RAS, as stored in qform and sform


def _ellipsoid(coords: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii)) <= 1.0


def _nifti_affine(rng: np.random.Generator) -> np.ndarray:
    """A few degrees of rotation plus an x flip, rounded through the qform so sform == qform."""
    theta = np.deg2rad(rng.uniform(2.0, 6.0) * rng.choice([-1.0, 1.0]))
    tilt = np.deg2rad(rng.uniform(-2.0, 2.0))
    rot_z = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    direction = rot_z @ rot_x @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(SPACING)
    affine[:3, 3] = [rng.uniform(-20, 20), rng.uniform(-160, -120), rng.uniform(-450, -350)]
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    return header.get_qform()


def _make_case(seed: int, index: int, with_lesion: bool) -> _Case:
    """One subject: air around an elliptic body, a spine, a liver ellipsoid, maybe a lesion."""
    rng = np.random.default_rng([seed, index])
    shape = (int(rng.integers(56, 73)), int(rng.integers(56, 73)), int(rng.integers(20, 29)))
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING)]
    coords = np.meshgrid(*axes, indexing="ij")
    extent = np.array([n * s for n, s in zip(shape, SPACING)])

    a, b = extent[0] * rng.uniform(0.42, 0.47), extent[1] * rng.uniform(0.34, 0.40)
    body = _ellipsoid(coords[:2], np.zeros(2), np.array([a, b]))
    spine = _ellipsoid(coords[:2], np.array([0.2 * a, -0.72 * b]), np.full(2, 0.1 * min(a, b)))
    organ_center = np.array([rng.uniform(-0.4, -0.3) * a, rng.uniform(-0.1, 0.1) * b,
                             rng.uniform(-0.1, 0.1) * extent[2]])
    organ_radii = np.array([rng.uniform(0.45, 0.55) * a, rng.uniform(0.5, 0.65) * b,
                            rng.uniform(0.3, 0.4) * extent[2]])
    organ = _ellipsoid(coords, organ_center, organ_radii) & body

    lesion = np.zeros(shape, dtype=bool)
    if with_lesion:
        offset = rng.uniform(-0.35, 0.35, size=3) * organ_radii
        in_plane = rng.uniform(0.32, 0.45) * min(organ_radii[:2])
        radii = np.array([in_plane, in_plane, max(rng.uniform(0.3, 0.4) * organ_radii[2], 5.0)])
        lesion = _ellipsoid(coords, organ_center + offset, radii) & organ

    hu = np.full(shape, _HU_AIR)
    hu[body] = _HU_BODY + rng.uniform(-5, 5)
    hu[spine] = _HU_BONE
    hu[organ] = _HU_LIVER + rng.uniform(-5, 5)
    hu[lesion] = _HU_LESION + rng.uniform(-5, 5)
    hu = gaussian_filter(hu, sigma=(0.7, 0.7, 0.3))  # partial-volume edges
    hu += rng.normal(0.0, _NOISE_HU, size=shape)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return _Case(image=image, label=label, affine=_nifti_affine(rng))


def _nifti_gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI bytes with gzip mtime 0: nibabel/SimpleITK would embed the clock."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _tar_info(name: str, size: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if size is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info


def make_synthetic_task(archive: Path, *, n_train: int = 12, n_test: int = 2, seed: int = 0) -> str:
    """Write the demo task as a Decathlon ``.tar`` at ``archive`` (atomically); return its MD5.

    Same arguments, same bytes: the returned MD5 can be pinned and checked like an official one.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"make_synthetic_task: need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    top = SYNTHETIC_TASK
    files: dict[str, bytes] = {}
    training, test = [], []
    for index in range(n_train + n_test):
        subject = f"liver_{index + 1:03d}"
        is_train = index < n_train
        case = _make_case(seed, index, with_lesion=is_train and index % 4 != 3)
        if is_train:
            files[f"imagesTr/{subject}.nii.gz"] = _nifti_gz(case.image, case.affine)
            files[f"labelsTr/{subject}.nii.gz"] = _nifti_gz(case.label, case.affine)
            training.append({"image": f"./imagesTr/{subject}.nii.gz", "label": f"./labelsTr/{subject}.nii.gz"})
            if index < 2:
                files[f"imagesTr/._{subject}.nii.gz"] = _APPLE_DOUBLE
                files[f"labelsTr/._{subject}.nii.gz"] = _APPLE_DOUBLE
        else:
            files[f"imagesTs/{subject}.nii.gz"] = _nifti_gz(case.image, case.affine)
            test.append(f"./imagesTs/{subject}.nii.gz")

    dataset = {
        "name": "SyntheticLiver",
        "description": "Synthetic CT phantoms (body, liver, lesion) for the msdseg demo",
        "reference": "msdseg.data.synthetic (generated)",
        "licence": "CC0 1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    files["dataset.json"] = (json.dumps(dataset, indent=4) + "\n").encode()

    entries: dict[str, bytes | None] = {f"{top}/{name}": data for name, data in files.items()}
    entries.update({f"{top}/{folder}": None for folder in ("", "imagesTr/", "labelsTr/", "imagesTs/")})
    with atomic_path(archive) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for name in sorted(entries):  # a folder ("x/") sorts before its content ("x/a")
                data = entries[name]
                if data is None:
                    tar.addfile(_tar_info(name, None))
                else:
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))

    return file_digest(archive, "md5")

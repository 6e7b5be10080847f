"""Benchmark: the preprocessed format. Region reads per second and disk use, .npy (memory-mapped) vs blosc2.

Why msdseg stores its preprocessed subjects as plain ``.npy`` arrays read through a memory map,
and not in compressed chunks: this script writes the same normalised, cropped subjects both ways
and times what the patch loader does with them, reading the region one patch needs (the patch,
or the 1.3x larger region a rotated, scaled patch samples from) at random places, all channels
plus the label, on one thread:

  npy     msdseg's files (``msdseg.data.preprocessed``), read with ``msdseg.train.patches.read_region``
  blosc2  nnU-Net v2's files: ``nnUNetDatasetBlosc2.save_case`` with its own chunk and block sizes
          for the patch (``comp_blosc2_params``), its default codec, read as its loader reads them
          (the `bench` extra: pip install -e ".[bench]" torch==2.13.0)

Warm: the files in the page cache (a training run reads the same subjects again and again).
Cold: each file dropped from the page cache before every read (``posix_fadvise(DONTNEED)``), so
the bytes come from the disk: a cohort larger than the node's memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/storage.py [--reads 60] [--only task04,brats,ct]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd

from loader import write_cohort, write_nnunet_cases
from msdseg.data.preprocessed import disk_bytes, open_subject, preprocess_subjects
from msdseg.train.patches import read_region

CASES = {  # cohort: patches (the planned or nnU-Net's)
    "task04": [(32, 40, 32)],
    "brats": [(128, 128, 128), (48, 48, 48)],
    "ct": [(96, 160, 160)],
}
AFFINE_REGION = 1.3  # a rotated, scaled patch samples from about 1.2-1.45x the patch per axis


def drop_from_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_blosc2(rows: list[dict[str, str]], folder: Path, patch: tuple[int, ...]) -> list[Path]:
    """nnU-Net's files for the preprocessed subjects, chunked for ``patch``; [] where nnU-Net is absent."""
    try:
        written = write_nnunet_cases(rows, folder, patch)
    except ImportError:
        return []
    return [written / row["subject"] for row in rows]


Reader = Callable[[np.ndarray, np.ndarray], None]


def region_reader(kind: str, path: Path) -> tuple[Reader, tuple[int, ...], list[Path]]:
    """(read(low, size), the subject's spatial shape, its files) for one subject in format ``kind``."""
    if kind == "npy":
        subject = open_subject(path)

        def read(low: np.ndarray, size: np.ndarray) -> None:
            read_region(subject.image, low, size)
            read_region(subject.label, low, size)
        return read, subject.shape, [path / "image.npy", path / "label.npy"]
    import blosc2
    files = [Path(f"{path}.b2nd"), Path(f"{path}_seg.b2nd")]
    data, seg = (blosc2.open(urlpath=str(f), mode="r", dparams={"nthreads": 1}, mmap_mode="r") for f in files)

    def read_b2(low: np.ndarray, size: np.ndarray) -> None:  # nnU-Net's loader: a slice of each array
        box = tuple(slice(int(a), int(a + n)) for a, n in zip(low, size))
        np.asarray(data[(slice(None), *box)])
        np.asarray(seg[(slice(None), *box)])
    return read_b2, tuple(int(s) for s in data.shape[1:]), files


def time_reads(kind: str, paths: list[Path], region: np.ndarray, reads: int, cold: bool) -> float:
    """Median seconds per region read at random places (inside the volume), one thread."""
    rng = np.random.default_rng(0)
    readers = [region_reader(kind, path) for path in paths]
    times = []
    for k in range(reads):
        read, shape, files = readers[k % len(readers)]
        size = np.minimum(region, shape)
        low = np.array([rng.integers(0, s - n + 1) for s, n in zip(shape, size)])
        if cold:
            drop_from_cache(files)
        started = time.perf_counter()
        read(low, size)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=60, help="region reads per measurement")
    parser.add_argument("--only", default="task04,brats,ct")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "msdseg-loader-bench")
    args = parser.parse_args()
    try:
        import blosc2
    except ImportError:
        print("blosc2 not installed (the `bench` extra): .npy only")
    else:
        blosc2.set_nthreads(1)
    table = []
    for name in args.only.split(","):
        rows, plan = write_cohort(name, args.data / name)
        rows = preprocess_subjects(rows, plan, args.data / f"{name}-preprocessed")
        npy_paths = [Path(row["preprocessed"]) for row in rows]
        for patch in CASES[name]:
            b2_paths = write_blosc2(rows, args.data / f"{name}-nnunet", patch)  # shared with loader.py
            formats = {"npy": (npy_paths, sum(disk_bytes(p) for p in npy_paths))}
            if b2_paths:
                formats["blosc2"] = (b2_paths, sum(f.stat().st_size for p in b2_paths
                                                   for f in (Path(f"{p}.b2nd"), Path(f"{p}_seg.b2nd"))))
            for kind, (paths, size) in formats.items():
                row = {"cohort": name, "patch": "x".join(map(str, patch)), "format": kind,
                       "disk_mb": round(size / 2**20, 1)}
                for label, scale in (("patch", 1.0), ("affine region", AFFINE_REGION)):
                    region = np.ceil(np.asarray(patch) * scale).astype(int)
                    for cold in (False, True):
                        seconds = time_reads(kind, paths, region, args.reads, cold)
                        row[f"{label} {'cold' if cold else 'warm'} ms"] = round(1000 * seconds, 2)
                table.append(row)
                print(row, flush=True)
    print(pd.DataFrame(table).to_string(index=False))
    print(json.dumps(table))


if __name__ == "__main__":
    main()

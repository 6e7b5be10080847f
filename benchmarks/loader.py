"""Benchmark: the training data path. Patches per second per worker core, first batch, memory, disk.

Synthetic cohorts of real task sizes (written once under --data, reused):
  task04  Task04-like, 1 x 36x50x35, 3 labels, at the CPU plan's patch (2 threads, 15 min)
  brats   BrainTumour-like, 4 x 240x240x155 (a brain-shaped non-zero region), 4 labels, at 128^3
          (nnU-Net's patch) and at the CPU plan's patch
  ct      CT, 1 x 512x512x300 (int16 HU), 3 labels, at 96x160x160
Loaders, each in one worker process (one core), default augmentation, a fresh augmentation per patch
where the loader allows it:
  queue   torchio's Queue as msdseg had it (train.loader: queue), at the plan's samples_per_volume
  patch   msdseg's patch loader (train.loader: patch) on the preprocessed arrays
  monai   MONAI: cached normalised arrays, FgBgToIndicesd, RandCropByPosNegLabeld + RandAffined + flips,
          gamma, noise (the `bench` extra: pip install -e ".[bench]")
  nnunet  nnU-Net v2's nnUNetDataLoader + its default training transforms on its blosc2 files
          (the `bench` extra; a benchmark tool, not a dependency)
Then the nnU-Net-style pair on the CPU: training pace (s/step) with the patch loader vs with
dummy batches (no data loading at all), for task04 and brats at their CPU plans.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/loader.py [--seconds 20] [--threads 2] [--only task04,brats]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import torch

from msdseg.config import load_config
from msdseg.data.preprocessed import disk_bytes, plan_hash, preprocess_subjects
from msdseg.data.subjects import subjects_from_paths
from msdseg.decathlon import TASKS
from msdseg.plan.fingerprint import DeviceSpec, published_fingerprint
from msdseg.plan.record import apply_plan
from msdseg.plan.training import plan_training
from msdseg.train import loop
from msdseg.train.patches import PatchStream, make_patch_loader
from msdseg.train.probe import torch_probe
from msdseg.train.queue import make_loader, make_queue
from msdseg.train.trainer import train

COHORTS = {  # name: (channels, shape, subjects, normalisation, labels)
    "task04": (1, (36, 50, 35), 32, "zscore", 3),
    "brats": (4, (240, 240, 155), 4, "zscore_nonzero", 4),
    "ct": (1, (512, 512, 300), 2, "ct", 3),
}
AUGMENTATION = {"flip": True, "flip_axes": [0, 1, 2], "affine": True, "elastic": False, "bias_field": False,
                "gamma": True, "noise": True}


def write_cohort(name: str, folder: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The cohort's NIfTI files (written once) and its preprocessing plan."""
    channels, shape, count, normalisation, n_labels = COHORTS[name]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        image_path, label_path = folder / f"{name}_{k:03d}.nii.gz", folder / f"{name}_{k:03d}_label.nii.gz"
        if not label_path.exists():
            image, label = _volume(name, channels, shape, n_labels, np.random.default_rng(k))
            nib.save(nib.Nifti1Image(image, np.eye(4)), image_path)
            nib.save(nib.Nifti1Image(label, np.eye(4)), label_path)
        rows.append({"subject": f"{name}_{k:03d}", "image": str(image_path), "label": str(label_path)})
    plan = {"normalization": normalisation, "labels": {str(i): f"class{i}" for i in range(n_labels)},
            "n_channels": channels}
    if normalisation == "ct":
        plan.update(ct_window=[-100.0, 300.0], ct_mean=100.0, ct_std=50.0)
    return rows, plan


def _volume(name: str, channels: int, shape: tuple[int, ...], n_labels: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8 ** 2 if name != "task04" else np.ones(shape, bool)  # hippocampus crops: no zeros
    label = np.zeros(shape, np.uint8)
    for value in range(1, n_labels):  # nested blobs, smaller for higher labels
        centre = rng.uniform(-0.3, 0.3, 3).astype(np.float32)[:, None, None, None]
        label[((grid - centre) ** 2).sum(0) < (0.35 / value) ** 2] = value
    if name == "ct":
        image = np.where(body, 40 + 30 * label, -1000).astype(np.int16)
        image = (image + rng.normal(0, 20, shape)).astype(np.int16)
        return image, label
    image = np.zeros((*shape, channels), np.float32)
    for c in range(channels):
        image[..., c] = np.where(body, 100 + 40 * label + rng.normal(0, 15, shape), 0)
    return (image[..., 0] if channels == 1 else image), label


def cpu_plan(task: str, threads: int) -> dict[str, Any]:
    """The planner's CPU settings for ``task`` (2 threads, 15 minutes), from its published fingerprint."""
    fingerprint = published_fingerprint(TASKS[task])
    probe = torch_probe(fingerprint, torch.device("cpu"), "fp32")
    return plan_training(fingerprint, DeviceSpec("cpu", threads=threads), 15.0, {}, probe=probe).as_dict()


def train_settings(patch: list[int], batch: int, samples: int = 1, queue: int = 8) -> dict[str, Any]:
    return {"patch_size": patch, "batch_size": batch, "sampler": "label",
            "label_probabilities": None, "samples_per_volume": samples, "queue_length": max(queue, samples),
            "augmentation": AUGMENTATION, "num_workers": 1}


def measure(batches: Iterator[Any], batch: int, seconds: float) -> tuple[float, float]:
    """(first batch s, patches/s after it) over ``seconds``."""
    started = time.perf_counter()
    next(batches)
    first = time.perf_counter() - started
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(batches)
        count += batch
    return first, count / (time.perf_counter() - t0)


def children_memory_mb() -> tuple[float, float, float]:
    """(RSS, PSS, anonymous RSS) summed over this process's children (the loader workers), MB.

    RSS and PSS count the mapped pages of the preprocessed files, which are the kernel's page
    cache (shared by all workers, dropped under memory pressure); the anonymous RSS is what the
    workers hold of their own (buffers, batches in flight, Python and torch).
    """
    rss = pss = anonymous = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_full_info()
            status = Path(f"/proc/{child.pid}/status").read_text()
        except (psutil.Error, OSError):
            continue
        rss, pss = rss + info.rss / 2**20, pss + getattr(info, "pss", info.rss) / 2**20
        anonymous += next((int(line.split()[1]) / 1024 for line in status.splitlines()
                           if line.startswith("RssAnon:")), 0.0)
    return rss, pss, anonymous


def run_patch(rows: list[dict[str, Any]], plan: dict[str, Any], cfg: dict[str, Any], seconds: float,
              workers: int = 1) -> dict[str, Any]:
    stream = PatchStream([r["preprocessed"] for r in rows], plan_hash(plan), cfg, 3, seed=0)
    batches = make_patch_loader(stream, cfg["batch_size"], 0, workers)
    first, rate = measure(batches, cfg["batch_size"], seconds)
    rss, pss, anonymous = children_memory_mb()
    return {"first_batch_s": first, "patches_per_s": rate, "workers_rss_mb": rss, "workers_pss_mb": pss,
            "workers_anon_mb": anonymous}


def workers_memory(data: Path, workers: int, seconds: float) -> dict[str, Any]:
    """Proportional set size of ``workers`` patch-loader workers on the BrainTumour-like cohort at 128^3.

    PSS splits pages shared between processes (the mapped files, the interpreter's pages inherited
    from the parent), so the sum over the workers is what they add to the machine.
    """
    rows, plan = write_cohort("brats", data / "brats")
    rows = preprocess_subjects(rows, plan, data / "brats-preprocessed")
    cfg = train_settings([128, 128, 128], 2)
    stream = PatchStream([r["preprocessed"] for r in rows], plan_hash(plan), cfg, 3, seed=0)
    batches = make_patch_loader(stream, 2, 0, workers)  # kept: its workers live as long as it does
    first, rate = measure(batches, 2, seconds)
    total: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        for line in Path(f"/proc/{child.pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                total[key] = total.get(key, 0.0) + int(line.split()[1]) / 1024
    batches.close()
    return {"first_batch_s": first, "patches_per_s": rate, "workers_pss_mb": total.get("Pss", 0.0),
            "workers_anon_mb": total.get("Pss_Anon", 0.0), "workers_file_mb": total.get("Pss_File", 0.0)}


def run_queue(rows: list[dict[str, Any]], plan: dict[str, Any], cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    queue = make_queue(subjects_from_paths(rows), plan, cfg, 3)
    loader = make_loader(queue, cfg["batch_size"])

    def forever() -> Iterator[Any]:
        while True:
            yield from loader

    first, rate = measure(forever(), cfg["batch_size"], seconds)
    rss, pss, anonymous = children_memory_mb()
    return {"first_batch_s": first, "patches_per_s": rate, "workers_rss_mb": rss, "workers_pss_mb": pss,
            "workers_anon_mb": anonymous}


def run_monai(rows: list[dict[str, Any]], cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    """MONAI in this process on one thread: cached normalised arrays, then random crops and augmentation."""
    try:
        from monai import transforms as mt
    except ImportError:
        return {"note": "monai not installed"}
    patch = cfg["patch_size"]
    cached = []
    for row in rows:  # what CacheDataset keeps: the deterministic part (normalised arrays, fg/bg indices)
        from msdseg.data.preprocessed import open_subject
        subject = open_subject(row["preprocessed"])
        item = {"image": np.asarray(subject.image), "label": np.asarray(subject.label)[None]}
        item = mt.SpatialPadd(["image", "label"], spatial_size=cfg["patch_size"])(item)
        cached.append(mt.FgBgToIndicesd(keys="label")(item))
    keys = ["image", "label"]
    random_part = mt.Compose([
        mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=1, neg=2, num_samples=1,
                                  fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices"),
        mt.RandAffined(keys, prob=0.3, rotate_range=[np.radians(15)] * 3, scale_range=[0.15] * 3,
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        *[mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
        mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.74, 1.35)),
        mt.RandGaussianNoised("image", prob=0.15, std=0.1),
    ])
    rng = np.random.default_rng(0)

    def batches() -> Iterator[Any]:
        while True:
            yield [random_part(cached[int(rng.integers(len(cached)))]) for _ in range(cfg["batch_size"])]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, rate = measure(batches(), cfg["batch_size"], seconds)
    finally:
        torch.set_num_threads(threads)
    return {"first_batch_s": first, "patches_per_s": rate}


def write_nnunet_cases(rows: list[dict[str, Any]], folder: Path, patch: tuple[int, ...]) -> Path:
    """nnU-Net v2's preprocessed files (blosc2 arrays chunked by nnU-Net for ``patch``, class
    locations) of the preprocessed subjects, written once under ``folder/<patch>``; that folder.
    Raises ImportError without nnunetv2."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from msdseg.data.preprocessed import open_subject
    folder = folder / "x".join(map(str, patch))
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:  # channel first, as msdseg's arrays
        target = folder / row["subject"]
        if not Path(f"{target}.b2nd").exists():
            subject = open_subject(row["preprocessed"])
            data, seg = np.asarray(subject.image), np.asarray(subject.label)[None].astype(np.int16)
            locations = {int(k): np.concatenate([np.zeros((len(v), 1), np.int64), v], 1)
                         for k, v in subject.locations.items() if k != "0"}
            blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
            nnUNetDatasetBlosc2.save_case(data, seg, {"class_locations": locations}, str(target), chunks=chunks,
                                          blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return folder


def run_nnunet(rows: list[dict[str, Any]], plan: dict[str, Any], cfg: dict[str, Any], seconds: float,
               folder: Path) -> dict[str, Any]:
    """nnU-Net v2's own data loader and default training transforms, in this process on one thread."""
    try:
        from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import LabelManager
    except ImportError:
        return {"note": "nnunetv2 not installed"}
    patch = tuple(int(p) for p in cfg["patch_size"])
    folder = write_nnunet_cases(rows, folder, patch)
    dataset = nnUNetDatasetBlosc2(str(folder), [r["subject"] for r in rows])
    patch = np.asarray(patch)
    rotation = (-np.pi / 6, np.pi / 6)  # nnU-Net's 3D default
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    transforms = nnUNetTrainer.get_training_transforms(patch, rotation, None, (0, 1, 2), False,
                                                       foreground_labels=list(range(1, len(plan["labels"]))))
    labels = LabelManager({("background" if k == "0" else name): int(k) for k, name in plan["labels"].items()},
                          regions_class_order=None)
    loader = nnUNetDataLoader(dataset, cfg["batch_size"], initial, patch, labels, oversample_foreground_percent=0.33,
                              transforms=transforms)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, rate = measure(iter(loader), cfg["batch_size"], seconds)
    finally:
        torch.set_num_threads(threads)
    return {"first_batch_s": first, "patches_per_s": rate, "disk_mb": disk_bytes(folder) / 2**20}


def pace_pair(rows: list[dict[str, Any]], plan: dict[str, Any], training_plan: dict[str, Any], threads: int,
              steps: int) -> dict[str, float]:
    """Median s/step training with the patch loader vs with dummy batches (the same shapes, no loading)."""
    raw = {"task": "bench", "source": {"folder": "unused"}, "train": {"augmentation": AUGMENTATION}}
    config = apply_plan(load_config(raw), training_plan)
    config["train"].update(iterations=steps, validate_every=10**6, settle_at=None, checkpoint_every=10**6,
                           max_minutes=60)
    pace = {}
    real = loop.training_batches
    for mode in ("loader", "dummy"):
        if mode == "dummy":
            loop.training_batches = _dummy_batches(real)
        try:
            with tempfile.TemporaryDirectory() as out:
                train(rows, [], plan, config, Path(out), fold=0, threads=threads, device="cpu")
                log = pd.read_csv(Path(out) / "training_log.csv")
        finally:
            loop.training_batches = real
        pace[mode] = float(log["seconds_per_step"].iloc[steps // 4:].median())
    return pace


def _dummy_batches(real: Callable[..., Any]) -> Callable[..., Any]:
    def dummy(run: Any, iteration: int) -> tuple[Any, Iterator[Any]]:
        source, batches = real(run, iteration)
        image, label = next(batches)  # one real batch, then the same tensors forever

        def forever() -> Iterator[Any]:
            while True:
                yield image, label
        return source, forever()
    return dummy


def cases(name: str, threads: int) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(label, train settings, CPU training plan or None) for the cohort's patch sizes."""
    if name == "ct":
        return [("96x160x160", train_settings([96, 160, 160], 2), None)]
    task = "Task04_Hippocampus" if name == "task04" else "Task01_BrainTumour"
    planned = cpu_plan(task, threads)
    settings = {k: v["value"] for k, v in planned["settings"].items()}
    cpu = train_settings(list(settings["train.patch_size"]), int(settings["train.batch_size"]),
                         int(settings["train.samples_per_volume"]), int(settings["train.queue_length"]))
    rows = [(f"CPU plan {'x'.join(map(str, cpu['patch_size']))}", cpu, planned)]
    if name == "brats":
        rows.insert(0, ("128x128x128", train_settings([128, 128, 128], 2), None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per loader")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="task04,brats,ct")
    parser.add_argument("--loaders", default="queue,patch,monai,nnunet")
    parser.add_argument("--steps", type=int, default=40, help="training steps per pace measurement (0: none)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "msdseg-loader-bench")
    parser.add_argument("--workers-memory", type=int, default=0, help="only: PSS of N workers on brats at 128^3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.workers_memory:
        print(json.dumps(workers_memory(args.data, args.workers_memory, args.seconds)))
        return
    loaders = args.loaders.split(",")
    table, pairs = [], []
    for name in args.only.split(","):
        rows, plan = write_cohort(name, args.data / name)
        started = time.perf_counter()
        rows = preprocess_subjects(rows, plan, args.data / f"{name}-preprocessed")
        prep_s = (time.perf_counter() - started) / len(rows)
        nifti_mb = sum(Path(r["image"]).stat().st_size + Path(r["label"]).stat().st_size for r in rows) / 2**20
        disk = f"npy {disk_bytes(args.data / f'{name}-preprocessed') / 2**20:.0f} MB, nii.gz {nifti_mb:.0f} MB"
        for label, cfg, planned in cases(name, args.threads):
            for loader in loaders:
                print(f"{name} {label} {loader} ...", file=sys.stderr, flush=True)
                if loader == "queue":
                    result = run_queue(rows, plan, cfg, args.seconds)
                elif loader == "patch":
                    result = run_patch(rows, plan, cfg, args.seconds)
                    result["disk"] = disk
                    result["preprocess_s"] = prep_s
                elif loader == "monai":
                    result = run_monai(rows, cfg, args.seconds)
                else:
                    result = run_nnunet(rows, plan, cfg, args.seconds, args.data / f"{name}-nnunet")
                table.append({"cohort": name, "patch": label, "loader": loader, **result})
            if planned is not None and args.steps:
                pace = pace_pair(rows, plan, planned, args.threads, args.steps)
                pairs.append({"cohort": name, "patch": label, "loader s/step": pace["loader"],
                              "dummy s/step": pace["dummy"], "ratio": pace["loader"] / pace["dummy"]})
        if name == "brats" and "patch" in loaders:  # 8 workers' memory, measured from a fresh process
            command = [sys.executable, __file__, "--workers-memory", "8", "--seconds", str(args.seconds),
                       "--data", str(args.data)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            table.append({"cohort": name, "patch": "128x128x128", "loader": "patch, 8 workers",
                          **json.loads(done.stdout.strip().splitlines()[-1])})
    frame = pd.DataFrame(table)
    print(frame.to_markdown(index=False, floatfmt=".2f"))
    if pairs:
        print()
        print(pd.DataFrame(pairs).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()

"""Patch-queue training of one fold: resumable, reproducible, on the GPU when there is one.

Writes ``out_dir/model.pt`` (best validation weights + everything inference needs, see
docs/design.md), ``out_dir/training_log.csv`` and, while running, ``out_dir/checkpoint.pt``.
A checkpoint is resumed only when it was written for the same training config (hash); it is
written atomically, so a run killed at any moment leaves the previous complete one.

``train.devices: N`` > 1 trains one model with DistributedDataParallel on N GPUs of this node
(:func:`_spawn`): N processes, each with its share of the subjects per epoch (``DistributedSampler``
as the queue's subject sampler) and its own augmentation seed; rank 0 alone validates and writes
the checkpoint, the log and model.pt (the unwrapped model: loads in one process). On a machine
without CUDA the ranks run on the CPU with gloo: that is for testing, not for speed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchio as tio
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from msdseg.config import ConfigError
from msdseg.data import IMAGE, LABEL, make_loader, make_queue, mirror_axes, preprocessing, subjects_from_paths
from msdseg.errors import MsdsegError
from msdseg.inference import autocast_dtype, default_overlap, predict_probabilities
from msdseg.io import atomic_path
from msdseg.metrics import dice_per_label
from msdseg.model import UNet, save_model

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "training_log.csv"
# train.* keys that do not change what is learned: a checkpoint survives changes to them
_NOT_HASHED = {"max_minutes", "threads", "mem_mb", "gpus", "folds", "checkpoint_every",
               "validate_every", "num_workers", "devices"}
# Diagnostics of DDP runs (tests): when set (not "0"), each rank writes DDP_DIAGNOSTICS.format(rank=r)
# into out_dir: the subject ids its queue drew per epoch and a hash of its weights after steps 1 and last.
DDP_DIAGNOSTICS_ENV = "MSDSEG_DDP_DIAGNOSTICS"
DDP_DIAGNOSTICS = "ddp_diagnostics_rank{rank}.json"


@dataclass(frozen=True)
class _Ddp:
    """This process's place in a DDP run; ``device`` holds the tensors of collectives."""

    rank: int
    world: int
    device: torch.device


def _say(message: str) -> None:
    """A message for the job log: logging when configured (msdseg.logs.job_log), else stderr."""
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(message)
    else:  # tqdm.write keeps the progress bar intact
        tqdm.write(f"[msdseg.train] {message}", file=sys.stderr)


class Schedule:
    """Learning rate over training progress: poly (nnU-Net, exponent 0.9), cosine or constant.

    Progress is iterations done / ``train.iterations``, or time spent / ``train.max_minutes``
    when the pace projects past the time budget (see :func:`_progress`), so the rate anneals to
    zero at whichever limit comes first: a run cut by its time budget still ends on a small
    learning rate, and a run that fits its budget is reproducible.
    Hand-written because torch's schedulers count steps only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.progress = 0.0

    def factor(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "poly":
            return (1.0 - progress) ** 0.9
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def step(self, progress: float) -> float:
        """Set the learning rate for the next step and return it (progress never goes back)."""
        self.progress = max(self.progress, float(progress))
        factor = self.factor(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kind, self.base_lrs, self.progress = state["kind"], list(state["base_lrs"]), float(state["progress"])


def make_optimizer(model: nn.Module, cfg_train: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW, Adam, or nnU-Net's SGD (Nesterov, momentum 0.99) from the train section."""
    kind, lr, decay = cfg_train["optimizer"], cfg_train["learning_rate"], cfg_train["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=decay)
    optimizer_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=lr, weight_decay=decay)


def segmentation_loss(logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, kind: str,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy and/or soft Dice over the foreground classes (batch Dice, as nnU-Net 3D).

    ``logits`` (B, K, x, y, z), ``target`` (B, x, y, z) integer labels. Computed in float32.
    A list of logits (deep supervision, each half the size of the one before) weighs level k by
    2**-k against a nearest-neighbour downsampled target, as nnU-Net does.
    """
    if not isinstance(logits, torch.Tensor):
        weights = [0.5**k for k in range(len(logits))]
        total = logits[0].new_zeros((), dtype=torch.float32)
        for weight, level in zip(weights, logits):
            level_target = target
            if level.shape[2:] != target.shape[1:]:
                level_target = F.interpolate(target[:, None].float(), size=level.shape[2:], mode="nearest")[:, 0].long()
            total = total + weight * segmentation_loss(level, level_target, kind, class_weights)
        return total / sum(weights)
    logits = logits.float()
    loss = logits.new_zeros(())
    if kind in ("ce", "ce+dice"):
        loss = loss + F.cross_entropy(logits, target, weight=class_weights)
    if kind in ("dice", "ce+dice"):
        probabilities = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        dims = (0, *range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(dims)
        denominator = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
        loss = loss + (1.0 - dice[1:].mean())
    return loss


def config_hash(config: Mapping[str, Any], plan: Mapping[str, Any], fold: int,
                train_ids: Sequence[str], val_ids: Sequence[str]) -> str:
    """Identity of a training run: a checkpoint from another identity is not resumed."""
    train_cfg = {k: v for k, v in config["train"].items() if k not in _NOT_HASHED}
    identity = {"model": config["model"], "train": train_cfg, "seed": config["seed"], "plan": plan,
                "fold": fold, "train_subjects": list(train_ids), "val_subjects": list(val_ids)}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random. Queue workers are seeded by torch's DataLoader from torch's RNG."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and primitives (checkpoints load with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _infinite(loader: Any) -> Iterator[Any]:
    """Batches forever: the queue's epoch ends after n_subjects * samples_per_volume patches."""
    while True:
        yield from loader


def _label_names(plan: Mapping[str, Any]) -> dict[int, str]:
    """Foreground labels -> names usable as CSV column suffixes (dataset.json names)."""
    return {int(k): "_".join(str(v).split()) for k, v in sorted(plan["labels"].items(), key=lambda i: int(i[0]))
            if int(k) > 0}


def validate(model: nn.Module, subjects: Sequence[tio.Subject], plan: Mapping[str, Any],
             config: Mapping[str, Any], device: torch.device) -> dict[int, float]:
    """Mean Dice per foreground label over whole validation volumes (NaN when never present)."""
    patch = config["infer"].get("patch_size") or config["train"]["patch_size"]
    overlap = config["infer"].get("overlap") or default_overlap(patch)
    transform = preprocessing(plan)
    labels = list(_label_names(plan))
    scores: dict[int, list[float]] = {label: [] for label in labels}
    for subject in subjects:
        prepared = transform(subject)
        probabilities = predict_probabilities(
            model, prepared[IMAGE].data, patch, overlap, batch_size=config["infer"]["batch_size"],
            device=device, overlap_mode=config["infer"]["overlap_mode"], tta=False,
            amp=config["train"]["precision"])
        prediction = probabilities.argmax(0).numpy()
        reference = prepared[LABEL].data[0].numpy()
        for label, value in dice_per_label(prediction, reference, labels).items():
            scores[label].append(value)
    return {label: float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
            for label, values in scores.items()}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available; use device 'cpu' or None.")
    return device


def _load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint if it belongs to this run, else None (and say why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint means: start over
        _say(f"{path}: unreadable checkpoint ({type(error).__name__}); starting over.")
        return None
    if not isinstance(state, dict) or state.get("config_hash") != expected_hash:
        found = state.get("config_hash") if isinstance(state, dict) else None
        _say(f"{path}: checkpoint was written for another training config (hash {found}, now "
             f"{expected_hash}); starting over from iteration 0.")
        return None
    return state


def train(train_subjects: Sequence[Mapping[str, Any]], val_subjects: Sequence[Mapping[str, Any]],
          plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
          threads: int = 1, device: str | None = None) -> Path:
    """Train one fold and return the path of model.pt (see module docstring).

    Subjects are mappings with subject, image and label (resampled files). ``device`` None = CUDA
    when available. Process-wide torch settings (threads, determinism, cuDNN) are restored after.
    ``train.devices`` > 1: DDP in that many worker processes (see :func:`_spawn`).
    """
    devices = int(config["train"].get("devices", 1))
    if devices > 1:
        return _spawn(train_subjects, val_subjects, plan, config, Path(out_dir), fold, threads, device, devices)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        return _train(train_subjects, val_subjects, plan, config, out_dir, fold, threads, device)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(train_subjects: Sequence[Mapping[str, Any]], val_subjects: Sequence[Mapping[str, Any]],
           plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
           threads: int, device: str | None, devices: int) -> Path:
    """Train with DDP in ``devices`` processes (``torch.multiprocessing``, rendezvous on 127.0.0.1).

    CUDA: rank r on ``cuda:r`` with NCCL. CPU (no CUDA, or ``device='cpu'``): gloo, for tests.
    Each rank gets ``threads // devices`` threads. A failing rank stops the others and raises here.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda" and torch.cuda.device_count() < devices:
        raise ConfigError(f"config key 'train.devices': {devices} GPUs requested, {torch.cuda.device_count()} "
                          "visible; lower train.devices or ask the scheduler for more GPUs (train.gpus).")
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"config key 'train.devices': DDP runs on CUDA or the CPU, not {dev.type}; "
                          "set train.devices: 1.")
    if dev.type == "cpu":
        _say(f"train.devices is {devices} without CUDA: {devices} CPU processes with gloo "
             "(meant for testing; it is not faster than one process).")
    # a job log (msdseg.logs.job_log) is a file behind sys.stderr: the ranks append to it too
    log_name = getattr(sys.stderr, "name", None)
    log_file = log_name if isinstance(log_name, str) and os.path.isfile(log_name) else None
    args = (devices, _free_port(), dev.type, log_file, [dict(s) for s in train_subjects],
            [dict(s) for s in val_subjects], plan, config, str(out_dir), int(fold), max(int(threads) // devices, 1))
    # spawn would re-run the caller's __main__ in each worker (a Snakemake rule script has no
    # `if __name__ == "__main__"` guard): hide it while the workers start; they need msdseg only
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        context = mp.start_processes(_ddp_worker, args=args, nprocs=devices, join=False, start_method="spawn")
    finally:
        sys.modules["__main__"] = main
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise MsdsegError(f"fold {fold}: DDP training failed in rank {error.error_index} of {devices}: "
                          f"{lines[-1] if lines else error}") from error
    return out_dir / MODEL


def _ddp_worker(rank: int, world: int, port: int, device_type: str, log_file: str | None,
                train_subjects: list[dict[str, Any]], val_subjects: list[dict[str, Any]],
                plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: str, fold: int, threads: int) -> None:
    """One DDP rank (a process started by :func:`_spawn`)."""
    # torch ends the ranks with SIGINT when the parent dies; a launcher may have left SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ExitStack() as stack:
        if log_file is not None:
            stream = stack.enter_context(open(log_file, "a", buffering=1))
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s"))
            logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
            stack.enter_context(redirect_stdout(stream))
            stack.enter_context(redirect_stderr(stream))
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
        else:
            dev = torch.device("cpu")
        # rank 0 validates while the others wait in a collective: allow it the whole budget
        timeout = timedelta(minutes=max(30.0, float(config["train"]["max_minutes"])))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
        try:
            _train(train_subjects, val_subjects, plan, config, Path(out_dir), fold, threads, str(dev),
                   ddp=_Ddp(rank, world, dev))
        finally:
            dist.destroy_process_group()


def _weights_hash(model: nn.Module) -> str:
    """sha256 of the parameters (what DDP keeps equal across ranks), for the DDP diagnostics."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train(train_subjects: Sequence[Mapping[str, Any]], val_subjects: Sequence[Mapping[str, Any]],
           plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
           threads: int, device: str | None, ddp: _Ddp | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg_train, cfg_model = config["train"], config["model"]
    dev = _resolve_device(device)
    torch.set_num_threads(max(int(threads), 1))
    deterministic = bool(cfg_train["deterministic"])
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        # benchmark picks the fastest kernels, but not reproducibly: only when determinism is off
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    # a few CUDA kernels (e.g. weighted NLL) have no deterministic version: warn there, never fail
    torch.use_deterministic_algorithms(deterministic, warn_only=dev.type == "cuda")
    seed = int(config["seed"]) + int(fold)
    seed_everything(seed)  # the same on every DDP rank: same initial weights (DDP also broadcasts rank 0's)
    lead = ddp is None or ddp.rank == 0  # validates and writes files
    diagnostics = ddp is not None and os.environ.get(DDP_DIAGNOSTICS_ENV, "0") not in ("", "0")

    names = _label_names(plan)
    n_classes = len(plan["labels"])
    weights = cfg_train.get("class_weights")
    if weights is not None and len(weights) != n_classes:
        raise ConfigError(f"config key 'train.class_weights': {len(weights)} weights for {n_classes} "
                          f"labels {plan['labels']}; give one weight per label.")
    class_weights = torch.tensor(weights, dtype=torch.float32, device=dev) if weights is not None else None

    train_tio = subjects_from_paths(train_subjects)
    val_tio = subjects_from_paths(val_subjects)
    if not train_tio:
        raise ConfigError(f"fold {fold}: no training subjects; check manifest.n_folds and the manifest.")
    identity = config_hash(config, plan, fold, [s["subject"] for s in train_tio], [s["subject"] for s in val_tio])

    model = UNet(cfg_model["spatial_dims"], int(plan.get("n_channels", 1)), n_classes,
                 cfg_model["base_channels"], cfg_model["depth"], cfg_model["norm"], cfg_model["dropout"],
                 deep_supervision=cfg_model["deep_supervision"]).to(dev)
    optimizer = make_optimizer(model, cfg_train)
    total = int(cfg_train["iterations"])
    scheduler = Schedule(optimizer, cfg_train["schedule"])
    amp_dtype = autocast_dtype(cfg_train["precision"], dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    iteration, elapsed_before, rows = 0, 0.0, []
    best: dict[str, Any] = {"score": -math.inf, "dice": {}, "iteration": 0, "state_dict": None}
    checkpoint_path = out_dir / CHECKPOINT
    state = _load_checkpoint(checkpoint_path, identity)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        iteration, elapsed_before, rows = int(state["iteration"]), float(state["elapsed_s"]), list(state["log"])
        best = dict(state["best"])
        if lead:
            _say(f"resuming fold {fold} from {checkpoint_path} at iteration {iteration}")
    net: nn.Module = model  # what trains; `model` (unwrapped) validates and is saved
    if ddp is not None:
        # per-rank augmentation and patch draws (a resumed run's checkpoint holds rank 0's RNG only)
        seed_everything(seed + ddp.rank + 1_000_003 * iteration)
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def save_checkpoint() -> None:
        content = {"config_hash": identity, "iteration": iteration, "elapsed_s": elapsed(),
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "rng": _rng_state(), "log": rows, "best": best}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(content, tmp)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def clock() -> tuple[float, float]:
        """(elapsed s, validation s): rank 0's under DDP, so that every rank stops and anneals alike."""
        if ddp is None:
            return elapsed(), validation_s
        values = torch.tensor([elapsed(), validation_s], dtype=torch.float64, device=ddp.device)
        dist.broadcast(values, 0)
        return float(values[0]), float(values[1])

    def run_validation() -> dict[int, float]:
        dice = validate(model, val_tio, plan, config, dev)
        valid = [v for v in dice.values() if not math.isnan(v)]
        score = float(np.mean(valid)) if valid else -math.inf
        # train.keep "last": every validation replaces the kept weights, so the final ones win
        keep_latest = cfg_train["keep"] == "last"
        if keep_latest or best["state_dict"] is None or score >= best["score"]:  # ties: the later weights
            best.update(score=score, dice={names[k]: v for k, v in dice.items()}, iteration=iteration,
                        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        return dice

    budget_s = float(cfg_train["max_minutes"]) * 60.0
    batch_size = int(cfg_train["batch_size"])
    validation_s = 0.0
    last_validated = rows[-1]["iteration"] if rows and _validated(rows[-1], names) else -1
    model.train()
    queue, hashes = None, {}
    now, validating_s = clock()
    if iteration < total and now < budget_s:
        if ddp is None:
            queue = make_queue(train_tio, plan, config)
        else:  # this rank's share of the subjects, reshuffled (alike on all ranks) every pass
            sampler = DistributedSampler(train_tio, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=seed)
            per_epoch = len(sampler) * int(cfg_train["samples_per_volume"])
            queue = make_queue(train_tio, plan, config, subject_sampler=sampler,
                               first_epoch=iteration * batch_size // per_epoch)
        batches = _infinite(make_loader(queue, batch_size, pin_memory=dev.type == "cuda"))
        bar = tqdm(total=total, initial=iteration, desc=f"fold {fold}", unit="it", mininterval=1.0,
                   dynamic_ncols=True, disable=not lead)
        last_dice, bad_steps = "-", 0
        while iteration < total:
            now, validating_s = clock()
            if now + validating_s >= budget_s:
                break
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            lr = scheduler.step(_progress(iteration, total, elapsed() if ddp is None else now,
                                          budget_s - validating_s))
            x = batch[IMAGE][tio.DATA].to(dev, non_blocking=True)
            y = batch[LABEL][tio.DATA][:, 0].to(dev, non_blocking=True).long()
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x)
            loss = segmentation_loss(logits, y, cfg_train["loss"], class_weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg_train["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg_train["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            loss_value = float(loss.item())  # synchronises, so the step time below is real
            if ddp is not None:  # the mean over ranks: logged, and every rank judges divergence alike
                total_loss = torch.tensor([loss_value], dtype=torch.float64, device=ddp.device)
                dist.all_reduce(total_loss)
                loss_value = float(total_loss) / ddp.world
            if not math.isfinite(loss_value):
                bad_steps += 1  # fp16: the scaler skipped the step; otherwise the weights are lost
                if not scaler.is_enabled() or bad_steps >= 50:
                    raise MsdsegError(
                        f"fold {fold}: training diverged at iteration {iteration + 1} (loss {loss_value}); "
                        f"lower train.learning_rate (now {cfg_train['learning_rate']}) or set train.grad_clip.")
            else:
                bad_steps = 0
            step_s = time.perf_counter() - t0
            iteration += 1
            if diagnostics and iteration == 1:
                hashes["1"] = _weights_hash(model)
            row: dict[str, Any] = {"iteration": iteration, "loss": loss_value, "lr": lr}
            row.update({f"val_dice_{name}": None for name in names.values()})
            patches = batch_size * (ddp.world if ddp is not None else 1)  # all ranks' patches per step
            row.update({"patches_per_s": patches / step_s, "seconds_per_step": step_s, "data_wait_s": t1 - t0})
            if lead and val_tio and (iteration % cfg_train["validate_every"] == 0 or iteration == total):
                t_val = time.perf_counter()
                dice = run_validation()
                model.train()
                validation_s = time.perf_counter() - t_val
                last_validated = iteration
                row.update({f"val_dice_{names[k]}": v for k, v in dice.items()})
                last_dice = " ".join(f"{v:.3f}" for v in dice.values())
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", dice=last_dice, refresh=False)
            if lead and iteration % cfg_train["checkpoint_every"] == 0:
                save_checkpoint()
        bar.close()
        if iteration < total and lead:
            _say(f"stopping at iteration {iteration} of {total}: train.max_minutes "
                 f"({cfg_train['max_minutes']}) reached after {elapsed():.0f} s")

    if diagnostics:
        record = {"rank": ddp.rank, "world_size": ddp.world, "iterations": iteration,
                  "subjects_per_epoch": getattr(queue, "subjects_per_epoch", []),
                  "weights_sha256": {**hashes, str(iteration): _weights_hash(model)}}
        with atomic_path(out_dir / DDP_DIAGNOSTICS.format(rank=ddp.rank)) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1))
    if not lead:  # rank 0 writes the results; wait for it
        dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)
        return out_dir / MODEL

    if val_tio and last_validated != iteration and rows:
        dice = run_validation()
        rows[-1].update({f"val_dice_{names[k]}": v for k, v in dice.items()})
    if best["state_dict"] is None:  # no validation subjects: the last weights are the result
        best.update(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, iteration=iteration)
    model.load_state_dict(best["state_dict"])

    meta = {"labels": dict(plan["labels"]), "plan": copy.deepcopy(dict(plan)),
            "patch_size": [int(p) for p in cfg_train["patch_size"]], "fold": int(fold), "seed": seed,
            "config": copy.deepcopy(dict(config)), "iterations": iteration,
            "best_iteration": int(best["iteration"]), "best_val_dice": dict(best["dice"]),
            "config_hash": identity, "mirror_axes": list(mirror_axes(config))}
    model_path = out_dir / MODEL
    save_model(model_path, model, meta)
    columns = ["iteration", "loss", "lr", *(f"val_dice_{n}" for n in names.values()),
               "patches_per_s", "seconds_per_step", "data_wait_s"]
    with atomic_path(out_dir / LOG) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    checkpoint_path.unlink(missing_ok=True)
    _say(f"fold {fold}: {iteration} iterations in {elapsed():.0f} s; best iteration {best['iteration']} "
         f"val Dice {best['dice']}; wrote {model_path}")
    if ddp is not None:
        dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)
    return model_path


def _progress(iteration: int, total: int, elapsed_s: float, budget_s: float) -> float:
    """Training progress for the schedule: by iterations, unless the time budget will bind first.

    Time counts only once the pace so far projects past the budget, so runs that fit their
    budget follow the iteration count alone (reproducible logs).
    """
    progress = iteration / total
    budget_s = max(budget_s, 1e-9)
    if iteration > 0 and elapsed_s / iteration * total > budget_s:
        progress = max(progress, elapsed_s / budget_s)
    return progress


def _validated(row: Mapping[str, Any], names: Mapping[int, str]) -> bool:
    return any(row.get(f"val_dice_{n}") is not None for n in names.values())

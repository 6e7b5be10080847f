"""DDP on one node: ``train.devices`` processes, each a rank of :func:`msdseg.train.loop.run_fold`.

Each rank gets its share of the subjects per epoch (``DistributedSampler`` as the queue's subject
sampler) and its own augmentation seed; rank 0 alone validates and writes the checkpoint, the log
and model.pt (the unwrapped model: loads in one process). On a machine without CUDA the ranks run
on the CPU with gloo: that is for testing, not for speed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import types
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msdseg.errors import ConfigError, MsdsegError
from msdseg.logs import say
from msdseg.train.loop import resolve_device, run_fold
from msdseg.train.ranks import Ranks
from msdseg.train.state import MODEL


def spawn(train_rows: Sequence[Mapping[str, Any]], val_rows: Sequence[Mapping[str, Any]],
          plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
          threads: int, device: str | None, devices: int) -> Path:
    """Train with DDP in ``devices`` processes (``torch.multiprocessing``, rendezvous on 127.0.0.1).

    CUDA: rank r on ``cuda:r`` with NCCL. CPU (no CUDA, or ``device='cpu'``): gloo, for tests.
    Each rank gets ``threads // devices`` threads. A failing rank stops the others and raises here.
    """
    device_type = _check_devices(resolve_device(device), devices)
    # a job log (msdseg.logs.job_log) is a file behind sys.stderr: the ranks append to it too
    log_name = getattr(sys.stderr, "name", None)
    log_file = log_name if isinstance(log_name, str) and os.path.isfile(log_name) else None
    args = (devices, _free_port(), device_type, log_file, [dict(s) for s in train_rows],
            [dict(s) for s in val_rows], plan, config, str(out_dir), int(fold), max(int(threads) // devices, 1))
    # spawn would re-run the caller's __main__ in each worker (a Snakemake rule script has no
    # `if __name__ == "__main__"` guard): hide it while the workers start; they need msdseg only
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        context = mp.start_processes(_worker, args=args, nprocs=devices, join=False, start_method="spawn")
    finally:
        sys.modules["__main__"] = main
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise MsdsegError(f"fold {fold}: DDP training failed in rank {error.error_index} of {devices}: "
                          f"{lines[-1] if lines else error}") from error
    return Path(out_dir) / MODEL


def _check_devices(device: torch.device, devices: int) -> str:
    """The device type the ranks use, or a ConfigError naming the key to change."""
    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise ConfigError(f"config key 'train.devices': {devices} GPUs requested, {torch.cuda.device_count()} "
                          "visible; lower train.devices or ask the scheduler for more GPUs (train.gpus).")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"config key 'train.devices': DDP runs on CUDA or the CPU, not {device.type}; "
                          "set train.devices: 1.")
    if device.type == "cpu":
        say(f"train.devices is {devices} without CUDA: {devices} CPU processes with gloo "
            "(meant for testing; it is not faster than one process).")
    return device.type


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, world: int, port: int, device_type: str, log_file: str | None,
            train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]],
            plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: str, fold: int, threads: int) -> None:
    """One DDP rank (a process started by :func:`spawn`)."""
    # torch ends the ranks with SIGINT when the parent dies; a launcher may have left SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ExitStack() as stack:
        if log_file is not None:
            _log_to(stack, log_file, rank)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        # rank 0 validates while the others wait in a collective: allow it the whole budget
        timeout = timedelta(minutes=max(30.0, float(config["train"]["max_minutes"])))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        try:
            run_fold(train_rows, val_rows, plan, config, Path(out_dir), fold, threads, str(device),
                     ranks=Ranks(rank, world, device))
        finally:
            dist.destroy_process_group()


def _log_to(stack: ExitStack, log_file: str, rank: int) -> None:
    """This rank's logging, stdout and stderr appended to the job log, lines tagged with the rank."""
    stream = stack.enter_context(open(log_file, "a", buffering=1))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stack.enter_context(redirect_stdout(stream))
    stack.enter_context(redirect_stderr(stream))

"""GPU counting and per-job GPU slots (lock files), so that concurrent jobs on one workstation never share a GPU."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from msdseg.errors import ConfigError

if TYPE_CHECKING:  # the annotations only; see the module docstring
    pass


logger = logging.getLogger(__name__)


GPU_COUNT_ENV = "MSDSEG_GPU_COUNT"
"""An integer that replaces GPU detection (tests; machines the probes misread)."""


LOCK_DIR_ENV = "MSDSEG_GPU_LOCK_DIR"
"""Folder of the GPU lock files (a local folder; default ``/tmp/msdseg-gpu-locks-<uid>``)."""


SLOTS_ENV = "MSDSEG_GPU_SLOTS"
"""``0`` turns :func:`gpu_slot` off: jobs then see every GPU (e.g. to share one large GPU)."""


def gpu_count() -> int:
    """NVIDIA GPUs of this machine, found without torch, without nvidia-smi on PATH, without CUDA.

    ``MSDSEG_GPU_COUNT`` wins; else the driver's ``/proc/driver/nvidia/gpus`` entries, else the
    ``/dev/nvidia<N>`` device files, else ``nvidia-smi -L`` where it is on PATH. Cheap enough
    for every Snakefile parse. CUDA_VISIBLE_DEVICES is not applied (see :func:`local_gpu_count`).
    """
    override = os.environ.get(GPU_COUNT_ENV, "").strip()
    if override:
        try:
            return max(int(override), 0)
        except ValueError:
            raise ConfigError(f"{GPU_COUNT_ENV}={override!r} is not a number of GPUs; "
                              "give an integer or unset it to detect the GPUs.") from None
    try:
        found = len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        found = 0
    if not found:
        try:
            found = sum(1 for entry in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", entry))
        except OSError:
            found = 0
    smi = shutil.which("nvidia-smi")
    if not found and smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return 0
        if listed.returncode == 0:
            found = sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))
    return found


def visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it (ids or GPU-/MIG- UUIDs); None where it is unset.

    CUDA stops at the first entry that is not a device (``-1``, ``NoDevFiles``...), so does this.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    devices = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        devices.append(entry)
    return devices


def local_gpu_count() -> int:
    """GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES where it is set (a SLURM
    job's own GPUs, or the user's choice), else every GPU of the machine (:func:`gpu_count`)."""
    visible = visible_devices()
    return len(visible) if visible is not None else gpu_count()


def default_lock_dir() -> Path:
    """``/tmp/msdseg-gpu-locks-<uid>``: the same folder for every session of the user (a login
    shell, tmux, cron), which ``$XDG_RUNTIME_DIR`` or ``$TMPDIR`` are not."""
    return Path("/tmp") / f"msdseg-gpu-locks-{os.getuid()}"


@contextlib.contextmanager
def gpu_slot(n: int = 1, *, lock_dir: str | os.PathLike[str] | None = None,
             poll_s: float = 2.0) -> Iterator[list[str] | None]:
    """Hold ``n`` GPUs of this machine for the job and show only those to CUDA (CUDA_VISIBLE_DEVICES).

    Why: Snakemake's ``gpu`` resource counts how many GPU jobs run at once but not which GPU each
    one gets, so every job would compute on cuda:0. Enter this before anything in the process
    initialises CUDA (CUDA reads CUDA_VISIBLE_DEVICES once, then): at the top of a rule script.

    - In a SLURM job (SLURM_JOB_ID set), SLURM chose the job's GPUs: nothing is changed.
    - Else the candidates are the GPUs the user listed in CUDA_VISIBLE_DEVICES (never another),
      or every GPU of the machine (:func:`gpu_count`). No GPU, ``n`` < 1 or MSDSEG_GPU_SLOTS=0:
      nothing is changed. ``n`` above the candidates is a ConfigError (train.devices).
    - A GPU is held by an exclusive ``flock`` on ``<lock dir>/gpu<id>.lock`` (MSDSEG_GPU_LOCK_DIR,
      default :func:`default_lock_dir`). The kernel drops it when the process ends, however it
      ends, so a killed job frees its GPU. Child processes (DDP ranks) inherit the variable.
    - When fewer than ``n`` are free it waits, logging who holds them, without keeping any, so
      two jobs that each need two GPUs never block each other for good.

    Yields the ids given to the job, or None where it changed nothing. CUDA_DEVICE_ORDER is set to
    PCI_BUS_ID unless set, so that ids mean what nvidia-smi shows.
    """
    if n < 1 or os.environ.get(SLOTS_ENV, "").strip() == "0" or os.environ.get("SLURM_JOB_ID"):
        yield None
        return
    visible = visible_devices()
    candidates = visible if visible is not None else [str(i) for i in range(gpu_count())]
    if not candidates:
        yield None
        return
    if n > len(candidates):
        where = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} lists {len(candidates)}"
                 if visible is not None else f"this machine has {len(candidates)}")
        raise ConfigError(f"config key 'train.devices': this job needs {n} GPUs but {where}; "
                          f"set train.devices to at most {len(candidates)}.")
    folder = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or default_lock_dir())
    held = _hold(candidates, n, folder, poll_s)
    chosen = [gpu for gpu, _ in held]
    saved = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        logger.warning("CUDA was initialised before the GPU slot was taken: this process keeps the GPUs "
                       "it saw then, not %s", ",".join(chosen))
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    logger.info("GPU slot: this job uses GPU %s of %s (CUDA_VISIBLE_DEVICES=%s; locks in %s)",
                ",".join(chosen), ",".join(candidates), os.environ["CUDA_VISIBLE_DEVICES"], folder)
    try:
        yield chosen
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _release(held)


def _lock_path(folder: Path, gpu: str) -> Path:
    return folder / f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def _open_lock(path: Path) -> tuple[int, bool]:
    """(descriptor, writable). Another user's lock file in a shared folder is locked read-only."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), True
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY), False
        except OSError as error:
            raise ConfigError(f"cannot use the GPU lock file {path} ({error}); set {LOCK_DIR_ENV} "
                              "to a local folder you can write.") from error


def _try_hold(folder: Path, gpu: str) -> int | None:
    fd, writable = _open_lock(_lock_path(folder, gpu))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if writable:  # who holds it, for the messages of jobs that wait
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holders(folder: Path, candidates: list[str]) -> str:
    said = []
    for gpu in candidates:
        try:
            pid = _lock_path(folder, gpu).read_text().strip()
        except OSError:
            pid = ""
        said.append(f"GPU {gpu}" + (f" (pid {pid})" if pid else ""))
    return ", ".join(said)


def _hold(candidates: list[str], n: int, folder: Path, poll_s: float) -> list[tuple[str, int]]:
    """Lock ``n`` of ``candidates``, waiting until that many are free at once."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the GPU lock folder {folder} ({error}); set {LOCK_DIR_ENV} "
                          "to a local folder you can write.") from error
    started, said = time.monotonic(), None
    while True:
        held: list[tuple[str, int]] = []
        busy = []
        try:
            for gpu in candidates:
                fd = _try_hold(folder, gpu)
                if fd is None:
                    busy.append(gpu)
                else:
                    held.append((gpu, fd))
                    if len(held) == n:
                        if said is not None:
                            logger.info("GPU slot free after %.0f s of waiting", time.monotonic() - started)
                        return held
        except BaseException:
            _release(held)
            raise
        _release(held)  # none kept while waiting: no two jobs can each hold what the other needs
        if said is None or time.monotonic() - said >= 60:
            said = time.monotonic()
            logger.info("waiting for %d free GPU(s) of %d; held by other jobs: %s", n, len(candidates),
                        _holders(folder, busy))
        time.sleep(poll_s)


def _release(held: list[tuple[str, int]]) -> None:
    for _, fd in held:
        with contextlib.suppress(OSError):  # forget the pid (a read-only descriptor cannot)
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock
    held.clear()

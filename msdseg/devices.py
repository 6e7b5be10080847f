"""Which device, which precision and which GPUs a job uses: one place decides, for train and infer.

Why one module: the default device, the autocast dtype, what counts as out of memory and which GPU
a job may take were answered in several places, each a little differently. Here they are answered
once, and honestly: a precision is only used where the hardware computes it natively, and a job
only sees the GPUs it holds.

torch is imported inside the functions that need it, never at module level: the Snakefile imports
this module to count the machine's GPUs (:func:`local_gpu_count`) and must stay quick to parse.
"""

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
    import torch

logger = logging.getLogger(__name__)

GPU_COUNT_ENV = "MSDSEG_GPU_COUNT"
"""An integer that replaces GPU detection (tests; machines the probes misread)."""
LOCK_DIR_ENV = "MSDSEG_GPU_LOCK_DIR"
"""Folder of the GPU lock files (a local folder; default ``/tmp/msdseg-gpu-locks-<uid>``)."""
SLOTS_ENV = "MSDSEG_GPU_SLOTS"
"""``0`` turns :func:`gpu_slot` off: jobs then see every GPU (e.g. to share one large GPU)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# How an allocation failure reads when it arrives as a plain RuntimeError: the CUDA driver
# ("CUDA error: out of memory"), the caching allocator of CUDA/HIP/MPS ("... out of memory"),
# library handles and workspaces (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED,
# CUSOLVER_/CUSPARSE_STATUS_ALLOC_FAILED, CUFFT_ALLOC_FAILED) and the CPU allocator.
_OUT_OF_MEMORY = re.compile(r"out of memory|_ALLOC_FAILED\b|can't allocate memory|not enough memory", re.IGNORECASE)


# --------------------------------------------------------------------------- device


def default_device() -> torch.device:
    """CUDA when this process can use a GPU, else the CPU: the one default for training and inference.

    Call it after :func:`gpu_slot` chose the job's GPUs: asking torch whether CUDA is available
    initialises the CUDA driver, which fixes the visible GPUs for the rest of the process.
    """
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- precision


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions in hardware (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch without the probes: assume emulation
        return False


def cuda_has_native_bf16() -> bool:
    """True where the current GPU has bf16 units (compute capability 8.0+: Ampere and newer).

    Emulated bf16 (torch's default answer counts it) runs slower than fp32, so it does not count.
    """
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no including_emulation; ask for the capability directly
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(precision: str, device: torch.device, key: str | None = None) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto/fp32/bf16/fp16) on ``device``; None = plain fp32.

    CUDA: ``auto`` is bf16 where the GPU has bf16 units (no loss scaling needed), else fp16 (train
    it with a GradScaler); ``fp16`` is fp16; ``bf16`` on a GPU without bf16 units is a ConfigError
    naming ``key`` (train.precision / infer.precision): torch would emulate it, slower than fp32.
    CPU: fp32, except an explicit ``bf16`` where the CPU computes bf16 natively (AVX512-BF16 or
    AMX: about 1.4x faster 3D U-Net steps on a Zen 4 core); elsewhere bf16 is emulated and slower
    than fp32, so CPUs run fp32 then, as they do for ``auto`` and ``fp16``. Other devices: fp32.
    Record what ran with :func:`precision_name` of the result.
    """
    import torch

    name = key or "train.precision' / 'infer.precision"
    if precision not in PRECISIONS:
        raise ConfigError(f"config key '{name}': {precision!r} is not one of {', '.join(PRECISIONS)}; "
                          "use auto unless you need a particular one.")
    if precision == "fp32":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" and cpu_has_native_bf16() else None
    if device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    native = cuda_has_native_bf16()
    if precision == "auto":
        return torch.bfloat16 if native else torch.float16
    if not native:
        raise ConfigError(
            f"config key '{name}': bf16 was asked for, but this GPU has no bf16 units (compute "
            "capability below 8.0), so it would be emulated and slower than fp32; set it to auto "
            "(fp16 with loss scaling on this GPU) or fp32."
        )
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """"bf16", "fp16" or "fp32" for a :func:`resolve_precision` result (None = fp32): what ran, to record."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype is None:
        return "fp32"
    if dtype not in names:
        raise ValueError(f"{dtype} is not an autocast precision (bf16, fp16 or fp32)")
    return names[dtype]


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(error: BaseException) -> bool:
    """True for every way an allocation failure surfaces, so that a fallback catches them all.

    torch.OutOfMemoryError (the CUDA caching allocator's, also the CPU allocator's) and MemoryError
    are typed; cuBLAS, cuDNN, cuFFT, cuSOLVER, cuSPARSE and the CUDA driver report theirs as a
    plain RuntimeError whose message says so (CUBLAS_STATUS_ALLOC_FAILED, "CUDA error: out of
    memory", ...). Other errors such as "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED" or an illegal
    memory access are limits or bugs, not memory, and retrying would hide them. An error raised
    ``from`` an out-of-memory error counts as one.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or _is_torch_out_of_memory(current):
            return True
        if isinstance(current, RuntimeError) and _OUT_OF_MEMORY.search(str(current)):
            return True
        current = current.__cause__
    return False


def _is_torch_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # no torch loaded: no torch error either
    if torch is None:
        return False
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t is not None)
    return bool(types) and isinstance(error, types)


# --------------------------------------------------------------------------- counting GPUs


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


# --------------------------------------------------------------------------- GPU slots


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

"""Which device, which precision and which GPUs a job uses: one place decides, for train and infer.

Why one module: the default device, the autocast dtype, what counts as out of memory and which GPU
a job may take were answered in several places, each a little differently. Here they are answered
once, and honestly: a precision is only used where the hardware computes it natively, and a job
only sees the GPUs it holds.

torch is imported inside the functions that need it, never at module level: the Snakefile imports
this module to count the machine's GPUs (:func:`local_gpu_count`) and must stay quick to parse.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

from msdseg.errors import ConfigError

if TYPE_CHECKING:  # the annotations only; see the module docstring
    import torch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# How an allocation failure reads when it arrives as a plain RuntimeError: the CUDA driver
# ("CUDA error: out of memory"), the caching allocator of CUDA/HIP/MPS ("... out of memory"),
# library handles and workspaces (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED,
# CUSOLVER_/CUSPARSE_STATUS_ALLOC_FAILED, CUFFT_ALLOC_FAILED) and the CPU allocator.
_OUT_OF_MEMORY = re.compile(r"out of memory|_ALLOC_FAILED\b|can't allocate memory|not enough memory", re.IGNORECASE)


def default_device() -> torch.device:
    """CUDA when this process can use a GPU, else the CPU: the one default for training and inference.

    Call it after :func:`gpu_slot` chose the job's GPUs: asking torch whether CUDA is available
    initialises the CUDA driver, which fixes the visible GPUs for the rest of the process.
    """
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

"""msdseg.devices without a GPU: fake devices, real concurrent processes, real dry runs.

- GPU slots: real processes take slots of a faked machine (MSDSEG_GPU_COUNT) through real
  ``flock`` files, hold them until told to stop, and report the CUDA_VISIBLE_DEVICES they got.
- Precision: ``torch.device("cuda")`` can be built without CUDA; the capability probes are
  monkeypatched to play an Ampere GPU, a pre-Ampere GPU and an older torch.
- Profiles: Snakemake dry runs show the ``gpu`` each job asks for, on a faked workstation and as
  submitted with profiles/slurm's set-resources (its executor left out: no plugin needed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from msdseg import devices
from msdseg.devices import is_out_of_memory, precision_name, resolve_precision
from msdseg.errors import ConfigError
from msdseg.jobs import gpu_slots
from msdseg.jobs.gpu_slots import gpu_count, gpu_slot, local_gpu_count, visible_devices

REPOSITORY = Path(__file__).resolve().parents[1]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")

HOLDER = """
import logging, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from msdseg.jobs.gpu_slots import gpu_slot
logging.basicConfig(level=logging.INFO, format="%(message)s")
out, stop, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with gpu_slot(n, poll_s=0.05) as ids:
    out.with_suffix(".tmp").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    out.with_suffix(".tmp").rename(out)
    while not stop.exists():
        time.sleep(0.02)
"""


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No SLURM, no user GPU choice, slots on, locks in a folder of this test."""
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SLURM_JOB_ID", gpu_slots.SLOTS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(gpu_slots.LOCK_DIR_ENV, str(tmp_path / "locks"))
    return tmp_path


class Holder:
    """One real job process that takes ``n`` GPU slots and keeps them until :meth:`stop`."""

    def __init__(self, folder: Path, name: str, n: int = 1, gpus: int = 3):
        script = folder / "holder.py"
        if not script.exists():
            script.write_text(HOLDER)
        self.out, self.stop_file = folder / f"{name}.out", folder / f"{name}.stop"
        env = {key: value for key, value in os.environ.items()
               if key not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpu_slots.SLOTS_ENV)}
        env.update({gpu_slots.GPU_COUNT_ENV: str(gpus), gpu_slots.LOCK_DIR_ENV: str(folder / "locks")})
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.out), str(self.stop_file), str(n), str(REPOSITORY)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def visible(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.out.exists():
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, "no GPU slot within the timeout"
            time.sleep(0.02)
        return self.out.read_text()

    def stop(self) -> str:
        self.stop_file.touch()
        output, _ = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, output
        return output


# ------------------------------------------------------------------------ GPU slots


def test_concurrent_jobs_get_distinct_gpus_and_a_fourth_waits_for_a_freed_one(tmp_path):
    jobs = [Holder(tmp_path, f"job{i}") for i in range(3)]
    waiting = None
    try:
        given = [job.visible() for job in jobs]
        assert sorted(given) == ["0", "1", "2"]
        waiting = Holder(tmp_path, "job3")
        time.sleep(1.0)
        assert not waiting.out.exists(), "a fourth job got a GPU while all three were held"
        jobs[1].stop()
        assert waiting.visible() == given[1]  # the GPU the finished job gave back
        assert "waiting for 1 free GPU(s) of 3" in waiting.stop()
    finally:
        for job in [*jobs, waiting]:
            if job is not None and job.process.poll() is None:
                job.process.kill()
                job.process.wait()


def test_a_killed_job_frees_its_gpu(tmp_path):
    first = Holder(tmp_path, "first", gpus=1)
    second = None
    try:
        assert first.visible() == "0"
        second = Holder(tmp_path, "second", gpus=1)
        time.sleep(0.5)
        assert not second.out.exists()
        first.process.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        first.process.wait()
        assert second.visible() == "0"
        second.stop()
    finally:
        for job in (first, second):
            if job is not None and job.process.poll() is None:
                job.process.kill()
                job.process.wait()


def test_a_job_with_two_devices_gets_two_gpus_others_the_rest(tmp_path):
    ddp, single = Holder(tmp_path, "ddp", n=2), None
    try:
        pair = ddp.visible().split(",")
        assert len(pair) == 2
        single = Holder(tmp_path, "single")
        (last,) = single.visible().split(",")
        assert sorted([*pair, last]) == ["0", "1", "2"]
    finally:
        for job in (ddp, single):
            if job is not None:
                job.stop()


def test_slot_sets_the_variable_inside_and_restores_it_after(clean_env, monkeypatch):
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "2")
    with gpu_slot(2) as ids:
        assert ids == ["0", "1"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # ids mean what nvidia-smi shows
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "CUDA_DEVICE_ORDER" not in os.environ
    with gpu_slot(1) as ids:  # the locks were given back
        assert ids == ["0"]


def test_slurm_gpus_are_left_alone(clean_env, monkeypatch):
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "4")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with gpu_slot(1) as ids:
        assert ids is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # a SLURM job that got no GPU takes none of the node's
    with gpu_slot(1) as ids:
        assert ids is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (clean_env / "locks").exists()


def test_user_choice_of_gpus_is_respected(clean_env, monkeypatch):
    """Only GPUs the user listed are handed out, each to one job (here GPU 2 is taken)."""
    import fcntl

    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with gpu_slot(1) as ids:
        assert ids == ["2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"
    (clean_env / "locks").mkdir(exist_ok=True)
    other_job = os.open(clean_env / "locks" / "gpu2.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other_job, fcntl.LOCK_EX)
    try:
        with gpu_slot(1) as ids:
            assert ids == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        with pytest.raises(ConfigError, match=r"train\.devices.*CUDA_VISIBLE_DEVICES=2,5"):
            with gpu_slot(3):
                pass
    finally:
        os.close(other_job)


def test_no_gpu_switched_off_or_too_many_asked(clean_env, monkeypatch):
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "0")
    with gpu_slot(2) as ids:  # a CPU machine (train.devices: 2 trains with gloo there)
        assert ids is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "2")
    with pytest.raises(ConfigError, match=r"train\.devices.*has 2"):
        with gpu_slot(3):
            pass
    monkeypatch.setenv(gpu_slots.SLOTS_ENV, "0")
    with gpu_slot(1) as ids:
        assert ids is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_visible_devices_read_as_cuda_reads_them(monkeypatch):
    for value, expected in [("0,1", ["0", "1"]), (" 3 ", ["3"]), ("", []), ("-1", []), ("1,-1,2", ["1"]),
                            ("NoDevFiles", []), ("GPU-8a1b,MIG-77c", ["GPU-8a1b", "MIG-77c"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert visible_devices() == expected, value
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices() is None


def test_gpu_count_override_and_visible_count(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "3")
    assert gpu_count() == 3 and local_gpu_count() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_count() == 3 and local_gpu_count() == 1
    monkeypatch.setenv(gpu_slots.GPU_COUNT_ENV, "three")
    with pytest.raises(ConfigError, match=gpu_slots.GPU_COUNT_ENV):
        gpu_count()


def test_the_snakefile_probe_does_not_import_torch():
    code = "import sys, msdseg.jobs.gpu_slots as d; d.local_gpu_count(); assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPOSITORY)), timeout=60)
    assert run.returncode == 0, run.stderr


# ------------------------------------------------------------------------ device and precision


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.default_device() == torch.device("cpu")


def _gpu(monkeypatch, capability_major: int) -> None:
    """Play a GPU of that compute capability: is_bf16_supported counts emulation unless told not to."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return capability_major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_precision_on_a_gpu_with_bf16_units(monkeypatch):
    _gpu(monkeypatch, 8)
    assert resolve_precision("auto", CUDA) == torch.bfloat16
    assert resolve_precision("bf16", CUDA) == torch.bfloat16
    assert resolve_precision("fp16", CUDA) == torch.float16
    assert resolve_precision("fp32", CUDA) is None


def test_precision_on_a_gpu_without_bf16_units(monkeypatch):
    _gpu(monkeypatch, 7)
    assert resolve_precision("auto", CUDA) == torch.float16  # with a GradScaler in training
    assert resolve_precision("fp16", CUDA) == torch.float16
    assert resolve_precision("fp32", CUDA) is None
    with pytest.raises(ConfigError, match=r"'train\.precision'.*no bf16 units.*auto.*fp32"):
        resolve_precision("bf16", CUDA, key="train.precision")
    with pytest.raises(ConfigError, match=r"'infer\.precision'"):
        resolve_precision("bf16", torch.device("cuda", 1), key="infer.precision")


def test_precision_with_an_older_torch_asks_the_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # no including_emulation keyword
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_precision("auto", CUDA) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision("auto", CUDA) == torch.bfloat16


def test_precision_on_cpus_and_other_devices(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert [resolve_precision(p, CPU) for p in ("auto", "fp16", "fp32")] == [None, None, None]
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("bf16", CPU) is None  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", torch.device("mps")) is None
    with pytest.raises(ConfigError, match="tf32"):
        resolve_precision("tf32", CPU)


def test_autocast_dtype_delegates(monkeypatch):
    from msdseg.model.sliding_window import autocast_dtype

    _gpu(monkeypatch, 7)
    assert autocast_dtype("auto", CUDA) == torch.float16
    with pytest.raises(ConfigError, match="bf16"):
        autocast_dtype("bf16", CUDA)
    _gpu(monkeypatch, 8)
    assert autocast_dtype("auto", CUDA) == torch.bfloat16


def test_precision_names():
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None, torch.float32)] == [
        "bf16", "fp16", "fp32", "fp32"]
    with pytest.raises(ValueError):
        precision_name(torch.int8)


# ------------------------------------------------------------------------ out of memory


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.OutOfMemoryError("DefaultCPUAllocator: not enough memory"),
    MemoryError(),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"),
    RuntimeError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 123456789 bytes."),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
    RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
], ids=lambda error: type(error).__name__ + ":" + str(error)[:30])
def test_allocation_failures_are_out_of_memory(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                 "non-contiguous input."),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"),
    RuntimeError("Expected all tensors to be on the same device"),
    ValueError("the model ran out of memory in a story"),
    KeyboardInterrupt(),
], ids=lambda error: type(error).__name__ + ":" + str(error)[:30])
def test_other_errors_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


def test_an_error_raised_from_out_of_memory_counts():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError as oom:
            raise RuntimeError("validation failed") from oom
    except RuntimeError as error:
        assert is_out_of_memory(error)


# ------------------------------------------------------------------------ inference fallback


class _FakeModel:
    """Only ``.to``: predict_probabilities is replaced, so no CUDA is touched."""

    def __init__(self):
        self.places: list[str] = []

    def to(self, where):
        self.places.append(str(where))
        return self


def _scripted(monkeypatch, failures):
    """predict_probabilities that raises the next of ``failures`` (None: succeeds); records each try."""
    from msdseg.model import sliding_window


    tries = []

    def fake(model, image, patch_size, overlap, batch_size, device, **kwargs):
        tries.append((str(device), batch_size))
        failure = failures[len(tries) - 1]
        if failure is not None:
            raise failure
        return torch.zeros(2, 4, 4, 4)

    monkeypatch.setattr(sliding_window, "predict_probabilities", fake)
    return tries


def test_fallback_on_a_cublas_allocation_failure(monkeypatch, caplog):
    from msdseg.infer.predict import predict_with_fallback

    _gpu(monkeypatch, 8)
    tries = _scripted(monkeypatch, [
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        None,
    ])
    infer = {"batch_size": 2, "precision": "auto"}
    with caplog.at_level("WARNING", logger="msdseg.infer.predict"):
        out = predict_with_fallback(_FakeModel(), torch.zeros(1, 4, 4, 4), [4, 4, 4], [0, 0, 0], infer, "cuda")
    assert out.shape == (2, 4, 4, 4)
    assert tries == [("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert caplog.text.count("retrying") == 2


def test_fallback_on_the_cpu_halves_the_batch_then_gives_up(monkeypatch):
    from msdseg.infer.predict import predict_with_fallback

    failure = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes")
    tries = _scripted(monkeypatch, [failure, failure])
    with pytest.raises(RuntimeError, match="can't allocate"):
        predict_with_fallback(_FakeModel(), torch.zeros(1, 4, 4, 4), [4, 4, 4], [0, 0, 0], {"batch_size": 4}, "cpu")
    assert tries == [("cpu", 4), ("cpu", 2)]


def test_other_errors_are_not_retried(monkeypatch):
    from msdseg.infer.predict import predict_with_fallback

    tries = _scripted(monkeypatch, [RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), None])
    with pytest.raises(RuntimeError, match="NOT_SUPPORTED"):
        predict_with_fallback(_FakeModel(), torch.zeros(1, 4, 4, 4), [4, 4, 4], [0, 0, 0], {"batch_size": 2}, "cpu")
    assert tries == [("cpu", 2)]


def test_bf16_inference_on_a_gpu_without_bf16_fails_before_predicting(monkeypatch):
    from msdseg.infer.predict import predict_with_fallback

    _gpu(monkeypatch, 7)
    tries = _scripted(monkeypatch, [None])
    with pytest.raises(ConfigError, match=r"'infer\.precision'"):
        predict_with_fallback(_FakeModel(), torch.zeros(1, 4, 4, 4), [4, 4, 4], [0, 0, 0],
                              {"batch_size": 1, "precision": "bf16"}, "cuda")
    assert tries == []


# ------------------------------------------------------------------------ profiles and the rules' gpu


def _profile(name: str) -> dict:
    return yaml.safe_load((REPOSITORY / "profiles" / name / "config.yaml").read_text())


def test_no_profile_pins_the_gpus_of_train():
    """The train rule asks for train.devices GPUs; a profile value would replace or clamp it."""
    default, slurm = _profile("default"), _profile("slurm")
    assert "gpu" not in (default.get("resources") or {}), "a global gpu limit clamps every job's gpu"
    for settings in (default, slurm):
        assert "gpu" not in (settings.get("set-resources") or {}).get("train", {})
    assert slurm["set-resources"]["train"]["slurm_partition"] == "gpu"
    assert all(slurm["set-resources"][rule]["gpu"] == 1 for rule in ("infer_fold", "infer_test"))
    train_rule = (REPOSITORY / "workflow" / "rules" / "train.smk").read_text()
    assert "gpu=train_gpus()" in train_rule


TINY = {"synthetic": {"n_train": 4, "n_test": 1}, "train": {"folds": [0]}}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A demo workdir up to the manifest checkpoint, so that dry runs plan the train jobs."""
    from workflow_runner import output_of, snakemake

    workdir = tmp_path_factory.mktemp("dry")
    run = snakemake(workdir, "--until", "manifest", config=TINY, cores=1, timeout=600)
    assert run.returncode == 0, output_of(run)[-3000:]
    return workdir


def _gpus_asked(workdir: Path, devices_: int, *args: str, gpus: str | None = None) -> dict[str, int]:
    """{rule: gpu} of the planned train and infer jobs in a dry run (MSDSEG_GPU_COUNT=gpus)."""
    from workflow_runner import output_of

    config = {**TINY, "train": {**TINY["train"], "devices": devices_}}
    config_file = workdir / f"devices{devices_}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items()
           if key not in ("CUDA_VISIBLE_DEVICES", gpu_slots.GPU_COUNT_ENV)}
    if gpus is not None:
        env[gpu_slots.GPU_COUNT_ENV] = gpus
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile"), "--directory", str(workdir),
         "-n", "--nocolor", *args, "--configfile", str(config_file)],
        cwd=workdir, env=dict(env, PYTHONPATH=str(REPOSITORY)), capture_output=True, text=True, timeout=300,
    )
    text = output_of(run)
    assert run.returncode == 0, text[-3000:]
    asked, rule = {}, None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["rule"]:
            rule = words[1].rstrip(":")
        elif words[:1] == ["resources:"] and rule in ("train", "infer_fold"):
            asked[rule] = int(dict(item.split("=", 1) for item in line.split(":", 1)[1].replace(" ", "").split(","))
                              .get("gpu", "0"))
    assert "train" in asked, text[-3000:]
    return asked


def test_workstation_train_asks_for_train_devices_gpus(planned):
    assert _gpus_asked(planned, 2, "--cores", "2", gpus="4") == {"train": 2, "infer_fold": 1}
    assert _gpus_asked(planned, 1, "--cores", "2", gpus="4")["train"] == 1
    # a CPU machine: no gpu limit, DDP with gloo asks for what it would use (was clamped to 1)
    assert _gpus_asked(planned, 2, "--cores", "2", gpus="0") == {"train": 2, "infer_fold": 0}
    # the user's own limit still caps it (the job then stops in gpu_slot, naming train.devices)
    assert _gpus_asked(planned, 2, "--cores", "2", "--resources", "gpu=1", gpus="4")["train"] == 1


def test_cluster_submission_asks_slurm_for_train_devices_gpus(planned, tmp_path):
    """profiles/slurm as shipped, less its executor line (the plugin is not needed to plan)."""
    profile = tmp_path / "slurm_no_executor"
    profile.mkdir()
    settings = _profile("slurm")
    assert settings.pop("executor") == "slurm"
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    # a login node without GPUs: GPU jobs still ask for one, train for train.devices
    assert _gpus_asked(planned, 4, "--profile", str(profile), gpus="0") == {"train": 4, "infer_fold": 1}
    assert _gpus_asked(planned, 1, "--profile", str(profile), gpus="0") == {"train": 1, "infer_fold": 1}

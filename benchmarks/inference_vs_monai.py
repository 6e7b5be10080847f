"""Benchmark: msdseg's torchio grid aggregation against MONAI's sliding_window_inference.

In one run, with one model for both methods (``--model``, or a quick one trained here with
msdseg.train on ``../shared/data/Task04_Hippocampus.tar``):

1. the 210 hippocampus volumes (200 labelled + 10 test) at several patch/overlap settings, equal
   for both methods (torchio overlap in voxels = MONAI's fraction x patch, so both use the same
   window positions): seconds per subject (inference call only, after a warm-up), mean Dice per
   method on the labelled subjects, their difference, and the agreement (Dice between the two
   methods' label maps) over all 210;
2. one synthetic 512x512x400 volume with 3 classes: seconds and peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of each method in a fresh subprocess (the
   probabilities only), and of msdseg's whole ``predict_subject`` (read, grid, argmax, write),
   once on a grid that is the original and once with a resampling back to an original grid half
   a voxel away (``predict_subject_resampled``). The RSS after imports and model loading is
   reported too (``runtime``): the interpreter and libraries are not the method's memory.

Targets: msdseg no slower than MONAI at equal overlap; mean Dice within 0.005; peak RSS for the
large volume below 3x its float32 probability volume (3 x 512 x 512 x 400 x 4 B = 1.26 GB).

MONAI is installed at run time only (``pip install monai``), with ``--no-deps`` if pip would
otherwise pull another torch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/inference_vs_monai.py [--model fold0/model.pt] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import torch

from bootstrap import bootstrap_interval

ARCHIVE = ROOT.parent / "shared" / "data" / "Task04_Hippocampus.tar"
PROBABILITY_BYTES = 3 * 512 * 512 * 400 * 4

# (patch, overlap fraction, torchio mode, MONAI mode): equal windows, comparable blending
SETTINGS = [
    ((32, 48, 32), 0.5, "hann", "gaussian"),  # configs/hippocampus.yaml: the training patch, half overlap
    ((40, 56, 40), 0.5, "hann", "gaussian"),
    ((40, 56, 40), 0.5, "average", "constant"),
    ((32, 32, 32), 0.5, "hann", "gaussian"),
    ((32, 32, 32), 0.5, "average", "constant"),
    ((32, 32, 32), 0.25, "hann", "gaussian"),
]


def ensure_monai() -> str:
    """Import MONAI, installing it first if needed, never replacing the installed torch."""
    try:
        return importlib.import_module("monai").__version__
    except ImportError:
        pass
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--report", report.name,
                        "monai"], check=True)
        planned = [item["metadata"]["name"].lower() for item in json.load(open(report.name))["install"]]
    extra = ["--no-deps"] if "torch" in planned else []
    plans = "without dependencies: pip would replace torch" if extra else "pip plans " + ", ".join(planned)
    print(f"installing monai ({plans})")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *extra, "monai"], check=True)
    importlib.invalidate_caches()
    return importlib.import_module("monai").__version__


# --------------------------------------------------------------------------- the two methods


def overlap_voxels(patch: Sequence[int], fraction: float) -> list[int]:
    """torchio overlap equal to MONAI's: MONAI steps int(patch * (1 - fraction)) voxels."""
    return [int(p) - int(int(p) * (1 - fraction)) for p in patch]


def run_msdseg(model: torch.nn.Module, image: torch.Tensor, patch: Sequence[int], fraction: float, mode: str,
               batch_size: int, device: str) -> torch.Tensor:
    from msdseg.model.sliding_window import predict_probabilities

    return predict_probabilities(model, image, patch, overlap_voxels(patch, fraction), batch_size, device,
                                 overlap_mode=mode, tta=False, amp="fp32")


def run_monai(model: torch.nn.Module, image: torch.Tensor, patch: Sequence[int], fraction: float, mode: str,
              batch_size: int, device: str) -> torch.Tensor:
    """MONAI with the same contract as msdseg: softmax per window, aggregated on the CPU."""
    from monai.inferers import sliding_window_inference

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x).float(), dim=1)

    with torch.inference_mode():
        output = sliding_window_inference(
            image[None].to(torch.float32), roi_size=list(patch), sw_batch_size=batch_size, predictor=predictor,
            overlap=fraction, mode=mode, padding_mode="constant", cval=0.0, sw_device=device, device="cpu",
        )
    return output[0]


METHODS = {"msdseg": run_msdseg, "monai": run_monai}


# --------------------------------------------------------------------------- data and model


def prepare(work: Path, config: dict) -> tuple[list[dict], dict]:
    """Extract, manifest, plan and resample all 210 subjects through the package."""
    from msdseg.data.archive import safe_extract
    from msdseg.data.manifest import build_manifest
    from msdseg.data.resample import resample_subject
    from msdseg.decathlon import read_dataset_json
    from msdseg.plan.preprocessing import make_plan

    task_dir = safe_extract(ARCHIVE, work / "raw")
    dataset = read_dataset_json(task_dir)
    manifest, _ = build_manifest(dataset, n_folds=config["manifest"]["n_folds"], seed=config["seed"])
    plan = make_plan(manifest, dataset, config["preprocess"], config["task"])
    rows = []
    for row in manifest.itertuples():
        folder = "imagesTr" if row.role == "train" else "imagesTs"
        image = work / "resampled" / folder / f"{row.subject}.nii.gz"
        label = work / "resampled" / "labelsTr" / f"{row.subject}.nii.gz" if row.role == "train" else None
        resample_subject(row.image, image, plan, label_in=row.label if label else None, label_out=label)
        rows.append({"subject": row.subject, "image": str(image), "label": str(label) if label else None})
    return rows, plan


def quick_model(rows: list[dict], plan: dict, config: dict, work: Path, minutes: float, threads: int) -> Path:
    """A briefly trained model (msdseg.train): good enough to compare two ways of aggregating it."""
    from msdseg.train.trainer import train

    labelled = [r for r in rows if r["label"]]
    random.Random(0).shuffle(labelled)
    config["train"]["max_minutes"] = minutes
    config["train"]["iterations"] = min(int(config["train"]["iterations"]), 600)
    config["train"]["validate_every"] = config["train"]["iterations"]
    return train(labelled[8:], labelled[:8], plan, config, work / "fold0", fold=0, threads=threads)


def load_cases(rows: list[dict], plan: dict) -> list[tuple[str, torch.Tensor, np.ndarray | None]]:
    from msdseg.data.normalize import preprocessing
    from msdseg.data.subjects import IMAGE, LABEL, subjects_from_paths

    transform = preprocessing(plan)
    cases = []
    for subject in subjects_from_paths(rows):
        prepared = transform(subject)
        label = prepared[LABEL].data[0].numpy().astype(np.int16) if LABEL in prepared else None
        cases.append((subject["subject"], prepared[IMAGE].data.to(torch.float32).contiguous(), label))
    return cases


# --------------------------------------------------------------------------- part 1: hippocampus


def _bootstrap_ratio(numerator: list[float], denominator: list[float], draws: int = 2000) -> str:
    """95% interval of sum(numerator) / sum(denominator) over subjects resampled with replacement.

    The pairs are timed back to back, so the interval says whether a speed ratio near 1 is a
    real difference or the machine's noise.
    """
    low, high = bootstrap_interval(lambda top, bottom: top.sum(axis=1) / bottom.sum(axis=1),
                                   numerator, denominator, draws=draws)
    return f"{low:.3f}-{high:.3f}"


def hippocampus_table(model: torch.nn.Module, cases: list, labels: dict[int, str], batch_size: int,
                      device: str) -> pd.DataFrame:
    from msdseg.metrics import dice, dice_per_label

    rows = []
    for patch, fraction, torchio_mode, monai_mode in SETTINGS:
        modes = {"msdseg": torchio_mode, "monai": monai_mode}
        predictions: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
        seconds = {m: 0.0 for m in METHODS}
        per_subject: dict[str, list[float]] = {m: [] for m in METHODS}
        for method in METHODS:  # warm-up
            METHODS[method](model, cases[0][1], patch, fraction, modes[method], batch_size, device)
        for index, (subject, image, _) in enumerate(cases):
            # alternate the order subject by subject: a shared machine's load drifts, and both
            # methods should see the same drift
            for method in (("msdseg", "monai") if index % 2 == 0 else ("monai", "msdseg")):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                probabilities = METHODS[method](model, image, patch, fraction, modes[method], batch_size, device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[method] += time.perf_counter() - start
                per_subject[method].append(time.perf_counter() - start)
                predictions[method][subject] = probabilities.argmax(0).numpy().astype(np.uint8)
        seconds = {m: total / len(cases) for m, total in seconds.items()}
        scores = {m: [] for m in METHODS}
        agreement = []
        for subject, _, label in cases:
            for key in labels:
                agreement.append(dice(predictions["msdseg"][subject], predictions["monai"][subject], key))
            if label is not None:
                for method in METHODS:
                    scores[method].append(list(dice_per_label(predictions[method][subject], label, labels).values()))
        mean = {m: float(np.nanmean(np.asarray(v, dtype=float))) for m, v in scores.items()}
        per_pair = np.asarray(scores["msdseg"], dtype=float) - np.asarray(scores["monai"], dtype=float)
        rows.append({
            "patch": "x".join(map(str, patch)), "overlap": f"{fraction} ({overlap_voxels(patch, fraction)})",
            "blend": f"{torchio_mode}/{monai_mode}",
            "msdseg_s": seconds["msdseg"], "monai_s": seconds["monai"],
            "speed_ratio": seconds["monai"] / seconds["msdseg"],
            "speed_ratio_95ci": _bootstrap_ratio(per_subject["monai"], per_subject["msdseg"]),
            "dice_msdseg": mean["msdseg"], "dice_monai": mean["monai"],
            "dice_diff": mean["msdseg"] - mean["monai"],
            "mean_abs_diff": float(np.nanmean(np.abs(per_pair))),
            "agreement": float(np.nanmean(agreement)),
        })
        print(json.dumps(rows[-1]), flush=True)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- part 2: large volume


def _rss_mb() -> float:
    """Peak RSS of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    """Resident memory now (for baselines; the peak so far would include import-time spikes)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _large_volume(shape: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)


def large_worker(args: argparse.Namespace) -> None:
    """One method on the large volume in this (fresh) process; prints one JSON line."""
    from msdseg.model.unet import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, args.device)
    if args.large_worker == "monai":
        import monai  # noqa: F401  (imported before the runtime baseline, like torchio for msdseg)
    import torchio  # noqa: F401
    runtime = _current_rss_mb()  # interpreter, torch, libraries, model: not the method's memory
    patch, fraction = args.large_patch, args.large_overlap
    if args.large_worker.startswith("predict_subject"):
        from msdseg.infer.predict import predict_subject

        work = Path(args.large_dir)
        # "predict_subject": the resampled grid is the original (no resampling back); with
        # "_resampled" the original grid is shifted by half a voxel, so every class is resampled
        reference = work / ("original.nii" if args.large_worker.endswith("_resampled") else "large.nii")
        baseline = _current_rss_mb()
        start = time.perf_counter()
        predict_subject([Path(args.model)], work / "large.nii", reference, work / "pred.nii.gz",
                        {"patch_size": list(patch), "overlap": overlap_voxels(patch, fraction), "overlap_mode": "hann",
                         "batch_size": args.batch_size, "tta": False, "precision": "fp32"},
                        device=args.device, threads=args.threads)
        seconds = time.perf_counter() - start
    else:
        image = _large_volume(args.large_shape)
        baseline = _current_rss_mb()
        mode = "hann" if args.large_worker == "msdseg" else "gaussian"
        start = time.perf_counter()
        probabilities = METHODS[args.large_worker](model, image, patch, fraction, mode, args.batch_size, args.device)
        seconds = time.perf_counter() - start  # probabilities only: the argmax is the same for both
        assert tuple(probabilities.shape) == (3, *args.large_shape)
    peak = _rss_mb()
    print(json.dumps({"method": args.large_worker, "seconds": seconds, "runtime_rss_mb": runtime,
                      "with_input_rss_mb": baseline, "peak_rss_mb": peak,
                      "peak_over_probabilities": peak * 2**20 / (3 * np.prod(args.large_shape) * 4),
                      "above_runtime_over_probabilities":
                          (peak - runtime) * 2**20 / (3 * np.prod(args.large_shape) * 4)}))


def large_table(args: argparse.Namespace, model_path: Path, work: Path) -> pd.DataFrame:
    import nibabel as nib

    (work / "large").mkdir(exist_ok=True)
    methods = ["msdseg", "monai"]
    if not args.skip_predict_subject:
        volume = _large_volume(args.large_shape)[0].numpy()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(work / "large" / "large.nii"))
        shifted = np.eye(4)
        shifted[:3, 3] = 0.5  # the "original" grid: same size, half a voxel off, so resampling runs
        nib.save(nib.Nifti1Image(np.zeros(args.large_shape, dtype=np.int16), shifted),
                 str(work / "large" / "original.nii"))
        del volume
        methods += ["predict_subject", "predict_subject_resampled"]
    rows = []
    # each method twice, in mirrored order (a b c c b a): the faster run counts, against load drift
    for method in [*methods, *reversed(methods)]:
        command = [sys.executable, __file__, "--large-worker", method, "--model", str(model_path),
                   "--threads", str(args.threads), "--device", args.device, "--batch-size", str(args.batch_size),
                   "--large-shape", *map(str, args.large_shape), "--large-patch", *map(str, args.large_patch),
                   "--large-overlap", str(args.large_overlap), "--large-dir", str(work / "large")]
        # Linux carries the parent's RSS high-water mark into ru_maxrss across exec; through an
        # intermediate shell that forks (the "; exit") the worker starts from the shell's tiny mark
        result = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *command],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
            rows.append({"method": method, "error": f"exit {result.returncode}"})
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    if "seconds" not in table:
        return table
    return (table.groupby("method", sort=False)
            .agg(seconds=("seconds", "min"), runtime_rss_mb=("runtime_rss_mb", "max"),
                 with_input_rss_mb=("with_input_rss_mb", "max"), peak_rss_mb=("peak_rss_mb", "max"),
                 peak_over_probabilities=("peak_over_probabilities", "max"),
                 above_runtime_over_probabilities=("above_runtime_over_probabilities", "max"))
            .reset_index())


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model.pt to compare with (default: train one)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "hippocampus.yaml")
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=None, help="only the first N of the 210 (quick runs)")
    parser.add_argument("--large-shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--large-patch", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--large-overlap", type=float, default=0.25)
    parser.add_argument("--large-model", choices=["tiny", "trained"], default="tiny",
                        help="tiny: a random-weight 3-class UNet (4 base channels, depth 2) so the CPU finishes; "
                             "trained: the hippocampus model (sensible on a GPU)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-hippocampus", action="store_true", help="only the large volume (needs --model)")
    parser.add_argument("--skip-predict-subject", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--large-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--large-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.large_worker:
        large_worker(args)
        return

    from msdseg.config import load_config
    from msdseg.decathlon import foreground_labels
    from msdseg.model.unet import UNet, load_model, save_model

    monai_version = ensure_monai()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="msdseg-monai-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        small, cases = None, []
        if args.skip_hippocampus and args.model:
            model_path = args.model
            model, meta = load_model(model_path, args.device)
            plan = meta["plan"]
        else:
            rows, plan = prepare(work, config)
            print(f"prepared {len(rows)} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
            model_path = args.model or quick_model(rows, plan, config, work, args.train_minutes, args.threads)
            model, meta = load_model(model_path, args.device)
            labels = foreground_labels(meta["labels"])
            cases = load_cases(rows[: args.subjects] if args.subjects else rows, plan)
            with torch.inference_mode():
                small = hippocampus_table(model, cases, labels, args.batch_size, args.device)
        large = None
        if not args.skip_large:
            large_model = model_path
            if args.large_model == "tiny":
                torch.manual_seed(0)
                large_model = work / "tiny" / "model.pt"
                save_model(large_model, UNet(3, 1, 3, base_channels=4, depth=2),
                           {"labels": {"0": "background", "1": "a", "2": "b"}, "plan": plan,
                            "patch_size": args.large_patch, "versions": {"torch": str(torch.__version__)}})
            large = large_table(args, large_model, work)

    pd.set_option("display.width", 200)
    print(f"\ntorch {torch.__version__}, MONAI {monai_version}, device {args.device}, threads {args.threads}, "
          f"batch {args.batch_size}, model {model_path}")
    if small is not None:
        print(f"\nHippocampus, {len(cases)} volumes (mean Dice over {sum(c[2] is not None for c in cases)} labelled "
              "subjects and classes; agreement = Dice between the two methods' label maps):")
        print(small.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if large is not None:
        print(f"\nLarge volume {'x'.join(map(str, args.large_shape))}, 3 classes, patch "
              f"{'x'.join(map(str, args.large_patch))}, overlap {args.large_overlap}, {args.large_model} model; "
              f"float32 probabilities = {3 * np.prod(args.large_shape) * 4 / 1e9:.2f} GB, target peak < "
              f"{3 * 3 * np.prod(args.large_shape) * 4 / 2**20:.0f} MB:")
        print(large.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

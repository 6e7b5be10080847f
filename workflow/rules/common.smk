"""Paths, the archive source and input functions shared by every stage."""

import functools
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from msdseg.config import PLANNED_KEYS, pace_settings, train_job_settings
from msdseg.decathlon import SYNTHETIC_TASK, TASKS
from msdseg.infer import cases as input_cases
from msdseg.jobs import chunking, costs
from msdseg.jobs.cohort import cached_cohort
from msdseg.jobs.cohort import resampled_image as cohort_resampled_image
from msdseg.jobs.gpu_slots import local_gpu_count
from msdseg.plan.resolution import resolution_for_cohort

TASK = config["task"]
RESULTS = Path(config["results"]) / TASK
SYNTHETIC = TASK == SYNTHETIC_TASK and not any(config["source"][key] for key in ("url", "archive", "folder"))
FOLDS = sorted(set(config["train"]["folds"]))
ENV = "../../envs/msdseg.yaml"
# GPU jobs ask for the `gpu` resource: one GPU each (train: train.devices), or train.gpus /
# infer.gpus where set. Submitting to a cluster (--jobs N, which profiles/slurm sets; the executor
# is not known yet while this file is read, and a local run gets --jobs only next to --cores), GPU
# jobs run on GPU nodes, so they ask for one although the login node has none. Run locally, they
# ask for one where this machine has a GPU, counted without torch or nvidia-smi
# (msdseg.jobs.gpu_slots.local_gpu_count; MSDSEG_GPU_COUNT overrides).
SUBMITS = workflow.resource_settings.nodes is not None
MACHINE_GPUS = 0 if SUBMITS else local_gpu_count()
LOCAL_GPU = 1 if SUBMITS or MACHINE_GPUS else 0


def chosen_planned_keys():
    """The planned keys (msdseg.plan.training.PLANNED_KEYS) the user or the task's preset set: the planner keeps them."""
    return {key: value for key, value in CHOSEN.items() if key in PLANNED_KEYS}


def train_gpus():
    """GPUs a train job asks for: at least train.devices when it trains with DDP (no profile pins it)."""
    devices = config["train"]["devices"]
    return max(config["train"]["gpus"] or LOCAL_GPU, devices if devices > 1 else 0)


# The global `gpu` limit (`--resources gpu=N` overrides both). Not a profile value: a profile cannot
# count GPUs, and Snakemake cuts every job's `gpu` down to the global limit, so a fixed `gpu: 1`
# made train.devices: 2 jobs ask for one GPU, on a cluster too.
if "gpu" not in workflow.global_resources:
    if SUBMITS:
        # as many as the largest GPU job asks for. With profiles/slurm's `gpu: local` scope it
        # limits only the jobs bundled into one SLURM job, which run one after the other there:
        # so a bundle asks SLURM for one job's GPUs, not one per job it holds.
        workflow.global_resources["gpu"] = max(train_gpus(), config["infer"]["gpus"] or LOCAL_GPU)
    elif MACHINE_GPUS:
        # a workstation's GPU count: never more GPU jobs at once than GPUs, a train.devices: N job
        # counting N; msdseg.jobs.gpu_slots.gpu_slot gives each job GPUs of its own
        workflow.global_resources["gpu"] = MACHINE_GPUS


def result(path):
    """A path under results/<task>/."""
    return str(RESULTS / path)


def log_path(rule_name, wildcards_part=""):
    """results/<task>/logs/<rule>[/<wildcards>].log"""
    return result(os.path.join("logs", rule_name, wildcards_part).rstrip(os.sep) + ".log")


def benchmark_path(rule_name, wildcards_part=""):
    return result(os.path.join("benchmarks", rule_name, wildcards_part).rstrip(os.sep) + ".tsv")


def archive_source():
    """Where the archive comes from: (url, md5, sha256). None for a local archive or folder."""
    source = config["source"]
    if source["folder"] or source["archive"]:
        return None
    if SYNTHETIC:
        return {"url": None, "md5": None, "sha256": None}  # filled from the generated archive
    if source["url"]:
        return {"url": source["url"], "md5": source["md5"], "sha256": source["sha256"]}
    official = TASKS[TASK]
    return {"url": official.url, "md5": source["md5"] or official.md5, "sha256": source["sha256"]}


def raw_folder():
    """The extracted task folder (dataset.json inside)."""
    if config["source"]["folder"]:
        return config["source"]["folder"]
    return result("raw")


def archive_path():
    if config["source"]["archive"]:
        return config["source"]["archive"]
    return result(f"download/{TASK}.tar")


def manifest_csv():
    """manifest.csv, once the manifest checkpoint has run (Snakemake re-evaluates the DAG after it)."""
    return checkpoints.manifest.get().output.manifest


def cohort():
    """The manifest's subjects (msdseg.jobs.cohort.Cohort): the one accessor every input function reads.

    msdseg.jobs.cohort.cached_cohort parses each version of manifest.csv (path, mtime, size) once:
    input functions run once per job, and parsing the table in each made the DAG quadratic.
    """
    return cached_cohort(manifest_csv())


def training_device_type():
    """cpu or cuda: the device the train jobs get (plan.device, else a GPU where they ask for one)."""
    requested = config["plan"]["device"]
    return requested if requested != "auto" else ("cuda" if train_gpus() else "cpu")


def training_resolution():
    """plan.json's spacing decision (msdseg.plan.resolution): a param of rule plan, so that a budget
    change reruns the resampling only where it changes the spacing."""
    training = cohort().role("train")
    return resolution_for_cohort(
        [s.spacing for s in training],
        [s.shape for s in training],
        training[0].n_channels if training else 1,
        config["preprocess"]["spacing"],
        config["preprocess"]["inplane_size"],
        training_device_type(),
        config["train"]["threads"],
        config["train"]["max_minutes"],
    )


def subjects(role):
    return [s.subject for s in cohort().role(role)]


def fold_subjects(fold):
    return [s.subject for s in cohort().validation(fold)]


def original_label(subject):
    return cohort().by_id[subject].label


# --------------------------------------------------------------------------- chunks of subjects
# A resample or infer job processes a chunk of subjects (resample.subjects_per_job,
# infer.subjects_per_job: a number or auto) into a staging folder results/<task>/chunks/<rule>/...;
# a local `place_*` job per subject then hard-links its file to the usual per-subject path. So
# outputs stay one file per subject, each job pays its start-up (imports, models) once per
# chunk, and a failed chunk leaves nothing placed (Snakemake deletes its staging folder).
ENSEMBLE_FOLDS = FOLDS if config["infer"]["ensemble_test"] else FOLDS[:1]
# the test list goes into fold F's chunks when it is predicted by fold F's model alone (one fold,
# or no ensemble): one process loads the model once for both, instead of a second job
TEST_WITH_FOLD = ENSEMBLE_FOLDS[0] if len(ENSEMBLE_FOLDS) == 1 else None


# the inference settings a prediction depends on: not how many subjects share a job; as JSON for
# the infer jobs' command line (params, so that Snakemake reruns them when a setting changes)
INFER_SETTINGS = {key: value for key, value in config["infer"].items() if key != "subjects_per_job"}
INFER_SETTINGS_JSON = json.dumps(INFER_SETTINGS, sort_keys=True)


def resample_chunks(role):
    """msdseg.jobs.chunking.Chunks of the subjects of ``role`` ("train": image and label, "test": image)."""

    def make():
        members = cohort().role(role)
        seconds = [costs.resample_seconds(s, config["preprocess"], with_label=role == "train") for s in members]
        size = chunking.chunk_size(
            config["resample"]["subjects_per_job"], seconds, costs.target_seconds(costs.RESAMPLE_STARTUP_S)
        )
        return chunking.Chunks.build([s.subject for s in members], size), seconds

    return cohort().derived(("resample", role), make)


def _infer_cost(subject, n_models):
    return costs.infer_seconds(subject.shape, subject.spacing, config, n_models)


def infer_chunks(fold=None):
    """Chunks of fold ``fold``'s validation subjects (and of the test list where TEST_WITH_FOLD is it); None: the test list."""

    def make():
        members = chunking.infer_members(cohort(), fold if fold is None else int(fold), _with_test(fold))
        n_models = len(ENSEMBLE_FOLDS) if fold is None else 1
        seconds = [_infer_cost(s, n_models) for s in members]
        size = chunking.chunk_size(
            config["infer"]["subjects_per_job"], seconds, costs.target_seconds(costs.INFER_STARTUP_S)
        )
        return chunking.Chunks.build([s.subject for s in members], size), seconds

    return cohort().derived(("infer", None if fold is None else int(fold)), make)


def _with_test(fold):
    """Whether fold ``fold``'s chunks hold the test list too (TEST_WITH_FOLD)."""
    return fold is not None and TEST_WITH_FOLD == int(fold)


def chunk_runtime(plan_of):
    """A `runtime` resource (minutes) from a chunk's estimated work: 3x the estimate, at least 10."""

    def runtime(wildcards):
        built, seconds = plan_of(wildcards)
        return costs.runtime_minutes(sum(seconds[built.span(wildcards.chunk)]))

    return runtime


# the place_* rules' shell: hard-link a staged file ("$1") onto its output ("$2"), or copy it
# across file systems; then touch it, so that it is newer than its chunk's folder. A failure's
# message goes to the job's log (the rule's `log:`); a success leaves the log empty.
PLACE = 'exec 2> {log:q}; place() {{ ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"; touch "$2"; }}; '
# fixed, so that Snakemake need not evaluate the default resources' expressions for 10,000s of them;
# and `threads: 0` in the rules: a hard link takes no core, so every ready place_* job is scheduled
# in one round instead of --cores at a time (each round solves the scheduler's ILP again: 2,000
# placements took 190 s that way, 95 ms each)
PLACE_RESOURCES = {"mem_mb": 100, "disk_mb": 0, "runtime": 1}


# The resampling and inference jobs run their script by a shell command, not `script:` (whose
# preamble imports Snakemake into each job: see workflow/scripts/resample.py), with the Python
# `script:` would use: this interpreter, or the `python` of the job's conda environment or container.
JOB_PYTHON = (
    "python"
    if workflow.deployment_settings.deployment_method & {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER}
    else sys.executable
)


def job_script(name):
    """The start of a shell command running workflow/scripts/``name`` with JOB_PYTHON."""
    command = shlex.join([JOB_PYTHON, os.path.join(workflow.basedir, "workflow", "scripts", name)])
    return command.replace("{", "{{").replace("}", "}}")  # a shell command is a format string


RESAMPLE_SCRIPT = job_script("resample.py")
INFER_SCRIPT = job_script("infer.py")


def _options(options):
    """``{"--name": value}`` as one shell-quoted string of options."""
    return shlex.join(str(part) for pair in options.items() for part in pair)


def resample_job_args(role, chunk):
    """Which chunk a resampling job does, as command-line options: it reads its subjects from manifest.csv."""
    built = resample_chunks(role)[0]
    members = built[chunk]
    options = {"--manifest": manifest_csv(), "--role": role, "--size": built.size, "--chunk": chunk}
    options.update({"--first": members[0], "--count": len(members)})
    return _options(options)


def infer_job_args(fold, chunk):
    """Which chunk an inference job does (``fold``, or None: the test list), as command-line options.

    The job reads its subjects from manifest.csv (msdseg.jobs.chunking.infer_chunk) and refuses a chunk
    that is not ``--count`` subjects from ``--first``, as the DAG planned it here.
    """
    built = infer_chunks(fold)[0]
    members = built[chunk]
    options = {"--manifest": manifest_csv(), "--fold": "test" if fold is None else int(fold)}
    options.update({"--size": built.size, "--chunk": chunk, "--first": members[0], "--count": len(members)})
    options["--resampled"] = result("resampled")
    return _options(options) + (" --with-test" if _with_test(fold) else "")


def resample_chunk_folder(role, subject):
    rule_name = "resample_training" if role == "train" else "resample_test"
    return result(f"chunks/{rule_name}/{resample_chunks(role)[0].of[subject]}")


def test_prediction_chunk_folder(subject):
    if TEST_WITH_FOLD is not None:
        return result(f"chunks/infer_fold/fold{TEST_WITH_FOLD}/{infer_chunks(TEST_WITH_FOLD)[0].of[subject]}")
    return result(f"chunks/infer_test/{infer_chunks(None)[0].of[subject]}")


def resampled_image(subject):
    """The resampled image of any subject of the manifest (imagesTr or imagesTs by its role)."""
    return cohort_resampled_image(result("resampled"), cohort().by_id[subject])


def training_inputs(wildcards):
    train = subjects("train")
    return {
        "images": expand(result("resampled/imagesTr/{subject}.nii.gz"), subject=train),
        "labels": expand(result("resampled/labelsTr/{subject}.nii.gz"), subject=train),
    }


def preprocessed_inputs(wildcards):
    """The patch loader's preprocessed chunks (none for train.loader: queue)."""
    if config["train"]["loader"] != "patch":
        return {}
    return {"preprocessed": expand(result("preprocessed/{chunk}"), chunk=resample_chunks("train")[0].names())}


def fold_predictions(wildcards):
    return expand(
        result("fold{fold}/predictions/{subject}.nii.gz"),
        fold=wildcards.fold,
        subject=fold_subjects(wildcards.fold),
    )


def fold_references(wildcards):
    return [original_label(subject) for subject in fold_subjects(wildcards.fold)]


# --------------------------------------------------------------------------- predict_folder
PREDICT = config["predict"]
FOLDER_OUT = str(PREDICT["output"] or result("predict_folder"))
FOLDER_MODELS = list(PREDICT["models"] or expand(result("fold{fold}/model.pt"), fold=ENSEMBLE_FOLDS))


@functools.cache
def folder_cases():
    """The cases of predict.input (msdseg.infer.cases.Case), listed once per run."""
    if not PREDICT["input"]:
        raise WorkflowError(
            "predict_folder needs images: --config predict='{input: /path/to/images, output: /path/to/out}' "
            "(a folder of .nii.gz files, or a list of them)"
        )
    return input_cases.group_cases(input_cases.list_images(PREDICT["input"]), PREDICT["layout"])


@functools.cache
def folder_costs():
    return [costs.case_seconds(case, config, len(FOLDER_MODELS)) for case in folder_cases()]


@functools.cache
def folder_chunks():
    size = chunking.chunk_size(
        config["infer"]["subjects_per_job"], folder_costs(), costs.target_seconds(costs.INFER_STARTUP_S)
    )
    return chunking.Chunks.build([case.case for case in folder_cases()], size)


def folder_chunk(chunk):
    by_name = {case.case: case for case in folder_cases()}
    return [by_name[name] for name in folder_chunks()[chunk]]


def final_outputs(wildcards):
    outputs = [result("manifest.csv"), result("dice_summary.csv")]
    outputs += expand(result("fold{fold}/learning_curve.png"), fold=FOLDS)
    outputs += expand(result("predictions/test/{subject}.nii.gz"), subject=subjects("test"))
    outputs += [result("plots/dice_boxplot.png"), result("plots/overlays.png")]
    return outputs


wildcard_constraints:
    fold=r"\d+",
    subject=r"[^/]+",
    chunk=r"\d\d\d\d+",
    case=r"[^/]+",

"""Stage 3: patch-queue training, one job per fold (folds run in parallel on a cluster)."""

# which folds run and what each job asks the scheduler for: never a reason to retrain a fold
NOT_TRAINING = {"folds", "threads", "mem_mb", "gpus"}


def train_settings():
    """The train section as the train job reads it: adding a fold or a thread retrains nothing."""
    return {k: v for k, v in config["train"].items() if k not in NOT_TRAINING}


def pace_settings():
    """The train keys a step's pace depends on: not the budget or the cadence either, so that
    changing those keeps the measured plan (and the models trained from it)."""
    cadence = {"iterations", "max_minutes", "validate_every", "validation_cases", "checkpoint_every"}
    return {k: v for k, v in train_settings().items() if k not in cadence}


rule plan_training:
    """Network, patch, batch and iterations from the fingerprint, the device and train.max_minutes (a probe
    of the step, then of the whole pipeline on the resampled training subjects)."""
    input:
        unpack(training_inputs),
        manifest=result("manifest.csv"),
        plan=result("plan.json"),
    output:
        plan=result("training_plan.json"),
        table=report(result("training_plan.csv"), caption="../report/training_plan.rst", category="Plan"),
    log:
        log_path("plan_training"),
    conda:
        ENV
    threads: config["train"]["threads"]
    resources:
        mem_mb=config["train"]["mem_mb"],
        runtime=15,
        gpu=train_gpus(),
    params:
        user=chosen_planned_keys(),
        budget_minutes=config["train"]["max_minutes"],
        n_folds=config["manifest"]["n_folds"],
        plan=config["plan"],
        devices=config["train"]["devices"],
        model=config["model"],
        train=pace_settings(),
        seed=config["seed"],
    script:
        "../scripts/plan_training.py"


rule train:
    """Train one U-Net on all folds but {fold}, validate on fold {fold}; resumes from checkpoint.pt."""
    input:
        unpack(training_inputs),
        manifest=result("manifest.csv"),
        plan=result("plan.json"),
        training_plan=result("training_plan.json"),
    output:
        model=result("fold{fold}/model.pt"),
        log_csv=result("fold{fold}/training_log.csv"),
        curve=report(
            result("fold{fold}/learning_curve.png"),
            caption="../report/learning_curve.rst",
            category="Training",
            subcategory="fold {fold}",
        ),
    log:
        log_path("train", "fold{fold}"),
    benchmark:
        benchmark_path("train", "fold{fold}")
    conda:
        ENV
    threads: config["train"]["threads"]
    resources:
        mem_mb=config["train"]["mem_mb"],
        runtime=int(config["train"]["max_minutes"]) + 30,
        gpu=train_gpus(),
    params:
        model=config["model"],
        train=train_settings(),
        seed=config["seed"],
        n_folds=config["manifest"]["n_folds"],
    script:
        "../scripts/train.py"

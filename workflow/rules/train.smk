"""Stage 3: patch-queue training, one job per fold (folds run in parallel on a cluster)."""


rule plan_training:
    """Network, patch, batch and iterations from the fingerprint, the device and train.max_minutes (a probe
    of the step, then of the whole pipeline on the resampled training subjects)."""
    input:
        unpack(training_inputs),
        unpack(preprocessed_inputs),
        manifest=result("manifest.csv"),
        plan=result("plan.json"),
    output:
        plan=result("training_plan.json"),
        table=report(result("training_plan.csv"), caption="../report/training_plan.rst", category="Plan"),
    log:
        log_path("plan_training"),
    benchmark:
        benchmark_path("plan_training")
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
        train=pace_settings(config["train"]),
        seed=config["seed"],
    script:
        "../scripts/plan_training.py"


rule train:
    """Train one U-Net on all folds but {fold}, validate on fold {fold}; resumes from checkpoint.pt."""
    input:
        unpack(training_inputs),
        unpack(preprocessed_inputs),
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
        train=train_job_settings(config["train"]),
        seed=config["seed"],
        n_folds=config["manifest"]["n_folds"],
    script:
        "../scripts/train.py"

"""Stage 3: patch-queue training, one job per fold (folds run in parallel on a cluster)."""


rule train:
    """Train one U-Net on all folds but {fold}, validate on fold {fold}; resumes from checkpoint.pt."""
    input:
        unpack(training_inputs),
        manifest=result("manifest.csv"),
        plan=result("plan.json"),
    output:
        model=result("fold{fold}/model.pt"),
        log_csv=result("fold{fold}/training_log.csv"),
        curve=report(
            result("fold{fold}/learning_curve.png"),
            caption="../report/learning_curve.rst",
            category="Training",
            subcategory="fold {fold}",
        ),
    params:
        model=config["model"],
        train=config["train"],
        seed=config["seed"],
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
    script:
        "../scripts/train.py"

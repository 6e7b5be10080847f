"""Stage 4: grid-aggregated inference per subject, written back in the original geometry."""


rule infer_fold:
    """Cross-validation prediction: fold {fold}'s model on one of its validation subjects."""
    input:
        models=[result("fold{fold}/model.pt")],
        image=result("resampled/imagesTr/{subject}.nii.gz"),
        reference=original_image,
    output:
        prediction=result("fold{fold}/predictions/{subject}.nii.gz"),
    params:
        infer=config["infer"],
    log:
        log_path("infer_fold", "fold{fold}/{subject}"),
    benchmark:
        benchmark_path("infer_fold", "fold{fold}/{subject}")
    conda:
        ENV
    group:
        "infer"
    threads: config["infer"]["threads"]
    resources:
        mem_mb=config["infer"]["mem_mb"],
        runtime=30,
        gpu=config["infer"]["gpus"] or LOCAL_GPU,
    script:
        "../scripts/infer.py"


rule infer_test:
    """Test-list prediction with the mean probabilities of every trained fold (or fold 0 only)."""
    input:
        models=expand(result("fold{fold}/model.pt"), fold=FOLDS if config["infer"]["ensemble_test"] else FOLDS[:1]),
        image=result("resampled/imagesTs/{subject}.nii.gz"),
        reference=original_image,
    output:
        prediction=result("predictions/test/{subject}.nii.gz"),
    params:
        infer=config["infer"],
    log:
        log_path("infer_test", "{subject}"),
    benchmark:
        benchmark_path("infer_test", "{subject}")
    conda:
        ENV
    group:
        "infer"
    threads: config["infer"]["threads"]
    resources:
        mem_mb=config["infer"]["mem_mb"],
        runtime=30,
        gpu=config["infer"]["gpus"] or LOCAL_GPU,
    script:
        "../scripts/infer.py"

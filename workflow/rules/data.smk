"""Stage 1-2: archive -> verified download -> extracted task -> manifest (checkpoint) -> plan -> resampled volumes."""


if SYNTHETIC:

    rule synthesize_demo:
        """Generate the embedded demo task as a real Decathlon archive (deterministic, seeded)."""
        output:
            archive=result(f"source/{TASK}.tar"),
            md5=result(f"source/{TASK}.tar.md5"),
        params:
            synthetic=config["synthetic"],
            seed=config["seed"],
        log:
            log_path("synthesize_demo"),
        conda:
            ENV
        resources:
            mem_mb=2000,
            runtime=10,
        script:
            "../scripts/synthesize_demo.py"


if archive_source() is not None:

    rule download:
        """Fetch the task archive (http(s) or file://), resume partial transfers, verify MD5/SHA-256."""
        input:
            demo=rules.synthesize_demo.output if SYNTHETIC else [],
        output:
            archive=result(f"download/{TASK}.tar"),
        params:
            source=archive_source(),
            retries=config["source"]["retries"],
        log:
            log_path("download"),
        conda:
            ENV
        retries: 1
        resources:
            mem_mb=1000,
            runtime=240,
        script:
            "../scripts/download.py"


if not config["source"]["folder"]:

    rule extract:
        """Extract the verified archive safely and atomically into results/<task>/raw."""
        input:
            archive=archive_path(),
        output:
            folder=directory(result("raw")),
        params:
            md5=config["source"]["md5"] if config["source"]["archive"] else None,
            sha256=config["source"]["sha256"] if config["source"]["archive"] else None,
        log:
            log_path("extract"),
        benchmark:
            benchmark_path("extract")
        conda:
            ENV
        resources:
            mem_mb=1000,
            runtime=120,
        script:
            "../scripts/extract.py"


checkpoint manifest:
    """One row per subject (dataset.json decides which), validated, with folds; excluded.csv lists dropped ones."""
    input:
        folder=raw_folder(),
    output:
        manifest=report(result("manifest.csv"), caption="../report/manifest.rst", category="Data"),
        excluded=result("excluded.csv"),
    params:
        manifest=config["manifest"],
        seed=config["seed"],
    log:
        log_path("manifest"),
    benchmark:
        benchmark_path("manifest")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/manifest.py"


rule plan:
    """Target spacing and intensity normalisation derived from the training set (nnU-Net style)."""
    input:
        manifest=result("manifest.csv"),
        folder=raw_folder(),
    output:
        plan=result("plan.json"),
    params:
        preprocess=config["preprocess"],
        task=TASK,
    log:
        log_path("plan"),
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/plan.py"


rule resample_training:
    """Resample one training subject: image (linear/B-spline) and label (nearest) on the same grid."""
    input:
        image=original_image,
        label=lambda wildcards: original_label(wildcards.subject),
        plan=result("plan.json"),
    output:
        image=result("resampled/imagesTr/{subject}.nii.gz"),
        label=result("resampled/labelsTr/{subject}.nii.gz"),
    log:
        log_path("resample_training", "{subject}"),
    benchmark:
        benchmark_path("resample_training", "{subject}")
    conda:
        ENV
    group:
        "resample"
    resources:
        mem_mb=4000,
        runtime=5,
    script:
        "../scripts/resample.py"


rule resample_test:
    """Resample one unlabelled test subject onto the same plan."""
    input:
        image=original_image,
        plan=result("plan.json"),
    output:
        image=result("resampled/imagesTs/{subject}.nii.gz"),
    log:
        log_path("resample_test", "{subject}"),
    benchmark:
        benchmark_path("resample_test", "{subject}")
    conda:
        ENV
    group:
        "resample"
    resources:
        mem_mb=4000,
        runtime=5,
    script:
        "../scripts/resample.py"

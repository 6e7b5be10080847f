"""Stage 1-2: archive -> verified download -> extracted task -> manifest (checkpoint) -> plan -> resampled volumes."""

if SYNTHETIC:

    rule synthesize_demo:
        """Generate the embedded demo task as a real Decathlon archive (deterministic, seeded)."""
        output:
            archive=result(f"source/{TASK}.tar"),
            md5=result(f"source/{TASK}.tar.md5"),
        log:
            log_path("synthesize_demo"),
        conda:
            ENV
        resources:
            mem_mb=2000,
            runtime=10,
        params:
            synthetic=config["synthetic"],
            seed=config["seed"],
        script:
            "../scripts/synthesize_demo.py"


if archive_source() is not None:

    rule download:
        """Fetch the task archive (http(s) or file://), resume partial transfers, verify MD5/SHA-256."""
        input:
            demo=rules.synthesize_demo.output if SYNTHETIC else [],
        output:
            archive=result(f"download/{TASK}.tar"),
        log:
            log_path("download"),
        retries: 1
        conda:
            ENV
        resources:
            mem_mb=1000,
            runtime=240,
        params:
            source=archive_source(),
            retries=config["source"]["retries"],
        script:
            "../scripts/download.py"


if not config["source"]["folder"]:

    rule extract:
        """Extract the verified archive safely and atomically into results/<task>/raw."""
        input:
            archive=archive_path(),
        output:
            folder=directory(result("raw")),
        log:
            log_path("extract"),
        benchmark:
            benchmark_path("extract")
        conda:
            ENV
        resources:
            mem_mb=1000,
            runtime=120,
        params:
            md5=config["source"]["md5"] if config["source"]["archive"] else None,
            sha256=config["source"]["sha256"] if config["source"]["archive"] else None,
        script:
            "../scripts/extract.py"


checkpoint manifest:
    """One row per subject (dataset.json decides which), validated, with folds; excluded.csv lists dropped ones."""
    input:
        folder=raw_folder(),
    output:
        manifest=report(result("manifest.csv"), caption="../report/manifest.rst", category="Data"),
        excluded=result("excluded.csv"),
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
    params:
        manifest=config["manifest"],
        seed=config["seed"],
    script:
        "../scripts/manifest.py"


rule plan:
    """Target spacing and intensity normalisation derived from the training set (nnU-Net style); on a CPU
    whose budget cannot afford the full-resolution context, a coarser spacing (msdseg.plan.resolution)."""
    input:
        # through the checkpoint (not the path): the resolution param reads the manifest, and a job
        # whose params do is rebuilt once the checkpoint is known only if an input depends on it
        manifest=lambda wildcards: manifest_csv(),
        folder=raw_folder(),
    output:
        plan=result("plan.json"),
    log:
        log_path("plan"),
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        preprocess=config["preprocess"],
        task=TASK,
        resolution=lambda wildcards: training_resolution(),
    script:
        "../scripts/plan.py"


rule resample_training:
    """Resample a chunk of training subjects (resample.subjects_per_job): images linear/B-spline, labels nearest."""
    input:
        images=lambda wildcards: [cohort().by_id[s].image for s in resample_chunks("train")[0][wildcards.chunk]],
        labels=lambda wildcards: [cohort().by_id[s].label for s in resample_chunks("train")[0][wildcards.chunk]],
        plan=result("plan.json"),
    output:
        staged=directory(result("chunks/resample_training/{chunk}")),
    log:
        log_path("resample_training", "{chunk}"),
    benchmark:
        benchmark_path("resample_training", "{chunk}")
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=chunk_runtime(lambda wildcards: resample_chunks("train")),
    params:
        chunk=lambda wildcards: resample_job_args("train", wildcards.chunk),
    shell:
        f"{RESAMPLE_SCRIPT} {{params.chunk}} --plan {{input.plan:q}} --out {{output.staged:q}} --log {{log:q}}"


rule resample_test:
    """Resample a chunk of unlabelled test subjects onto the same plan."""
    input:
        images=lambda wildcards: [cohort().by_id[s].image for s in resample_chunks("test")[0][wildcards.chunk]],
        plan=result("plan.json"),
    output:
        staged=directory(result("chunks/resample_test/{chunk}")),
    log:
        log_path("resample_test", "{chunk}"),
    benchmark:
        benchmark_path("resample_test", "{chunk}")
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=chunk_runtime(lambda wildcards: resample_chunks("test")),
    params:
        chunk=lambda wildcards: resample_job_args("test", wildcards.chunk),
    shell:
        f"{RESAMPLE_SCRIPT} {{params.chunk}} --plan {{input.plan:q}} --out {{output.staged:q}} --log {{log:q}}"


# A placed file is a hard link to the staged one (no copy; a copy across file systems), touched
# so that it is newer than its chunk (common.smk: PLACE). Local jobs: a shell command on the
# Snakemake process's machine, never a cluster job.


rule place_resampled_training:
    """One training subject's resampled image and label, from its chunk's staging folder."""
    input:
        chunk=lambda wildcards: resample_chunk_folder("train", wildcards.subject),
    output:
        image=result("resampled/imagesTr/{subject}.nii.gz"),
        label=result("resampled/labelsTr/{subject}.nii.gz"),
    log:
        log_path("place_resampled_training", "{subject}"),
    localrule: True
    conda:
        ENV
    threads: 0
    resources:
        **PLACE_RESOURCES,
    shell:
        f"{PLACE}place {{input.chunk:q}}/imagesTr/{{wildcards.subject:q}}.nii.gz {{output.image:q}}"
        " && place {input.chunk:q}/labelsTr/{wildcards.subject:q}.nii.gz {output.label:q}"


rule place_resampled_test:
    """One test subject's resampled image, from its chunk's staging folder."""
    input:
        chunk=lambda wildcards: resample_chunk_folder("test", wildcards.subject),
    output:
        image=result("resampled/imagesTs/{subject}.nii.gz"),
    log:
        log_path("place_resampled_test", "{subject}"),
    localrule: True
    conda:
        ENV
    threads: 0
    resources:
        **PLACE_RESOURCES,
    shell:
        f"{PLACE}place {{input.chunk:q}}/imagesTs/{{wildcards.subject:q}}.nii.gz {{output.image:q}}"


rule preprocess_training:
    """A chunk of resampled training subjects, normalised by the plan, cropped to their non-zero box and stored
    as memory-mapped arrays with their label locations: the patch loader's input, shared by all folds."""
    input:
        staged=result("chunks/resample_training/{chunk}"),
        plan=result("plan.json"),
    output:
        folder=directory(result("preprocessed/{chunk}")),
    log:
        log_path("preprocess_training", "{chunk}"),
    benchmark:
        benchmark_path("preprocess_training", "{chunk}")
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=chunk_runtime(lambda wildcards: resample_chunks("train")),
    params:
        seed=config["seed"],
    script:
        "../scripts/preprocess.py"

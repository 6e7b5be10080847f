"""Stage 4: grid-aggregated inference, a chunk of subjects per job, written back in the original geometry."""

# the infer jobs' command (workflow/scripts/infer.py, a shell command: common.smk, JOB_PYTHON): the
# chunk (params.chunk: the job reads its subjects from manifest.csv), the models, the staging
# folder, threads, the infer settings as JSON and the log
INFER_OPTIONS = (
    " {params.chunk} --models {input.models:q} --out {output.staged:q} --threads {threads}"
    " --infer {params.infer:q} --log {log:q}"
)


rule infer_fold:
    """Cross-validation predictions: fold {fold}'s model on a chunk of its validation subjects (infer.subjects_per_job).

    Where fold {fold}'s model alone predicts the test list (one fold, or infer.ensemble_test: false),
    the test subjects follow its validation subjects in the same chunks: one process, one model load.
    """
    input:
        models=[result("fold{fold}/model.pt")],
        images=lambda wildcards: [resampled_image(s) for s in infer_chunks(wildcards.fold)[0][wildcards.chunk]],
        references=lambda wildcards: [cohort().by_id[s].image for s in infer_chunks(wildcards.fold)[0][wildcards.chunk]],
    output:
        staged=directory(result("chunks/infer_fold/fold{fold}/{chunk}")),
    log:
        log_path("infer_fold", "fold{fold}/{chunk}"),
    benchmark:
        benchmark_path("infer_fold", "fold{fold}/{chunk}")
    conda:
        ENV
    threads: config["infer"]["threads"]
    resources:
        mem_mb=config["infer"]["mem_mb"],
        runtime=chunk_runtime(lambda wildcards: infer_chunks(wildcards.fold)),
        gpu=config["infer"]["gpus"] or LOCAL_GPU,
    params:
        chunk=lambda wildcards: infer_job_args(wildcards.fold, wildcards.chunk),
        infer=INFER_SETTINGS_JSON,
    shell:
        INFER_SCRIPT + INFER_OPTIONS


rule infer_test:
    """Test-list predictions, a chunk per job, with the mean probabilities of every trained fold (or fold 0 only)."""
    input:
        models=expand(result("fold{fold}/model.pt"), fold=ENSEMBLE_FOLDS),
        images=lambda wildcards: [resampled_image(s) for s in infer_chunks(None)[0][wildcards.chunk]],
        references=lambda wildcards: [cohort().by_id[s].image for s in infer_chunks(None)[0][wildcards.chunk]],
    output:
        staged=directory(result("chunks/infer_test/{chunk}")),
    log:
        log_path("infer_test", "{chunk}"),
    benchmark:
        benchmark_path("infer_test", "{chunk}")
    conda:
        ENV
    threads: config["infer"]["threads"]
    resources:
        mem_mb=config["infer"]["mem_mb"],
        runtime=chunk_runtime(lambda wildcards: infer_chunks(None)),
        gpu=config["infer"]["gpus"] or LOCAL_GPU,
    params:
        chunk=lambda wildcards: infer_job_args(None, wildcards.chunk),
        infer=INFER_SETTINGS_JSON,
    shell:
        INFER_SCRIPT + INFER_OPTIONS


rule place_fold_prediction:
    """One validation subject's prediction, from its chunk's staging folder (a hard link, touched)."""
    input:
        chunk=lambda wildcards: result(
            f"chunks/infer_fold/fold{wildcards.fold}/{infer_chunks(wildcards.fold)[0].of[wildcards.subject]}"
        ),
    output:
        prediction=result("fold{fold}/predictions/{subject}.nii.gz"),
    log:
        log_path("place_fold_prediction", "fold{fold}/{subject}"),
    localrule: True
    conda:
        ENV
    threads: 0
    resources:
        **PLACE_RESOURCES,
    shell:
        f"{PLACE}place {{input.chunk:q}}/{{wildcards.subject:q}}.nii.gz {{output.prediction:q}}"


rule place_test_prediction:
    """One test subject's prediction, from its chunk's staging folder (a hard link, touched)."""
    input:
        chunk=lambda wildcards: test_prediction_chunk_folder(wildcards.subject),
    output:
        prediction=result("predictions/test/{subject}.nii.gz"),
    log:
        log_path("place_test_prediction", "{subject}"),
    localrule: True
    conda:
        ENV
    threads: 0
    resources:
        **PLACE_RESOURCES,
    shell:
        f"{PLACE}place {{input.chunk:q}}/{{wildcards.subject:q}}.nii.gz {{output.prediction:q}}"


# --------------------------------------------------------------------------- new images
# snakemake --cores 8 predict_folder --config predict='{input: /data/new, output: /data/out}'
# The run's fold ensemble (infer.ensemble_test; predict.models to choose others) on every NIfTI
# image of predict.input, with the models' own preprocessing, in chunks (infer.subjects_per_job),
# each prediction written as <output>/<case>.nii.gz in its image's geometry.


rule infer_folder:
    """Resample and predict a chunk of new images (predict.input) with the fold ensemble, in their own geometry."""
    input:
        models=FOLDER_MODELS,
        images=lambda wildcards: [path for case in folder_chunk(wildcards.chunk) for path in case.files],
    output:
        staged=directory(os.path.join(FOLDER_OUT, ".msdseg", "chunks", "{chunk}")),
    log:
        os.path.join(FOLDER_OUT, ".msdseg", "logs", "{chunk}.log"),
    benchmark:
        os.path.join(FOLDER_OUT, ".msdseg", "benchmarks", "{chunk}.tsv")
    conda:
        ENV
    threads: config["infer"]["threads"]
    resources:
        mem_mb=config["infer"]["mem_mb"],
        runtime=lambda wildcards: costs.runtime_minutes(sum(folder_costs()[folder_chunks().span(wildcards.chunk)])),
        gpu=config["infer"]["gpus"] or LOCAL_GPU,
    params:
        infer=INFER_SETTINGS,
        cases=lambda wildcards: [[case.case, list(case.files)] for case in folder_chunk(wildcards.chunk)],
    script:
        "../scripts/predict_folder.py"


rule place_folder_prediction:
    """One new image's prediction, from its chunk's staging folder (a hard link, touched)."""
    input:
        chunk=lambda wildcards: os.path.join(FOLDER_OUT, ".msdseg", "chunks", folder_chunks().of[wildcards.case]),
    output:
        prediction=os.path.join(FOLDER_OUT, "{case}.nii.gz"),
    log:
        os.path.join(FOLDER_OUT, ".msdseg", "logs", "place", "{case}.log"),
    localrule: True
    conda:
        ENV
    threads: 0
    resources:
        **PLACE_RESOURCES,
    shell:
        f"{PLACE}place {{input.chunk:q}}/{{wildcards.case:q}}.nii.gz {{output.prediction:q}}"


rule predict_folder:
    """Target: a prediction for every image of predict.input in predict.output (see infer_folder)."""
    input:
        lambda wildcards: [os.path.join(FOLDER_OUT, f"{case.case}.nii.gz") for case in folder_cases()],
    localrule: True

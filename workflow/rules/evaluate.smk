"""Stage 5: metrics per subject and class in the original geometry, summaries and plots."""


rule evaluate_fold:
    """Dice, HD95, surface Dice and volumes for every validation subject of fold {fold}."""
    input:
        predictions=fold_predictions,
        references=fold_references,
        folder=raw_folder(),
    output:
        metrics=result("fold{fold}/metrics.csv"),
    log:
        log_path("evaluate_fold", "fold{fold}"),
    benchmark:
        benchmark_path("evaluate_fold", "fold{fold}")
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        evaluate=config["evaluate"],
    script:
        "../scripts/evaluate.py"


rule summarize:
    """Dice summary per class and fold, box plot, best/worst overlays, and what made them."""
    input:
        metrics=expand(result("fold{fold}/metrics.csv"), fold=FOLDS),
        manifest=result("manifest.csv"),
    output:
        summary=report(result("dice_summary.csv"), caption="../report/dice_summary.rst", category="Evaluation"),
        boxplot=report(result("plots/dice_boxplot.png"), caption="../report/dice_boxplot.rst", category="Evaluation"),
        overlays=report(result("plots/overlays.png"), caption="../report/overlays.rst", category="Evaluation"),
        provenance=report(result("provenance.json"), caption="../report/provenance.rst", category="Provenance"),
    log:
        log_path("summarize"),
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        folds=FOLDS,
        prediction_pattern=lambda wildcards: result("fold{fold}/predictions/{subject}.nii.gz"),
    script:
        "../scripts/summarize.py"

"""Rules infer_fold / infer_test: predict a chunk of subjects (models loaded once) into its staging folder."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.devices import gpu_slot
from msdseg.logs import job_log
from msdseg.predict import Item, predict_chunk


def files(value):
    """A named input as a list (a single file comes as a string)."""
    return [value] if isinstance(value, str) else list(value)


# a GPU of its own (where the machine has any) before anything initialises CUDA
with job_log(snakemake.log[0]), gpu_slot(1):
    staged = Path(snakemake.output.staged)
    items = [
        Item(subject, Path(image), Path(reference), staged / f"{subject}.nii.gz")
        for subject, image, reference in zip(
            snakemake.params.subjects, files(snakemake.input.images), files(snakemake.input.references), strict=True
        )
    ]
    predict_chunk(
        [Path(path) for path in files(snakemake.input.models)],
        items,
        snakemake.params.infer,
        threads=snakemake.threads,
    )

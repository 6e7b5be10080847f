"""msdseg: a Medical Segmentation Decathlon task from archive to U-Net, predictions and Dice.

    snakemake --cores 8                                   # the embedded synthetic demo
    snakemake --cores 8 --config task=Task04_Hippocampus  # a real task (official URL + MD5)
"""

import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


sys.path.insert(0, workflow.basedir)  # the msdseg package beside this Snakefile
from msdseg.config import ConfigError, load_config

try:  # first, a one-line message that names the key (and cross-key checks a schema cannot do)
    load_config(config)
except ConfigError as error:
    raise WorkflowError(f"invalid configuration: {error}") from None
validate(config, os.path.join(workflow.basedir, "msdseg", "schemas", "config.schema.yaml"))


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        final_outputs,
    default_target: True

"""msdseg: a Medical Segmentation Decathlon task from archive to U-Net, predictions and Dice.

snakemake --cores 8                                   # the embedded synthetic demo
snakemake --cores 8 --config task=Task04_Hippocampus  # a real task (official URL + MD5)
"""

import os
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


sys.path.insert(0, workflow.basedir)  # the msdseg package beside this Snakefile
from msdseg.config import ConfigError, layered_config

# presets for this task only, numbers as numbers, then one-line messages that name the key;
# layered_config validates against msdseg/schemas/config.schema.yaml and fills its defaults, as
# snakemake.utils.validate would (tests/test_config.py checks both agree): calling that too cost
# 0.2 s of every run, dry run and no-op (it parses the schema with pure-Python YAML each time)
try:
    _layered, CHOSEN = layered_config(config)
except ConfigError as error:
    raise WorkflowError(f"invalid configuration: {error}") from None
config.clear()
config.update(_layered)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        final_outputs,

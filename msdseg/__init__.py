"""msdseg: Medical Segmentation Decathlon tasks from archive to U-Net, predictions and Dice.

The Snakemake workflow in this repository calls these modules through thin scripts; every
module also works on its own (see README, "Using the package without Snakemake").
"""

__version__ = "0.1.0"

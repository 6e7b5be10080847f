"""Cohort-scale job shaping for Snakemake: chunking, cost estimates, GPU slots and per-chunk workers."""

"""Rules resample_training / resample_test: a chunk of subjects onto the plan's grid, into a staging folder.

Run by the rules' shell command, not Snakemake's ``script:`` directive: its preamble imports
Snakemake into every job, 0.1-0.25 s of a resampling job's 0.5-0.8 s start-up, where a chunk of
10 hippocampus subjects is 0.4 s of work. The job reads its subjects from manifest.csv as the DAG
did (msdseg.jobs.resample_jobs.resample_role_chunk), so the command line stays short for any chunk size.

    python resample.py --manifest M --role train|test --size N --chunk 0000 --first S --count K
        --plan plan.json --out STAGING_FOLDER --log LOG
"""

import _bootstrap  # noqa: F401

import argparse

from msdseg.jobs.resample_jobs import ROLE_FOLDERS, resample_role_chunk
from msdseg.logs import job_log

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--manifest", required=True)
parser.add_argument("--role", required=True, choices=sorted(ROLE_FOLDERS))
parser.add_argument("--size", required=True, type=int, help="subjects per chunk")
parser.add_argument("--chunk", required=True)
parser.add_argument("--first", required=True, help="the chunk's first subject, as the workflow planned it")
parser.add_argument("--count", required=True, type=int, help="its number of subjects, as planned")
parser.add_argument("--plan", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--log", required=True)
args = parser.parse_args()

with job_log(args.log):
    resample_role_chunk(
        args.manifest, args.role, args.size, args.chunk, args.plan, args.out, args.first, args.count
    )

"""Rules infer_fold / infer_test: predict a chunk of subjects (models loaded once) into its staging folder.

Run by the rules' shell command, not Snakemake's ``script:`` directive: its preamble imports
Snakemake into every job, 0.1-0.25 s of an inference job's start-up (torch and torchio are
1.4 s more, which no job avoids). The job reads its subjects from manifest.csv as the DAG did
(msdseg.jobs.chunking.infer_chunk), so the command line stays short for any chunk size.

    python infer.py --manifest M --fold 0|test [--with-test] --size N --chunk 0000 --first S
        --count K --resampled RESAMPLED_FOLDER --models model.pt ... --out STAGING_FOLDER
        --threads T --infer JSON --log LOG
"""

import _bootstrap  # noqa: F401

import argparse
import json

from msdseg.jobs.chunking import infer_chunk
from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.jobs.infer_jobs import predict_subjects
from msdseg.logs import job_log

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--manifest", required=True)
parser.add_argument("--fold", required=True, help="a fold's validation subjects, or test: the test list")
parser.add_argument("--with-test", action="store_true", help="the fold's chunks hold the test list too")
parser.add_argument("--size", required=True, type=int, help="subjects per chunk")
parser.add_argument("--chunk", required=True)
parser.add_argument("--first", required=True, help="the chunk's first subject, as the workflow planned it")
parser.add_argument("--count", required=True, type=int, help="its number of subjects, as planned")
parser.add_argument("--resampled", required=True, help="the folder of resampled images (imagesTr, imagesTs)")
parser.add_argument("--models", required=True, nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--threads", required=True, type=int)
parser.add_argument("--infer", required=True, type=json.loads, help="the infer config section, as JSON")
parser.add_argument("--log", required=True)
args = parser.parse_args()

fold = None if args.fold == "test" else int(args.fold)
# a GPU of its own (where the machine has any) before anything initialises CUDA
with job_log(args.log), gpu_slot(1):
    subjects = infer_chunk(args.manifest, fold, args.with_test, args.size, args.chunk, args.first, args.count)
    predict_subjects(subjects, args.resampled, args.models, args.out, args.infer, threads=args.threads)

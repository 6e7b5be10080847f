"""Imported first by every rule script: puts the msdseg package beside the Snakefile on sys.path."""

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

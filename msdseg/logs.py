"""Logging for workflow jobs: everything a job prints goes to its rule's log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def job_log(log_file: str | os.PathLike[str] | None) -> Iterator[logging.Logger]:
    """Send logging, stdout and stderr (tqdm bars too) to ``log_file``.

    An exception is logged with its traceback and its one-line message is also printed on the
    console's stderr, so the user sees what failed without opening the log.
    """
    console = sys.stderr
    if log_file is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        yield logging.getLogger("msdseg")
        return
    os.makedirs(os.path.dirname(os.fspath(log_file)) or ".", exist_ok=True)
    with open(log_file, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        logger = logging.getLogger("msdseg")
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield logger
        except BaseException as error:
            logger.exception("job failed")
            print(f"msdseg: {type(error).__name__}: {error}  (log: {log_file})", file=console)
            raise


def say(message: str, name: str = "msdseg.train") -> None:
    """A message for the job log: logging when configured (:func:`job_log`), else stderr.

    tqdm.write keeps a progress bar on stderr intact.
    """
    logger = logging.getLogger(name)
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(message)
    else:
        from tqdm import tqdm  # here: a resampling job's start-up need not import it

        tqdm.write(f"[{name}] {message}", file=sys.stderr)

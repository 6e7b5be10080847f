"""Shared fixtures: a loopback HTTP server, the read-only real data, extracted tasks, builders.

``tests/`` is on ``sys.path`` while pytest runs, so helpers import as ``from loopback import
LoopbackServer`` and ``from helpers import plan`` (the builders behind the fixtures below, for
module-scoped fixtures and subprocess scripts, which cannot take function-scoped fixtures).

Fixtures
- ``http_server``: a started :class:`loopback.LoopbackServer` serving ``tmp_path / "served"``
  (function scope, stopped at teardown). ``http_server.url_for(path)`` gives a URL.
- ``shared_data``: ``../shared/data`` beside the checkout (skips when absent).
- ``hippocampus_tar``: the real Task04_Hippocampus.tar (read-only, never copy it).
- ``hippocampus_dir``: that archive extracted once per session (holds dataset.json); read-only
  by convention, copy it before changing anything.
- ``synthetic_dir``: a small Task00_SyntheticLiver (4 train, 1 test) extracted once per session.
- ``synthetic_plan`` / ``hippocampus_plan``: plan.json dicts for those tasks (z-score; the
  hippocampus one at 1 mm), a fresh dict per test (:func:`helpers.plan`).
- ``synthetic_rows`` / ``hippocampus_rows``: {subject, image, label} rows of the training
  subjects, all 4 synthetic ones and the first 8 hippocampus ones (:func:`helpers.training_rows`).
- ``make_config``: :func:`helpers.tiny_config`, ``make_config(task, model=..., infer=..., **train)``
  -> a validated config with a tiny U-Net and ``num_workers: 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import HIPPOCAMPUS_LABELS, SHARED_DATA, plan, shared_archive, tiny_config, training_rows
from loopback import LoopbackServer

# the longest slow test (a workflow run on real data) takes ~6 min on 2 cores; three times that
SLOW_TEST_TIMEOUT_S = 1200


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests get a longer timeout than pyproject's default, unless they set their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LoopbackServer]:
    served = tmp_path / "served"
    served.mkdir()
    with LoopbackServer(served) as server:
        yield server


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "Task04_Hippocampus.tar").is_file():
        pytest.skip(reason=f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hippocampus_tar(shared_data: Path) -> Path:
    return shared_archive("Task04_Hippocampus.tar")


@pytest.fixture(scope="session")
def liver_ct_tar(shared_data: Path) -> Path:
    return shared_archive("Task90_LiverCT.tar")


@pytest.fixture(scope="session")
def hippocampus_dir(hippocampus_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msdseg.data.archive import safe_extract

    return safe_extract(hippocampus_tar, tmp_path_factory.mktemp("hippocampus") / "Task04_Hippocampus")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msdseg.data.archive import safe_extract
    from msdseg.data.synthetic import make_synthetic_task

    folder = tmp_path_factory.mktemp("synthetic")
    archive = folder / "Task00_SyntheticLiver.tar"
    make_synthetic_task(archive, n_train=4, n_test=1, seed=0)
    return safe_extract(archive, folder / "Task00_SyntheticLiver")


@pytest.fixture
def synthetic_plan() -> dict[str, Any]:
    return plan()


@pytest.fixture
def hippocampus_plan() -> dict[str, Any]:
    return plan("Task04_Hippocampus", HIPPOCAMPUS_LABELS, modality="MRI", target_spacing=[1.0, 1.0, 1.0])


@pytest.fixture
def synthetic_rows(synthetic_dir: Path) -> list[dict[str, str]]:
    return training_rows(synthetic_dir)


@pytest.fixture
def hippocampus_rows(hippocampus_dir: Path) -> list[dict[str, str]]:
    return training_rows(hippocampus_dir, 8)


@pytest.fixture
def make_config() -> Callable[..., dict[str, Any]]:
    return tiny_config

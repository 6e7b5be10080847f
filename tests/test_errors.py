"""Every error a user can act on is an MsdsegError, naming the key, file or subject and the fix."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from msdseg import errors
from msdseg.data.manifest import assign_folds, build_manifest
from msdseg.infer.cases import group_cases
from msdseg.jobs.chunking import chunk_size


def test_every_error_class_of_the_project_is_an_msdseg_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 9
    assert all(issubclass(c, errors.MsdsegError) for c in classes)


@pytest.mark.parametrize("call, kind, names", [
    (lambda: assign_folds(["a", "b"], n_folds=1, seed=0), errors.ConfigError, "manifest.n_folds"),
    (lambda: assign_folds(["a", "a"], n_folds=2, seed=0), errors.DatasetError, "dataset.json"),
    (lambda: build_manifest(None, n_folds=2, seed=0, on_invalid="ignore"), errors.ConfigError, "manifest.on_invalid"),
    (lambda: chunk_size(0, [1.0], 10.0), errors.ConfigError, "subjects_per_job"),
    (lambda: group_cases(["x.nii.gz"], layout="bids"), errors.ConfigError, "predict.layout"),
])
def test_a_bad_setting_names_its_key(call: Callable[[], Any], kind: type, names: str) -> None:
    with pytest.raises(kind, match=names.replace(".", r"\.")) as caught:
        call()
    assert isinstance(caught.value, errors.MsdsegError)

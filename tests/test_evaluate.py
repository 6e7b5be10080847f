"""Fold tables, the Dice summary on hand-made numbers, and the report plots."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from msdseg.errors import SubjectError
from msdseg.files import write_csv
from msdseg.metrics import METRIC_COLUMNS
from msdseg.report.plots import (
    OverlayCase,
    best_and_worst,
    overlay_cases,
    plot_dice_boxplot,
    plot_learning_curve,
    plot_overlays,
)
from msdseg.report.tables import SUMMARY_COLUMNS, dice_summary, fold_metrics, read_metrics

NAN = float("nan")


def _row(subject, label, value, hd=1.0):
    return {"subject": subject, "label": label, "class_name": {1: "Anterior", 2: "Posterior"}[label],
            "dice": value, "hd95_mm": hd, "nsd": value, "volume_ref_ml": 1.0, "volume_pred_ml": 1.0}


@pytest.fixture
def metrics_by_fold():
    fold0 = fold_metrics([_row("b", 1, 0.6), _row("a", 2, 0.5), _row("a", 1, 0.8), _row("b", 2, NAN, NAN)])
    fold1 = fold_metrics([_row(s, 1, v) for s, v in (("c", 1.0), ("d", 0.9), ("e", 0.7))]
                         + [_row(s, 2, v, math.inf) for s, v in (("c", 0.4), ("d", 0.2), ("e", 0.3))])
    return {1: fold1, 0: fold0}


def test_fold_metrics_orders_rows_and_columns(metrics_by_fold, tmp_path):
    fold0 = metrics_by_fold[0]
    assert list(fold0.columns) == METRIC_COLUMNS
    assert list(zip(fold0["subject"], fold0["label"])) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    write_csv(metrics_by_fold[1], tmp_path / "metrics.csv")
    back = read_metrics(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(back, metrics_by_fold[1])
    assert np.isinf(back["hd95_mm"]).sum() == 3


def test_dice_summary_hand_computed(metrics_by_fold):
    summary = dice_summary(metrics_by_fold)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(zip(summary["fold"], summary["label"])) == [
        ("0", 1), ("0", 2), ("1", 1), ("1", 2), ("all", 1), ("all", 2)]
    expected = {
        # fold, label: n, mean, std (ddof=1), median, min, max
        ("0", 1): (2, 0.7, 0.141421356, 0.7, 0.6, 0.8),
        ("0", 2): (1, 0.5, NAN, 0.5, 0.5, 0.5),  # the NaN Dice (both empty) is not counted
        ("1", 1): (3, 0.866666667, 0.152752523, 0.9, 0.7, 1.0),
        ("1", 2): (3, 0.3, 0.1, 0.3, 0.2, 0.4),
        ("all", 1): (5, 0.8, 0.158113883, 0.8, 0.6, 1.0),
        ("all", 2): (4, 0.35, 0.129099445, 0.35, 0.2, 0.5),
    }
    for row in summary.itertuples(index=False):
        n, mean, std, median, low, high = expected[(row.fold, row.label)]
        assert row.n == n
        assert row.class_name == {1: "Anterior", 2: "Posterior"}[row.label]
        got = (row.mean, row.std, row.median, row.min, row.max)
        np.testing.assert_allclose(got, (mean, std, median, low, high), rtol=1e-7, equal_nan=True)


def test_dice_summary_marks_folds_scored_on_their_own_training_subjects(metrics_by_fold):
    summary = dice_summary(metrics_by_fold, held_out={0: False, 1: True})
    held_out = dict(zip(summary["fold"], summary["held_out"]))
    assert held_out == {"0": False, "1": True, "all": False}
    assert dice_summary(metrics_by_fold)["held_out"].all()


def test_dice_summary_all_nan_class():
    frame = fold_metrics([_row("a", 1, NAN, NAN), _row("a", 2, 0.5)])
    summary = dice_summary({0: frame})
    first = summary.iloc[0]
    assert first["n"] == 0 and math.isnan(first["mean"])


def test_learning_curve_png(tmp_path):
    log = pd.DataFrame({
        "iteration": np.arange(1, 41),
        "loss": np.linspace(1.5, 0.3, 40),
        "lr": 0.01,
        "val_dice_Anterior": [0.5 + i / 100 if i % 10 == 9 else NAN for i in range(40)],
        "val_dice_Posterior": [0.4 + i / 100 if i % 10 == 9 else NAN for i in range(40)],
        "patches_per_s": 10.0,
    })
    (tmp_path / "fold0").mkdir()
    log.to_csv(tmp_path / "fold0" / "training_log.csv", index=False)
    out = tmp_path / "fold0" / "learning_curve.png"
    plot_learning_curve(tmp_path / "fold0" / "training_log.csv", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # deterministic bytes for the same input
    first = out.read_bytes()
    plot_learning_curve(tmp_path / "fold0" / "training_log.csv", out)
    assert out.read_bytes() == first


def test_boxplot_png(metrics_by_fold, tmp_path):
    frame = pd.concat(list(metrics_by_fold.values()), ignore_index=True)
    out = tmp_path / "plots" / "dice_boxplot.png"
    plot_dice_boxplot(frame, out)
    assert out.stat().st_size > 5000
    plot_dice_boxplot(frame.iloc[0:0], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_best_and_worst_and_overlays(metrics_by_fold, tmp_path):
    frame = pd.concat(list(metrics_by_fold.values()), ignore_index=True)
    picked = best_and_worst(frame)
    # mean over classes (NaN ignored): a .65, b .6, c .7, d .55, e .5
    assert [(s, k) for s, _, k in picked] == [("c", "best"), ("e", "worst")]
    assert picked[0][1] == pytest.approx(0.7)

    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS-like storage: the plot reorients to RAS
    paths = {}
    for subject in ("c", "e"):
        image = rng.normal(100, 20, size=(20, 24, 12)).astype(np.float32)
        ref = np.zeros(image.shape, dtype=np.uint8)
        ref[5:12, 6:15, 3:8] = 1
        ref[12:16, 6:15, 3:8] = 2
        pred = np.roll(ref, 2, axis=0)
        for kind, data in (("image", image), ("ref", ref), ("pred", pred)):
            path = tmp_path / kind / f"{subject}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(path))
        paths[subject] = {k: tmp_path / k / f"{subject}.nii.gz" for k in ("image", "ref", "pred")}
    cases = overlay_cases(
        frame,
        images={s: p["image"] for s, p in paths.items()},
        references={s: p["ref"] for s, p in paths.items()},
        predictions={s: p["pred"] for s, p in paths.items()},
    )
    assert [c.subject for c in cases] == ["c", "e"] and "best" in cases[0].title
    out = tmp_path / "plots" / "overlays.png"
    plot_overlays(cases, out, class_names={1: "Anterior", 2: "Posterior"})
    assert out.stat().st_size > 10000
    plot_overlays([], tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0
    with pytest.raises(SubjectError, match="one grid"):
        bad = OverlayCase("c", paths["c"]["image"], paths["c"]["ref"], tmp_path / "small.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), affine), str(bad.prediction))
        plot_overlays([bad], tmp_path / "bad.png")

"""Figures for the report: learning curves, Dice box plots, best/worst overlays.

Agg backend (no display on cluster nodes), fixed sizes, a seeded jitter and no timestamps in the
PNG metadata, so the same inputs give the same bytes on the same matplotlib version.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from msdseg.decathlon import label_map  # noqa: E402
from msdseg.errors import SubjectError  # noqa: E402
from msdseg.files import atomic_path  # noqa: E402

matplotlib.use("Agg")


_DPI = 100


_COLORS = plt.get_cmap("tab10").colors


def _save(figure: Figure, out_png: str | os.PathLike[str]) -> None:
    """Atomic PNG write without the software/date metadata that would make bytes vary."""
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(figure)


def _message_figure(text: str) -> Figure:
    figure, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure


def plot_learning_curve(training_log_csv: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> None:
    """Training loss and validation Dice per class against the iteration (one fold)."""
    log = pd.read_csv(training_log_csv)
    dice_columns = sorted(c for c in log.columns if c.startswith("val_dice_"))
    figure, (ax_loss, ax_dice) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    fold = Path(training_log_csv).parent.name
    figure.suptitle(f"Learning curve ({fold})" if fold.startswith("fold") else "Learning curve")
    if {"iteration", "loss"} <= set(log.columns) and len(log):
        loss = log[["iteration", "loss"]].dropna()
        ax_loss.plot(loss["iteration"], loss["loss"], color=_COLORS[0], linewidth=0.8, label="loss")
        if len(loss) >= 50:
            window = max(len(loss) // 20, 5)
            smooth = loss["loss"].rolling(window, min_periods=1, center=True).mean()
            ax_loss.plot(loss["iteration"], smooth, color=_COLORS[1], linewidth=1.5, label=f"mean of {window}")
        ax_loss.legend(loc="upper right")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, alpha=0.3)
    for index, column in enumerate(dice_columns):
        points = log[["iteration", column]].dropna()
        if len(points):
            ax_dice.plot(
                points["iteration"], points[column], marker="o", markersize=3,
                color=_COLORS[index % len(_COLORS)], label=column.removeprefix("val_dice_"),
            )
    if dice_columns:
        ax_dice.legend(loc="lower right", title="class")
    else:
        ax_dice.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_dice.transAxes)
    ax_dice.set_ylim(0, 1)
    ax_dice.set_xlabel("iteration")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.grid(True, alpha=0.3)
    _save(figure, out_png)


def plot_dice_boxplot(metrics_df: pd.DataFrame, out_png: str | os.PathLike[str]) -> None:
    """Dice per class over subjects (all folds pooled), one box per class with the subjects on top.

    Subjects with a NaN Dice (class absent in reference and prediction) are left out and counted in
    the tick label.
    """
    classes = (
        metrics_df[["label", "class_name"]].drop_duplicates("label").sort_values("label", kind="stable")
    )
    if classes.empty:
        _save(_message_figure("no metrics to plot"), out_png)
        return
    values, ticks, colors = [], [], []
    for label, name in classes.itertuples(index=False):
        colors.append(_COLORS[int(label) % len(_COLORS)])  # same colour per class as the overlays
        dice_values = metrics_df.loc[metrics_df["label"] == label, "dice"].astype(float)
        kept = dice_values.dropna().to_numpy()
        values.append(kept)
        ticks.append(f"{name}\n(n={kept.size})")
    figure, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(values) + 2), 4.5), constrained_layout=True)
    positions = np.arange(1, len(values) + 1)
    ax.boxplot([v if v.size else [np.nan] for v in values], positions=positions, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for position, kept, color in zip(positions, values, colors):
        jitter = rng.uniform(-0.12, 0.12, size=kept.size)
        ax.scatter(position + jitter, kept, s=10, alpha=0.6, color=color, zorder=3)
    ax.set_xticks(positions, ticks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    n_subjects = metrics_df["subject"].nunique() if "subject" in metrics_df else 0
    ax.set_title(f"Dice per class ({n_subjects} subjects, original geometry)")
    ax.grid(True, axis="y", alpha=0.3)
    _save(figure, out_png)


@dataclass(frozen=True)
class OverlayCase:
    """One row of the overlay figure: a subject's original image, reference and prediction."""

    subject: str
    image: Path
    reference: Path
    prediction: Path
    title: str = ""


def best_and_worst(metrics_df: pd.DataFrame, n: int = 1) -> list[tuple[str, float, str]]:
    """(subject, mean Dice over classes, "best"/"worst") for the n best and n worst subjects.

    Ties are broken by subject id so the choice is deterministic.
    """
    means = (
        metrics_df.groupby("subject", sort=True)["dice"].mean().dropna().reset_index()
    )
    if means.empty:
        return []
    ranked = means.sort_values(["dice", "subject"], ascending=[False, True], kind="stable")
    best = [(str(s), float(d), "best") for s, d in ranked.head(n).itertuples(index=False)]
    chosen = {s for s, _, _ in best}
    worst_rows = ranked.sort_values(["dice", "subject"], ascending=[True, True], kind="stable")
    worst = [(str(s), float(d), "worst") for s, d in worst_rows.itertuples(index=False) if s not in chosen][:n]
    return best + worst


def overlay_cases(
    metrics_df: pd.DataFrame,
    images: Mapping[str, str | os.PathLike[str]],
    references: Mapping[str, str | os.PathLike[str]],
    predictions: Mapping[str, str | os.PathLike[str]],
    n: int = 1,
) -> list[OverlayCase]:
    """The best and worst subjects of a metrics table as :class:`OverlayCase` rows."""
    cases = []
    for subject, mean_dice, kind in best_and_worst(metrics_df, n):
        cases.append(
            OverlayCase(
                subject=subject,
                image=Path(images[subject]),
                reference=Path(references[subject]),
                prediction=Path(predictions[subject]),
                title=f"{kind}: {subject} (mean Dice {mean_dice:.3f})",
            )
        )
    return cases


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxel data reoriented to the closest RAS axes so 'axial' means the same for every file."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, spacing  # type: ignore[return-value]


def _centre(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """Middle of the labelled bounding box (reference, else prediction, else the volume)."""
    for mask in (reference > 0, prediction > 0):
        if mask.any():
            coords = np.nonzero(mask)
            return tuple(int((c.min() + c.max()) // 2) for c in coords)  # type: ignore[return-value]
    return tuple(s // 2 for s in reference.shape)  # type: ignore[return-value]


_VIEWS = (
    # name, fixed axis, (horizontal axis, vertical axis)
    ("axial", 2, (0, 1)),
    ("coronal", 1, (0, 2)),
    ("sagittal", 0, (1, 2)),
)


def plot_overlays(
    cases: Sequence[OverlayCase],
    out_png: str | os.PathLike[str],
    class_names: Mapping[int, str] | None = None,
) -> None:
    """Axial, coronal and sagittal slices through the middle of the labelled region of each case.

    Reference outlines are solid, prediction outlines dashed, one colour per class; images are
    shown in RAS orientation with the voxel spacing as aspect ratio.
    """
    if not cases:
        _save(_message_figure("no subjects with a Dice to show"), out_png)
        return
    figure, axes = plt.subplots(
        len(cases), 3, figsize=(11, 3.7 * len(cases)), squeeze=False, constrained_layout=True
    )
    labels_seen: set[int] = set()
    for row, case in zip(axes, cases):
        image, spacing = _canonical(case.image)
        reference, _ = _canonical(case.reference)
        prediction, _ = _canonical(case.prediction)
        if not (image.shape[:3] == reference.shape == prediction.shape):
            raise SubjectError(
                case.subject, str(case.prediction),
                f"image {case.image} {image.shape}, reference {case.reference} {reference.shape} and "
                f"this prediction {prediction.shape} must share one grid; delete the prediction so "
                "its infer rule writes it again",
            )
        finite = image[np.isfinite(image)] if np.issubdtype(image.dtype, np.floating) else image
        low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        centre = _centre(reference, prediction)
        present = sorted(int(v) for v in np.union1d(np.unique(reference), np.unique(prediction)) if v > 0)
        labels_seen.update(present)
        for ax, (view, fixed, (h_axis, v_axis)) in zip(row, _VIEWS):
            index = [slice(None)] * 3
            index[fixed] = centre[fixed]
            picked = tuple(index)
            ax.imshow(
                np.asarray(image[picked], dtype=np.float32).T, cmap="gray", origin="lower",
                vmin=low, vmax=high if high > low else low + 1,
                aspect=spacing[v_axis] / spacing[h_axis], interpolation="nearest",
            )
            for label in present:
                color = _COLORS[label % len(_COLORS)]
                for volume, style in ((reference, "solid"), (prediction, "dashed")):
                    mask = (volume[picked] == label).T
                    if mask.any() and not mask.all():
                        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color],
                                   linestyles=style, linewidths=1.2, origin="lower")
            ax.set_title(f"{view} slice {centre[fixed]}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(case.title or case.subject, fontsize=9)
    handles = [Line2D([], [], color="black", linestyle="solid", label="reference"),
               Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    names = label_map(class_names)
    handles += [Line2D([], [], color=_COLORS[label % len(_COLORS)], label=names.get(label, f"label {label}"))
                for label in sorted(labels_seen)]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    _save(figure, out_png)

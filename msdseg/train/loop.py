"""One fold's training loop, the same in a single process and in every DDP rank."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchio as tio
from torch import nn
from tqdm import tqdm

from msdseg.data.subjects import subjects_from_paths
from msdseg.devices import default_device, is_out_of_memory, precision_name, resolve_precision
from msdseg.errors import ConfigError, MsdsegError
from msdseg.files import atomic_path
from msdseg.logs import say
from msdseg.model.unet import UNet, save_model
from msdseg.plan.budget import patch_forward_seconds
from msdseg.train import settle
from msdseg.train.augmentation import mirror_axes
from msdseg.train.batches import preprocessed_rows, subjects_per_epoch, training_batches
from msdseg.train.loss import segmentation_loss
from msdseg.train.ranks import Diagnostics, Ranks
from msdseg.train.schedule import Schedule, make_optimizer, progress
from msdseg.train.state import (
    CHECKPOINT,
    LOG,
    MODEL,
    RunState,
    Trainables,
    config_hash,
    load_checkpoint,
    resume,
    save_checkpoint,
    seed_everything,
)
from msdseg.train.validation import (
    ValidationPatches,
    draw_validation_patches,
    label_names,
    mean_score,
    pseudo_dice,
    validated,
)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None = the default (CUDA when available)."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available; use device 'cpu' or None.")
    return device


def configure_torch(device: torch.device, threads: int, deterministic: bool) -> None:
    """Threads and determinism for this process (callers restore the previous settings)."""
    torch.set_num_threads(max(int(threads), 1))
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        # benchmark picks the fastest kernels, but not reproducibly: only when determinism is off
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    # a few CUDA kernels (e.g. weighted NLL) have no deterministic version: warn there, never fail
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")


@dataclass
class Budget:
    """The time budget (``train.max_minutes``) as the run spends it; rank 0's clock under DDP."""

    seconds: float
    ranks: Ranks
    started: float
    before_s: float = 0.0  # spent by the processes this run resumes
    validation_s: float = 0.0  # the last validation's duration: the next one will cost about as much
    checkpoint_s: float = 0.0  # the last checkpoint's writing time (outside the steps' own times)
    exhausted: bool = False  # the run stopped before its iterations because the budget ran out

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.started

    def now(self) -> tuple[float, float]:
        """(elapsed s, last validation s), alike on every rank."""
        elapsed, validation_s = self.ranks.from_lead([self.elapsed(), self.validation_s])
        return elapsed, validation_s


@dataclass
class Fold:
    """One fold's training, built once before the loop: what trains, on which data, how."""

    fold: int
    seed: int
    identity: str
    out_dir: Path
    ranks: Ranks
    plan: Mapping[str, Any]
    cfg_train: Mapping[str, Any]
    cfg_model: Mapping[str, Any]
    train_subjects: list[tio.Subject]
    val_subjects: list[tio.Subject]
    parts: Trainables
    net: nn.Module  # what trains: the model, or DDP around it
    amp_dtype: torch.dtype | None
    class_weights: torch.Tensor | None
    names: dict[int, str] = field(default_factory=dict)
    val_patches: ValidationPatches | None = None  # drawn on the rank that validates
    train_rows: list[dict[str, Any]] = field(default_factory=list)  # with their preprocessed folders
    threads: int = 1

    @property
    def device(self) -> torch.device:
        return self.ranks.device


def run_fold(train_rows: Sequence[Mapping[str, Any]], val_rows: Sequence[Mapping[str, Any]],
             plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
             threads: int, device: str | None, ranks: Ranks | None = None) -> Path:
    """Train one fold in this process (a world of one, or one DDP rank) and return model.pt's path.

    The budget's clock starts after the preprocessing that API calls without preprocessed rows get.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = ranks or Ranks.single(resolve_device(device))
    configure_torch(ranks.device, threads, bool(config["train"]["deterministic"]))
    train_rows = _with_preprocessed(train_rows, plan, config, out_dir, ranks)
    started = time.perf_counter()
    run = _build(train_rows, val_rows, plan, config, out_dir, fold, ranks)
    run.threads = int(threads)
    content = load_checkpoint(out_dir / CHECKPOINT, run.identity)
    state = resume(content, run.parts) if content is not None else RunState()
    if content is not None and ranks.lead:
        say(f"resuming fold {fold} from {out_dir / CHECKPOINT} at iteration {state.iteration}")
    ranks.reseed(run.seed, state.iteration)
    run.net = ranks.wrap(run.parts.model)
    budget = Budget(float(config["train"]["max_minutes"]) * 60.0, ranks, started, state.elapsed_before_s)
    diagnostics = Diagnostics.for_ranks(ranks)
    queue = _loop(run, state, budget, diagnostics)
    drawn = subjects_per_epoch(queue, state.iteration * int(run.cfg_train["batch_size"]))
    diagnostics.write(out_dir, state.iteration, drawn, run.parts.model)
    if not ranks.lead:  # rank 0 writes the results; wait for it
        ranks.barrier()
        return out_dir / MODEL
    model_path = _finish(run, state, budget, config)
    ranks.barrier()
    return model_path


def _build(train_rows: Sequence[Mapping[str, Any]], val_rows: Sequence[Mapping[str, Any]],
           plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int, ranks: Ranks) -> Fold:
    """Seed, then build subjects, model, optimiser, schedule and scaler (in this order: reproducible)."""
    cfg_train, cfg_model = config["train"], config["model"]
    seed = int(config["seed"]) + int(fold)
    seed_everything(seed)  # the same on every DDP rank: same initial weights (DDP also broadcasts rank 0's)
    n_classes = len(plan["labels"])
    weights = cfg_train.get("class_weights")
    if weights is not None and len(weights) != n_classes:
        raise ConfigError(f"config key 'train.class_weights': {len(weights)} weights for {n_classes} "
                          f"labels {plan['labels']}; give one weight per label.")
    class_weights = torch.tensor(weights, dtype=torch.float32, device=ranks.device) if weights is not None else None
    val_rows = list(val_rows)[: cfg_train.get("validation_cases") or None]
    train_subjects, val_subjects = subjects_from_paths(train_rows), subjects_from_paths(val_rows)
    if not train_subjects:
        raise ConfigError(f"fold {fold}: no training subjects; check manifest.n_folds and the manifest.")
    amp_dtype = resolve_precision(cfg_train["precision"], ranks.device, key="train.precision")
    identity = config_hash(config, plan, fold, [s["subject"] for s in train_subjects],
                           [s["subject"] for s in val_subjects],
                           {"device": ranks.device.type, "precision": precision_name(amp_dtype)})
    model = UNet(cfg_model["spatial_dims"], int(plan.get("n_channels", 1)), n_classes,
                 cfg_model["base_channels"], cfg_model["depth"], cfg_model["norm"], cfg_model["dropout"],
                 deep_supervision=cfg_model["deep_supervision"], strides=cfg_model.get("strides")).to(ranks.device)
    optimizer = make_optimizer(model, cfg_train)
    parts = Trainables(model, optimizer, Schedule(optimizer, cfg_train["schedule"]),
                       torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16))
    # after the model: drawing in a forked random stream leaves the initial weights as they were
    patches = (draw_validation_patches(val_subjects, plan, cfg_train, cfg_train.get("validation_patches"), seed)
               if val_subjects and ranks.lead else None)
    return Fold(fold, seed, identity, out_dir, ranks, plan, cfg_train, cfg_model, train_subjects,
                val_subjects, parts, model, amp_dtype, class_weights, label_names(plan), patches, list(train_rows))


def _with_preprocessed(train_rows: Sequence[Mapping[str, Any]], plan: Mapping[str, Any], config: Mapping[str, Any],
                       out_dir: Path, ranks: Ranks) -> list[dict[str, Any]]:
    """The patch loader's rows, each with its preprocessed folder (rank 0 writes what is missing)."""
    if config["train"]["loader"] != "patch":
        return [dict(row) for row in train_rows]
    folder, seed = out_dir / "preprocessed", int(config["seed"])
    rows = preprocessed_rows(train_rows, plan, config["train"], folder, seed) if ranks.lead else []
    ranks.barrier()
    return rows if ranks.lead else preprocessed_rows(train_rows, plan, config["train"], folder, seed)


def _total(run: Fold, state: RunState) -> int:
    """The iterations this run trains: as planned until the settling step, then as settled."""
    settle_at = run.cfg_train.get("settle_at")
    if state.settled is not None and settle_at is not None and state.iteration >= int(settle_at):
        return int(state.settled)
    return int(run.cfg_train["iterations"])


def _settle_if_due(run: Fold, state: RunState, budget: Budget) -> None:
    """At step ``train.settle_at``, then once more (msdseg.train.settle): the iterations from this
    run's pace, or from its record. Rank 0 decides and every DDP rank takes its number (collective)."""
    settle_at, planned = run.cfg_train.get("settle_at"), int(run.cfg_train["iterations"])
    which = settle.settlement_due(state.iteration, settle_at, state.settled, state.resettled)
    if which is None:
        return
    elapsed, validation_s = budget.now()
    record = settle.read_record(run.out_dir, run.identity) if run.ranks.lead else None
    recorded = record.at_step(state.iteration, which) if record is not None else None
    measured = recorded is None  # else a repeat or a resumed run: the recorded count, nothing written
    since = state.iteration // 2 if which == settle.FIRST else int(settle_at)
    if measured:
        between_steps = (_validation_estimate(run, state, validation_s) / int(run.cfg_train["validate_every"])
                         + budget.checkpoint_s / int(run.cfg_train["checkpoint_every"]))
        recorded = settle.settled_iterations(state.rows, state.iteration, elapsed, budget.seconds, between_steps,
                                             since)
    before = planned if state.settled is None else state.settled
    state.settled = int(run.ranks.from_lead([float(recorded[0])])[0])
    state.resettled = which == settle.SECOND
    if run.ranks.lead and measured:
        now = settle.Settled(run.identity, state.iteration, state.settled, planned, recorded[1])
        say(settle.record_settlement(run.out_dir, record, which, now, run.fold, (since, state.iteration), before))


def _validation_estimate(run: Fold, state: RunState, measured_s: float) -> float:
    """Seconds of one validation: the last one's, else the planner's estimate at the run's pace so far."""
    if not run.val_subjects or run.val_patches is None:
        return 0.0
    if measured_s > 0:
        return measured_s
    steps = [float(row["seconds_per_step"]) for row in state.rows[-20:]]
    pace = sum(steps) / max(len(steps), 1)
    return len(run.val_patches.images) * patch_forward_seconds(int(run.cfg_train["batch_size"]), pace)


def _loop(run: Fold, state: RunState, budget: Budget, diagnostics: Diagnostics) -> tio.Queue | None:
    """Train until the iterations (settled on the way, see :func:`_settle_if_due`) or the time budget."""
    total, cfg = _total(run, state), run.cfg_train
    now, validation_s = budget.now()
    if state.iteration >= total or now >= budget.seconds:
        return None
    queue, batches = training_batches(run, state.iteration)
    bar = tqdm(total=total, initial=state.iteration, desc=f"fold {run.fold}", unit="it", mininterval=1.0,
               dynamic_ncols=True, disable=not run.ranks.lead)
    divergence, last_dice = Divergence(run.fold, cfg, run.parts.scaler), "-"
    run.parts.model.train()
    while state.iteration < total:
        now, validation_s = budget.now()
        if now + validation_s >= budget.seconds:
            budget.exhausted = True
            break
        lr = run.parts.schedule.step(progress(state.iteration, total))
        try:
            row = _step(run, batches, lr, divergence, state.iteration + 1)
        except Exception as error:
            if is_out_of_memory(error):  # the last checkpoint on disk stays as it was
                raise _out_of_memory(run, state.iteration + 1) from error
            raise
        state.iteration += 1
        diagnostics.after_step(state.iteration, run.parts.model)
        state.rows.append(row)
        _settle_if_due(run, state, budget)
        if _total(run, state) != total:
            total = _total(run, state)
            bar.total = total
        if run.ranks.lead and run.val_subjects and (state.iteration % cfg["validate_every"] == 0
                                                    or state.iteration == total):
            last_dice = _validate_during_training(run, state, budget, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", dice=last_dice, refresh=False)
        if run.ranks.lead and state.iteration % cfg["checkpoint_every"] == 0:
            saving = time.perf_counter()
            save_checkpoint(run.out_dir / CHECKPOINT, run.identity, state, budget.elapsed(), run.parts)
            budget.checkpoint_s = time.perf_counter() - saving
    bar.close()
    if budget.exhausted and run.ranks.lead:
        say(f"stopping at iteration {state.iteration} of {total}: train.max_minutes ({cfg['max_minutes']}) "
            f"reached after {budget.elapsed():.0f} s (this machine is slower than the plan measured, or busy); "
            "model.pt records budget_exhausted: true. Rerun the plan_training rule on the training "
            "machine, or raise train.max_minutes.")
    return queue


def _out_of_memory(run: Fold, iteration: int) -> MsdsegError:
    cfg = run.cfg_train
    return MsdsegError(
        f"fold {run.fold}: out of memory at iteration {iteration} on {run.device} with patch "
        f"{list(cfg['patch_size'])}, batch {cfg['batch_size']}, {precision_name(run.amp_dtype)}; lower "
        "train.batch_size or train.patch_size (or model.base_channels), or set plan.gpu_memory_gb to what "
        "this GPU has free and rerun plan_training. The last checkpoint is kept: a rerun resumes from it.")


@dataclass
class Divergence:
    """Stops a run whose loss is not finite (fp16 skips up to 50 such steps: the scaler backs off)."""

    fold: int
    cfg_train: Mapping[str, Any]
    scaler: torch.amp.GradScaler
    bad_steps: int = 0

    def check(self, loss: float, iteration: int) -> None:
        if math.isfinite(loss):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        if not self.scaler.is_enabled() or self.bad_steps >= 50:
            raise MsdsegError(
                f"fold {self.fold}: training diverged at iteration {iteration} (loss {loss}); "
                f"lower train.learning_rate (now {self.cfg_train['learning_rate']}) or set train.grad_clip.")


def _step(run: Fold, batches: Iterator[Any], lr: float, divergence: Divergence, iteration: int) -> dict[str, Any]:
    """One optimiser step on the next batch; returns its training-log row."""
    t0 = time.perf_counter()
    image, label = next(batches)
    t1 = time.perf_counter()
    x = image.to(run.device, non_blocking=True)
    y = label.to(run.device, non_blocking=True).long()
    parts = run.parts
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits = run.net(x)
    loss = segmentation_loss(logits, y, run.cfg_train["loss"], run.class_weights)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if run.cfg_train["grad_clip"] > 0:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), run.cfg_train["grad_clip"])
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    loss_value = run.ranks.mean(float(loss.item()))  # .item() synchronises: the step time below is real
    divergence.check(loss_value, iteration)
    step_s = time.perf_counter() - t0
    patches = int(run.cfg_train["batch_size"]) * run.ranks.world  # all ranks' patches per step
    return {"iteration": iteration, "loss": loss_value, "lr": lr,
            **{f"val_dice_{name}": None for name in run.names.values()},
            "patches_per_s": patches / step_s, "seconds_per_step": step_s, "data_wait_s": t1 - t0}


def _validate(run: Fold, state: RunState) -> dict[int, float]:
    """Pseudo-Dice per label on the validation patches; offers the weights to the kept ones."""
    assert run.val_patches is not None
    dice = pseudo_dice(run.parts.model, run.val_patches, list(run.names), int(run.cfg_train["batch_size"]),
                       run.cfg_train["precision"], run.device)
    state.kept.offer(mean_score(dice), {run.names[k]: v for k, v in dice.items()}, state.iteration,
                     run.parts.model, keep_last=run.cfg_train["keep"] == "last")
    return dice


def _validate_during_training(run: Fold, state: RunState, budget: Budget, row: dict[str, Any]) -> str:
    """Validate, time it for the budget, put the Dice into ``row``; returns the progress bar's text."""
    started = time.perf_counter()
    dice = _validate(run, state)
    run.parts.model.train()
    budget.validation_s = time.perf_counter() - started
    row.update({f"val_dice_{run.names[k]}": v for k, v in dice.items()})
    return " ".join(f"{v:.3f}" for v in dice.values())


def _finish(run: Fold, state: RunState, budget: Budget, config: Mapping[str, Any]) -> Path:
    """Validate the final weights if not yet done, write model.pt and the log, drop the checkpoint."""
    if run.val_subjects and state.rows and not validated(state.rows[-1], run.names):
        dice = _validate(run, state)
        state.rows[-1].update({f"val_dice_{run.names[k]}": v for k, v in dice.items()})
    kept, model = state.kept, run.parts.model
    mirrored = mirror_axes(run.cfg_train["augmentation"], run.cfg_model["spatial_dims"])
    if kept.state_dict is None:  # no validation subjects: the last weights are the result
        kept.state_dict, kept.iteration = {k: v.detach().cpu() for k, v in model.state_dict().items()}, state.iteration
    model.load_state_dict(kept.state_dict)
    meta = {"labels": dict(run.plan["labels"]), "plan": copy.deepcopy(dict(run.plan)),
            "patch_size": [int(p) for p in run.cfg_train["patch_size"]], "fold": int(run.fold), "seed": run.seed,
            "config": copy.deepcopy(dict(config)), "iterations": state.iteration,
            "best_iteration": int(kept.iteration), "best_val_dice": dict(kept.dice),
            "iterations_planned": int(run.cfg_train["iterations"]), "iterations_settled": state.settled,
            "resettled": state.resettled,
            "settle_at": run.cfg_train.get("settle_at"),
            "config_hash": run.identity, "mirror_axes": list(mirrored), "budget_exhausted": budget.exhausted,
            "precision": precision_name(run.amp_dtype), "device": run.device.type}
    model_path = run.out_dir / MODEL
    save_model(model_path, model, meta)
    columns = ["iteration", "loss", "lr", *(f"val_dice_{n}" for n in run.names.values()),
               "patches_per_s", "seconds_per_step", "data_wait_s"]
    with atomic_path(run.out_dir / LOG) as tmp:
        pd.DataFrame(state.rows, columns=columns).to_csv(tmp, index=False)
    (run.out_dir / CHECKPOINT).unlink(missing_ok=True)
    say(f"fold {run.fold}: {precision_name(run.amp_dtype)} on {run.device.type}; {state.iteration} iterations "
        f"in {budget.elapsed():.0f} s; best iteration {kept.iteration} val Dice {kept.dice}; wrote {model_path}")
    return model_path

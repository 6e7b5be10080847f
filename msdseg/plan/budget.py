"""The time budget: iterations, validation and checkpoint cadence from the measured step and pipeline pace."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.decathlon import label_map
from msdseg.errors import PlanError
from msdseg.plan.fingerprint import DeviceSpec, Fingerprint
from msdseg.plan.network import CONTEXT_CAP, MAX_CPU_BATCH, Network, batch_cap, context_floor, network_for
from msdseg.plan.record import StepProbe, TrainingPlan

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    pass


TARGET_ITERATIONS = 1500  # the fewest steps a budget should buy on a slow device
MIN_ITERATIONS = 100  # below this many steps of the smallest plan a budget trains nothing worth predicting with


USABLE_SHARE = 0.95  # of the budget: start-up, queue filling and checkpoints take the rest


# a probe times the network on random tensors; in training the patch queue's workers share the
# machine (Task04 on 2 CPU cores, one queue worker: median step 0.38 s against a 0.28 s probe, 19% of
# it waiting for data)
PIPELINE_OVERHEAD = {"cpu": 1.4, "cuda": 1.1}


VALIDATIONS = 5  # validations (learning-curve points) a budget should allow
VALIDATION_SHARE = 0.1  # of the budget, at most, for validation during training
SETTLE_MIN_STEPS = 100  # the run's pace is its mean step over the second half of these
SETTLE_SHARE = 0.2  # of the planned iterations, at least SETTLE_MIN_STEPS, before the count is settled
MAX_VALIDATION_PATCHES = 64  # enough for a stable pseudo-Dice; more only costs time
VALIDATION_MEMORY_BYTES = 512 * 2**20  # the patches are held in memory for the whole run


MAX_PROBES = 4  # real measurements while searching: bounds the plan job's time


def _fit_budget(networks: Sequence[Network], fingerprint: Fingerprint, plan: TrainingPlan, dims: int,
                probe: StepProbe) -> tuple[Network, int, float, str]:
    """The largest network whose measured step leaves TARGET_ITERATIONS in the budget.

    A cost model (fixed + per multiply-add, from two measured reference networks) skips the
    candidates that cannot fit; the first that may fit is measured for real, up to MAX_PROBES.
    """
    budget_s = plan.budget_minutes * 60.0 * USABLE_SHARE
    overhead = PIPELINE_OVERHEAD.get(plan.device.type, 1.2)
    floor = context_floor(fingerprint, dims)  # where candidate_patches stopped shrinking
    fixed, per_flop = _calibrate(probe, fingerprint, dims)
    probes, last = 0, None
    for network in networks:
        batch = min(batch_cap(fingerprint, network), MAX_CPU_BATCH[dims])
        estimate = fixed + per_flop * 3 * batch * network.flops(fingerprint.n_channels)
        if budget_s / (estimate * overhead) < TARGET_ITERATIONS and network is not networks[-1]:
            continue
        measured = probe(network, batch)
        probes += 1
        last = (network, batch, measured)
        if budget_s / (measured * overhead) >= TARGET_ITERATIONS or probes >= MAX_PROBES:
            break
    assert last is not None
    network, batch, measured = last
    if budget_s / (measured * overhead) < MIN_ITERATIONS:
        minimum = MIN_ITERATIONS * measured * overhead / USABLE_SHARE / 60.0
        raise PlanError(f"config key 'train.max_minutes': {plan.budget_minutes:g} minutes buy "
                        f"{budget_s / (measured * overhead):.0f} steps of the smallest patch with enough context "
                        f"({list(network.patch)}, measured {measured:.3f} s/step on {plan.device.describe()}); "
                        f"this task needs at least {minimum:.1f} minutes here ({MIN_ITERATIONS} steps). "
                        "Raise train.max_minutes, or train on a GPU.")
    if budget_s / (measured * overhead) >= TARGET_ITERATIONS:
        return network, batch, measured, (f"largest patch/width with >= {TARGET_ITERATIONS} steps in the budget "
                                          f"(measured {measured:.3f} s/step)")
    return network, batch, measured, (f"the smallest patch with the context a segmentation needs (>= "
                                      f"{[round(f) for f in floor]}: half the median image, <= {CONTEXT_CAP}); "
                                      f"the budget buys fewer than {TARGET_ITERATIONS} steps of it "
                                      f"(measured {measured:.3f} s/step)")


def _calibrate(probe: StepProbe, fingerprint: Fingerprint, dims: int) -> tuple[float, float]:
    """(fixed seconds per step, seconds per multiply-add) from two measured reference networks."""
    sizes = ([24, 24, 24], [40, 40, 40]) if dims == 3 else ([48, 48, 1], [128, 128, 1])
    points = []
    for size in sizes:
        reference = network_for(size, fingerprint.target_spacing, dims, 16)
        points.append((3 * 4 * reference.flops(fingerprint.n_channels), probe(reference, 4)))
    (work_a, time_a), (work_b, time_b) = points
    per_flop = max((time_b - time_a) / max(work_b - work_a, 1.0), 1e-15)
    return max(time_a - per_flop * work_a, 0.0), per_flop


def patch_forward_seconds(batch: int, step_s: float) -> float:
    """One validation patch's forward pass: about a third of a training step's share per sample."""
    return step_s / (3 * max(batch, 1))


def validation_patch_count(fingerprint: Fingerprint, network: Network, forward_s: float, budget_s: float,
                           validations: int) -> int:
    """Validation patches: MAX_VALIDATION_PATCHES, fewer where their memory or VALIDATION_SHARE of the budget binds."""
    patch_bytes = 4 * max(fingerprint.n_channels, 1) * math.prod(network.patch)
    by_memory = int(VALIDATION_MEMORY_BYTES // patch_bytes)
    by_budget = int(VALIDATION_SHARE * budget_s / (validations * forward_s))
    return max(1, min(MAX_VALIDATION_PATCHES, by_memory, by_budget))


def _plan_budget(plan: TrainingPlan, fingerprint: Fingerprint, network: Network, batch: int,
                 step_s: float | None, n_folds: int, user: Mapping[str, Any], pace: Any = None) -> None:
    """Iterations and cadence from the measured step time and the budget (recorded, never re-read from the clock).

    ``pace`` (:class:`msdseg.train.probe.Pace`): the whole pipeline measured; without it the step
    probe is scaled by the data queue's usual share (PIPELINE_OVERHEAD). Validation scores a fixed
    set of patches (:mod:`msdseg.train.validation`), so its cost is planned, whatever the case size.
    """
    if step_s is None:
        plan.put("train.iterations", None, "settled by the train job's probe on its device", user)
        plan.put("train.validate_every", None, "a fifth of the iterations", user)
        plan.put("train.checkpoint_every", None, "a twentieth of the iterations", user)
        plan.put("train.validation_patches", None, "settled with the iterations", user)
        plan.put("train.validation_cases", None, "settled with the iterations", user)
        plan.put("train.settle_at", None, "settled with the iterations", user)
        return
    budget_s = plan.budget_minutes * 60.0 * USABLE_SHARE
    forward_s = patch_forward_seconds(batch, step_s)
    if pace is None:
        step_s = step_s * PIPELINE_OVERHEAD.get(plan.device.type, 1.2)  # a training step beside its data queue
        measured = "probe, with the data queue's usual share"
    else:
        step_s, budget_s = pace.step_s, budget_s - pace.startup_s
        measured = f"{pace.steps} steps with the training loader measured; {pace.startup_s:.0f} s to start"
    validations = VALIDATIONS
    patches = int(plan.put(
        "train.validation_patches", validation_patch_count(fingerprint, network, forward_s, budget_s, validations),
        f"pseudo-Dice on fixed patches (~{forward_s:.3f} s each): {validations} validations take <= "
        f"{VALIDATION_SHARE:.0%} of the budget; the infer rules score whole cases", user) or 1)
    fold_cases = max(1, fingerprint.n_training // max(n_folds, 1))
    plan.put("train.validation_cases", min(fold_cases, patches),
             "the fold's cases the validation patches are drawn from (at least one patch each)", user)
    one_validation = patches * forward_s
    iterations = max(1, int((budget_s - validations * one_validation) / step_s))
    iterations = int(plan.put("train.iterations", iterations,
                              f"{plan.budget_minutes} min x {USABLE_SHARE:.0%} at {step_s:.3f} s/step ({measured}), "
                              f"less {validations} validation(s) of ~{one_validation:.0f} s", user))
    plan.put("train.validate_every", max(1, math.ceil(iterations / validations)),
             f"{validations} learning-curve point(s) within the budget", user)
    plan.put("train.checkpoint_every", max(1, math.ceil(iterations / 20)),
             "20 resumable checkpoints per run", user)
    _plan_settling(plan, iterations, user)


def _plan_settling(plan: TrainingPlan, iterations: int, user: Mapping[str, Any]) -> None:
    """Where the run fixes its iteration count from its own pace (msdseg.train.settle), if anywhere."""
    settle_at = max(SETTLE_MIN_STEPS, math.ceil(SETTLE_SHARE * iterations))
    if "train.iterations" in user:
        plan.put("train.settle_at", None, "train.iterations is yours: the run trains exactly that many", user)
    elif 2 * settle_at > iterations:
        plan.put("train.settle_at", None, f"too few iterations to measure the run's pace first (< {2 * settle_at})",
                 user)
    else:
        plan.put("train.settle_at", settle_at, f"after {settle_at} steps the run's own pace fixes the iterations "
                 "(a short probe reads it high); recorded for a resume or repeat", user)


def planned_network(training_plan: Mapping[str, Any]) -> Network:
    """The network a training_plan.json describes."""
    settings = training_plan["settings"]
    return network_for(settings["train.patch_size"]["value"], training_plan["fingerprint"]["target_spacing"],
                       int(settings["model.spatial_dims"]["value"]), int(settings["model.base_channels"]["value"]))


def settle_budget(training_plan: Mapping[str, Any], probe_seconds: float | None, n_folds: int,
                  pace: Any = None) -> dict[str, Any]:
    """Fill (or refill) a plan's iteration count and cadence from a measured step (``None``: the plan's
    own probe) and, where measured, the whole pipeline's ``pace``."""
    settings = training_plan["settings"]
    fp = training_plan["fingerprint"]
    fingerprint = Fingerprint(tuple(fp["median_shape"]), tuple(fp["target_spacing"]), int(fp["n_channels"]),
                              label_map(fp["labels"]), int(fp["n_training"]))
    plan = TrainingPlan(budget_minutes=float(training_plan["budget_minutes"]),
                        device=DeviceSpec(**training_plan["device"]))
    user = {k: s["value"] for k, s in settings.items() if s["source"] == "user"}
    seconds = training_plan["seconds_per_step"] if probe_seconds is None else probe_seconds
    _plan_budget(plan, fingerprint, planned_network(training_plan), int(settings["train.batch_size"]["value"]),
                 seconds, n_folds, user, pace)
    settled = {k: s.as_dict() for k, s in plan.settings.items()}
    paced = {} if pace is None else {"pipeline_seconds_per_step": pace.step_s, "startup_seconds": pace.startup_s}
    return {**training_plan, "seconds_per_step": seconds, **paced, "settings": {**settings, **settled}}

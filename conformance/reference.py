"""The references every result is checked against, computed in float64 NumPy.

- `replay`: the same training as the backends (same data, initial parameters, batch order and
  hyperparameters), step by step in float64, with the update formulas of `optimizers.py`.
- `least_squares`: the least-squares solution of the case's data. Small problems are solved
  exactly, in rational arithmetic on the float64 data, and rounded once: the reference then does
  not depend on the installed scipy and LAPACK (scipy's SVD solver gave NIST Wampler5 7.2 digits
  in one environment and 6.2 in another; the exact solution gives 15.0 in any). Larger problems
  go to scipy, with the columns of the design scaled to unit norm first.
- `ridge`: with coupled weight decay (SGD's `weight_decay`), the minimiser of the objective
  whose gradient the training follows: the case's loss plus the decay's penalty, bias included.
- `huber_fit`: with the Huber loss, scipy's Huber fit of the same objective, made exact.
- `weighted_least_squares`, `logistic_fit`: with sample weights; for `bce`, the maximum-likelihood
  fit, or NoFiniteFit when the classes are separable.
- `lre`: digits of agreement (log relative error) against certified values.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

from conformance import network, schedules
from conformance.formulas import NONE, Switches
from conformance.optimizers import make_update
from conformance.problem import Problem, Trajectory

LRE_CAP = 15.0


UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def rounder(dtype: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Rounding of float64 values to a compute dtype (nearest even, through float32 as the
    frameworks' float32 accumulators are rounded), back as float64; None for float32/float64.
    float16 overflows to infinity past 65504, as the frameworks' casts do."""
    if dtype not in ("bfloat16", "float16"):
        return None
    import ml_dtypes  # ships with JAX and TensorFlow

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16

    def rd(values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(values, dtype=np.float64).astype(np.float32).astype(target).astype(np.float64)

    return rd


class LossScaler:
    """The loss scale of a step and its dynamic rule, as Keras 3's LossScaleOptimizer and torch's
    GradScaler run it: after `growth_interval` consecutive finite steps the scale doubles; a
    non-finite gradient halves it and the step is skipped (no update, no optimizer count, no
    schedule count). A fixed scale never changes and never skips."""

    def __init__(self, loss_scale: dict[str, Any] | None) -> None:
        self.kind = None if loss_scale is None else loss_scale["kind"]
        self.scale = 1.0 if loss_scale is None else float(loss_scale.get("scale", loss_scale.get("initial")))
        self.interval = 0 if loss_scale is None else int(loss_scale.get("growth_interval", 0))
        self.good = 0

    def skips(self, finite: bool) -> bool:
        """Record one step's gradient; whether the step is skipped."""
        if self.kind != "dynamic":
            return False
        if not finite:
            self.scale, self.good = self.scale * 0.5, 0
            return True
        self.good += 1
        if self.good == self.interval:
            self.scale, self.good = self.scale * 2.0, 0
        return False


def replay(problem: Problem, rounding: np.random.Generator | None = None, switches: Switches = NONE) -> Trajectory:
    """Train `problem` in float64, visiting batches exactly as the backends do, with the case
    format's formulas or, with `switches`, a framework's own (conformance/formulas.py).

    With `rounding`, the arithmetic is perturbed as rounding in the training dtype could move
    it (unit roundoff u), with uniform random relative errors drawn from `rounding` (see
    `rounding_band`). Rounding is deterministic, and its bias does not average out over steps
    the way fresh noise would, so two perturbations are drawn once per run and kept: each
    sample's model output (size u) and each gradient component (size u * sqrt(batch size), its
    sums); a third, each updated parameter (size u), is drawn afresh every step, as is a fourth,
    each value the optimizer keeps in its state (size u; see optimizers.make_update). With
    hidden layers, each sample's activation of each hidden unit is perturbed too (size u, drawn
    once per run, as the model output is). The outputs and activations are also perturbed afresh
    at every step (size u again): the fixed part is rounding's bias, the fresh part its noise,
    which is what starts an instability (fuzz-0-118: with the fixed part alone, 16 replays
    stayed within 4e-7 where torch and jax left the path by 1e-5).

    Mixed precision (`problem.precision`): the forward and backward values are rounded to the
    compute dtype where network.forward/backward say, the loss is float64 from the rounded
    output, the gradient of the output is scaled by the loss scale before its rounding (float16
    overflows there, as in the frameworks) and unscaled after; a non-finite gradient under a
    dynamic scale skips the step (`LossScaler`). Outputs, activations and gradients are then
    perturbed by the compute dtype's u (the gradient afresh every step: a lowering that rounds
    elsewhere moves each step's gradient by about one rounding), parameters and optimizer state
    by float32's. The gradient's perturbation stands for summation: a float32 sum in another order
    rounds to the compute dtype a unit away now and then; a backend that sums a bias's or a
    kernel's gradient in the compute dtype itself (switch gradient_sum_in_compute_dtype: XLA,
    TensorFlow's broadcasting add) gets the sum's own perturbation with the compute dtype's u.
    """
    x = problem.x.astype(np.float64)
    y = problem.y.astype(np.float64)
    w = None if problem.sample_weight is None else problem.sample_weight.astype(np.float64)
    unit = UNIT_ROUNDOFF[problem.dtype] if rounding is not None else 0.0
    compute_unit = UNIT_ROUNDOFF[problem.compute_dtype] if rounding is not None else 0.0
    rd = rounder(problem.compute_dtype)

    def jitter(values: np.ndarray, size: float) -> np.ndarray:
        return values * (1.0 + size * rounding.uniform(-1.0, 1.0, np.shape(values)))

    output_bias = np.ones(problem.n) if rounding is None else jitter(np.ones(problem.n), compute_unit)
    # a stream of its own: the loss's rounding leaves every other perturbation (and band) as it was
    loss_rounding = None if rounding is None else rounding.spawn(1)[0]
    # bce's gradient p - y: p rounded first, so the difference carries u p, not u |p - y|
    probability_bias = None if rounding is None or problem.loss != "bce" else jitter(np.ones(problem.n), compute_unit)
    model = network.with_switches(problem.layers, switches)
    hidden_bias = None if rounding is None or len(model) == 1 else \
        [jitter(np.ones((problem.n, layer.units)), compute_unit) for layer in model[:-1]]
    params = problem.initial_params()
    # a gradient summed in the compute dtype (a reduction of float16 partial sums): its error is
    # bounded by the compute dtype's u, not float32's, times the sum of its terms' magnitudes
    sum_unit = compute_unit if "gradient_sum_in_compute_dtype" in switches else unit
    gradient_bias = np.ones(params.size) if rounding is None else jitter(np.ones(params.size), sum_unit)
    def stored(values: np.ndarray) -> np.ndarray:
        """The parameters as the framework stores them after a step. float32 variables: rounded
        to float32 itself, not by a random unit: a step that repeats (a saturated clip by value,
        Adam's lr sign(g)) rounds the same way every time, a drift linear in the steps that
        independent errors (sqrt of the steps) miss (fuzz-52409-267: a clipped SGD step of 77
        units of the weight's float32 spacing, 1.2e-7 short every step, 2.1e-5 after 177).
        float64: a random unit (the replay cannot round below its own precision)."""
        if problem.dtype == "float32":
            return values.astype(np.float32).astype(np.float64)
        return jitter(values, unit)

    float32_unit = FLOAT32_POWER_UNITS * UNIT_ROUNDOFF["float32"]
    float32_jitter = None if rounding is None else lambda values: jitter(values, float32_unit)
    optimizer = problem.optimizer
    decay = float(optimizer.settings.get("weight_decay") or 0.0)
    if "l2_factor_in_float32" in switches:  # Keras's L2(decay / 2): its factor a float32
        decay = 2.0 * float(np.float32(decay / 2.0))
    if "replica_scale_in_float32" in switches and problem.replicas > 1:  # its L2 term scaled too
        decay *= problem.replicas * float(np.float32(1.0 / problem.replicas))
    if decay:
        optimizer = replace(optimizer, settings=optimizer.settings | {"weight_decay": decay})
    decay_before_clip = "clip_after_l2" in switches
    if decay_before_clip:  # the decay is part of the clipped gradient, not added by the optimizer
        optimizer = replace(optimizer, settings=optimizer.settings | {"weight_decay": 0.0})
    update = make_update(optimizer, None if rounding is None else lambda values: jitter(values, unit), switches,
                         float32_jitter)
    rates = schedules.step_rates(problem.schedule, problem.learning_rate, problem.epochs,
                                 problem.optimizer_steps_per_epoch,
                                 reciprocal="staircase_by_float32_reciprocal" in switches)
    if "schedule_in_float32" in switches:
        rates = schedule_rounding(rates, problem.learning_rate, rounding)
    counts_skips = switches & {"skipped_steps_counted", "schedule_counts_skipped_steps"}
    flat_rates = rates.reshape(-1)
    scaler = LossScaler(problem.loss_scale)
    scales, skipped = np.empty(problem.epochs), np.zeros(problem.epochs, dtype=np.int64)
    last_rates = np.empty(problem.epochs)
    applied = 0  # optimizer steps taken: a skipped step advances neither Adam's t nor a schedule
    history = np.empty((problem.epochs, params.size))
    losses = np.empty(problem.epochs)
    penalties = np.zeros(problem.epochs)
    def evaluate(params: np.ndarray, rows: Any, batch_size: int) -> tuple[float, np.ndarray, np.ndarray | None]:
        """The loss of `rows`, its gradient, and (with `rounding`) its terms' magnitudes."""
        magnitudes = None if rounding is None and not order_decides else []
        loss, grad = loss_and_gradient(params, x[rows], y[rows], problem.has_bias, problem.reduction,
                                       problem.loss, problem.delta, None if w is None else w[rows],
                                       None if rounding is None else jitter(output_bias[rows], compute_unit),
                                       model,
                                       None if hidden_bias is None else
                                       [jitter(f[rows], compute_unit) for f in hidden_bias],
                                       rd=rd, loss_scale=scaler.scale, magnitudes=magnitudes,
                                       weights_in_float32_over=batch_size
                                       if "weighted_losses_in_float32" in switches else None,
                                       probability_factors=None if probability_bias is None else
                                       jitter(probability_bias[rows], compute_unit))
        if magnitudes is None:
            return loss, grad, None
        loss_terms = magnitudes.pop()
        if rounding is not None:  # the loss's own sum, in the training dtype (autocast, Keras: float32)
            loss += unit * np.sqrt(len(y[rows])) * loss_terms * float(loss_rounding.uniform(-1.0, 1.0))
        return loss, grad, magnitudes.pop()

    order_decides = "gradient_sum_in_compute_dtype" in switches and problem.loss_scale is not None
    largest = float(np.finfo(problem.compute_dtype).max) if order_decides else np.inf
    overflow_possible = np.zeros(problem.epochs, dtype=bool)

    def clip(grad: np.ndarray) -> np.ndarray:
        return schedules.clip(grad, problem.clip, network.blocks(model),
                              plus_epsilon="clip_norm_plus_epsilon" in switches)

    def clipped(grad: np.ndarray) -> np.ndarray:
        """The clipped gradient; with `rounding`, its product rounded too (a norm clip otherwise
        normalises every perturbation of the gradient away), before any sum of replicas' parts."""
        grad = clip(grad)
        return grad if rounding is None or problem.clip is None else jitter(grad, unit)

    across_epochs = "accumulate_across_epochs" in switches and problem.accumulate > 1
    running_mean32 = "accumulated_mean_in_float32" in switches and problem.accumulate > 1
    batch_rates = None
    if "schedule_counts_batches" in switches and problem.accumulate > 1 and not problem.schedule_every_epoch:
        batch_rates = schedules.step_rates(problem.schedule, problem.learning_rate, problem.epochs,
                                           problem.steps_per_epoch).reshape(-1)
        if "schedule_in_float32" in switches:
            batch_rates = schedule_rounding(batch_rates, problem.learning_rate, rounding)
    totals, penalty_totals = np.zeros(problem.epochs), np.zeros(problem.epochs)
    epoch, step, batches_seen = 0, 0, 0  # the epoch trained now, its optimizer steps, batches so far

    def end_epochs(before: int) -> None:
        """Record every epoch before `before` (from `epoch` on): its end's parameters and scale."""
        nonlocal epoch, step
        while epoch < before:
            history[epoch], scales[epoch] = params, scaler.scale
            if step == 0:  # no step ended in this epoch (an accumulation across epochs): its rate stays
                last_rates[epoch] = last_rates[epoch - 1] if epoch else flat_rates[0]
            epoch, step = epoch + 1, 0

    with np.errstate(all="ignore"):
        for group in problem.step_groups(across_epochs):
            replica_grads: list[np.ndarray] = []
            finite = True
            batches = [batch for _, batch in group]
            for k, ((batch_epoch, batch), factor) in enumerate(zip(group, group_factors(problem, batches, switches))):
                end_epochs(batch_epoch)
                batches_seen += 1
                shards, shares = replica_shares(problem, batch, switches)
                parts = [evaluate(params, rows, len(y[batch])) for rows in shards]
                loss = sum(share * part[0] for share, part in zip(shares, parts)) \
                    if "reported_loss_averaged" in switches else \
                    sum(part[0] * (len(y[rows]) / len(y[batch]) if problem.reduction == "mean" else 1.0)
                        for rows, part in zip(shards, parts))  # the batch's loss
                if "replica_scale_in_float32" in switches and len(shards) > 1:  # Keras unscales its scaled loss
                    loss *= len(shards) * float(np.float32(1.0 / len(shards)))
                totals[epoch] += loss * len(y[batch])
                # the L2 term a framework reports with the loss: every batch's, a skipped step's too
                penalty_totals[epoch] += decay / 2 * float(params @ params) * len(y[batch])
                if order_decides:  # a partial sum is bounded by the sum of its terms' magnitudes, and no better
                    overflow_possible[epoch] |= scaler.scale * max(share * float(np.max(part[2]))
                                                                   for share, part in zip(shares, parts)) >= largest
                finite = finite and all(bool(np.isfinite(part[1]).all()) for part in parts)
                batch_grads = []
                for share, rows, (_, grad, magnitude) in zip(shares, shards, parts):
                    grad = share * grad
                    if rounding is not None:  # a sum of m terms: within u sqrt(m) of the sum of their magnitudes
                        grad = grad + (gradient_bias - 1.0) * np.sqrt(len(y[rows])) * share * magnitude
                        if rd is not None:  # its float32 sum, in another order or in the compute dtype (XLA),
                            grad = jitter(grad, compute_unit)  # can round a unit away
                    if decay_before_clip:  # each replica's loss carries its share of the L2 term
                        grad = grad + decay * params / len(shards)
                    batch_grads.append(grad)
                if running_mean32:  # optax.MultiSteps accumulates the replicas' combined gradient
                    batch_grads = [sum(batch_grads)]
                for replica, grad in enumerate(batch_grads):
                    if replica == len(replica_grads):
                        replica_grads.append(grad if running_mean32 else factor * grad)
                    elif running_mean32:  # optax.MultiSteps: acc + (g - acc) / (k + 1), kept in float32
                        replica_grads[replica] = replica_grads[replica] + (grad - replica_grads[replica]) / (k + 1)
                    else:  # each replica accumulates its shards of the group's batches
                        replica_grads[replica] = replica_grads[replica] + factor * grad
                if running_mean32 and k < len(group) - 1:  # stored between batches in float32
                    replica_grads = [part.astype(np.float32).astype(np.float64) for part in replica_grads]
            if across_epochs and len(group) < problem.accumulate:
                break  # the training's last batches never complete a group: no step
            rate = flat_rates[applied] if not problem.schedule_every_epoch else \
                rates[applied // problem.optimizer_steps_per_epoch, 0] \
                if "epoch_from_applied_steps" in switches else rates[epoch, min(step, rates.shape[1] - 1)]
            if batch_rates is not None:  # the schedule of the batches trained so far, not of the steps
                rate = batch_rates[batches_seen - 1]
            last_rates[epoch] = rate
            step += 1
            if scaler.skips(finite):
                skipped[epoch] += 1
                if counts_skips:  # the framework's step counter advances on a skipped step
                    applied += 1
                    if "skipped_steps_counted" in switches:
                        update.skipped()
                continue
            grad = clipped(replica_grads[0]) if len(replica_grads) == 1 else \
                sum(clipped(part) for part in replica_grads) if "clip_per_replica" in switches \
                else clipped(sum(replica_grads))
            params = update(params, grad, rate)
            applied += 1
            if rounding is not None:
                params = stored(params)
        end_epochs(problem.epochs)
        losses[:] = totals / problem.n
        penalties[:] = penalty_totals / problem.n
    predictions = None
    if problem.predict_x is not None:
        predictions = predict(params, problem.predict_x.astype(np.float64), problem.has_bias, model, rd)
        if problem.loss == "bce":  # `predict` compares probabilities
            predictions = scipy.special.expit(predictions)
    scaled = problem.loss_scale is not None
    return Trajectory(history, losses, predictions, penalty=penalties if decay else None,
                      rates=last_rates if problem.schedule is not None else None,
                      loss_scale=scales if scaled else None, skipped=skipped if scaled else None,
                      overflow_possible=overflow_possible if order_decides else None)


def group_factors(problem: Problem, group: list[Any], switches: Switches) -> list[float]:
    """Each batch's weight in its optimizer step's gradient (the case format's gradient accumulation).

    The gradient of the loss over the union of the group's samples: with `mean`, each batch's
    mean gradient times its share of the group's samples; with `sum`, the sum. With
    `accumulate_divides_by_n` (the common idiom, `(loss / N).backward()`, and every optimizer-level
    accumulation): each batch's gradient over N = `accumulate`, the same only for a full group of
    equal batches under `mean`; a short last batch, a partial last group or `sum` differ.
    """
    if "accumulate_divides_by_n" in switches:
        return [1.0 / problem.accumulate] * len(group)
    if problem.reduction == "sum" or len(group) == 1:
        return [1.0] * len(group)
    sizes = [len(np.arange(problem.n)[batch]) if isinstance(batch, slice) else len(batch) for batch in group]
    return [size / sum(sizes) for size in sizes]


def replica_shares(problem: Problem, batch: Any, switches: Switches) -> tuple[list[Any], list[float]]:
    """The parts a step's gradient is summed from, and each one's weight in the sum: the whole
    batch, or with a replica switch each replica's shard (Problem.shards). `replica_losses_averaged`
    (DDP, lax.pmean, Keras's fit): the mean of the replicas' own losses, 1 / R each; else (the
    GradientTape loop's compute_average_loss) the shard's share of the batch's mean, n_r / n."""
    if problem.replicas == 1 or not switches & {"replica_losses_averaged", "clip_per_replica"}:
        return [batch], [1.0]
    shards = problem.shards(batch)
    if "replica_losses_averaged" in switches:
        share = float(np.float32(1.0 / len(shards))) if "replica_scale_in_float32" in switches else 1.0 / len(shards)
        return shards, [share] * len(shards)
    size = sum(len(rows) for rows in shards)
    return shards, [len(rows) / size if problem.reduction == "mean" else 1.0 for rows in shards]


FLOAT32_POWER_UNITS = 2  # a float32 power or square root of a framework: within 2 units of the exact one


def schedule_rounding(rates: np.ndarray, learning_rate: float, rounding: np.random.Generator | None) -> np.ndarray:
    """A schedule computed in float32 (formulas.py, schedule_in_float32): each rate rounded to
    float32; in a perturbed replay also moved as the float32 arithmetic before that rounding can
    move it. lr * r^p (or a cosine) in float32 is off the exact rate by at most about
    (FLOAT32_POWER_UNITS + 1 + |ln(rate / lr)|) u: the power, the product, and p's own rounding
    (relative u) carried through r^p as u |p ln r| = u |ln(rate / lr)|. That error is the same at
    every run of the step, so half of it is drawn once per run (a bias) and half afresh."""
    rounded = rates.astype(np.float32).astype(np.float64)
    if rounding is None:
        return rounded
    with np.errstate(divide="ignore"):
        units = FLOAT32_POWER_UNITS + 1 + np.abs(np.log(np.where(rates > 0, rates / learning_rate, 1.0)))
    bias = rounding.uniform(-1.0, 1.0)
    return rounded * (1 + units * UNIT_ROUNDOFF["float32"] * (bias + rounding.uniform(-1.0, 1.0, rates.shape)) / 2)


AUTO_RUNS = 4  # perturbed replays per case
AUTO_FACTOR = 10.0  # the band is this many times the largest spread they show
AUTO_SCALE_FRACTION = 1e-3  # parameters near 0 are judged against this fraction of the largest one
AUTO_LIMIT = 1e-2  # a derived rtol above this: rounding alone moves the training too far to compare
LIMIT_UNITS = 64  # mixed precision: "too sensitive" is a derived rtol above 64 u of the compute dtype
MIXED_SCALE_FRACTION = 0.1  # mixed precision: values below this fraction of the largest are judged by atol
TRAJECTORY_WINDOW = 2  # the per-epoch band is the widest of this many epochs either side


@dataclass
class RoundingSpread:
    """How far rounding alone moves one training: for each value, the largest distance of
    AUTO_RUNS perturbed float64 replays from the unperturbed one (see `rounding_spread`)."""

    params: np.ndarray  # (epochs, P): every epoch's parameters, on the case's own features
    loss: np.ndarray  # (epochs,): every epoch's training loss
    predictions: np.ndarray  # (K,): the final `predict` outputs (empty without `predict`)
    unit: float  # the training dtype's unit roundoff
    compute_unit: float = 0.0  # the compute dtype's (the training dtype's without mixed precision)
    decisions_vary_from: int | None = None  # the first epoch (from 0) where a perturbed replay's
    # loss-scale decisions differ: from there on, rounding alone can flip a skip

    @property
    def limit(self) -> float:
        return auto_limit(self.compute_unit)

    @property
    def scale_fraction(self) -> float:
        """Values below this fraction of the largest are judged by atol: AUTO_SCALE_FRACTION, or
        under mixed precision MIXED_SCALE_FRACTION: rounding to the compute dtype moves every
        parameter by about u times the largest value it meets (measured: 0.4 u x the largest
        parameter for a float16 tanh layer, the small ones included), so a small parameter's
        relative spread says nothing about the framework."""
        return AUTO_SCALE_FRACTION if self.compute_unit <= self.unit else MIXED_SCALE_FRACTION


def auto_limit(compute_unit: float) -> float:
    """The widest derived rtol still compared: AUTO_LIMIT, or under mixed precision LIMIT_UNITS
    of the compute dtype's u (bfloat16: 0.0625), whose outputs carry only two or three digits:
    a band of a few bfloat16 units is what an honest port shows there, not a chaotic run."""
    return max(AUTO_LIMIT, LIMIT_UNITS * compute_unit)


def rounding_spread(problem: Problem, unperturbed: Trajectory,
                    to_original: Callable[[np.ndarray], np.ndarray], switches: Switches = NONE) -> RoundingSpread:
    """The Monte Carlo arithmetic experiment behind `auto` bands, run once per case.

    AUTO_RUNS replays of the same training in float64, each with every step perturbed by
    random relative errors the size of the training dtype's unit roundoff
    (`replay(problem, rounding=...)`), kept at every epoch: the parity band reads the last
    epoch, the trajectory band every epoch.
    """
    params = np.zeros_like(unperturbed.params)
    loss = np.zeros_like(unperturbed.loss)
    predictions = np.zeros_like(_predictions(unperturbed))
    decisions_vary_from = None
    with np.errstate(invalid="ignore"):
        for seed in range(AUTO_RUNS):
            perturbed = replay(problem, rounding=np.random.default_rng(seed), switches=switches)
            perturbed.params = to_original(perturbed.params)
            params = np.maximum(params, np.abs(perturbed.params - unperturbed.params))
            loss = np.maximum(loss, np.abs(perturbed.loss - unperturbed.loss))
            predictions = np.maximum(predictions, np.abs(_predictions(perturbed) - _predictions(unperturbed)))
            varied = _first_decision_apart(perturbed, unperturbed)
            if varied is not None:
                decisions_vary_from = varied if decisions_vary_from is None else min(decisions_vary_from, varied)
    return RoundingSpread(params, loss, predictions, UNIT_ROUNDOFF[problem.dtype],
                          UNIT_ROUNDOFF[problem.compute_dtype], decisions_vary_from)


def _first_decision_apart(one: Trajectory, other: Trajectory) -> int | None:
    """The first epoch (from 0) whose loss scale or skipped steps differ between two replays."""
    if one.loss_scale is None or other.loss_scale is None:
        return None
    apart = (one.loss_scale != other.loss_scale) | (one.skipped != other.skipped)
    return int(np.argmax(apart)) if apart.any() else None


def band_from_spread(values: np.ndarray, spread: np.ndarray, unit: float, factor: float = AUTO_FACTOR,
                     floor: float = AUTO_SCALE_FRACTION) -> tuple[float, float, float] | None:
    """(rtol, atol, relative spread) of the band around `values` that holds `factor` times the
    spread everywhere, or None when no value is finite.

    With F = factor, scale = the largest |value| and floor = AUTO_SCALE_FRACTION * scale:
    rtol = F * max s_j / |v_j| over the values above the floor (at least 4 u), and
    atol = F * max over all values of (s_j - rtol / F * |v_j|), or 0, so that
    atol + rtol |v_j| >= F * s_j for every value. Values near 0 (a prediction that cancels, a
    parameter through zero) set atol and leave rtol to the others.
    """
    finite = np.isfinite(values) & np.isfinite(spread)
    if not finite.any():
        return None
    values, spread = np.abs(values[finite]), spread[finite]
    large = values > floor * (float(np.max(values)) or 1.0)
    relative = float(np.max(spread[large] / values[large])) if large.any() else 0.0
    rtol = max(factor * relative, 4 * unit)
    atol = factor * max(0.0, float(np.max(spread - rtol / factor * values)))
    return rtol, atol, relative


def rounding_band(problem: Problem, unperturbed: Trajectory,
                  to_original: Callable[[np.ndarray], np.ndarray],
                  spread: RoundingSpread | None = None) -> dict[str, Any]:
    """`tolerance.parity: auto`: the parity band this case's training allows from rounding alone.

    The spread s_j of the final parameters and predictions over the perturbed replays
    (`rounding_spread`), made a band by `band_from_spread`: ten times what rounding was seen to
    do, everywhere. Assumptions: a framework rounds each operation about as the model does (a
    few units in the last place; sums within sqrt(m) u), and the four runs see the sensitivity
    that matters. A real difference smaller than ten rounding spreads is not separated from
    rounding.
    """
    spread = spread or rounding_spread(problem, unperturbed, to_original)
    final_spread = np.concatenate([spread.params[-1], spread.predictions])
    band = band_from_spread(_final_values(unperturbed), final_spread, spread.unit, floor=spread.scale_fraction)
    if band is None:
        return {"rtol": None, "atol": None, "method": "no finite replay to measure rounding on"}
    rtol, atol, relative = band
    finite = final_spread[np.isfinite(final_spread)]
    return {"rtol": rtol, "atol": atol, "spread_relative": relative,
            "spread_max": float(np.max(finite)) if finite.size else 0.0, "runs": AUTO_RUNS, "factor": AUTO_FACTOR,
            "unit_roundoff": spread.unit, "limit": spread.limit,
            "method": f"{AUTO_FACTOR:g} x the largest spread of {AUTO_RUNS} float64 replays with every step "
                      f"perturbed by the {problem.dtype} unit roundoff" +
                      (f" ({problem.compute_dtype}'s in the forward and backward pass)" if problem.precision else "")}


@dataclass
class EpochBands:
    """A band per epoch, for parameters and for the training loss; `comparable` epochs (from
    the first) are those before rounding alone moves the training by more than AUTO_LIMIT."""

    rtol: np.ndarray
    atol: np.ndarray
    loss_rtol: np.ndarray
    loss_atol: np.ndarray
    comparable: int
    method: str
    limit: float = AUTO_LIMIT

    def at(self, epoch: int) -> tuple[float, float]:
        """(rtol, atol) of the parameters' band at this 0-based epoch."""
        return float(self.rtol[epoch]), float(self.atol[epoch])


def trajectory_bands(unperturbed: Trajectory, spread: RoundingSpread, window: int = TRAJECTORY_WINDOW) -> EpochBands:
    """`tolerance.trajectory: auto`: the band at every epoch, from the rounding spread there.

    Each epoch's parameters get the parity construction (`band_from_spread`) on that epoch's
    values and spread, and so does its loss (with an atol floor of F u times the first epoch's
    loss: a loss that falls to rounding level has no relative digits left). The band at epoch e
    holds what rounding did up to that epoch: the widest of epochs 1 .. e + window. The spread
    of one epoch over AUTO_RUNS runs is a small sample, and a band that dips where the runs
    happened to agree would fail honest frameworks (measured: 0.8 of a per-epoch band).
    """
    epochs = len(unperturbed.params)
    rtol, atol, loss_rtol, loss_atol = (np.full(epochs, np.inf) for _ in range(4))
    loss_floor = AUTO_FACTOR * max(spread.unit, spread.compute_unit) * abs(float(unperturbed.loss[0])) \
        if epochs else 0.0
    for epoch in range(epochs):
        band = band_from_spread(unperturbed.params[epoch], spread.params[epoch], spread.unit,
                                floor=spread.scale_fraction)
        if band is not None:
            rtol[epoch], atol[epoch], _ = band
        band = band_from_spread(unperturbed.loss[epoch:epoch + 1], spread.loss[epoch:epoch + 1], spread.unit)
        if band is not None:
            loss_rtol[epoch], loss_atol[epoch] = band[0], max(band[1], loss_floor)
    widest = [np.maximum.accumulate(_window_max(values, window)) if epochs else values
              for values in (rtol, atol, loss_rtol, loss_atol)]
    # beyond the limit: a relative band past it, or an absolute one past it times the parameters'
    # scale so far (a parameter at 0 that rounding alone moves as far as the others are large)
    scale = np.maximum.accumulate(np.nan_to_num(np.max(np.abs(unperturbed.params), axis=1, initial=0.0))) \
        if epochs else np.zeros(0)
    beyond = np.flatnonzero(~(widest[0] <= spread.limit) | ~(widest[1] <= spread.limit * scale))
    comparable = int(beyond[0]) if beyond.size else epochs
    return EpochBands(*widest, comparable=comparable, limit=spread.limit,
                      method=f"per epoch: {AUTO_FACTOR:g} x the largest spread of {AUTO_RUNS} perturbed float64 "
                             f"replays, the widest up to that epoch (+{window})")


def _window_max(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 0 or values.size == 0:
        return values
    padded = np.pad(values, window, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1).max(axis=1)


def _predictions(trajectory: Trajectory) -> np.ndarray:
    return np.asarray([] if trajectory.predictions is None else trajectory.predictions, dtype=np.float64)


def _final_values(trajectory: Trajectory) -> np.ndarray:
    """The values the parity check compares: final parameters, then `predict` outputs."""
    return np.concatenate([trajectory.params[-1], _predictions(trajectory)])


def loss_and_gradient(params: np.ndarray, x: np.ndarray, y: np.ndarray, has_bias: bool, reduction: str,
                      loss: str = "mse", delta: float = 1.0,
                      weights: np.ndarray | None = None,
                      output_factors: np.ndarray | None = None,
                      model: list[network.Layer] | None = None,
                      hidden_factors: list[np.ndarray] | None = None,
                      rd: Callable[[np.ndarray], np.ndarray] | None = None,
                      loss_scale: float = 1.0, magnitudes: list[np.ndarray] | None = None,
                      weights_in_float32_over: int | None = None,
                      probability_factors: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """One batch's loss and its gradient with respect to [weights..., bias], or with hidden
    layers (`model`) to every parameter in network.py's layout (z is then the network's output).

    Per sample, with z = x w + b and r = z - y: `mse` r^2; `huber` 0.5 r^2 if |r| <= delta,
    else delta * (|r| - delta / 2); `bce` -(y log p + (1 - y) log(1 - p)) with p = sigmoid(z),
    computed as softplus(z) - y z (exact math: no framework's clipping). Sample weights
    multiply each sample's loss; `mean` divides the batch's sum by its size (not by the sum of
    the weights: Keras's "sum over batch size").

    `rd` (mixed precision): the forward and backward passes round to the compute dtype
    (network.forward/backward); the output's gradient is multiplied by `loss_scale` before it is
    rounded and the gradient divided by it after, so float16's overflow shows as a non-finite
    gradient.

    `weights_in_float32_over` (tf.nn.compute_average_loss with sample weights, `mean`): each
    sample's loss and weight are cast to float32 and multiplied there, so the loss sums
    float32(float32(loss_i) float32(w_i)) and the gradient of loss_i is float32(float32(1 / n) w_i),
    n this argument: the global batch's size, which each replica's shard divides by (in a shard of
    13 of 25, float32(1 / 25) is not float32(1 / 13) 13 / 25: fuzz-70211-80).

    `magnitudes`, when given, receives the sum of the magnitudes of the terms each gradient
    component sums (the same backward pass on absolute values): what bounds the rounding error
    of that sum, whatever the sum itself is (a gradient that cancels to 0 still has one); then
    the same for the loss. bce's loss cancels: torch computes (1 - y) z - log_sigmoid(z)
    (aten/src/ATen/native/Loss.cpp binary_cross_entropy_with_logits), TensorFlow
    max(z, 0) - z y + log1p(exp(-|z|)), the probability path -log(p) with p rounded near 1, so
    a saturated sample's loss (1e-21 in float64, 1e-249 in the replay of a float32 run) is
    rounding alone: its error is u times 2 |z| + 1, not u times the loss (fuzz-70211-0: torch
    0 in float64 where the exact loss is 3.3e-21).

    `probability_factors` (`bce`, the replay's model of rounding): the frameworks' gradient of the
    output is p - y with p = sigmoid(z) rounded first (torch's BCELoss and BCEWithLogitsLoss
    backward, `sigmoid(z) - y`; TensorFlow's logits loss, whose gradient adds 1[z > 0] - y and
    -sigmoid(-z) in the dtype, and the probability path's clipped p), so its error is u p,
    not u |p - y|: a saturated sample's gradient (|p - y| below u) is rounding alone
    (fuzz-90417-187: keras, the loop and torch all 3.3e-6 from the exact replay after 34 epochs
    of Adam on separable data, each within 2.4e-7 of a float32 replay of p - y).
    """
    layered = model is not None and (len(model) > 1 or rd is not None)
    if layered:
        output, tape = network.forward(params, x, model, hidden_factors, rd)
    else:
        output = predict(params, x, has_bias)
    if output_factors is not None:  # the replay's model of rounding (`replay(rounding=...)`)
        if layered:
            output = output * output_factors
        else:  # x w + b rounds by u times the sum of its terms' magnitudes, not of its value
            terms = np.abs(x) @ np.abs(params[:x.shape[1]]) + (abs(params[-1]) if has_bias else 0.0)
            output = output + (output_factors - 1.0) * terms
    residual = output - y
    if loss == "bce":
        per_sample = np.logaddexp(0.0, output) - y * output
        terms = 2.0 * np.abs(output) + 1.0  # softplus(z) <= |z| + log 2, |y z| <= |z|: what the sum cancels
        slope = scipy.special.expit(output) - y
        if probability_factors is not None:
            slope = slope + (probability_factors - 1.0) * scipy.special.expit(output)
    elif loss == "huber":
        inside = np.abs(residual) <= delta
        per_sample = np.where(inside, 0.5 * residual**2, delta * (np.abs(residual) - delta / 2))
        slope = np.where(inside, residual, delta * np.sign(residual))  # d loss_i / d prediction_i
    else:
        per_sample, slope = residual**2, 2.0 * residual
    if loss != "bce":
        terms = per_sample  # a square or a Huber branch: no cancellation, its rounding is relative
    scale = 1.0 / len(y) if reduction == "mean" else 1.0
    if weights is not None and weights_in_float32_over and reduction == "mean":
        weights32 = weights.astype(np.float32)
        per_sample = (per_sample.astype(np.float32) * weights32).astype(np.float64)
        slope = (np.float32(1.0 / weights_in_float32_over) * weights32).astype(np.float64) \
            * weights_in_float32_over * slope
    elif weights is not None:
        per_sample, slope = weights * per_sample, weights * slope
    if magnitudes is not None:
        magnitudes.append(_term_magnitudes(params, x, has_bias, scale * np.abs(slope),
                                           tape if layered else None, model))
        magnitudes.append(scale * float(np.sum(terms if weights is None else np.abs(weights) * terms)))
    if layered:
        if output_factors is not None:
            slope = slope * output_factors
        if rd is None:
            return float(per_sample.sum()) * scale, scale * network.backward(params, model, tape, slope)
        gradient = network.backward(params, model, tape, loss_scale * scale * slope, rd)
        return float(per_sample.sum()) * scale, gradient / loss_scale
    grad_w = scale * (x.T @ slope)
    grad = np.append(grad_w, scale * slope.sum()) if has_bias else grad_w
    return float(per_sample.sum()) * scale, grad


def _term_magnitudes(params: np.ndarray, x: np.ndarray, has_bias: bool, slope: np.ndarray,
                     tape: list[tuple[np.ndarray, np.ndarray]] | None, model: list[network.Layer] | None) -> np.ndarray:
    """Per gradient component, the sum of |term| over the samples (and units) it adds up."""
    if tape is None:
        magnitude = np.abs(x).T @ slope
        return np.append(magnitude, slope.sum()) if has_bias else magnitude
    absolute = [(np.abs(a), np.abs(s)) for a, s in tape]
    return network.backward(np.abs(params), model, absolute, slope)


def predict(params: np.ndarray, x: np.ndarray, has_bias: bool, model: list[network.Layer] | None = None,
            rd: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The model's output z for each row of x (the network's, with hidden layers in `model`,
    rounded as mixed precision computes it with `rd`)."""
    if model is not None and (len(model) > 1 or rd is not None):
        return network.forward(params, x, model, rd=rd)[0]
    weights = params[: x.shape[1]]
    return x @ weights + (params[-1] if has_bias else 0.0)


TALL_ROWS = 100_000  # from here on, well-conditioned problems are solved via the Gram matrix
GRAM_CONDITION_LIMIT = 1e8  # of the column-scaled Gram matrix, i.e. 1e4 for the scaled design


EXACT_WORK_LIMIT = 50_000  # rows x parameters^2 up to which least squares is solved exactly (Filip: 36 ms)


def least_squares_method(rows: int, parameters: int) -> str:
    """How `least_squares` solves a problem of this size, as the report names the reference."""
    return "exact least squares" if rows * parameters**2 <= EXACT_WORK_LIMIT else "scipy least squares"


def least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool) -> np.ndarray:
    """[weights..., bias] minimising ||X w + b - y||.

    Small problems are solved exactly (`exact_least_squares`). Larger ones go through
    scipy's SVD solver on unit-norm columns. Tall,
    well-conditioned ones are solved from the Gram matrix with one step of iterative refinement:
    no copy of the data, two passes over it, and agreement with the SVD solution to ~1e-13
    (tests/test_reference.py), where the SVD path costs more than training one epoch.
    """
    if least_squares_method(len(y), x.shape[1] + has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, has_bias)
        if solution is not None:
            return solution
    if len(y) >= TALL_ROWS:
        solution = _tall_least_squares(x, y, has_bias)
        if solution is not None:
            return solution
    design = np.empty((len(y), x.shape[1] + has_bias))  # one working copy, scaled in place
    design[:, : x.shape[1]] = x
    if has_bias:
        design[:, -1] = 1.0
    norms = np.linalg.norm(design, axis=0)
    norms[norms == 0] = 1.0
    design /= norms
    solution, *_ = scipy.linalg.lstsq(design, y, overwrite_a=True, check_finite=False)
    return solution / norms


def exact_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool, row_weights: np.ndarray | None = None,
                        penalty: float = 0.0) -> np.ndarray | None:
    """The exact minimiser for the float64 data, rounded once to float64; None if rank-deficient.

    Minimises sum_i c_i (x_i b - y_i)^2 + penalty * |b|^2 (c_i = 1 without row weights; the
    bias is part of b). Every float64 is a dyadic rational, so the normal equations
    (X^T C X + penalty I) b = X^T C y can be formed and solved by Gaussian elimination in
    `Fraction`s without any rounding. Rank-deficient data has no unique solution; the caller
    then takes scipy's minimum-norm one.
    """
    columns = [[Fraction(float(value)) for value in column] for column in np.asarray(x, dtype=np.float64).T]
    if has_bias:
        columns.append([Fraction(1)] * len(y))
    target = [Fraction(float(value)) for value in y]
    if row_weights is not None:
        weights = [Fraction(float(value)) for value in row_weights]
        weighted = [list(map(operator.mul, column, weights)) for column in columns]
    else:
        weighted = columns
    size = len(columns)
    gram = [[sum(map(operator.mul, weighted[i], columns[j]), Fraction(0)) for j in range(size)] for i in range(size)]
    for index in range(size):
        gram[index][index] += Fraction(float(penalty))
    right = [sum(map(operator.mul, column, target), Fraction(0)) for column in weighted]
    for col in range(size):
        pivot = next((row for row in range(col, size) if gram[row][col] != 0), None)
        if pivot is None:
            return None
        gram[col], gram[pivot], right[col], right[pivot] = gram[pivot], gram[col], right[pivot], right[col]
        for row in range(col + 1, size):
            factor = gram[row][col] / gram[col][col]
            if factor:
                gram[row] = [a - factor * b for a, b in zip(gram[row], gram[col])]
                right[row] -= factor * right[col]
    solution = [Fraction(0)] * size
    for col in reversed(range(size)):
        known = sum((gram[col][k] * solution[k] for k in range(col + 1, size)), Fraction(0))
        solution[col] = (right[col] - known) / gram[col][col]
    return np.array([float(value) for value in solution])


def ridge(problem: Problem) -> np.ndarray:
    """[weights..., bias] where the training's averaged update vanishes under coupled weight decay.

    Each step adds weight_decay * theta to one batch's gradient, so an epoch's steps sum to
    sum_b grad(loss_b) + B * weight_decay * theta (B batches). With the case's reduction a
    sample's squared error enters its batch's loss with weight c_i: 1 for `sum`; for `mean`,
    1/m over its batch's size m, or B/n on average when batches are reshuffled every epoch. The
    reference is the minimiser of sum_i c_i r_i^2 + (B * weight_decay / 2) |theta|^2, on the
    features as trained (after standardization), in float64.
    """
    x, y = problem.x.astype(np.float64), problem.y.astype(np.float64)
    weights, penalty = decay_objective(problem)
    if least_squares_method(problem.n, problem.features + problem.has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, problem.has_bias, weights, penalty)
        if solution is not None:
            return solution
    design = np.hstack([x, np.ones((problem.n, 1))]) if problem.has_bias else x
    gram = design.T @ (design * weights[:, None]) + penalty * np.eye(design.shape[1])
    return scipy.linalg.solve(gram, design.T @ (weights * y), assume_a="pos")


def decay_objective(problem: Problem) -> tuple[np.ndarray, float]:
    """Under coupled weight decay: each sample's weight c_i in the objective the training follows,
    and the penalty on |theta|^2 (see `ridge`)."""
    batches = problem.optimizer_steps_per_epoch  # decay is added once per optimizer step
    step_size = problem.batch_size * problem.accumulate  # the samples of one optimizer step
    if problem.reduction == "sum":
        weights = np.ones(problem.n)
    elif problem.orders is None:
        weights = np.empty(problem.n)
        for start in range(0, problem.n, step_size):
            stop = min(start + step_size, problem.n)
            weights[start:stop] = 1.0 / (stop - start)
    else:
        weights = np.full(problem.n, batches / problem.n)
    if problem.sample_weight is not None:
        weights = weights * problem.sample_weight.astype(np.float64)
    return weights, batches * problem.optimizer.settings["weight_decay"] / 2


class NoFiniteFit(ValueError):
    """The case's objective has no finite minimiser (separable classes for `bce`)."""


def weighted_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool, weights: np.ndarray) -> np.ndarray:
    """[weights..., bias] minimising sum_i w_i r_i^2: exact for small data, else least squares
    on rows scaled by sqrt(w_i) (the intercept column scaled with them)."""
    if least_squares_method(len(y), x.shape[1] + has_bias) == "exact least squares":
        solution = exact_least_squares(x, y, has_bias, weights)
        if solution is not None:
            return solution
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    root = np.sqrt(weights)
    return least_squares(design * root[:, None], y * root, False)


def logistic_fit(x: np.ndarray, y: np.ndarray, has_bias: bool, weights: np.ndarray | None = None,
                 penalty: float = 0.0) -> np.ndarray:
    """[weights..., bias] maximising the likelihood of logistic regression: minimising
    sum_i w_i (softplus(z_i) - y_i z_i) + penalty |theta|^2, z = x w + b, in float64.

    scipy's trust-region Newton method with the exact gradient and Hessian, then Newton steps
    until the gradient is at most 1e-10 of its size at zero. Without a penalty, separable
    classes have no finite optimum: NoFiniteFit, found by a linear program (`separable`).
    """
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    weights = np.ones(len(y)) if weights is None else weights
    if penalty == 0 and separable(design, y, weights):
        raise NoFiniteFit("linearly separable: no finite maximum-likelihood fit (a linear program found "
                          "parameters that put every weighted sample on its label's side with a margin)")
    identity = np.eye(design.shape[1])

    def objective(theta: np.ndarray) -> float:
        z = design @ theta
        return float(weights @ (np.logaddexp(0.0, z) - y * z) + penalty * theta @ theta)

    def gradient(theta: np.ndarray) -> np.ndarray:
        return design.T @ (weights * (scipy.special.expit(design @ theta) - y)) + 2 * penalty * theta

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = scipy.special.expit(design @ theta)
        return design.T @ (design * (weights * p * (1 - p))[:, None]) + 2 * penalty * identity

    start = np.zeros(design.shape[1])
    theta = scipy.optimize.minimize(objective, start, jac=gradient, hess=hessian, method="trust-exact",
                                    options={"gtol": 1e-13, "maxiter": 1000}).x
    for _ in range(20):
        step = np.linalg.lstsq(hessian(theta), gradient(theta), rcond=None)[0]
        theta = theta - step
        if np.abs(step).max() <= 1e-16 * max(1.0, np.abs(theta).max()):
            break
    scale = max(1.0, float(np.abs(gradient(start)).max()))
    if not np.abs(gradient(theta)).max() <= 1e-10 * scale:
        raise NoFiniteFit(f"no maximum-likelihood fit found: the gradient is still "
                          f"{np.abs(gradient(theta)).max():.1e} (the classes may be quasi-separable)")
    return theta


def separable(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> bool:
    """Whether some parameters put every sample with weight > 0 strictly on its label's side:
    z_i >= 1 for y_i = 1 and z_i <= -1 for y_i = 0 (scaling makes any strict separation one
    with margin 1). A label strictly between 0 and 1 pulls both ways: never separable."""
    used = weights > 0
    labels = y[used]
    if np.any((labels > 0) & (labels < 1)):
        return False
    signs = np.where(labels == 1, -1.0, 1.0)  # -z_i <= -1 for positives, z_i <= -1 for negatives
    found = scipy.optimize.linprog(np.zeros(design.shape[1]), A_ub=signs[:, None] * design[used],
                                   b_ub=-np.ones(used.sum()), bounds=[(None, None)] * design.shape[1],
                                   method="highs")
    return found.status == 0


def huber_fit(x: np.ndarray, y: np.ndarray, has_bias: bool, delta: float, weights: np.ndarray | None = None,
              penalty: float = 0.0) -> np.ndarray:
    """[weights..., bias] minimising sum_i c_i huber_delta(r_i) + penalty |theta|^2 (c_i = 1 unless
    given), in float64.

    scipy's `least_squares(loss="huber", f_scale=delta)` minimises exactly sum_i huber_delta(r_i)
    (its cost is 0.5 C^2 rho(f^2 / C^2) per residual); its solution then fixes which residuals
    are inside delta, and the objective is quadratic given those: one linear solve gives the
    exact minimiser, repeated until the sets no longer change (they rarely move at all).
    """
    design = np.hstack([x, np.ones((len(y), 1))]) if has_bias else x
    weights = np.ones(len(y)) if weights is None else weights
    start = scipy.optimize.least_squares(lambda theta: design @ theta - y, np.zeros(design.shape[1]),
                                         loss="huber", f_scale=delta, method="trf", xtol=1e-15, ftol=1e-15,
                                         gtol=1e-15, max_nfev=10_000).x
    theta, seen = start, []
    for _ in range(50):
        residual = design @ theta - y
        inside = np.abs(residual) <= delta
        outside_pull = delta * (design[~inside].T @ (weights[~inside] * np.sign(residual[~inside])))
        gram = design[inside].T @ (design[inside] * weights[inside, None]) + 2 * penalty * np.eye(design.shape[1])
        try:
            solution = np.linalg.solve(gram, design[inside].T @ (weights[inside] * y[inside]) - outside_pull)
        except np.linalg.LinAlgError:  # too few residuals inside delta to fix the parameters
            return theta
        if np.array_equal(np.abs(design @ solution - y) <= delta, inside):
            return solution
        if any(np.array_equal(inside, earlier) for earlier in seen):
            break  # the sets cycle: keep scipy's solution
        seen.append(inside)
        theta = solution
    return start


def _tall_least_squares(x: np.ndarray, y: np.ndarray, has_bias: bool) -> np.ndarray | None:
    """Normal equations on unit-norm columns plus one refinement step; None if ill-conditioned."""

    def transposed_times(vector: np.ndarray) -> np.ndarray:  # X^T v for the design [x, 1]
        return np.append(x.T @ vector, vector.sum()) if has_bias else x.T @ vector

    gram = x.T @ x
    if has_bias:
        sums = x.sum(axis=0)
        gram = np.block([[gram, sums[:, None]], [sums[None, :], np.array([[float(len(y))]])]])
    norms = np.sqrt(np.diag(gram))
    norms[norms == 0] = 1.0
    scaled = gram / np.outer(norms, norms)
    if not np.isfinite(scaled).all() or np.linalg.cond(scaled) > GRAM_CONDITION_LIMIT:
        return None
    factor = scipy.linalg.cho_factor(scaled)
    solution = scipy.linalg.cho_solve(factor, transposed_times(y) / norms) / norms
    residual = y - predict(solution, x, has_bias)
    return solution + scipy.linalg.cho_solve(factor, transposed_times(residual) / norms) / norms


def lre(estimate: np.ndarray, certified: np.ndarray) -> np.ndarray:
    """Significant digits of agreement per coefficient, capped at LRE_CAP."""
    estimate = np.asarray(estimate, dtype=np.float64)
    certified = np.asarray(certified, dtype=np.float64)
    error = np.abs(estimate - certified)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(certified != 0, error / np.abs(certified), error)
        digits = -np.log10(relative)
    digits = np.where(np.isnan(digits), 0.0, digits)
    return np.clip(digits, 0.0, LRE_CAP)

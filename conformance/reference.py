"""The float64 replay every result is checked against (`replay`): the same training as the
backends (same data, initial parameters, batch order and hyperparameters), step by step in
float64, with the update formulas of `optimizers.py` and a backend's own formulas switched on
(`formulas.py`); with a rounding stream, one of the perturbed replays the rounding bands are
derived from (`rounding_bands.py`). The fits of the objective are `fits.py`'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

from conformance import network, schedules
from conformance.compute_dtype import LossScaler, replica_sum_finite, rounder
from conformance.formulas import NONE, Switches
from conformance.model_loss import loss_and_gradient, predict
from conformance.optimizers import make_update
from conformance.problem import Problem, Trajectory

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}


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

    def offsets(shape: Any, size: float) -> np.ndarray:
        """Relative perturbations delta, uniform in [-size, size]: kept as delta, as 1 + delta
        rounds to 1 in float64 (three in four draws of u; fuzz-84113-52)."""
        return size * rounding.uniform(-1.0, 1.0, shape)

    def jitter(values: np.ndarray, size: float) -> np.ndarray:
        return values * (1.0 + offsets(np.shape(values), size))

    output_bias = None if rounding is None else offsets(problem.n, compute_unit)
    # a stream of its own: the loss's rounding leaves every other perturbation (and band) as it was
    loss_rounding = None if rounding is None else rounding.spawn(1)[0]
    # bce's gradient p - y: p rounded first, so the difference carries u p, not u |p - y|
    probability_bias = None if rounding is None or problem.loss != "bce" else offsets(problem.n, compute_unit)
    model = network.with_switches(problem.layers, switches)
    hidden_bias = None if rounding is None or len(model) == 1 else \
        [offsets((problem.n, layer.units), compute_unit) for layer in model[:-1]]
    params = problem.initial_params()
    # a gradient summed in the compute dtype (a reduction of float16 partial sums): its error is
    # bounded by the compute dtype's u, not float32's, times the sum of its terms' magnitudes
    sum_unit = compute_unit if "gradient_sum_in_compute_dtype" in switches else unit
    gradient_bias = None if rounding is None else offsets(params.size, sum_unit)
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

    def kept(values: np.ndarray) -> np.ndarray:
        """A value the optimizer keeps in its state, as the framework keeps it: its operations'
        roundings (size u, afresh: frameworks order and fuse them differently) and its store, the
        same in every framework (`stored`). Under a gradient that repeats (a saturated clip) the
        store rounds the same way every step, a bias that centered RMSprop's v - a^2 amplifies
        where it cancels (fuzz-91733-24: Keras on TensorFlow and under XLA 5e-6 apart, relative,
        where fresh errors alone gave a band of 5.8e-6)."""
        return stored(jitter(values, unit)) if problem.dtype == "float32" else jitter(values, unit)

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
    update = make_update(optimizer, None if rounding is None else kept, switches, float32_jitter)
    rates = schedules.step_rates(problem.schedule, problem.learning_rate, problem.epochs,
                                 problem.optimizer_steps_per_epoch,
                                 reciprocal="staircase_by_float32_reciprocal" in switches)
    if "schedule_in_float32" in switches:
        rates = schedule_rounding(rates, problem.schedule, problem.learning_rate, rounding)
    counts_skips = switches & {"skipped_steps_counted", "schedule_counts_skipped_steps"}
    flat_rates = rates.reshape(-1)
    scaler = LossScaler(problem.loss_scale)
    scales, skipped = np.empty(problem.epochs), np.zeros(problem.epochs, dtype=np.int64)
    last_rates = np.empty(problem.epochs)
    applied = 0  # optimizer steps taken: a skipped step advances neither Adam's t nor a schedule
    history = np.empty((problem.epochs, params.size))
    losses = np.empty(problem.epochs)
    penalties = np.zeros(problem.epochs)
    def evaluate(params: np.ndarray, rows: Any, batch_size: int,
                 share: float = 1.0) -> tuple[float, np.ndarray, np.ndarray | None]:
        """The loss of `rows`, its gradient, and (with `rounding`) its terms' magnitudes.
        `share`: the replica's weight and the batch's weight in its group, where the framework
        applies them inside the backward pass (its compute-dtype cotangents, and so their
        overflow, carry them); the gradient returned is without them."""
        magnitudes = None if rounding is None and not order_decides else []
        loss, grad = loss_and_gradient(params, x[rows], y[rows], problem.has_bias, problem.reduction,
                                       problem.loss, problem.delta, None if w is None else w[rows],
                                       None if rounding is None else
                                       output_bias[rows] + offsets(len(output_bias[rows]), compute_unit),
                                       model,
                                       None if hidden_bias is None else
                                       [f[rows] + offsets(f[rows].shape, compute_unit) for f in hidden_bias],
                                       rd=rd, loss_scale=scaler.scale * share, magnitudes=magnitudes,
                                       weights_in_float32_over=batch_size
                                       if "weighted_losses_in_float32" in switches else None,
                                       probability_offsets=None if probability_bias is None else
                                       probability_bias[rows] + offsets(len(probability_bias[rows]),
                                                                        compute_unit))
        if magnitudes is None:
            return loss, grad, None
        loss_terms = magnitudes.pop()
        if rounding is not None:  # the loss's own sum, in the training dtype (autocast, Keras: float32)
            loss += unit * np.sqrt(len(y[rows])) * loss_terms * float(loss_rounding.uniform(-1.0, 1.0))
        return loss, grad, magnitudes.pop()

    order_decides = "gradient_sum_in_compute_dtype" in switches and problem.loss_scale is not None
    replicas_summed_in_compute = "replica_sum_in_compute_dtype" in switches and rd is not None
    largest = float(np.finfo(problem.compute_dtype).max) if order_decides or replicas_summed_in_compute else np.inf
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
                                           problem.steps_per_epoch)
        if "schedule_in_float32" in switches:
            batch_rates = schedule_rounding(batch_rates, problem.schedule, problem.learning_rate, rounding)
        batch_rates = batch_rates.reshape(-1)
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
                inside = len(shards) > 1 and "replica_share_after_backward" not in switches
                # the group's weight is in the backward ((loss / N).backward()), its cotangents carry it, unless
                carried = 1.0 if across_epochs else factor  # the optimizer accumulates (Keras 3, MultiSteps)
                parts = [evaluate(params, rows, len(y[batch]), (share if inside else 1.0) * carried)
                         for rows, share in zip(shards, shares)]
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
                    overflow_possible[epoch] |= scaler.scale * carried * max(share * float(np.max(part[2]))
                                                                   for share, part in zip(shares, parts)) >= largest
                finite = finite and all(bool(np.isfinite(part[1]).all()) for part in parts)
                if replicas_summed_in_compute and len(shards) > 1:
                    finite = finite and replica_sum_finite(rd, scaler.scale * carried, shares, parts, inside)
                    overflow_possible[epoch] |= len(shards) > 2 and scaler.scale * carried * float(np.max(sum(
                        abs(share * part[1]) for share, part in zip(shares, parts)))) >= largest
                batch_grads = []
                for share, rows, (_, grad, magnitude) in zip(shares, shards, parts):
                    grad = share * grad
                    if rounding is not None:  # a sum of m terms: within u sqrt(m) of the sum of their magnitudes
                        grad = grad + gradient_bias * np.sqrt(len(y[rows])) * share * magnitude
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
    GradientTape loop's compute_average_loss) the shard's share of the batch's mean, n_r / n.
    A gradient summed in the compute dtype (`gradient_sum_in_compute_dtype`) is summed per
    replica too: each replica's float16 backward pass can overflow on its own (fuzz-84113-83: the
    whole batch's sum of 91 samples overflows where each replica's 30 do not)."""
    per_replica = {"replica_losses_averaged", "clip_per_replica", "gradient_sum_in_compute_dtype"}
    if problem.replicas == 1 or not switches & per_replica:
        return [batch], [1.0]
    shards = problem.shards(batch)
    if "replica_losses_averaged" in switches:
        share = float(np.float32(1.0 / len(shards))) if "replica_scale_in_float32" in switches else 1.0 / len(shards)
        return shards, [share] * len(shards)
    size = sum(len(rows) for rows in shards)
    return shards, [len(rows) / size if problem.reduction == "mean" else 1.0 for rows in shards]


FLOAT32_POWER_UNITS = 2  # a float32 power or square root of a framework: within 2 units of the exact one


def schedule_rounding(rates: np.ndarray, schedule: dict[str, Any], learning_rate: float,
                      rounding: np.random.Generator | None) -> np.ndarray:
    """A schedule computed in float32 (formulas.py, schedule_in_float32): each of the (epochs,
    steps) rates rounded to float32; in a perturbed replay also moved as far as the float32
    arithmetic before that rounding can move it (float32_schedule_error). That error is the same
    at every run of the step, so half of it is drawn once per run (a bias) and half afresh."""
    rounded = rates.astype(np.float32).astype(np.float64)
    if rounding is None:
        return rounded
    error = float32_schedule_error(rates, schedule, learning_rate) * UNIT_ROUNDOFF["float32"]
    bias = rounding.uniform(-1.0, 1.0)
    return rounded + error * (bias + rounding.uniform(-1.0, 1.0, rates.shape)) / 2


def float32_schedule_error(rates: np.ndarray, schedule: dict[str, Any], learning_rate: float) -> np.ndarray:
    """How far, in units u of float32, a framework's float32 computation of each rate can be
    from the exact one (an absolute bound, as the rates are).

    lr * r^p (exponential, piecewise): (FLOAT32_POWER_UNITS + 1 + |ln(rate / lr)|) u relative:
    the power, the product, and p's own rounding carried through r^p as u |p ln r|.
    The cosine, lr ((1 - a) f + a) with f = (1 + cos x) / 2 and x = pi s / D (Keras's
    CosineDecay, optax's cosine_decay_schedule): x = float32(pi) * (s / D) is within 3 u x
    (pi's rounding, the quotient, the product), so cos x within 3 u x |sin x| + 2 u |cos x|
    (the function within 2 ulp), 1 + cos x within another u (1 + cos x); then (1 - a) f within
    2 u (1 - a) f, the sum with a within u (a + decayed), and the product with lr within 2 u
    of the rate. The bound is absolute: where f cancels to 0 at the end of the decay, the
    float32 rate is off by up to about u lr, however small the exact rate (fuzz-84113-243: RMSprop
    normalises the step, so those steps move a parameter near 0 by u lr each; measured for
    Keras 3.15's CosineDecay: at most 1.9 u lr during the decay, 0.2 u lr at its end). Past the
    decay (s clipped to D) the rate is a lr exactly: cos(float32(pi)) rounds to -1. A warm-up,
    lr t / W: 3 u relative."""
    with np.errstate(divide="ignore"):
        power = FLOAT32_POWER_UNITS + 1 + np.abs(np.log(np.where(rates > 0, rates / learning_rate, 1.0)))
    if schedule["kind"] != "cosine":
        return rates * power
    epochs, steps = rates.shape
    t = np.arange(epochs)[:, None] + np.zeros(steps) if schedule["every"] == "epoch" \
        else np.arange(epochs * steps, dtype=np.float64).reshape(epochs, steps)
    settings = schedule["settings"]
    warmup, decay_steps, alpha = settings["warmup_steps"], settings["decay_steps"], settings["alpha"]
    x = np.pi * np.clip(t - warmup, 0, decay_steps) / decay_steps
    f = (1 + np.cos(x)) / 2
    decayed = (1 - alpha) * f + alpha
    units = (1 - alpha) * (3 * x * np.abs(np.sin(x)) + 2 * np.abs(np.cos(x)) + 2 * f) / 2 \
        + 2 * (1 - alpha) * f + alpha + decayed
    units = np.where(t - warmup >= decay_steps, alpha + decayed, units)  # past the decay: cos(float32(pi)) = -1
    return np.where(t < warmup, 3 * rates, learning_rate * units + 2 * rates)

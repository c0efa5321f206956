"""Learning-rate schedules and gradient clipping as the case format defines them (spec v1.2):
the float64 formulas of the replay, and what each framework's call does differently.

t counts optimizer steps taken before this one (`every: step`, 0-based) or epochs completed
(`every: epoch`; the rate is constant within an epoch). lr is the optimizer's learning_rate.

    exponential   lr * decay_rate ^ (t / decay_steps)        staircase: floor(t / decay_steps)
    piecewise     values[i], i = how many boundaries are <= t  (the value changes AT a boundary)
    cosine        t < warmup_steps: lr * t / warmup_steps; then, with s = t - warmup_steps,
                  lr * ((1 - alpha) * (1 + cos(pi * min(s, decay_steps) / decay_steps)) / 2 + alpha)

Clipping applies to the gradient of the loss, before weight decay is added:

    global_norm   every gradient times min(1, c / ||g||), ||g|| over every parameter (no epsilon)
    norm          each parameter tensor (the kernel, the bias) clipped so on its own
    value         each component clamped to [-c, c]

The translations each backend makes to its framework's call are in docs/schedules.md.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

import numpy as np


def rate(schedule: dict[str, Any] | None, learning_rate: float, t: int, reciprocal: bool = False) -> float:
    """The case format's learning rate at t (steps or epochs, as `schedule["every"]` says).
    `reciprocal` (formulas.py, staircase_by_float32_reciprocal): a staircase's floor is taken of
    float32(t) * float32(1 / decay_steps), as a compiled graph computes t / decay_steps."""
    if schedule is None:
        return learning_rate
    kind, settings = schedule["kind"], schedule["settings"]
    if kind == "exponential":
        exponent = t / settings["decay_steps"]
        if settings["staircase"]:
            exponent = math.floor(np.float32(t) * (np.float32(1) / np.float32(settings["decay_steps"]))
                                  if reciprocal else exponent)
        return learning_rate * settings["decay_rate"] ** exponent
    if kind == "piecewise":
        return settings["values"][bisect_right(settings["boundaries"], t)]
    warmup = settings["warmup_steps"]
    if t < warmup:
        return learning_rate * t / warmup
    decay_steps, alpha = settings["decay_steps"], settings["alpha"]
    cosine = (1 + math.cos(math.pi * min(t - warmup, decay_steps) / decay_steps)) / 2
    return learning_rate * ((1 - alpha) * cosine + alpha)


def step_rates(schedule: dict[str, Any] | None, learning_rate: float, epochs: int, steps_per_epoch: int,
               reciprocal: bool = False) -> np.ndarray:
    """(epochs, steps_per_epoch): the rate of every optimizer step of the training."""
    if schedule is None:
        return np.full((epochs, steps_per_epoch), learning_rate)
    per_epoch = schedule is not None and schedule["every"] == "epoch"
    rates = np.empty((epochs, steps_per_epoch))
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            rates[epoch, step] = rate(schedule, learning_rate, epoch if per_epoch else epoch * steps_per_epoch + step,
                                      reciprocal)
    return rates


NORM_EPSILON = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)


def clip(gradient: np.ndarray, clipping: dict[str, Any] | None, tensors: list[slice],
         plus_epsilon: bool = False) -> np.ndarray:
    """The case format's clipped gradient of the flat parameters; `tensors` are where each
    parameter tensor (a kernel, a bias) lies in it (network.blocks). `plus_epsilon`: torch's
    formula, min(1, c / (norm + 1e-6)) times the gradient (formulas.py, clip_norm_plus_epsilon)."""
    if clipping is None:
        return gradient
    kind, threshold = clipping["kind"], clipping["threshold"]
    if kind == "value":
        return np.clip(gradient, -threshold, threshold)
    parts = [slice(0, gradient.size)] if kind == "global_norm" else tensors
    clipped = gradient.copy()
    for part in parts:
        norm = float(np.sqrt(np.sum(gradient[part] ** 2)))
        if plus_epsilon:
            clipped[part] = gradient[part] * min(1.0, threshold / (norm + NORM_EPSILON))
        elif norm > threshold:
            clipped[part] = gradient[part] * (threshold / norm)
    return clipped


def total_units(schedule: dict[str, Any], epochs: int, steps_per_epoch: int) -> int:
    """How many t values the training has: its steps, or its epochs."""
    return epochs if schedule["every"] == "epoch" else epochs * steps_per_epoch

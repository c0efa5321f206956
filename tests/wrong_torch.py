"""A pytest plugin for the harness's tests: the real `torch` backend with its optimizer made wrong
on purpose, by case name (the name's last part after '-', or the WRONG_TORCH variable):

    lr             the learning rate 1e-4 (relative) too large
    latemomentum   SGD momentum applied one step late: the step uses the buffer before this
                   step's gradient is added to it
    skip           the third optimizer step skipped
    nonesterov     SGD built with nesterov=False whatever the case asks (a dropped keyword)

Any other name trains correctly. Loaded with `-p tests.wrong_torch` in pytester runs."""

from __future__ import annotations

import dataclasses
import os

import conformance.backends.torch as backend

_train_steps = backend.train_steps
_make_optimizer = backend.make_optimizer
_make_scheduler = backend.make_scheduler
_current = {"mistake": ""}


class WrongOptimizer:
    """Wraps a real torch optimizer: zero_grad and step as the backend calls them."""

    def __init__(self, inner, mistake: str) -> None:
        self.inner, self.mistake, self.steps, self.buffers = inner, mistake, 0, {}
        if mistake == "lr":
            for group in inner.param_groups:
                group["lr"] *= 1 + 1e-4

    def __getattr__(self, name: str):  # param_groups and the rest: the real optimizer's
        return getattr(self.inner, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch

        self.steps += 1
        if self.mistake == "skip" and self.steps == 3:
            return
        if self.mistake != "latemomentum":
            self.inner.step()
            return
        with torch.no_grad():
            for group in self.inner.param_groups:
                for parameter in group["params"]:
                    buffer = self.buffers.get(parameter)
                    if buffer is not None:
                        parameter -= group["lr"] * buffer
                    gradient = parameter.grad
                    self.buffers[parameter] = gradient.clone() if buffer is None \
                        else buffer * group["momentum"] + gradient


def train_steps(problem, device, compile_step):
    _current["mistake"] = os.environ.get("WRONG_TORCH") or problem.name.rsplit("-", 1)[-1]
    return _train_steps(problem, device, compile_step)


def make_optimizer(torch, parameters, optimizer, rate_tensor=None):
    mistake = _current["mistake"]
    if mistake == "nonesterov" and optimizer.settings.get("nesterov"):
        optimizer = dataclasses.replace(optimizer, settings=optimizer.settings | {"nesterov": False})
    inner = _make_optimizer(torch, parameters, optimizer, rate_tensor)
    return WrongOptimizer(inner, mistake) if mistake in ("lr", "latemomentum", "skip") else inner


def make_scheduler(torch, optimizer, problem):
    """torch's schedulers take only a real optimizer: the one inside the wrong one."""
    return _make_scheduler(torch, getattr(optimizer, "inner", optimizer), problem)


backend.train_steps = train_steps
backend.make_optimizer = make_optimizer
backend.make_scheduler = make_scheduler

"""Mixed precision in the torch loops (the `torch` backend, torch_compile, the trainers): autocast
and the case's loss scale as PyTorch users write them, and what each run records of it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from conformance.backends import Unavailable, _frameworks
from conformance.problem import Problem


class MixedPrecision:
    """`problem.precision` as PyTorch users write it: float32 parameters, `torch.autocast` around
    the forward pass and the loss module, and the case's loss scale.

    - dynamic: `torch.amp.GradScaler` with every setting passed (the device too: without it the
      scaler is disabled on a CPU-only torch); `scale(loss).backward()`, `unscale_`, the clip,
      `step`, `update`. Its `step` skips the optimizer on a non-finite gradient; the loop still
      steps the scheduler every iteration (torch's recipe; the replay's schedule counts applied
      steps only).
    - fixed: GradScaler has no fixed mode, so `(loss * S).backward()` and every gradient divided
      by S before the clip and the step.

    Per epoch it records the scaler's own scale after the last `update()` and the steps skipped
    (the scale fell at `update()`: read before and after the step, outside it, so that a
    compiled step is read alike). Raises Unavailable when autocast or the scaler does not work on
    this device (`_unsupported`).
    """

    def __init__(self, torch: Any, problem: Problem, device: str) -> None:
        self.torch, self.problem = torch, problem
        self.device_type = torch.device(device).type
        self.compute = getattr(torch, problem.compute_dtype)
        reason = _unsupported(device, problem.compute_dtype, problem.dynamic_scaling)
        if reason is not None:
            raise Unavailable(reason)
        settings = problem.loss_scale
        self.scaler = None
        if problem.dynamic_scaling:
            self.passed = {"device": self.device_type, "init_scale": settings["initial"], "growth_factor": 2.0,
                           "backoff_factor": 0.5, "growth_interval": settings["growth_interval"]}
            self.scaler = torch.amp.GradScaler(**self.passed)
        else:
            self.passed = None if settings is None else {"scale": settings["scale"]}
        self.scales: list[float] = []
        self.skips: list[int] = []
        self.epoch_skips = 0

    def autocast(self) -> Any:
        return self.torch.autocast(self.device_type, dtype=self.compute)

    def backward_and_step(self, loss: Any, optimizer: Any, parameters: list[Any], clip: Callable[[], None]) -> None:
        """Backward, unscale, clip and step, with the case's loss scale."""
        self.backward(loss)
        self.step(optimizer, parameters, clip)

    def backward(self, loss: Any) -> None:
        """The scaled loss's backward pass (gradient accumulation: once per batch of a group)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        elif self.passed is None:
            loss.backward()
        else:
            (loss * self.passed["scale"]).backward()

    def step(self, optimizer: Any, parameters: list[Any], clip: Callable[[], None]) -> None:
        """Unscale, clip and step the gradients summed so far (once per optimizer step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            clip()
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        if self.passed is not None:
            for parameter in parameters:
                parameter.grad.div_(self.passed["scale"])
        clip()
        optimizer.step()

    def scale(self) -> float | None:
        """The scaler's scale now (before a step); None without a dynamic scale."""
        return None if self.scaler is None else self.scaler.get_scale()

    def count_skip(self, before: float | None) -> None:
        """After a step: it was skipped if the scaler's scale fell at its `update()`."""
        if before is not None and self.scaler.get_scale() < before:
            self.epoch_skips += 1

    def end_epoch(self) -> None:
        if self.passed is not None:
            self.scales.append(self.passed["scale"] if self.scaler is None else self.scaler.get_scale())
            self.skips.append(self.epoch_skips)
        self.epoch_skips = 0

    def recorded(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Trajectory.loss_scale and .skipped: per epoch; None without a loss scale."""
        if self.passed is None:
            return None, None
        return np.asarray(self.scales, dtype=np.float64), np.asarray(self.skips, dtype=np.int64)

    def describe(self, model: Any, loss_function: Any, x_batch: Any, y_batch: Any, weight: Any) -> dict[str, Any]:
        """info["precision"]: the dtypes of this run's tensors (the output and the loss from one
        more forward pass on the first batch, the gradient the optimizer got last), the scaler's
        settings as passed, and the calls."""
        with self.torch.no_grad(), self.autocast():
            output = model(x_batch)
            loss = loss_function(output, y_batch)
        name = self.problem.compute_dtype
        scaling = "no loss scale"
        if self.scaler is not None:
            scaling = (f"torch.amp.GradScaler({self.device_type!r}, ...): scale(loss).backward(), unscale_, clip, "
                       "step, update")
        elif self.passed is not None:
            scaling = "(loss * S).backward(), grad.div_(S) (GradScaler has no fixed mode)"
        return {"precision": self.problem.precision, "compute_dtype": name,
                "output_dtype": _dtype_name(output), "loss_dtype": _dtype_name(loss),
                "gradient_dtype": _dtype_name(weight.grad), "variable_dtype": _dtype_name(weight),
                "loss_scale": self.passed, "lowering": "x @ W + b rounded once (addmm), then the activation",
                "api": f"torch.autocast({self.device_type!r}, dtype=torch.{name}) around model and loss module; "
                       f"{scaling}"}


@contextlib.contextmanager
def float16_probabilities_refused(problem: Problem) -> Iterator[None]:
    """Unavailable, with torch's own reason, when training stops on NaN probabilities from
    BCELoss under float16 autocast: its backward divides by max(p (1 - p), 1e-12), and 1e-12
    is 0 in float16, so a probability rounded to 1 gives a NaN gradient for a label 0 (0 for a
    label 1); no loss scale skips the step, the parameters go NaN and the next forward's BCELoss
    refuses its input (fuzz-40961-148). PyTorch documents BCELoss as unsafe to autocast
    (docs/stable/amp.html, "Prefer binary_cross_entropy_with_logits over binary_cross_entropy")
    and refuses it in autocast regions on CUDA; on the CPU it computes it in float16."""
    try:
        yield
    except RuntimeError as error:
        probabilities = problem.loss == "bce" and not problem.from_logits
        if probabilities and problem.compute_dtype == "float16" and "should be between 0 and 1" in str(error):
            raise Unavailable(
                "torch's BCELoss on float16 probabilities under autocast: a probability that rounds to 1 gives a "
                "NaN gradient (its backward's 1e-12 is 0 in float16), the parameters go NaN and BCELoss then "
                "refuses its input; PyTorch documents BCELoss as unsafe to autocast (it refuses it on CUDA) and "
                "recommends BCEWithLogitsLoss (loss bce with from_logits: true)") from error
        raise


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@functools.cache
def _unsupported(device: str, compute: str, dynamic: bool) -> str | None:
    """None, or why mixed precision cannot run on `device`: autocast disables itself (with a
    warning) for a dtype the device does not support, so a `Linear`'s output dtype inside it
    tells; GradScaler disables itself on a device without its kernels, so `is_enabled()` and one
    scale / unscale_ / step / update tell."""
    torch = _frameworks.torch()
    device_type, dtype = torch.device(device).type, getattr(torch, compute)
    layer = torch.nn.Linear(2, 1, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=dtype):
                output = layer(torch.ones(1, 2, device=device))
        except RuntimeError as error:
            return f"torch.autocast({device_type!r}, dtype=torch.{compute}) failed: {str(error).splitlines()[0]}"
    if output.dtype != dtype:
        said = "; ".join(" ".join(str(warning.message).split()) for warning in caught)
        return (f"torch.autocast({device_type!r}, dtype=torch.{compute}) does not lower here: a Linear's output is "
                f"{output.dtype}" + (f" ({said})" if said else ""))
    if not dynamic:
        return None
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=1)
    if not scaler.is_enabled():
        return f"torch.amp.GradScaler({device_type!r}) is disabled on this device"
    try:
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
        scaler.scale(output.float().sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    except (RuntimeError, NotImplementedError) as error:
        return f"torch.amp.GradScaler({device_type!r}) failed: {str(error).splitlines()[0]}"
    return None

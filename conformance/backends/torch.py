"""PyTorch: `nn.Linear` (or an `nn.Sequential` of them with activation modules), the case's loss
module (`MSELoss`, `HuberLoss`, `BCEWithLogitsLoss` or `BCELoss`) and `torch.optim`: the loop its
tutorials write. Mixed precision: `torch.autocast` and `torch.amp.GradScaler` (MixedPrecision).
Replicas > 1: the same loop in one process per replica under `DistributedDataParallel` (_torch_ddp)."""

from __future__ import annotations

import bisect
import contextlib
import time
from typing import Any

import numpy as np

from conformance.backends import _frameworks, _torch_ddp, _torch_precision
from conformance.problem import Optimizer, Problem, Trajectory

NAME = "torch"
LOOKED_FOR = ("cpu", "cuda", "mps")  # device kinds asked of torch: cuda:N, mps
DATA_PARALLEL = True  # DistributedDataParallel, one process per replica (conformance/backends/_torch_ddp.py)
ACCUMULATES = True  # the idiom of its tutorials: (loss / N).backward(), a step every N batches and at the epoch's end


def available() -> str | None:
    return None if _frameworks.installed("torch") else "torch is not installed"


def devices() -> list[str]:
    torch = _frameworks.torch()
    found = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def device_name(device: str) -> str:
    """What the device is, as torch names it (the GPU model for CUDA)."""
    torch = _frameworks.torch()
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(int(device.split(":")[1])))
    return "Apple MPS" if device == "mps" else _frameworks.cpu_name()


def train(problem: Problem, device: str) -> Trajectory:
    if problem.replicas > 1:
        return _torch_ddp.train(NAME, problem, device)
    with _torch_precision.float16_probabilities_refused(problem):
        return train_steps(problem, device, compile_step=None)


def train_replica(problem: Problem, device: str, replica: Any) -> Trajectory:
    """One rank's part of a data-parallel case (called in its process by _torch_ddp)."""
    return train_steps(problem, device, compile_step=None, replica=replica)


def train_steps(problem: Problem, device: str, compile_step: Any, replica: Any = None) -> Trajectory:
    """The tutorial loop; `compile_step`, when given, wraps the training step (torch.compile).

    Returns the trajectory; `info` gets each epoch's wall time under "epoch_seconds" only when
    the step is compiled (the caller derives the compile time from it). `replica` (a
    _torch_ddp.Replica, in one rank's process of a process group): the model is wrapped in
    DistributedDataParallel, each step trains this rank's shard, and `info["shard_losses"]`
    keeps this rank's loss of every step (the caller combines the ranks' into batch losses).
    """
    torch = _frameworks.torch()
    dtype = getattr(torch, problem.dtype)
    x = torch.as_tensor(problem.x, device=device)
    y = torch.as_tensor(problem.y, device=device).reshape(-1, 1)
    model, linears = build_model(torch, problem, device, dtype)
    forward = model if replica is None else replica.wrap(torch, model, device)
    parameters = list(model.parameters())
    # A compiled step reads the learning rate as a tensor: with a Python float, every new rate
    # of a schedule is a new constant and recompiles the step (PyTorch's tutorial "Running the
    # compiled optimizer with an LR scheduler"). The tensor has the parameters' dtype.
    rate_tensor = dtype if compile_step is not None and problem.schedule is not None else None
    optimizer = make_optimizer(torch, model.parameters(), problem.optimizer, rate_tensor)
    scheduler = make_scheduler(torch, optimizer, problem)
    weighted = problem.sample_weight is not None
    # With sample weights, the weighted mean (or sum) people write by hand: the loss module
    # per sample (reduction="none"), times the weights, then mean over the batch (or sum).
    loss_function = loss_module(torch, problem, "none" if weighted else problem.reduction)
    w = torch.as_tensor(problem.sample_weight, device=device).reshape(-1, 1) if weighted else None

    def batch_loss(x_batch: Any, y_batch: Any, w_batch: Any) -> Any:
        loss = loss_function(forward(x_batch), y_batch)
        if w_batch is not None:
            loss = (loss * w_batch).mean() if problem.reduction == "mean" else (loss * w_batch).sum()
        return loss

    def step(x_batch: Any, y_batch: Any, w_batch: Any = None) -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(x_batch, y_batch, w_batch)
        loss.backward()
        clip_gradients(torch, parameters, problem.clip)
        optimizer.step()
        return loss.detach()

    mixed = None if problem.precision is None else _torch_precision.MixedPrecision(torch, problem, device)

    def clip() -> None:
        """The case's clip of the (unscaled) gradients: under mixed precision, between unscale_ and step."""
        clip_gradients(torch, parameters, problem.clip)

    def mixed_step(x_batch: Any, y_batch: Any, w_batch: Any = None) -> Any:
        optimizer.zero_grad(set_to_none=True)
        with mixed.autocast():
            loss = batch_loss(x_batch, y_batch, w_batch)
        mixed.backward_and_step(loss, optimizer, parameters, clip)
        return loss.detach()

    def accumulating_step(x_batch: Any, y_batch: Any, w_batch: Any = None) -> Any:
        """One batch of a group: (loss / N).backward(), the gradients summed in .grad."""
        with contextlib.nullcontext() if mixed is None else mixed.autocast():
            loss = batch_loss(x_batch, y_batch, w_batch)
        if mixed is None:
            (loss / problem.accumulate).backward()
        else:
            mixed.backward(loss / problem.accumulate)
        return loss.detach()

    def optimizer_step() -> None:
        """The group's one step: unscale, clip and step once (the gradients are zeroed before the
        group's first batch)."""
        if mixed is None:
            clip_gradients(torch, parameters, problem.clip)
            optimizer.step()
        else:
            mixed.step(optimizer, parameters, clip)

    chosen = step if mixed is None else mixed_step
    if problem.accumulate > 1:
        chosen = accumulating_step
    run_step = chosen if compile_step is None else compile_step(chosen)
    # Compiled, the accumulating step holds the forward and backward passes only: the group's
    # optimizer step is compiled on its own (PyTorch's "compiled optimizer" recipe), so that the
    # update is the compiled optimizer's, as in the step that holds both.
    apply_step = optimizer_step if compile_step is None or problem.accumulate == 1 else compile_step(optimizer_step)
    orders = None if problem.orders is None else torch.as_tensor(problem.orders, device=device)
    params, step_losses, rates = _Stacked(torch), _Stacked(torch), []
    ends = [time.perf_counter()]
    last_start = (problem.steps_per_epoch - 1) * problem.batch_size
    for epoch in range(problem.epochs):
        for index, start in enumerate(range(0, problem.n, problem.batch_size)):
            rows = slice(start, start + problem.batch_size) if orders is None \
                else orders[epoch, start:start + problem.batch_size]
            if replica is not None:
                rows = replica.rows(torch, problem, epoch, start, device)
            if scheduler is not None and start == last_start:
                rates.append(float(optimizer.param_groups[0]["lr"]))
            steps = (index + 1) % problem.accumulate == 0 or start == last_start  # an optimizer step now
            scale = None if mixed is None else mixed.scale()
            if problem.accumulate > 1 and index % problem.accumulate == 0:
                optimizer.zero_grad(set_to_none=True)
            # DistributedDataParallel's idiom: no all-reduce on a group's accumulating batches
            # (model.no_sync()); the group's last backward all-reduces the summed gradients.
            with forward.no_sync() if replica is not None and not steps else contextlib.nullcontext():
                step_losses.add(run_step(x[rows], y[rows], w[rows]) if weighted else run_step(x[rows], y[rows]))
            if problem.accumulate > 1 and steps:
                apply_step()
            if mixed is not None and steps:
                mixed.count_skip(scale)
            if scheduler is not None and not problem.schedule_every_epoch and steps:
                scheduler.step()
        if scheduler is not None and problem.schedule_every_epoch:
            scheduler.step()
        params.add(flat_parameters(torch, linears))
        if mixed is not None:
            mixed.end_epoch()
        if compile_step is not None:
            ends.append(time.perf_counter())
    predictions = None
    if problem.predict_x is not None:
        with torch.no_grad():
            outputs = model(torch.as_tensor(problem.predict_x, device=device))
            if problem.loss == "bce" and problem.from_logits:  # `predict` compares probabilities
                outputs = torch.sigmoid(outputs)
            predictions = outputs[:, 0].cpu().double().numpy()
    info = _environment(torch, device, linears[0].weight)
    if replica is not None:
        info["shard_losses"] = step_losses.numpy()
    if compile_step is not None:
        info["epoch_seconds"] = np.diff(ends)
    if scheduler is not None:
        info["scheduler"] = _describe(scheduler)
    trajectory = Trajectory(params.numpy(), problem.epoch_losses(step_losses.numpy()), predictions, info,
                            rates=np.asarray(rates) if scheduler is not None else None)
    if mixed is not None:
        first = slice(0, problem.batch_size) if orders is None else orders[0, :problem.batch_size]
        info["precision"] = mixed.describe(model, loss_function, x[first], y[first], linears[0].weight)
        trajectory.loss_scale, trajectory.skipped = mixed.recorded()
    return trajectory


def build_model(torch: Any, problem: Problem, device: str, dtype: Any) -> tuple[Any, list[Any]]:
    """The model as PyTorch users write it, and its `nn.Linear` layers: the one `Linear` of the
    v1 model, or an `nn.Sequential` of `Linear`s and activation modules (a `Sigmoid` last for
    `bce` on probabilities). Each `Linear` gets the harness's parameters: `weight` (units,
    inputs) is the transpose of the harness's kernel."""
    linears, modules = [], []
    for layer, kernel, bias in problem.initial_layers():
        linear = torch.nn.Linear(layer.inputs, layer.units, bias=layer.bias, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(kernel.T))
            if bias is not None:
                linear.bias.copy_(torch.as_tensor(bias))
        linears.append(linear)
        modules.append(linear)
        if layer.name != "output":
            modules.append(activation_module(torch, layer.activation, layer.settings))
    if problem.loss == "bce" and not problem.from_logits:
        modules.append(torch.nn.Sigmoid())
    return (modules[0] if len(modules) == 1 else torch.nn.Sequential(*modules)), linears


def activation_module(torch: Any, name: str, settings: dict[str, Any] | None) -> Any:
    """The `torch.nn` module of an activation, every setting explicit (torch's `Softplus`
    keeps its default threshold of 20, above which it returns its input: a finding)."""
    nn = torch.nn
    if name == "gelu":
        return nn.GELU(approximate="tanh" if settings["approximate"] else "none")
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope=settings["negative_slope"], inplace=False)
    if name == "elu":
        return nn.ELU(alpha=settings["alpha"], inplace=False)
    return {"linear": lambda: nn.Identity(), "relu": lambda: nn.ReLU(inplace=False), "tanh": lambda: nn.Tanh(),
            "sigmoid": lambda: nn.Sigmoid(), "softplus": lambda: nn.Softplus(beta=1.0, threshold=20.0),
            "silu": lambda: nn.SiLU(inplace=False)}[name]()


def flat_parameters(torch: Any, linears: list[Any]) -> Any:
    """Every parameter in the harness's layout: each kernel as (inputs, units), then its bias."""
    parts = []
    for linear in linears:
        parts.append(linear.weight.detach().t().reshape(-1))
        if linear.bias is not None:
            parts.append(linear.bias.detach())
    return torch.cat(parts)


def loss_module(torch: Any, problem: Problem, reduction: str) -> Any:
    """The case's loss as the PyTorch module its users pick, every setting explicit."""
    if problem.loss == "huber":
        return torch.nn.HuberLoss(reduction=reduction, delta=problem.delta)
    if problem.loss == "bce":
        return torch.nn.BCEWithLogitsLoss(reduction=reduction) if problem.from_logits \
            else torch.nn.BCELoss(reduction=reduction)
    return torch.nn.MSELoss(reduction=reduction)


class _Stacked:
    """Tensors recorded during training, kept on the device and stacked in chunks.

    Appending a detached tensor costs far less than writing into a preallocated one (no
    indexing op per step), and chunking bounds the number of live tensor objects.
    """

    CHUNK = 1024

    def __init__(self, torch: Any) -> None:
        self.torch, self.pending, self.chunks = torch, [], []

    def add(self, tensor: Any) -> None:
        self.pending.append(tensor)
        if len(self.pending) == self.CHUNK:
            self.chunks.append(self.torch.stack(self.pending))
            self.pending = []

    def numpy(self) -> np.ndarray:
        if self.pending:
            self.chunks.append(self.torch.stack(self.pending))
            self.pending = []
        return self.torch.cat(self.chunks).cpu().double().numpy()


def make_optimizer(torch: Any, parameters: Any, optimizer: Optimizer, rate_tensor: Any = None) -> Any:
    """A torch optimizer with every hyperparameter passed explicitly (foreach off: one code path).

    torch's own defaults differ from the case format's (RMSprop alpha 0.99, not 0.9), so none
    is left to torch. The formulas are in conformance/optimizers.py. `rate_tensor`, a dtype:
    the learning rate as a tensor of it (for a compiled step under a schedule).
    """
    settings = optimizer.settings
    rate = settings["learning_rate"]
    if rate_tensor is not None:
        rate = torch.tensor(rate, dtype=rate_tensor)
    common = {"lr": rate, "weight_decay": settings.get("weight_decay", 0.0),
              "foreach": False, "maximize": False}
    if optimizer.name == "sgd":
        return torch.optim.SGD(parameters, momentum=settings["momentum"], dampening=0.0,
                               nesterov=settings["nesterov"], **common)
    if optimizer.name == "adam":
        return torch.optim.Adam(parameters, betas=(settings["beta_1"], settings["beta_2"]), eps=settings["epsilon"],
                                amsgrad=settings["amsgrad"], **common)
    if optimizer.name == "rmsprop":
        return torch.optim.RMSprop(parameters, alpha=settings["rho"], eps=settings["epsilon"],
                                   momentum=settings["momentum"], centered=settings["centered"], **common)
    if optimizer.name == "adagrad":
        return torch.optim.Adagrad(parameters, lr_decay=0.0, eps=settings["epsilon"],
                                   initial_accumulator_value=settings["initial_accumulator_value"], **common)
    raise NotImplementedError(f"optimizer {optimizer.name} is not supported by the torch backend")


def make_scheduler(torch: Any, optimizer: Any, problem: Problem) -> Any:
    """The case's schedule as `torch.optim.lr_scheduler` schedulers, stepped by the loop after
    every optimizer step (every: step) or every epoch. The translations (docs/schedules.md):

    - exponential: `StepLR(step_size=decay_steps, gamma=decay_rate)` with staircase, else
      `ExponentialLR(gamma=decay_rate ** (1 / decay_steps))` (torch multiplies every step);
    - piecewise: `MultiStepLR(milestones=boundaries, gamma)` where the values fall by one
      ratio, else `LambdaLR` of values[i] / values[0] (torch has no piecewise of any values);
    - cosine: `CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * lr)`, then `ConstantLR`
      holding eta_min (CosineAnnealingLR rises again after T_max, the case format stays), after
      a warm-up of `LambdaLR(t / warmup_steps)` (`LinearLR` cannot start at 0), joined by
      `SequentialLR`.
    """
    if problem.schedule is None:
        return None
    schedulers = torch.optim.lr_scheduler
    kind, settings = problem.schedule["kind"], problem.schedule["settings"]
    if kind == "exponential":
        if settings["staircase"]:
            return schedulers.StepLR(optimizer, step_size=settings["decay_steps"], gamma=settings["decay_rate"])
        return schedulers.ExponentialLR(optimizer, gamma=settings["decay_rate"] ** (1 / settings["decay_steps"]))
    if kind == "piecewise":
        values, boundaries = settings["values"], settings["boundaries"]
        ratios = [later / earlier for earlier, later in zip(values, values[1:])]
        if all(abs(ratio - ratios[0]) <= 1e-12 * ratios[0] for ratio in ratios):
            return schedulers.MultiStepLR(optimizer, milestones=boundaries, gamma=ratios[0])
        return schedulers.LambdaLR(optimizer, lambda t: values[bisect.bisect_right(boundaries, t)] / values[0])
    warmup, decay_steps, alpha = settings["warmup_steps"], settings["decay_steps"], settings["alpha"]
    parts = [schedulers.LambdaLR(optimizer, lambda t: t / warmup)] if warmup else []
    parts += [schedulers.CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=alpha * problem.learning_rate),
              schedulers.ConstantLR(optimizer, factor=alpha,
                                    total_iters=problem.epochs * problem.optimizer_steps_per_epoch + 1)]
    return schedulers.SequentialLR(optimizer, parts, milestones=[warmup, warmup + decay_steps][-len(parts) + 1:])


def clip_gradients(torch: Any, parameters: list[Any], clip: dict[str, Any] | None) -> None:
    """The case's clipping with torch.nn.utils, between backward() and step(): clip_grad_norm_
    over every parameter (global_norm) or over each on its own (norm), or clip_grad_value_."""
    if clip is None:
        return
    utils, threshold = torch.nn.utils, clip["threshold"]
    if clip["kind"] == "value":
        utils.clip_grad_value_(parameters, clip_value=threshold, foreach=False)
        return
    groups = [parameters] if clip["kind"] == "global_norm" else [[parameter] for parameter in parameters]
    for group in groups:
        utils.clip_grad_norm_(group, max_norm=threshold, norm_type=2.0, error_if_nonfinite=False, foreach=False)


def _describe(scheduler: Any) -> str:
    inner = getattr(scheduler, "_schedulers", None)
    name = type(scheduler).__name__
    return f"{name}({', '.join(type(part).__name__ for part in inner)})" if inner else name


def _environment(torch: Any, device: str, weight: Any) -> dict[str, Any]:
    """Versions and numerics settings, and where torch says the trained weight lives."""
    details: dict[str, Any] = {"torch": torch.__version__, "placed_on": str(weight.device)}
    details |= _frameworks.torch_settings()
    if device.startswith("cuda"):
        details["device_name"] = torch.cuda.get_device_name(torch.device(device))
        details["cuda"] = torch.version.cuda
    return details

"""What the two trainer backends (`lightning`, `accelerate`) share: the harness's batches as a
`DataLoader` in the harness's order, the case's model, loss, optimizer and scheduler as the
torch backend builds them (a trainer runs the same PyTorch objects; what it adds is the loop),
and the records a trajectory needs.

The trainers' own loops decide when to step, scale, clip and schedule; nothing here steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.backends import Unavailable, _frameworks, _torch_precision
from conformance.backends import torch as torch_backend
from conformance.problem import Problem, Trajectory


def availability(module: str, distribution: str) -> str | None:
    """A trainer backend's `available()`: None, or which package is missing."""
    if not _frameworks.installed("torch"):
        return "torch is not installed"
    if not _frameworks.installed(module):
        return f"{distribution} is not installed (pip install '.[trainers]')"
    return None


def devices() -> list[str]:
    """One process on the CPU (accelerators and several processes are not built yet)."""
    return ["cpu"]


def device_name(device: str) -> str:
    return torch_backend.device_name(device)


def refuse_unbuilt(problem: Problem, trainer: str) -> None:
    """Unavailable, with the reason, for what this trainer backend does not train."""
    if problem.loss_scale is not None and problem.loss_scale["kind"] == "fixed":
        raise Unavailable(f"{trainer} scales a float16 loss only through torch.amp.GradScaler, which has no fixed "
                          "scale (a dynamic one halves on overflow)")
    if problem.clip is not None and problem.clip["kind"] == "norm":
        raise Unavailable(f"{trainer} clips by the global norm or by value; the case's per-tensor norm clipping "
                          "(clip: norm) has no trainer argument")


class ScaleRecords:
    """A trainer's float16 training as the torch backend records its own: the case's GradScaler
    (_torch_precision.MixedPrecision: every setting passed; disabled without a loss scale), the scale at
    each epoch's end and the steps skipped (the scale fell across a batch)."""

    def __init__(self, problem: Problem) -> None:
        self.torch = _frameworks.torch()
        self.mixed = _torch_precision.MixedPrecision(self.torch, problem, "cpu")
        self.scaler = self.mixed.scaler or self.torch.amp.GradScaler("cpu", enabled=False)
        self.before: float | None = None

    def before_batch(self) -> None:
        self.before = self.mixed.scale()

    def after_batch(self) -> None:
        self.mixed.count_skip(self.before)

    def end_epoch(self) -> None:
        self.mixed.end_epoch()

    def scaler_calls(self) -> str:
        if self.mixed.scaler is None:
            return "GradScaler(enabled=False): no loss scale"
        return "scaler.scale(loss).backward(), unscale_, clip, scaler.step, scaler.update"

    def record(self, trajectory: Trajectory, setup: Setup, api: str) -> None:
        """The trajectory's loss scales and skips, and info["precision"] with the trainer's calls."""
        x, y = self.torch.as_tensor(setup.problem.x[:setup.problem.batch_size]), \
            self.torch.as_tensor(setup.problem.y[:setup.problem.batch_size]).reshape(-1, 1)
        trajectory.info["precision"] = self.mixed.describe(setup.model, setup.loss_function, x, y,
                                                           setup.linears[0].weight) | {"api": api}
        trajectory.loss_scale, trajectory.skipped = self.mixed.recorded()


class EpochBatches:
    """A batch sampler yielding the harness's batches of each epoch in order: epoch k's on the
    k-th iteration (the trainers iterate their DataLoader once per epoch)."""

    def __init__(self, problem: Problem, rank: int | None = None) -> None:
        self.problem, self.rank, self.epoch = problem, rank, 0

    def __iter__(self) -> Any:
        epoch = min(self.epoch, self.problem.epochs - 1)
        self.epoch += 1
        for batch in self.problem.batches(epoch):
            rows = np.arange(self.problem.n)[batch] if isinstance(batch, slice) else batch
            yield (rows if self.rank is None else self.problem.shards(rows)[self.rank]).tolist()

    def __len__(self) -> int:
        return self.problem.steps_per_epoch


class Setup:
    """The torch objects of one training: model, optimizer, scheduler, loss and data."""

    def __init__(self, problem: Problem, device: str, replica: Any = None) -> None:
        torch = self.torch = _frameworks.torch()
        self.problem = problem
        dtype = getattr(torch, problem.dtype)
        self.model, self.linears = torch_backend.build_model(torch, problem, device, dtype)
        self.optimizer = torch_backend.make_optimizer(torch, self.model.parameters(), problem.optimizer)
        self.scheduler = torch_backend.make_scheduler(torch, self.optimizer, problem)
        self.weighted = problem.sample_weight is not None
        self.loss_function = torch_backend.loss_module(torch, problem, "none" if self.weighted else problem.reduction)
        x = torch.as_tensor(problem.x)
        y = torch.as_tensor(problem.y).reshape(-1, 1)
        w = torch.as_tensor(problem.sample_weight).reshape(-1, 1) if self.weighted else torch.ones_like(y)
        self.replica = replica
        sampler = EpochBatches(problem, None if replica is None else replica.rank)
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, w), batch_sampler=sampler,
                                                  num_workers=0)
        self.step_losses: list[Any] = []
        self.params: list[np.ndarray] = []
        self.rates: list[float] = []

    def loss(self, output: Any, y_batch: Any, w_batch: Any) -> Any:
        """The batch's loss as the torch backend writes it (sample weights by hand)."""
        loss = self.loss_function(output, y_batch)
        if self.weighted:
            loss = (loss * w_batch).mean() if self.problem.reduction == "mean" else (loss * w_batch).sum()
        return loss

    def record_rate(self, batch_index: int) -> None:
        """Before the epoch's last batch: the rate its step uses (with a schedule)."""
        if self.scheduler is not None and batch_index == self.problem.steps_per_epoch - 1:
            self.rates.append(float(self.optimizer.param_groups[0]["lr"]))

    def record_epoch(self) -> None:
        self.params.append(torch_backend.flat_parameters(self.torch, self.linears).cpu().double().numpy())

    def trajectory(self, info: dict[str, Any]) -> Trajectory:
        torch, problem = self.torch, self.problem
        predictions = None
        if problem.predict_x is not None:
            with torch.no_grad():
                outputs = self.model(torch.as_tensor(problem.predict_x))
                if problem.loss == "bce" and problem.from_logits:
                    outputs = torch.sigmoid(outputs)
                predictions = outputs[:, 0].cpu().double().numpy()
        losses = np.array([float(loss) for loss in self.step_losses])
        info = torch_backend._environment(torch, "cpu", self.linears[0].weight) | info
        if self.scheduler is not None:
            info["scheduler"] = torch_backend._describe(self.scheduler)
        if self.replica is not None:  # this rank's loss of every step (_torch_ddp combines the ranks')
            info["shard_losses"] = losses
        return Trajectory(np.array(self.params), problem.epoch_losses(losses), predictions, info,
                          rates=np.asarray(self.rates) if self.scheduler is not None else None)

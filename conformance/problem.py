"""One training problem as plain NumPy: what every backend and the float64 replay receive.

The harness decides every number here (data rounded to the training dtype, initial
parameters, the order of samples in each epoch, every optimizer hyperparameter), so that
backends differ only in how their framework does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from conformance import network

SUPPORTED_OPTIMIZERS = ("sgd", "adam", "rmsprop", "adagrad")
MAX_STEPS = 20_000_000  # Keras at ~0.4 ms a step: over 2 hours per backend and device


@dataclass(frozen=True)
class Optimizer:
    """An optimizer with every hyperparameter resolved (the case's value or the format's default)."""

    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs, numpy in; arrays are already in the training dtype."""

    name: str
    x: np.ndarray
    y: np.ndarray
    init_weights: np.ndarray
    init_bias: np.ndarray | None
    epochs: int
    batch_size: int
    orders: np.ndarray | None
    reduction: str
    optimizer: Optimizer
    dtype: str
    predict_x: np.ndarray | None = None
    loss: str = "mse"  # "mse" (per sample r^2), "huber" or "bce"
    delta: float = 1.0  # huber's delta
    from_logits: bool = True  # bce: the model outputs logits (else a sigmoid, and the probability loss)
    sample_weight: np.ndarray | None = None  # per sample, in the training dtype; None: all 1
    # v1.2, as plain data (conformance/schedules.py): {"kind", "settings", "every"} and {"kind", "threshold"}
    schedule: dict[str, Any] | None = None
    clip: dict[str, Any] | None = None
    # v1.2 hidden layers, as plain data: [{"units", "activation", "settings"}], and their initial
    # parameters [{"kernel": (inputs, units), "bias": (units,) or None}] in the training dtype;
    # init_weights and init_bias are then the output layer's
    hidden: list[dict[str, Any]] | None = None
    init_hidden: list[dict[str, Any]] | None = None
    # v1.2 mixed precision: "mixed_bfloat16" | "mixed_float16" (variables stay in `dtype`,
    # float32); loss_scale as plain data: {"kind": "fixed", "scale": S} or
    # {"kind": "dynamic", "initial": S0, "growth_interval": G} (growth x2, backoff x0.5)
    precision: str | None = None
    loss_scale: dict[str, Any] | None = None
    # v1.2 data parallelism: each step's batch is split into `replicas` contiguous shards
    replicas: int = 1
    # v1.3 gradient accumulation: one optimizer step every `accumulate` batches of an epoch
    accumulate: int = 1

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def features(self) -> int:
        return self.x.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.init_bias is not None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per `accumulate` batches, an epoch's partial last group one more."""
        return -(-self.steps_per_epoch // self.accumulate)

    def groups(self, epoch: int) -> Iterator[list[np.ndarray | slice]]:
        """The batches of each optimizer step of an epoch: `accumulate` consecutive ones, the
        last group shorter when the epoch's batches are not a multiple of it (never joining the
        next epoch's, the case format's rule)."""
        batches = list(self.batches(epoch))
        for start in range(0, len(batches), self.accumulate):
            yield batches[start:start + self.accumulate]

    def step_groups(self, across_epochs: bool = False) -> Iterator[list[tuple[int, np.ndarray | slice]]]:
        """Every optimizer step's batches over the whole training, each with its epoch: `groups`
        epoch by epoch, or `across_epochs` (an optimizer that counts batches and knows no epochs)
        consecutive runs of `accumulate` batches of the whole training, the last one possibly
        short (its batches train no step)."""
        if not across_epochs:
            for epoch in range(self.epochs):
                for group in self.groups(epoch):
                    yield [(epoch, batch) for batch in group]
            return
        pending: list[tuple[int, np.ndarray | slice]] = []
        for epoch in range(self.epochs):
            for batch in self.batches(epoch):
                pending.append((epoch, batch))
                if len(pending) == self.accumulate:
                    yield pending
                    pending = []
        if pending:
            yield pending

    @property
    def batch_sizes(self) -> list[int]:
        """The distinct sizes of the case's steps: the full batch, and a shorter last one if any."""
        full, last = divmod(self.n, self.batch_size)
        return ([self.batch_size] if full else []) + ([last] if last else [])

    def batches(self, epoch: int) -> Iterator[np.ndarray | slice]:
        """The samples of each step of an epoch: slices in file order, or index arrays when shuffled."""
        for step in range(self.steps_per_epoch):
            yield self.batch(epoch, step)

    def batch(self, epoch: int, step: int) -> np.ndarray | slice:
        """The samples of one step: a slice in file order, or an index array when shuffled."""
        start = step * self.batch_size
        stop = min(start + self.batch_size, self.n)
        return slice(start, stop) if self.orders is None else self.orders[epoch, start:stop]

    def shards(self, batch: np.ndarray | slice) -> list[np.ndarray]:
        """One step's samples split over the replicas: contiguous, as even as possible, the first
        shards one sample larger (the case format's rule; every backend feeds replica r shard r)."""
        indices = np.arange(self.n)[batch] if isinstance(batch, slice) else np.asarray(batch)
        return np.array_split(indices, self.replicas)

    def epoch_losses(self, step_losses: np.ndarray) -> np.ndarray:
        """Each epoch's loss from its steps' batch losses: weighted by batch size, over n, as
        Keras's history reports it (the backends that record per step use this)."""
        sizes = np.diff(np.append(np.arange(0, self.n, self.batch_size), self.n))
        return np.asarray(step_losses, dtype=np.float64).reshape(self.epochs, len(sizes)) @ sizes / self.n

    @property
    def compute_dtype(self) -> str:
        """The dtype of the forward and backward arithmetic: the precision's, else `dtype`."""
        return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(self.precision or "", self.dtype)

    @property
    def dynamic_scaling(self) -> bool:
        return self.loss_scale is not None and self.loss_scale["kind"] == "dynamic"

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.settings["learning_rate"])

    @property
    def schedule_every_epoch(self) -> bool:
        return self.schedule is not None and self.schedule["every"] == "epoch"

    @property
    def layers(self) -> list[network.Layer]:
        """The model's dense layers, the one-unit output layer last (one layer: the v1 model)."""
        return network.layers(self.features, self.hidden, self.has_bias)

    @property
    def parameter_count(self) -> int:
        return sum(layer.size for layer in self.layers)

    def initial_layers(self) -> list[tuple[network.Layer, np.ndarray, np.ndarray | None]]:
        """(layer, kernel (inputs, units), bias (units,) or None) in the training dtype, for
        every layer: what each backend loads, in its own layout."""
        found = [(layer, part["kernel"], part["bias"]) for layer, part in zip(self.layers, self.init_hidden or [])]
        bias = None if self.init_bias is None else self.init_bias.reshape(1)
        return found + [(self.layers[-1], self.init_weights.reshape(-1, 1), bias)]

    def initial_params(self) -> np.ndarray:
        """The flat parameter vector (network.py's layout) in float64."""
        return np.concatenate([np.concatenate([kernel.reshape(-1), [] if bias is None else bias]).astype(np.float64)
                               for _, kernel, bias in self.initial_layers()])

    def to_data(self) -> dict[str, Any]:
        """Plain data (dicts, strings, numbers, NumPy arrays), as it goes to a worker process."""
        return asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Problem:
        return cls(**(data | {"optimizer": Optimizer(**data["optimizer"])}))


@dataclass
class Trajectory:
    """What a training run returns, numpy out: parameters and loss after every epoch.

    params is (epochs, P) float64 with P = [weights..., bias]; loss[e] is the mean over the
    epoch's samples of the framework's own batch losses (weighted by batch size, as Keras's
    history reports it); predictions are the framework's own outputs for `predict`.
    """

    params: np.ndarray
    loss: np.ndarray
    predictions: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the replay's only: per epoch, the mean over its batches of weight decay's L2 penalty
    # (decay / 2 * ||params||^2 before each step), which Keras's reported loss includes
    penalty: np.ndarray | None = None
    # with a schedule: per epoch, the learning rate of its last optimizer step, as the framework
    # reports it (the replay's: the case format's formula)
    rates: np.ndarray | None = None
    # with a loss scale: per epoch, the scale after its last step, and how many of its steps were
    # skipped (a non-finite gradient: no update)
    loss_scale: np.ndarray | None = None
    skipped: np.ndarray | None = None
    # the replay's only, under a loss scale: per epoch, whether a step's gradient sums could
    # overflow the compute dtype in some order of summation while their exact sums do not
    # (the scale times the sum of a component's terms' magnitudes reaches the dtype's largest value)
    overflow_possible: np.ndarray | None = None

    @property
    def final(self) -> np.ndarray:
        return self.params[-1]

    def to_data(self) -> dict[str, Any]:
        """Plain data, as it comes back from a worker process."""
        return asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Trajectory:
        return cls(**data)

    def first_nonfinite_epoch(self) -> int | None:
        """1-based epoch at which loss or a parameter first became NaN or infinite."""
        bad = ~(np.isfinite(self.loss) & np.isfinite(self.params).all(axis=1))
        return int(np.argmax(bad)) + 1 if bad.any() else None

"""PyTorch Lightning: a `LightningModule` around the torch backend's model and loss, its
`configure_optimizers` returning the case's optimizer and scheduler (`interval: step | epoch`),
and `Trainer(max_epochs, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm,
precision)` fed the harness's batches in the harness's order, progress bar, logger,
checkpoints and model summary off. Lightning's loop decides when to step, clip and schedule.

What Lightning adds to the plain loop (docs/accumulation.md): each batch's loss divided by
`accumulate_grad_batches` before its backward pass, an optimizer step every N batches and at
the epoch's last batch, the scheduler stepped once per optimizer step, the clip once per step
(torch.nn.utils.clip_grad_norm_ or clip_grad_value_).

Float16 through the precision plugin with the case's GradScaler; replicas through
`strategy="ddp"` in the torch backend's rank processes (_torch_ddp), each rank fed its shards.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from conformance.backends import Unavailable, _frameworks, _torch_ddp, _torch_precision, _trainers
from conformance.problem import Problem, Trajectory

NAME = "lightning"
LOOKED_FOR = ("cpu",)  # one process on the CPU; CUDA and DDP are not built yet
ACCUMULATES = True  # Trainer(accumulate_grad_batches=N)
SELECTED_BY_DEFAULT = _frameworks.installed("pytorch_lightning")  # an extra: in a run when installed
DATA_PARALLEL = True  # Trainer(strategy="ddp") in the torch backend's rank processes (_torch_ddp)
PRECISION = {None: {"float32": "32-true", "float64": "64-true"}, "mixed_bfloat16": "bf16-mixed",
             "mixed_float16": "16-mixed"}
CLIP_ALGORITHM = {"global_norm": "norm", "value": "value"}


def available() -> str | None:
    return _trainers.availability("pytorch_lightning", "pytorch-lightning")


devices = _trainers.devices
device_name = _trainers.device_name


def train(problem: Problem, device: str) -> Trajectory:
    _trainers.refuse_unbuilt(problem, "Lightning")
    if device != "cpu":
        raise Unavailable("the lightning backend trains on the CPU only (not built yet for accelerators)")
    if problem.replicas > 1:
        return _torch_ddp.train(NAME, problem, device)
    return train_replica(problem, device, None)


def train_replica(problem: Problem, device: str, replica: Any) -> Trajectory:
    """The Trainer in this process; `replica` (a _torch_ddp.Replica): as one rank of a process
    group already joined, the way torchrun starts a Lightning script (LOCAL_RANK set: Lightning
    launches nothing, finds torch.distributed initialised and wraps the module in DDP itself)."""
    if replica is None:
        with _torch_precision.float16_probabilities_refused(problem):
            return _fit(problem, device, None)
    variables = {"LOCAL_RANK": str(replica.rank), "NODE_RANK": "0", "WORLD_SIZE": str(replica.replicas)}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        return _fit(problem, device, replica)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fit(problem: Problem, device: str, replica: Any) -> Trajectory:
    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    setup = _trainers.Setup(problem, device, replica)
    precision = PRECISION[problem.precision]
    if isinstance(precision, dict):
        precision = precision[problem.dtype]
    # float16 on the CPU: Trainer(precision="16-mixed") would switch to bf16-mixed on the CPU
    # (its accelerator connector warns and replaces the flag); the plugin with the case's scaler
    # keeps float16, as Lightning's docs pass a custom GradScaler.
    scaling = _trainers.ScaleRecords(problem) if problem.precision == "mixed_float16" else None
    plugins = [] if scaling is None else [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaling.scaler)]

    class CaseModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = setup.model

        def training_step(self, batch: Any, batch_index: int) -> Any:
            x_batch, y_batch, w_batch = batch
            loss = setup.loss(self.model(x_batch), y_batch, w_batch)
            setup.step_losses.append(loss.detach())
            return loss

        def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
            setup.record_rate(batch_index)
            if scaling is not None:
                scaling.before_batch()

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
            if scaling is not None:
                scaling.after_batch()

        def on_train_epoch_end(self) -> None:
            setup.record_epoch()
            if scaling is not None:
                scaling.end_epoch()

        def configure_optimizers(self) -> Any:
            if setup.scheduler is None:
                return setup.optimizer
            interval = "epoch" if problem.schedule_every_epoch else "step"
            return {"optimizer": setup.optimizer,
                    "lr_scheduler": {"scheduler": setup.scheduler, "interval": interval, "frequency": 1}}

    clip = problem.clip
    parallel = {} if replica is None else {"devices": replica.replicas, "strategy": "ddp"}
    trainer = pl.Trainer(accelerator="cpu", **({"devices": 1} | parallel), max_epochs=problem.epochs,
                         accumulate_grad_batches=problem.accumulate,
                         **({"precision": precision} if scaling is None else {"plugins": plugins}),
                         gradient_clip_val=None if clip is None else clip["threshold"],
                         gradient_clip_algorithm=None if clip is None else CLIP_ALGORITHM[clip["kind"]],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(CaseModule(), train_dataloaders=setup.loader)
    calls = (f"Trainer(max_epochs={problem.epochs}, accumulate_grad_batches={problem.accumulate}, "
             f"precision={precision!r}, gradient_clip_val={None if clip is None else clip['threshold']}, "
             f"gradient_clip_algorithm={None if clip is None else CLIP_ALGORITHM[clip['kind']]!r}).fit")
    if replica is not None:
        calls = calls.replace("Trainer(", f"Trainer(strategy='ddp', devices={replica.replicas}, ")
    trajectory = setup.trajectory({"pytorch_lightning": pl.__version__, "trainer": calls})
    if scaling is not None:
        scaling.record(trajectory, setup, "Trainer(plugins=[MixedPrecision('16-mixed', 'cpu', scaler=torch.amp."
                       f"GradScaler('cpu', ...))]): autocast around training_step; {scaling.scaler_calls()}")
    return trajectory

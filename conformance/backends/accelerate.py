"""Hugging Face Accelerate: the loop of its documentation around the torch backend's model, loss,
optimizer and scheduler: `Accelerator(gradient_accumulation_steps, mixed_precision)`,
`prepare`, `with accelerator.accumulate(model)`, `accelerator.backward(loss)`,
`accelerator.clip_grad_norm_` (or `clip_grad_value_`) when `sync_gradients`, then
`optimizer.step()`, `scheduler.step()`, `optimizer.zero_grad()` on every batch: the prepared
optimizer and scheduler act only when Accelerate syncs (every N batches and at the end of the
DataLoader).

What Accelerate adds to the plain loop (docs/accumulation.md): `backward` divides the loss by
N, the epoch's last batch ends a group, the wrapped scheduler steps once per optimizer step on
one process.
"""

from __future__ import annotations

import logging

from conformance.backends import Unavailable, _frameworks, _trainers
from conformance.problem import Problem, Trajectory

NAME = "accelerate"
LOOKED_FOR = ("cpu",)  # one process on the CPU; GPUs and `accelerate launch` are not built yet
ACCUMULATES = True  # Accelerator(gradient_accumulation_steps=N)
SELECTED_BY_DEFAULT = _frameworks.installed("accelerate")  # an extra: in a run when installed
WHY_NOT_DATA_PARALLEL = ("Accelerate's prepared DataLoader decides each process's samples itself (whole batches per "
                         "process, or split_batches with a short last batch padded from the epoch's start: "
                         "even_batches), so the case's shards cannot be fed through it; not built")
MIXED_PRECISION = {None: "no", "mixed_bfloat16": "bf16"}


def available() -> str | None:
    return _trainers.availability("accelerate", "accelerate")


devices = _trainers.devices
device_name = _trainers.device_name


def train(problem: Problem, device: str) -> Trajectory:
    _trainers.refuse_unbuilt(problem, "Accelerate")
    if problem.precision == "mixed_float16":
        raise Unavailable("Accelerator(mixed_precision='fp16') on the CPU trains in float32: it makes neither "
                          "autocast nor a GradScaler there (accelerate/accelerator.py: the fp16 branch requires "
                          "device.type != 'cpu', so native_amp stays False and autocast is a nullcontext)")
    if device != "cpu":
        raise Unavailable("the accelerate backend trains on the CPU only (not built yet for accelerators)")
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    AcceleratorState._reset_state(True)  # one Accelerator per training: its state is a process singleton
    GradientState._reset_state()
    setup = _trainers.Setup(problem, device)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=problem.accumulate,
                                         mixed_precision=MIXED_PRECISION[problem.precision])
    prepared = accelerator.prepare(setup.model, setup.optimizer, setup.loader,
                                   *([] if setup.scheduler is None else [setup.scheduler]))
    model, optimizer, loader = prepared[:3]
    scheduler = prepared[3] if setup.scheduler is not None else None
    per_step = scheduler is not None and not problem.schedule_every_epoch
    clip = problem.clip
    for _ in range(problem.epochs):
        for index, (x_batch, y_batch, w_batch) in enumerate(loader):
            setup.record_rate(index)
            with accelerator.accumulate(model):
                loss = setup.loss(model(x_batch), y_batch, w_batch)
                accelerator.backward(loss)
                if clip is not None and accelerator.sync_gradients:
                    if clip["kind"] == "value":
                        accelerator.clip_grad_value_(model.parameters(), clip["threshold"])
                    else:
                        accelerator.clip_grad_norm_(model.parameters(), clip["threshold"])
                optimizer.step()
                if per_step:
                    scheduler.step()
                optimizer.zero_grad()
            setup.step_losses.append(loss.detach())
        if scheduler is not None and not per_step:
            scheduler.step()
        setup.record_epoch()
    calls = (f"Accelerator(gradient_accumulation_steps={problem.accumulate}, "
             f"mixed_precision={MIXED_PRECISION[problem.precision]!r}); accumulate, backward, "
             + ("clip_grad_value_, " if clip is not None and clip["kind"] == "value" else
                "clip_grad_norm_, " if clip is not None else "") + "step")
    return setup.trajectory({"accelerate": accelerate.__version__, "trainer": calls})

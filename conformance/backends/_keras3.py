"""Keras 3 on its JAX or PyTorch backend (`keras_jax`, `keras_torch`), trained in worker processes.

Keras reads `KERAS_BACKEND` once per process, so these backends cannot share the test process
with `keras` (Keras on TensorFlow). Each trains in a long-lived worker (conformance.workers)
started with its backend's environment; the test process sends the problem and gets the
trajectory back as plain data.

In the worker the model, optimizer and loss are the `keras` backend's (_keras_common), and
`fit` is fed by a `keras.utils.PyDataset` that serves the harness's batches in the harness's
order, one Keras epoch per case epoch. Every setting is explicit: `jit_compile=True` on JAX
(what Keras's "auto" picks there), `jit_compile=False` on PyTorch (eager, what "auto" picks),
and `steps_per_execution=1` (Keras's default, and the only value its PyTorch backend allows).

Data parallelism (`replicas` > 1) is Keras's own on JAX: `fit` under a
`keras.distribution.DataParallel` over R devices (its `scope()`), which replicates every variable
and shards each global batch over the devices itself; before training the split its data layout
makes of every batch size is checked against Problem.shards (a split that differs, or a batch
that Keras cannot split, skips with the reason). On a CPU the R devices are JAX's host devices
from `--xla_force_host_platform_device_count`, set before JAX starts: a worker kind of its own,
so that one-replica cases keep the plain worker. Keras on PyTorch has no such API
(WHY_NOT_DATA_PARALLEL).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np

from conformance import backends, workers
from conformance.backends import Unavailable, _frameworks, _keras_common, _keras_precision
from conformance.problem import Problem, Trajectory

FRAMEWORK_MODULE = {"jax": "jax", "torch": "torch"}  # KERAS_BACKEND -> the module it needs
JIT_COMPILE = {"jax": True, "torch": False}
ENVIRONMENT = {
    # float64 cases need JAX's 64-bit mode; every array the suite makes has an explicit dtype.
    "jax": {"KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    "torch": {"KERAS_BACKEND": "torch"},
}
REPLICA_DEVICES = 4  # JAX CPU devices of the data-parallel worker (more when a case asks for more)
WHY_NOT_DATA_PARALLEL = {
    "torch": ("Keras 3 has no data-parallel API on its PyTorch backend: keras.distribution (DataParallel, "
              "ModelParallel) is implemented for JAX only (keras/src/backend/__init__.py sets distribution_lib "
              "= None for torch), and the torch trainer's fit has no distribution path; Keras's multi-GPU guide "
              "for PyTorch wraps the model in torch DistributedDataParallel under a hand-written torch loop "
              "instead of fit, which is the torch backend's DDP, not Keras's"),
}


def available(framework: str) -> str | None:
    """None, or why Keras cannot run on `framework` here: Keras 2, or the framework missing."""
    version = _frameworks.distribution_version("keras")
    if version is None:
        return "keras is not installed"
    if int(version.split(".")[0]) < 3:
        return (f"Keras {version} is installed: Keras 2 runs on TensorFlow only; "
                f"Keras on {framework} needs Keras 3 (TensorFlow >= 2.16 or pip install 'keras>=3')")
    if not _frameworks.installed(FRAMEWORK_MODULE[framework]):
        extra = " (pip install '.[jax]')" if framework == "jax" else ""
        return f"{FRAMEWORK_MODULE[framework]} is not installed{extra}"
    return None


def worker_kind(framework: str, replicas: int = 1, device: str = "cpu") -> workers.WorkerKind:
    """The worker for Keras on `framework`; determinism, when requested, is part of its kind.
    Replicas on a CPU need JAX with several host devices: a worker kind of its own."""
    environment = dict(ENVIRONMENT[framework])
    name = f"keras_{framework}"
    if _frameworks.determinism_requested():
        environment["CONFORMANCE_DETERMINISM"] = "1"
    if replicas > 1 and device == "cpu":
        count = max(REPLICA_DEVICES, replicas)
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
        environment |= {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        name = f"{name}_{count}_cpu_devices"
    return workers.WorkerKind(name, environment, setup="conformance.backends._keras3:setup")


def train(framework: str, problem: Problem, device: str) -> Trajectory:
    """Train `problem` with Keras on `framework` in this process's worker for it."""
    if problem.replicas > 1 and framework in WHY_NOT_DATA_PARALLEL:
        raise Unavailable(WHY_NOT_DATA_PARALLEL[framework])
    return backends.train_in_worker(worker_kind(framework, problem.replicas, device),
                                    "conformance.backends._keras3:train_here", problem.to_data(), device)


# --- in the worker process -------------------------------------------------------------------

def setup() -> dict[str, Any]:
    """Import Keras on the backend named by KERAS_BACKEND, with the suite's numerics settings."""
    backend = os.environ["KERAS_BACKEND"]
    if os.environ.get("CONFORMANCE_DETERMINISM") == "1":
        _frameworks.request_determinism()
    if backend == "torch":
        _frameworks.torch()  # TF32 off, determinism as requested
    else:
        _frameworks.jax()
    import keras

    if keras.backend.backend() != backend:
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, expected {backend!r} (KERAS_BACKEND)")
    return {"keras": keras.__version__, "backend": backend, "extra_setup": workers.extra_setup()}


def train_here(problem_data: dict[str, Any], device: str) -> dict[str, Any]:
    """`compile` + `fit` in this worker; the trajectory as plain data."""
    import keras

    started = time.perf_counter()
    problem = Problem.from_data(problem_data)
    backend = keras.backend.backend()
    distribution = None if problem.replicas == 1 else data_parallel(keras, problem, device)
    placement = keras.device(_keras_device(backend, device)) if distribution is None else distribution.scope()
    with _keras_common.floatx(keras, problem.dtype), placement:
        model = _keras_common.model(keras, problem, steps_per_execution=1, jit_compile=JIT_COMPILE[backend])
        kernel = _keras_common.output_kernel(model)
        if kernel.dtype != problem.dtype:
            raise Unavailable(f"Keras on {backend} made a {kernel.dtype} kernel for this {problem.dtype} case")
        if problem.dtype == "float64" and (rounded := _float64_rounding_here()):
            raise Unavailable(f"Keras {keras.__version__} on {backend} computes in float32 where float64 was "
                              f"asked: {'; '.join(rounded)}. Keras maps 64-bit results of its type promotion "
                              "to 32-bit on every backend but TensorFlow (BIT64_TO_BIT32_DTYPE in "
                              "keras/src/backend/common/dtypes.py), so this float64 case would train partly "
                              "in float32")
        dtypes = None if problem.precision is None else _precision_dtypes(keras, backend, model, problem)
        batches = _batches_class(keras)(problem)
        recorder = _recorder_class(keras)(problem, batches)
        scheduler = _keras_common.epoch_scheduler(keras, problem)
        model.fit(batches, epochs=problem.epochs, verbose=0, shuffle=False,
                  callbacks=[recorder] if scheduler is None else [scheduler, recorder])
        if batches.served != [problem.steps_per_epoch] * problem.epochs:
            raise RuntimeError(f"fit took {batches.served} batches per epoch; expected {problem.steps_per_epoch} "
                               f"in each of {problem.epochs} epochs")
        predictions = None
        if problem.predict_x is not None:
            outputs = keras.ops.convert_to_numpy(model(problem.predict_x, training=False))
            predictions = _keras_common.outputs_as_predictions(
                problem, outputs, lambda z: keras.ops.convert_to_numpy(keras.ops.sigmoid(z)))
    info = _environment(keras, backend, model, kernel) | {"compile_seconds": recorder.compile_seconds,
                                                          "seconds_in_worker": time.perf_counter() - started}
    if problem.optimizer.settings.get("weight_decay"):
        info |= {"loss_note": "Keras's loss includes the L2 term that carries weight decay",
                 "loss_includes_l2_penalty": True}  # the trajectory check adds the replay's penalty
    if dtypes is not None:
        info["precision"] = _keras_precision.precision_info(keras, problem, model, dtypes)
    if distribution is not None:
        info["replicas"] = replica_info(problem, distribution, model)
    return Trajectory(recorder.history_params, recorder.history_loss, predictions, info,
                      rates=recorder.history_rates, loss_scale=recorder.history_loss_scale,
                      skipped=recorder.history_skipped).to_data()


def data_parallel(keras: Any, problem: Problem, device: str) -> Any:
    """`keras.distribution.DataParallel` over `problem.replicas` devices of the kind of `device`
    (from the named one on), after checking that it splits every batch size of the case as
    Problem.shards does; Unavailable when there are too few devices or the split differs."""
    kind, first = ("cpu", 0) if device == "cpu" else ("gpu", int(device.split(":")[1]))
    listed = keras.distribution.list_devices(kind)
    chosen = listed[first:first + problem.replicas]
    if len(chosen) < problem.replicas:
        raise Unavailable(f"{problem.replicas} replicas from {device} need {problem.replicas} {kind} devices; "
                          f"Keras lists {listed}")
    distribution = keras.distribution.DataParallel(devices=chosen)
    check_split(distribution, problem)
    return distribution


def check_split(distribution: Any, problem: Problem) -> None:
    """Check Keras's own split of each batch size: the data layout fit gives a batch
    (`distribution.get_data_layout(shape).backend_layout`, a NamedSharding over the batch axis)
    and the shards Keras's `distribute_data_input` makes of the case's first batch of that size
    must both put Problem.shards' rows r on the mesh's device r. Unavailable otherwise."""
    from keras.src.backend.jax.distribution_lib import distribute_data_input

    sizes = problem.batch_sizes
    for size in sizes:
        step = 0 if size == problem.batch_size else problem.steps_per_epoch - 1
        rows = problem.batch(0, step)
        layout = distribution.get_data_layout(problem.x[rows].shape).backend_layout
        try:
            index_map = layout.devices_indices_map(problem.x[rows].shape)
        except ValueError as error:  # jax's IndivisibleError: NamedSharding needs equal shards
            raise Unavailable(f"Keras's DataParallel cannot split a batch of {size} over {problem.replicas} devices "
                              f"(its data layout {layout.spec} shards the batch axis evenly): {error}") from None
        placed = distribute_data_input(problem.x[rows], layout, distribution.batch_dim_name)
        by_device = {shard.device: np.asarray(shard.data) for shard in placed.addressable_shards}
        for replica, (device, shard) in enumerate(zip(layout.mesh.devices.flat, problem.shards(rows))):
            given = np.arange(problem.n)[rows][index_map[device][0]]
            if not (np.array_equal(given, shard) and np.array_equal(by_device[device], problem.x[shard])):
                raise Unavailable(f"Keras's DataParallel gives device {device} (replica {replica}) rows "
                                  f"{given.tolist()} of a batch of {size}; Problem.shards gives it {shard.tolist()}")


def replica_info(problem: Problem, distribution: Any, model: Any) -> dict[str, Any]:
    """Trajectory.info["replicas"] for Keras's DataParallel: its devices, the layout of its
    variables, and whether the copies of each variable are equal on every device."""
    variables = model.trainable_variables
    copies = [[np.asarray(shard.data) for shard in v.value.addressable_shards] for v in variables]
    equal = all(np.array_equal(copy, parts[0]) for parts in copies for copy in parts)
    devices = [str(device) for device in distribution.device_mesh.devices.flat]
    shardings = sorted({str(v.value.sharding.spec) for v in variables})
    return {"replicas": problem.replicas, "devices": devices, "processes": [os.getpid()] * problem.replicas,
            "ranks": None,
            "collective": "the all-reduce XLA's SPMD partitioner puts into Keras's jitted train step (the loss is "
                          "the mean over the global batch, sharded over the mesh's 'batch' axis)",
            "placement": f"every variable on every device (sharding specs {', '.join(shardings)}: replicated)",
            "api": "keras.distribution.DataParallel(devices=...); with distribution.scope(): model, compile, fit",
            "split": f"Keras's own (jax NamedSharding over the batch axis), checked equal to Problem.shards for "
                     f"batches of {', '.join(str(size) for size in problem.batch_sizes)}",
            "combined_loss": "mean over the global batch (no per-replica weighting)",
            "parameters_equal_across_replicas": bool(equal)}


def _precision_dtypes(keras: Any, backend: str, model: Any, problem: Problem) -> dict[str, str]:
    """The dtypes of a mixed-precision step's real tensors, from one forward pass, loss and
    gradient on the first batch (nothing is applied): JAX's `value_and_grad` of the model's
    `stateless_call`, as Keras's JAX trainer differentiates it; on torch, `backward()` on the
    loss, as Keras's torch trainer does (the gradients are then cleared again)."""
    rows = problem.batch(0, 0)
    x, y = problem.x[rows], problem.y[rows].reshape(-1, 1)
    loss_object = _keras_common.loss(keras, problem)
    variables = model.trainable_variables
    if backend == "jax":
        import jax

        fixed = [v.value for v in model.non_trainable_variables]

        def loss_of(values: list[Any]) -> Any:
            output, _ = model.stateless_call(values, fixed, x, training=True)
            return loss_object(y, output), output

        (loss, output), gradients = jax.value_and_grad(loss_of, has_aux=True)([v.value for v in variables])
    else:
        output = model(x, training=True)
        loss = loss_object(y, output)
        loss.backward()
        gradients = [v.value.grad for v in variables]
        for variable in variables:
            variable.value.grad = None
    name = _keras_precision.dtype_name
    return {"output_dtype": name(output.dtype), "loss_dtype": name(loss.dtype),
            "gradient_dtype": ", ".join(sorted({name(gradient.dtype) for gradient in gradients})),
            "variable_dtype": ", ".join(sorted({name(v.value.dtype) for v in variables}))}


@functools.cache
def _float64_rounding_here() -> list[str]:
    import keras

    return float64_rounding(keras)


def float64_rounding(keras: Any) -> list[str]:
    """The Keras ops that the one-unit model and its loss use which do not compute float64 in
    float64 here, each with what it returned; empty when all do. Each op gets float64 inputs
    whose exact result needs more than float32's 24 bits."""
    ops, tiny = keras.ops, 2.0 ** -40
    probes = {
        "keras.ops.matmul": (lambda: ops.matmul(np.array([[1 + tiny]]), np.array([[1.0]])), 1 + tiny),
        "keras.ops.add": (lambda: ops.add(np.array([1.0]), np.array([tiny])), 1 + tiny),
        "keras.ops.subtract": (lambda: ops.subtract(np.array([1.0]), np.array([tiny])), 1 - tiny),
        "keras.ops.square": (lambda: ops.square(np.array([1 + tiny])), (1 + tiny) ** 2),
        "keras.ops.sum": (lambda: ops.sum(np.array([1.0, tiny])), 1 + tiny),
        "keras.ops.mean": (lambda: ops.mean(np.array([1.0, tiny])), 0.5 + tiny / 2),
    }
    found = []
    for name, (probe, exact) in probes.items():
        result = ops.convert_to_numpy(probe())
        value = float(np.ravel(result)[0])
        if result.dtype != np.float64 or value != exact:
            found.append(f"{name} of float64 inputs returned {result.dtype} {value!r}, exactly {exact!r}")
    return found


def _keras_device(backend: str, device: str) -> str:
    """The suite's device name ('cpu', 'cuda:0') as Keras's device scope on `backend` takes it.

    On PyTorch the scope must be "cpu", not Keras's documented "cpu:0": Keras 3.15 moves each
    new variable `.to("cpu:0")`, which torch treats as another device, and the copy is not a
    leaf tensor, so `fit` fails with "No gradients provided for any variable".
    """
    if backend == "torch":
        return device
    return "cpu:0" if device == "cpu" else device.replace("cuda", "gpu")


def _environment(keras: Any, backend: str, model: Any, kernel: Any) -> dict[str, Any]:
    """Versions, settings and where the trained kernel really lives, as the backend says."""
    value = kernel.value
    if backend == "jax":
        import jax

        placed_on = ", ".join(sorted(str(d) for d in value.devices()))
        versions = {"jax": jax.__version__, "jax_enable_x64": bool(jax.config.jax_enable_x64)}
    else:
        import torch

        placed_on = str(value.device)
        versions = {"torch": torch.__version__} | _frameworks.torch_settings()
    return versions | {"keras": keras.__version__, "keras_backend": backend, "placed_on": placed_on,
                       "jit_compile": bool(model.jit_compile), "steps_per_execution": 1,
                       "kernel_dtype": str(kernel.dtype), "feeding": "fit(keras.utils.PyDataset)",
                       "worker_pid": os.getpid()}


def _batches_class(keras: Any) -> type:
    class HarnessBatches(keras.utils.PyDataset):
        """The case's batches in the harness's order; one `fit` epoch per case epoch. The epoch
        is set by the recorder's `on_epoch_begin` (Keras's own dataset hooks run at different
        points in different versions), and the batches served per epoch are counted. Keras
        reads one batch before training to learn the data's structure: served, not counted."""

        def __init__(self, problem: Problem) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.problem = problem
            self.epoch: int | None = None  # before training
            self.served = [0] * problem.epochs
            self.y = problem.y.reshape(-1, 1)

        def __len__(self) -> int:
            return self.problem.steps_per_epoch

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            rows = self.problem.batch(self.epoch or 0, index)
            if self.epoch is not None:
                self.served[self.epoch] += 1
            if self.problem.sample_weight is None:
                return self.problem.x[rows], self.y[rows]
            return self.problem.x[rows], self.y[rows], self.problem.sample_weight[rows]

    return HarnessBatches


def _recorder_class(keras: Any) -> type:
    class EpochRecorder(_keras_common.EpochRecords, keras.callbacks.Callback):
        """Parameters and Keras's own epoch loss after every epoch (`self.model` brings JAX's
        training state back into the variables before they are read)."""

        def __init__(self, problem: Problem, batches: Any) -> None:
            super().__init__()
            self.problem, self.batches = problem, batches
            self.reset_records()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.batches.epoch = epoch

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            weights = _keras_common.parameters(self.model)
            self.record(np.concatenate([np.ravel(keras.ops.convert_to_numpy(w.value)) for w in weights]), logs)
            self.record_rate(keras)
            if self.problem.loss_scale is not None:
                self.record_scaling(*_keras_precision.scaling_state(keras, self.model.optimizer))

    return EpochRecorder

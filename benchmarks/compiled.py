"""Compiled backends: steady per-step time against the bare compiled loop, and compile time per case.

Section "Compiled backends" of `benchmarks/run.py`, for keras_xla, gradient_tape_xla and
torch_compile. A compiled backend pays its compile once per case, so two numbers matter: the
harness's training less the compile time it records, per step, against the same framework's bare
loop compiled the same way (timed after its first epoch, when it has compiled), and the compile
time itself. Best of 3 on "small" and "medium" ("large" is one epoch: nothing is left once it
has compiled); each backend in a child process of its own (`run.py --one BACKEND`).
"""

from __future__ import annotations

import time

from _runner import COMPILED, SIZES, in_child, make_problem, steps, timed

from conformance.problem import Problem

# ---- compiled floors: compile on the first epoch, then time the rest (the steady state) --------

def compiled_floor_torch(problem: Problem) -> tuple[float, int]:
    """The bare loop with its step under torch.compile; returns (seconds after epoch 1, steps)."""
    from conformance.backends._frameworks import torch as load_torch

    torch = load_torch()
    torch._dynamo.reset()
    x, y = torch.as_tensor(problem.x), torch.as_tensor(problem.y).reshape(-1, 1)
    model = torch.nn.Linear(problem.features, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, foreach=False)
    loss_function = torch.nn.MSELoss()

    def step(x_batch, y_batch):
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(x_batch), y_batch).backward()
        optimizer.step()

    compiled = torch.compile(step, backend="inductor", mode="default")

    def epochs(count: int) -> None:
        for _ in range(count):
            for start in range(0, problem.n, problem.batch_size):
                compiled(x[start:start + problem.batch_size], y[start:start + problem.batch_size])

    epochs(1)
    return timed(epochs, problem.epochs - 1), (problem.epochs - 1) * problem.steps_per_epoch


def compiled_floor_keras(problem: Problem) -> tuple[float, int]:
    """Keras with compile(jit_compile=True): one fit of one epoch compiles, a second fit trains the rest."""
    from conformance.backends import _frameworks, _tensorflow

    tf, keras = _frameworks.tensorflow(), _tensorflow.keras()
    model = keras.Sequential([keras.Input(shape=(problem.features,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=problem.steps_per_epoch,
                  jit_compile=True)
    data = tf.data.Dataset.from_tensor_slices((problem.x, problem.y.reshape(-1, 1))).batch(problem.batch_size)
    model.fit(data, epochs=1, steps_per_epoch=problem.steps_per_epoch, verbose=0)
    rest = problem.epochs - 1
    return timed(lambda: model.fit(data.repeat(rest), epochs=1, steps_per_epoch=rest * problem.steps_per_epoch,
                                   verbose=0)), rest * problem.steps_per_epoch


def compiled_floor_gradient_tape(problem: Problem) -> tuple[float, int]:
    """The whole loop under tf.function(jit_compile=True), static batch slices; a zero-epoch call compiles."""
    from conformance.backends import _frameworks, _tensorflow

    tf = _frameworks.tensorflow()
    w = tf.Variable(tf.zeros((problem.features, 1)))
    b = tf.Variable(tf.zeros(1))
    optimizer = _tensorflow.keras().optimizers.SGD(0.01)
    x, y = tf.constant(problem.x), tf.constant(problem.y.reshape(-1, 1))
    full, last = divmod(problem.n, problem.batch_size)

    def step(start, size: int) -> None:
        with tf.GradientTape() as tape:
            x_batch = tf.slice(x, [start, 0], [size, problem.features])
            loss = tf.reduce_mean(tf.square(x_batch @ w + b - tf.slice(y, [start, 0], [size, 1])))
        optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    @tf.function(jit_compile=True)
    def training(epochs) -> None:
        for _ in tf.range(epochs):
            for index in tf.range(full):
                step(index * problem.batch_size, problem.batch_size)
            if last:
                step(full * problem.batch_size, last)

    training(tf.constant(0))
    return timed(training, tf.constant(problem.epochs)), steps(problem)


COMPILED_FLOORS = {"torch_compile": compiled_floor_torch, "keras_xla": compiled_floor_keras,
                   "gradient_tape_xla": compiled_floor_gradient_tape}


def measure_compiled(backend: str) -> dict:
    """In this process: the steady per-step time of the harness (its training less its recorded
    compile time) against the bare compiled loop's, and the compile time per case."""
    from conformance import backends
    from conformance.backends import _frameworks

    _frameworks.torch() if backend == "torch_compile" else _frameworks.tensorflow()
    module = backends.load(backend)
    warm = make_problem(6, 1, 6, 3)
    module.train(warm, "cpu"), COMPILED_FLOORS[backend](warm)  # first-use costs (imports of the compilers)
    result = {"backend": backend, "sizes": {}}
    for size in ("small", "medium"):  # "large" is one epoch: nothing left once it has compiled
        problem = make_problem(*SIZES[size])
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            compile_s = module.train(problem, "cpu").info["compile_seconds"]
            total = time.perf_counter() - started
            runs.append((total - compile_s, compile_s, *COMPILED_FLOORS[backend](problem)))
        harness, compile_s, floor, floor_steps = min(runs)
        result["sizes"][size] = {"steps": steps(problem), "harness_ms": 1e3 * harness / steps(problem),
                                 "floor_ms": 1e3 * floor / floor_steps, "compile_s": compile_s}
    return result


def print_section() -> None:
    """Print the table, measuring each compiled backend in its own child process as it goes."""
    print("\nCompiled backends: steady per-step time (training less the recorded compile time) vs the bare "
          "compiled loop (after its first epoch), and the compile time per case")
    print(f"{'backend':18} {'size':7} {'steps':>6} {'harness ms/step':>16} {'floor ms/step':>14} {'ratio':>6} "
          f"{'compile s':>10}")
    for backend in COMPILED:
        result = in_child("--one", backend)
        for size, row in result["sizes"].items():
            print(f"{backend:18} {size:7} {row['steps']:6d} {row['harness_ms']:16.3f} {row['floor_ms']:14.3f} "
                  f"{row['harness_ms'] / row['floor_ms']:6.2f} {row['compile_s']:10.2f}")

"""Per step, the harness against each framework's bare loop; the references' share; import and memory.

Sections "Per step", "References" and "Import and memory per process" of `benchmarks/run.py`,
for the v1 backends (keras, gradient_tape, torch) and jax. The training arithmetic here is tiny,
so nearly all time is framework overhead, and the question is whether the suite adds its own:
each backend's `train` is timed next to the fastest bare loop its framework offers (nothing
recorded), in the same process, alternating, best of 5 (2 for "large"). The same child process
also times the float64 references and reads its peak memory on the large case, so all three
tables come from one process per backend (`run.py --one BACKEND`).
"""

from __future__ import annotations

import resource
import time

import numpy as np
from _runner import BACKENDS, OTHERS, SIZES, in_child, make_problem, steps, timed

from conformance.problem import Problem

# ---- floors: the bare framework loops, nothing recorded -------------------------------------

def floor_torch(problem: Problem) -> None:
    from conformance.backends._frameworks import torch as load_torch

    torch = load_torch()
    x, y = torch.as_tensor(problem.x), torch.as_tensor(problem.y).reshape(-1, 1)
    model = torch.nn.Linear(problem.features, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, foreach=False)
    loss_function = torch.nn.MSELoss()
    for _ in range(problem.epochs):
        for start in range(0, problem.n, problem.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_function(model(x[start:start + problem.batch_size]), y[start:start + problem.batch_size]).backward()
            optimizer.step()


def floor_keras(problem: Problem) -> None:
    """Keras's fast feeding path: one tf.data stream, one long epoch, one execution per epoch."""
    from conformance.backends import _frameworks, _tensorflow

    tf, keras = _frameworks.tensorflow(), _tensorflow.keras()
    model = keras.Sequential([keras.Input(shape=(problem.features,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=problem.steps_per_epoch)
    data = tf.data.Dataset.from_tensor_slices((problem.x, problem.y.reshape(-1, 1)))
    model.fit(data.batch(problem.batch_size).repeat(problem.epochs), epochs=1, steps_per_epoch=steps(problem),
              verbose=0)


def floor_gradient_tape(problem: Problem) -> None:
    """The same loop as one tf.function over every epoch (the fastest shape a hand-written loop takes)."""
    from conformance.backends import _frameworks, _tensorflow

    tf = _frameworks.tensorflow()
    w = tf.Variable(tf.zeros((problem.features, 1)))
    b = tf.Variable(tf.zeros(1))
    optimizer = _tensorflow.keras().optimizers.SGD(0.01)
    x, y = tf.constant(problem.x), tf.constant(problem.y.reshape(-1, 1))

    @tf.function
    def training() -> None:
        for _ in tf.range(problem.epochs):
            for start in tf.range(0, problem.n, problem.batch_size):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(x[start:start + problem.batch_size] @ w + b
                                                    - y[start:start + problem.batch_size]))
                optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    training()


def floor_jax(problem: Problem) -> None:
    """The same jitted loop (value_and_grad, optax.sgd, lax.scan over epochs and full batches),
    recording nothing; compiled before it is timed, as the harness's compile is part of its time."""
    from conformance.backends import _frameworks

    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y.reshape(-1, 1))
    optimizer = optax.sgd(0.01)
    batches, last = divmod(problem.n, problem.batch_size)

    def loss_of(params, x_batch, y_batch):
        return jnp.mean(jnp.square(x_batch @ params["w"] + params["b"] - y_batch))

    def step(carry, start, size):
        params, state = carry
        x_batch = jax.lax.dynamic_slice_in_dim(x, start, size)
        y_batch = jax.lax.dynamic_slice_in_dim(y, start, size)
        updates, state = optimizer.update(jax.grad(loss_of)(params, x_batch, y_batch), state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def training(params):
        def one_batch(carry, index):
            return step(carry, index * problem.batch_size, problem.batch_size), None

        def one_epoch(carry, _):
            carry = jax.lax.scan(one_batch, carry, jnp.arange(batches))[0]
            return (step(carry, batches * problem.batch_size, last) if last else carry), None

        return jax.lax.scan(one_epoch, (params, optimizer.init(params)), jnp.arange(problem.epochs))[0][0]

    params = {"w": jnp.zeros((problem.features, 1), jnp.float32), "b": jnp.zeros(1, jnp.float32)}
    jax.block_until_ready(training(params))


FLOORS = {"torch": floor_torch, "keras": floor_keras, "gradient_tape": floor_gradient_tape, "jax": floor_jax}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_backend(backend: str) -> dict:
    """In this process: import cost, per-size harness and floor times, references, peak memory."""
    from conformance import backends
    from conformance.backends import _frameworks
    from conformance.reference import least_squares, replay

    started = time.perf_counter()
    {"torch": _frameworks.torch, "jax": _frameworks.jax}.get(backend, _frameworks.tensorflow)()
    module = backends.load(backend)
    result = {"backend": backend, "import_s": time.perf_counter() - started, "sizes": {}}
    warm = make_problem(6, 1, 6, 3)
    module.train(warm, "cpu"), FLOORS[backend](warm)  # first-use costs (tracing caches, thread pools)
    before_large = rss_mb()
    for size, shape in SIZES.items():
        problem = make_problem(*shape)
        # Best of 5, harness and floor alternating, so that a noisy spell on this shared machine
        # hits both sides alike.
        times = [(timed(module.train, problem, "cpu"), timed(FLOORS[backend], problem))
                 for _ in range(2 if size == "large" else 5)]
        harness, floor = (min(column) for column in zip(*times))
        references = timed(replay, problem) + timed(least_squares, problem.x.astype(np.float64),
                                                    problem.y.astype(np.float64), True)
        result["sizes"][size] = {"steps": steps(problem), "harness_s": harness, "floor_s": floor,
                                 "references_s": references}
        if size == "large":
            result["peak_rss_above_frameworks_mb"] = rss_mb() - before_large
            result["data_mb"] = (problem.x.nbytes + problem.y.nbytes) / 2**20
    return result


def print_section() -> None:
    """Measure each backend in its own child process, then print the three tables."""
    results = [in_child("--one", backend) for backend in BACKENDS + OTHERS]
    print("Per step: harness (conformance backend, recording every epoch) vs the bare framework loop, same process")
    print(f"{'backend':14} {'size':7} {'steps':>6} {'harness ms/step':>16} {'floor ms/step':>14} {'ratio':>6}")
    for result in results:
        for size, row in result["sizes"].items():
            print(f"{result['backend']:14} {size:7} {row['steps']:6d} {1e3 * row['harness_s'] / row['steps']:16.3f} "
                  f"{1e3 * row['floor_s'] / row['steps']:14.3f} {row['harness_s'] / row['floor_s']:6.2f}")
    print("\nReferences (float64 replay + least squares) against the case's time (every measured backend's "
          "training + references)")
    for size in SIZES:
        training = sum(result["sizes"][size]["harness_s"] for result in results)
        references = min(result["sizes"][size]["references_s"] for result in results)  # same work in each process
        print(f"  {size:7}: references {references:7.3f} s, training {training:7.3f} s, "
              f"share {references / (training + references):6.1%}")
    print("\nImport and memory per process (large case: 10^6 x 10 float32, data "
          f"{results[0]['data_mb']:.0f} MB)")
    for result in results:
        print(f"{result['backend']:14} import {result['import_s']:5.1f} s   peak RSS above frameworks "
              f"{result['peak_rss_above_frameworks_mb']:7.0f} MB")

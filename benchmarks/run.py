"""Benchmark: the harness's cost next to each framework's bare loop, measured side by side.

    python benchmarks/run.py            # everything (about 5 minutes on 2 cores)
    python benchmarks/run.py --quick    # per-step ratios and memory only

Prints ratios (harness / floor), not just absolute times: the training arithmetic here is tiny,
so nearly all time is framework overhead, and the question is whether the suite adds its own.
Each backend is measured in its own process (imports paid once there, peak memory its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conformance.problem import Optimizer, Problem  # noqa: E402

SIZES = {  # name: (n, features, batch_size, epochs)
    "small": (6, 1, 6, 500),
    "medium": (100, 1, 8, 40),
    "large": (1_000_000, 10, 1024, 1),
}
BACKENDS = ("keras", "gradient_tape", "torch")
OTHERS = ("jax",)  # measured like the v1 backends, against their own bare loop
COMPILED = ("keras_xla", "gradient_tape_xla", "torch_compile")  # each against its own bare compiled loop


def make_problem(n: int, features: int, batch_size: int, epochs: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x @ np.linspace(1, 2, features) + 0.5 + 0.01 * rng.normal(size=n)).astype(np.float32)
    sgd = Optimizer("sgd", {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0})
    return Problem("bench", x, y, np.zeros(features, np.float32), np.zeros((), np.float32), epochs, batch_size,
                   None, "mean", sgd, "float32")


def steps(problem: Problem) -> int:
    return problem.epochs * problem.steps_per_epoch


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
COMPILED_FLOORS = {"torch_compile": compiled_floor_torch, "keras_xla": compiled_floor_keras,
                   "gradient_tape_xla": compiled_floor_gradient_tape}


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


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


def keras_fit_floor(problem_data: dict) -> float:
    """In a Keras worker process: seconds of a bare `fit(x, y)` on the same model, no callbacks."""
    import keras

    from conformance.backends import _keras3, _keras_common

    problem = Problem.from_data(problem_data)
    with _keras_common.floatx(keras, problem.dtype):
        model = _keras_common.model(keras, problem, steps_per_execution=1,
                                    jit_compile=_keras3.JIT_COMPILE[keras.backend.backend()])
        started = time.perf_counter()
        model.fit(problem.x, problem.y.reshape(-1, 1), batch_size=problem.batch_size, epochs=problem.epochs,
                  verbose=0, shuffle=False)
        return time.perf_counter() - started


def measure_workers() -> list[dict]:
    """keras_jax and keras_torch: a worker's start-up (process, imports, setup), a call's round
    trip, and per step the harness (time inside the worker) against a bare `fit` there, with what
    carrying the problem and trajectory across the pipe adds."""
    from conformance import workers
    from conformance.backends import _keras3

    rows = []
    for framework in ("jax", "torch"):
        kind = _keras3.worker_kind(framework)
        started = time.perf_counter()
        workers.POOL.worker(kind)
        start_s = time.perf_counter() - started
        round_trips = [timed(workers.POOL.call, kind, "os:getpid") for _ in range(50)]
        here = str(Path(__file__).resolve().parent)
        row = {"backend": f"keras_{framework}", "start_s": start_s, "round_trip_ms": 1e3 * min(round_trips),
               "sizes": {}}
        _keras3.train(framework, make_problem(6, 1, 6, 3), "cpu")  # first compile of the step functions
        for size in ("small", "medium"):
            problem = make_problem(*SIZES[size])
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                info = _keras3.train(framework, problem, "cpu").info
                wall = time.perf_counter() - started
                floor = workers.POOL.call(kind, "run:keras_fit_floor", problem.to_data()) if here in sys.path \
                    else float("nan")
                runs.append((info["seconds_in_worker"], wall - info["seconds_in_worker"], floor))
            harness, carried, floor = min(runs)
            row["sizes"][size] = {"steps": steps(problem), "harness_ms": 1e3 * harness / steps(problem),
                                  "floor_ms": 1e3 * floor / steps(problem), "carried_ms": 1e3 * carried}
        rows.append(row)
    workers.POOL.stop_all()
    return rows


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


def growth() -> list[dict]:
    """Harness time against n (one epoch, batch 1024) and against epochs (6 points), torch and references."""
    from conformance.backends import torch as backend
    from conformance.reference import replay

    rows = []
    backend.train(make_problem(6, 1, 6, 3), "cpu")  # first use of torch, not the first size's cost
    for n in (10**3, 10**4, 10**5, 10**6):
        problem = make_problem(n, 10, 1024, 1)
        rows.append({"vary": "n", "value": n, "torch_s": timed(backend.train, problem, "cpu"),
                     "replay_s": timed(replay, problem)})
    for epochs in (100, 500, 2000):
        problem = make_problem(6, 1, 6, epochs)
        rows.append({"vary": "epochs", "value": epochs, "torch_s": timed(backend.train, problem, "cpu"),
                     "replay_s": timed(replay, problem)})
    return rows


def suite_wall(workers: str, only: tuple[str, ...] = (), label: str = "", env: dict | None = None,
               extra: tuple[str, ...] = ()) -> dict:
    """The suite's wall time (default selection, or only these backends), and where each test
    process spent it (its results.json)."""
    label = label or f"bench-n{workers}"
    selection = [argument for backend in only for argument in ("--backend", backend)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider", "-n", workers,
                    "--report-label", label, *selection, *extra], cwd=ROOT, capture_output=True, check=False,
                   env=os.environ | (env or {}))
    wall = time.perf_counter() - started
    data = json.loads((ROOT / "reports" / label / "results.json").read_text())
    processes = data["meta"]["time"]
    total = {key: sum(spent[key] for spent in processes.values()) for key in next(iter(processes.values()))}
    from conformance.report.writer import write_run

    report = timed(write_run, ROOT / "reports" / label, data["items"], data["meta"])
    # Every process could have worked for the whole wall time: that is the time there was to spend.
    available = wall * len(processes)
    return {"workers": workers, "processes": len(processes), "wall_s": wall, "report_s": report,
            "total": total, "share": (total["imports"] + total["training"]) / available,
            "outside_s": available - total["wall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="per-step ratios and memory only")
    parser.add_argument("--one", choices=BACKENDS + OTHERS + COMPILED, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--growth", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(measure_compiled(arguments.one) if arguments.one in COMPILED else
                         measure_backend(arguments.one)))
        return
    if arguments.growth:
        print(json.dumps(growth()))
        return
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    here = [sys.executable, str(Path(__file__).resolve())]
    results = [json.loads(subprocess.run(here + ["--one", backend], capture_output=True, text=True, env=env,
                                         check=True).stdout.splitlines()[-1]) for backend in BACKENDS + OTHERS]
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
    print("\nCompiled backends: steady per-step time (training less the recorded compile time) vs the bare "
          "compiled loop (after its first epoch), and the compile time per case")
    print(f"{'backend':18} {'size':7} {'steps':>6} {'harness ms/step':>16} {'floor ms/step':>14} {'ratio':>6} "
          f"{'compile s':>10}")
    for backend in COMPILED:
        result = json.loads(subprocess.run(here + ["--one", backend], capture_output=True, text=True, env=env,
                                           check=True).stdout.splitlines()[-1])
        for size, row in result["sizes"].items():
            print(f"{backend:18} {size:7} {row['steps']:6d} {row['harness_ms']:16.3f} {row['floor_ms']:14.3f} "
                  f"{row['harness_ms'] / row['floor_ms']:6.2f} {row['compile_s']:10.2f}")
    print("\nKeras 3 worker processes: start-up (process, imports, Keras on its backend), a call's round trip; "
          "per step the harness (inside the worker) vs a bare fit(x, y) there, and what carrying the problem "
          "and trajectory across the pipe adds per case")
    print(f"{'backend':12} {'start s':>8} {'call ms':>8} {'size':7} {'steps':>6} {'harness ms/step':>16} "
          f"{'floor ms/step':>14} {'ratio':>6} {'carried ms':>11}")
    for row in measure_workers():
        for size, numbers in row["sizes"].items():
            print(f"{row['backend']:12} {row['start_s']:8.2f} {row['round_trip_ms']:8.3f} {size:7} "
                  f"{numbers['steps']:6d} {numbers['harness_ms']:16.3f} {numbers['floor_ms']:14.3f} "
                  f"{numbers['harness_ms'] / numbers['floor_ms']:6.2f} {numbers['carried_ms']:11.2f}")
    if arguments.quick:
        return
    print("\nCost growth (torch backend and float64 replay)")
    for row in json.loads(subprocess.run(here + ["--growth"], capture_output=True, text=True, env=env,
                                         check=True).stdout.splitlines()[-1]):
        print(f"  {row['vary']:6} {row['value']:>8}: torch {row['torch_s']:7.3f} s   replay {row['replay_s']:7.3f} s")
    print("\nThe default suite (pytest conformance): seconds summed over test processes; the share is "
          "imports + training over (wall x processes)")
    for workers in ("0", "auto"):
        row = suite_wall(workers)
        total = row["total"]
        print(f"  -n {workers:4}: wall {row['wall_s']:5.1f} s x {row['processes']} process(es); imports "
              f"{total['imports']:5.1f}, training {total['training']:5.1f}, planning {total['planning']:4.1f}, "
              f"references {total['references']:4.1f}, harness {total['harness']:4.1f}, outside the processes' "
              f"pytest session (start, exit, report) {row['outside_s']:4.1f}; report writing alone "
              f"{row['report_s']:4.2f} s; imports + training {row['share']:.0%}")

    print("\nGenerated cases (--fuzz 20 --fuzz-seed 0, no shipped cases, default backends, -n auto)")
    with tempfile.TemporaryDirectory() as empty:
        row = suite_wall("auto", label="bench-fuzz", extra=("--fuzz", "20", "--fuzz-seed", "0", "--cases", empty))
    print(f"  wall {row['wall_s']:5.1f} s for 20 cases: {row['wall_s'] / 20:4.2f} s per generated case "
          f"(training {row['total']['training'] / 20:4.2f} s and references {row['total']['references'] / 20:4.2f} s "
          f"per case, summed over processes)")

    print("\nThe run of the shipped cases (-n auto) with and without the compiled backends, one after another; "
          "torch_compile first with an empty inductor cache (a new machine), then with the cache it left")
    baseline = None
    with tempfile.TemporaryDirectory() as cache:
        for name, only in (("v1 backends only", BACKENDS), ("v1 + jax", BACKENDS + ("jax",)),
                           ("v1 + keras_xla", BACKENDS + ("keras_xla",)),
                           ("v1 + gradient_tape_xla", BACKENDS + ("gradient_tape_xla",)),
                           ("v1 + keras_jax", BACKENDS + ("keras_jax",)),
                           ("v1 + keras_torch", BACKENDS + ("keras_torch",)),
                           ("default (v1, both XLA, jax, keras_jax, keras_torch)", ()),
                           ("v1 + torch_compile, cold cache", BACKENDS + ("torch_compile",)),
                           ("v1 + torch_compile, warm cache", BACKENDS + ("torch_compile",))):
            wall = suite_wall("auto", only, label="bench-selection", env={"TORCHINDUCTOR_CACHE_DIR": cache})["wall_s"]
            baseline = baseline or wall
            print(f"  {name:52}: wall {wall:5.1f} s, {wall / baseline:4.2f}x the v1 backends' run")

if __name__ == "__main__":
    main()

"""The bare framework loops ("floors") the harness is timed against: for each framework, the
fastest loop its users write, recording nothing, for any model (the linear model's floors here;
benchmarks/hidden.py passes a network to the same loops)."""

from __future__ import annotations

from _runner import steps

from conformance.problem import Problem


def floor_torch(problem: Problem) -> None:
    from conformance.backends._frameworks import torch as load_torch

    torch_sgd_loop(problem, load_torch().nn.Linear(problem.features, 1))


def torch_sgd_loop(problem: Problem, model) -> None:
    """Train `model` with torch.optim.SGD(0.01) and MSELoss over the problem's batches: the
    tutorial loop, nothing recorded (the bare torch loop of any model)."""
    from conformance.backends._frameworks import torch as load_torch

    torch = load_torch()
    x, y = torch.as_tensor(problem.x), torch.as_tensor(problem.y).reshape(-1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, foreach=False)
    loss_function = torch.nn.MSELoss()
    for _ in range(problem.epochs):
        for start in range(0, problem.n, problem.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_function(model(x[start:start + problem.batch_size]), y[start:start + problem.batch_size]).backward()
            optimizer.step()


def floor_keras(problem: Problem) -> None:
    """Keras's fast feeding path: one tf.data stream, one long epoch, one execution per epoch."""
    from conformance.backends import _tensorflow

    keras_fit_loop(problem, [_tensorflow.keras().layers.Dense(1)])


def keras_fit_loop(problem: Problem, layers: list) -> None:
    """`Sequential(layers)` compiled with SGD(0.01) and mse, fit on one tf.data stream of every
    epoch's batches (the bare Keras loop of any model)."""
    from conformance.backends import _frameworks, _tensorflow

    tf, keras = _frameworks.tensorflow(), _tensorflow.keras()
    model = keras.Sequential([keras.Input(shape=(problem.features,)), *layers])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=problem.steps_per_epoch)
    data = tf.data.Dataset.from_tensor_slices((problem.x, problem.y.reshape(-1, 1)))
    model.fit(data.batch(problem.batch_size).repeat(problem.epochs), epochs=1, steps_per_epoch=steps(problem),
              verbose=0)


def floor_gradient_tape(problem: Problem) -> None:
    """The same loop as one tf.function over every epoch (the fastest shape a hand-written loop takes)."""
    from conformance.backends import _frameworks

    tf = _frameworks.tensorflow()
    w, b = tf.Variable(tf.zeros((problem.features, 1))), tf.Variable(tf.zeros(1))
    tape_sgd_loop(problem, lambda x_batch: x_batch @ w + b, [w, b])


def tape_sgd_loop(problem: Problem, forward, variables: list) -> None:
    """Train `variables` of `forward(x_batch)` with Keras's SGD(0.01) on the mean squared error,
    in one tf.function over every epoch (the bare GradientTape loop of any model)."""
    from conformance.backends import _frameworks, _tensorflow

    tf = _frameworks.tensorflow()
    optimizer = _tensorflow.keras().optimizers.SGD(0.01)
    x, y = tf.constant(problem.x), tf.constant(problem.y.reshape(-1, 1))

    @tf.function
    def training() -> None:
        for _ in tf.range(problem.epochs):
            for start in tf.range(0, problem.n, problem.batch_size):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(forward(x[start:start + problem.batch_size])
                                                    - y[start:start + problem.batch_size]))
                optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    training()


def floor_jax(problem: Problem) -> None:
    """The same jitted loop (value_and_grad, optax.sgd, lax.scan over epochs and full batches),
    recording nothing; compiled before it is timed, as the harness's compile is part of its time."""
    from conformance.backends import _frameworks

    _frameworks.jax()
    import jax.numpy as jnp

    def loss_of(params, x_batch, y_batch):
        return jnp.mean(jnp.square(x_batch @ params["w"] + params["b"] - y_batch))

    params = {"w": jnp.zeros((problem.features, 1), jnp.float32), "b": jnp.zeros(1, jnp.float32)}
    jax_sgd_loop(problem, loss_of, params)


def jax_sgd_loop(problem: Problem, loss_of, params) -> None:
    """Train `params` on `loss_of(params, x_batch, y_batch)` with optax.sgd(0.01) in one jitted
    loop over the problem's epochs and batches (the bare JAX loop of any model)."""
    from conformance.backends import _frameworks

    jax = _frameworks.jax()
    import jax.numpy as jnp
    import optax

    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y.reshape(-1, 1))
    optimizer = optax.sgd(0.01)
    batches, last = divmod(problem.n, problem.batch_size)

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

    jax.block_until_ready(training(params))


FLOORS = {"torch": floor_torch, "keras": floor_keras, "gradient_tape": floor_gradient_tape, "jax": floor_jax}



"""A catalogue of deliberately wrong frameworks: the suite's own mutation testing.

Each mutant is one small, realistic bug put into a real framework (a wrong default, a constant
off by a little, a formula variant, a dtype silently lowered), by patching the framework's own
class or function the way a bad release would change it. The suite is as good as the mutants it
catches: `benchmarks/mutation.py` runs the shipped cases against each one and prints the score.

Loaded as a pytest plugin, with the mutant named in the environment:

    CONFORMANCE_MUTANT=torch-sgd-nesterov-ignored pytest conformance -p tests.mutants --backend torch

The plugin patches the test process (torch, TensorFlow and Keras on it, JAX and optax) and asks
the Keras worker processes (Keras on JAX, on PyTorch) to load the same mutant when they start
(`CONFORMANCE_WORKER_SETUP`, read by conformance/workers.py). Without CONFORMANCE_MUTANT, or
with a name that is not here, nothing is patched (an unknown name is an error).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VARIABLE = "CONFORMANCE_MUTANT"
TF_KERAS = ("keras", "keras_xla", "gradient_tape", "gradient_tape_xla")  # Keras's optimizers on TensorFlow


@dataclass(frozen=True)
class Mutant:
    name: str
    backends: tuple[str, ...]  # the backends that train with the mutated code: the ones that must catch it
    process: str  # where the patch goes: "main" (the test process), a Keras worker ("keras_jax", "keras_torch")
    # or a data-parallel worker ("jax_sharded", "tf_replicated")
    bug: str  # what is wrong, in a user's words
    apply: Callable[[], None]


def _patch_init(cls: type, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Make `cls(...)` see `change(keyword arguments)`: the backends pass every setting by name."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **change(dict(kwargs)))

    cls.__init__ = __init__


def _patch_function(owner: Any, name: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **change(dict(kwargs)))

    setattr(owner, name, patched)


def _set(**values: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda kwargs: kwargs | values


def _scaled(name: str, factor: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda kwargs: kwargs | {name: kwargs[name] * factor}


def _one_minus_scaled(name: str, factor: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A beta whose 1 - beta is `factor` times the given one (a decay constant off by a little)."""
    return lambda kwargs: kwargs | {name: 1 - (1 - kwargs[name]) * factor}


# ---- torch ------------------------------------------------------------------------------------

def _torch() -> Any:
    from conformance.backends import _frameworks

    return _frameworks.torch()


def _torch_adam_amsgrad_ignored() -> None:
    _patch_init(_torch().optim.Adam, _set(amsgrad=False))


def _torch_huber_as_smooth_l1() -> None:
    """HuberLoss computing SmoothL1Loss(beta=delta), which is Huber / delta (the confusion the
    case format's note warns about)."""
    torch = _torch()
    original = torch.nn.HuberLoss.forward

    def forward(self: Any, input: Any, target: Any) -> Any:
        return original(self, input, target) / self.delta

    torch.nn.HuberLoss.forward = forward


def _torch_adam_betas(kwargs: dict[str, Any]) -> dict[str, Any]:
    beta_1, beta_2 = kwargs["betas"]
    return kwargs | {"betas": (beta_1, 1 - (1 - beta_2) * 1.01)}


# ---- TensorFlow and Keras ------------------------------------------------------------------------

def _tf_keras() -> Any:
    from conformance.backends import _tensorflow

    return _tensorflow.keras()


def _keras_here() -> Any:
    """Keras in a worker process, on the backend KERAS_BACKEND names."""
    import keras

    return keras


def _tape_logits_loss_written_out() -> None:
    """tf.nn.sigmoid_cross_entropy_with_logits as the textbook formula on sigmoid(z): log(0) once
    a logit saturates, instead of the stable max(z, 0) - z y + log(1 + exp(-|z|))."""
    from conformance.backends import _frameworks

    tf = _frameworks.tensorflow()

    def written_out(labels: Any = None, logits: Any = None, name: Any = None) -> Any:
        p = tf.math.sigmoid(logits)
        return -(labels * tf.math.log(p) + (1 - labels) * tf.math.log(1 - p))

    tf.nn.sigmoid_cross_entropy_with_logits = written_out


# ---- JAX and optax ------------------------------------------------------------------------------

def _jax() -> Any:
    from conformance.backends import _frameworks

    return _frameworks.jax()


def _optax() -> Any:
    from conformance.backends import _frameworks

    _frameworks.jax()
    import optax

    return optax


def _optax_updates_float32() -> None:
    """optax.apply_updates rounding every update to float32 before adding it (a dtype lowered)."""
    optax = _optax()
    import jax
    import jax.numpy as jnp

    original = optax.apply_updates

    def apply_updates(params: Any, updates: Any) -> Any:
        return original(params, jax.tree.map(lambda u: u.astype(jnp.float32).astype(u.dtype), updates))

    optax.apply_updates = apply_updates


CATALOGUE = [Mutant(*fields) for fields in [
    ("torch-sgd-nesterov-ignored", ("torch", "torch_compile"), "main",
     "torch.optim.SGD drops nesterov=True (issue 25's mutant)",
     lambda: _patch_init(_torch().optim.SGD, _set(nesterov=False))),
    ("torch-sgd-lr-1e-4", ("torch", "torch_compile"), "main",
     "torch.optim.SGD's learning rate 1e-4 (relative) too large",
     lambda: _patch_init(_torch().optim.SGD, _scaled("lr", 1 + 1e-4))),
    ("torch-adam-amsgrad-ignored", ("torch", "torch_compile"), "main",
     "torch.optim.Adam drops amsgrad=True", _torch_adam_amsgrad_ignored),
    ("torch-adam-beta2-off", ("torch", "torch_compile"), "main",
     "torch.optim.Adam's 1 - beta_2 1% too large",
     lambda: _patch_init(_torch().optim.Adam, _torch_adam_betas)),
    ("torch-rmsprop-alpha-default", ("torch", "torch_compile"), "main",
     "torch.optim.RMSprop keeps its own default alpha 0.99 over the one given",
     lambda: _patch_init(_torch().optim.RMSprop, _set(alpha=0.99))),
    ("torch-adagrad-accumulator-ignored", ("torch", "torch_compile"), "main",
     "torch.optim.Adagrad starts its accumulator at 0 whatever initial_accumulator_value says",
     lambda: _patch_init(_torch().optim.Adagrad, _set(initial_accumulator_value=0.0))),
    ("torch-huber-as-smooth-l1", ("torch", "torch_compile"), "main",
     "torch.nn.HuberLoss computes SmoothL1Loss(beta=delta) = Huber / delta", _torch_huber_as_smooth_l1),
    ("keras-adam-beta1-off", TF_KERAS, "main",
     "Keras's Adam with 1 - beta_1 1% too large (issue 25's mutant)",
     lambda: _patch_init(_tf_keras().optimizers.Adam, _one_minus_scaled("beta_1", 1.01))),
    ("keras-sgd-nesterov-ignored", TF_KERAS, "main",
     "Keras's SGD drops nesterov=True",
     lambda: _patch_init(_tf_keras().optimizers.SGD, _set(nesterov=False))),
    ("keras-rmsprop-centered-ignored", TF_KERAS, "main",
     "Keras's RMSprop drops centered=True",
     lambda: _patch_init(_tf_keras().optimizers.RMSprop, _set(centered=False))),
    ("keras-huber-delta-default", ("keras", "keras_xla"), "main",
     "keras.losses.Huber keeps its default delta 1.0 over the one given",
     lambda: _patch_init(_tf_keras().losses.Huber, _set(delta=1.0))),
    ("tape-logits-loss-written-out", ("gradient_tape", "gradient_tape_xla", "keras", "keras_xla"), "main",
     "tf.nn.sigmoid_cross_entropy_with_logits written out on sigmoid(z) (unstable once a logit saturates)",
     _tape_logits_loss_written_out),
    ("optax-sgd-nesterov-ignored", ("jax",), "main",
     "optax.sgd drops nesterov=True",
     lambda: _patch_function(_optax(), "sgd", _set(nesterov=False))),
    ("optax-adam-eps-in-root", ("jax",), "main",
     "optax.adam puts epsilon inside the square root (eps_root) instead of outside",
     lambda: _patch_function(_optax(), "adam", lambda kwargs: kwargs | {"eps_root": kwargs["eps"], "eps": 0.0})),
    ("optax-updates-float32", ("jax",), "main",
     "optax.apply_updates rounds every update to float32", _optax_updates_float32),
    ("keras-jax-sgd-nesterov-ignored", ("keras_jax",), "keras_jax",
     "Keras on JAX: SGD drops nesterov=True",
     lambda: _patch_init(_keras_here().optimizers.SGD, _set(nesterov=False))),
    ("keras-jax-rmsprop-rho-off", ("keras_jax",), "keras_jax",
     "Keras on JAX: RMSprop's 1 - rho 1% too large",
     lambda: _patch_init(_keras_here().optimizers.RMSprop, _one_minus_scaled("rho", 1.01))),
    ("keras-torch-adam-beta2-off", ("keras_torch",), "keras_torch",
     "Keras on PyTorch: Adam's 1 - beta_2 1% too large",
     lambda: _patch_init(_keras_here().optimizers.Adam, _one_minus_scaled("beta_2", 1.01))),
    ("keras-torch-adagrad-accumulator-default", ("keras_torch",), "keras_torch",
     "Keras on PyTorch: Adagrad keeps Keras's default initial accumulator 0.1 over the one given",
     lambda: _patch_init(_keras_here().optimizers.Adagrad, _set(initial_accumulator_value=0.1))),
]]
CATALOGUE += [Mutant(*fields) for fields in [  # v1.2: schedules and clipping
    ("torch-multisteplr-one-step-late", ("torch", "torch_compile"), "main",
     "torch's MultiStepLR switches one step after each milestone (Keras's convention)",
     lambda: _patch_init(_torch().optim.lr_scheduler.MultiStepLR,
                         lambda kwargs: kwargs | {"milestones": [m + 1 for m in kwargs["milestones"]]})),
    ("keras-piecewise-one-step-late", TF_KERAS, "main",
     "Keras's PiecewiseConstantDecay switches one step later than it does",
     lambda: _patch_init(_tf_keras().optimizers.schedules.PiecewiseConstantDecay,
                         lambda kwargs: kwargs | {"boundaries": [b + 1 for b in kwargs["boundaries"]]})),
    ("keras-clipnorm-as-global", TF_KERAS, "main",
     "Keras's clipnorm clips all variables together (as global_clipnorm does), not each on its own",
     lambda: _patch_init(_tf_keras().optimizers.SGD, lambda kwargs: kwargs | (
         {"global_clipnorm": kwargs["clipnorm"], "clipnorm": None} if kwargs.get("clipnorm") else {}))),
    ("optax-clip-global-norm-off", ("jax",), "main",
     "optax.clip_by_global_norm clips at a threshold 1% too large",
     lambda: _patch_function(_optax(), "clip_by_global_norm", _scaled("max_norm", 1.01))),
]]


def _torch_relu_as_clamp() -> None:
    """nn.ReLU computing input.clamp(min=0): the same values, but clamp's gradient at exactly 0
    is 1 (it passes where input >= min), relu's 0."""
    torch = _torch()
    torch.nn.ReLU.forward = lambda self, input: input.clamp(min=0)


def _jax_relu_as_maximum() -> None:
    """jax.nn.relu as jnp.maximum(x, 0), whose gradient at a tie is 0.5 (why JAX gave relu a
    custom derivative)."""
    jax = _jax()
    jax.nn.relu = lambda x: jax.numpy.maximum(x, 0)


CATALOGUE += [Mutant(*fields) for fields in [  # v1.2: hidden layers
    ("torch-gelu-tanh-form", ("torch", "torch_compile"), "main",
     "torch.nn.GELU computes the tanh approximation whatever approximate says",
     lambda: _patch_init(_torch().nn.GELU, _set(approximate="tanh"))),
    ("torch-leaky-relu-default-slope", ("torch", "torch_compile"), "main",
     "torch.nn.LeakyReLU keeps its default slope 0.01 over the one given",
     lambda: _patch_init(_torch().nn.LeakyReLU, _set(negative_slope=0.01))),
    ("torch-relu-as-clamp", ("torch", "torch_compile"), "main",
     "torch.nn.ReLU as clamp(min=0), whose gradient at exactly 0 is 1", _torch_relu_as_clamp),
    ("keras-gelu-approximate-default", ("keras", "keras_xla"), "main",
     "keras.activations.gelu computes the tanh form whatever approximate says (keras.ops.gelu's default)",
     lambda: _patch_function(_tf_keras().activations, "gelu", _set(approximate=True))),
    ("jax-elu-alpha-default", ("jax",), "main",
     "jax.nn.elu keeps its default alpha 1.0 over the one given",
     lambda: _patch_function(_jax().nn, "elu", _set(alpha=1.0))),
    ("jax-relu-as-maximum", ("jax",), "main",
     "jax.nn.relu as jnp.maximum(x, 0), whose gradient at exactly 0 is 0.5", _jax_relu_as_maximum),
]]

_AUTOCAST = {"dtype": None}  # the compute dtype of the last torch.autocast made (the master-weight mutant's)


def _torch_master_weights_in_compute_dtype() -> None:
    """Every optimizer step leaves the parameters rounded to the autocast dtype: master weights
    kept in the compute dtype (what `model.to(torch.bfloat16)` under autocast does), so updates
    smaller than half its spacing are lost."""
    torch = _torch()
    original_init = torch.autocast.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _AUTOCAST["dtype"] = kwargs.get("dtype")

    torch.autocast.__init__ = __init__
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad):
        _round_after_step(torch, cls)


def _round_after_step(torch: Any, cls: type) -> None:
    original = cls.step

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        dtype = _AUTOCAST["dtype"]
        if dtype is not None:
            with torch.no_grad():
                for group in self.param_groups:
                    for parameter in group["params"]:
                        parameter.copy_(parameter.to(dtype).to(parameter.dtype))
        return result

    cls.step = step


def _torch_mse_in_input_dtype() -> None:
    """nn.MSELoss written out as ((input - target) ** 2) in the input's dtype: under autocast the
    loss is computed in the compute dtype (float16's squares overflow past 256)."""
    torch = _torch()

    def forward(self: Any, input: Any, target: Any) -> Any:
        squared = (input - target.to(input.dtype)) ** 2
        return squared.sum() if self.reduction == "sum" else squared.mean()

    torch.nn.MSELoss.forward = forward


def _keras_policy_variables_in_compute_dtype() -> None:
    """A mixed DTypePolicy that creates its variables in the compute dtype (the `dtype="bfloat16"`
    confusion): master weights in bfloat16 / float16."""
    keras = _tf_keras()
    keras.DTypePolicy.variable_dtype = property(lambda self: self.compute_dtype)


def _optax_apply_if_finite_applies() -> None:
    """optax.apply_if_finite that applies every update, non-finite ones included (the skip of a
    dynamic loss scale does nothing)."""
    optax = _optax()
    optax.apply_if_finite = lambda inner, max_consecutive_errors: inner


CATALOGUE += [Mutant(*fields) for fields in [  # v1.2: mixed precision
    ("torch-master-weights-in-compute-dtype", ("torch", "torch_compile"), "main",
     "parameters kept in the autocast dtype after every optimizer step (master weights not float32)",
     _torch_master_weights_in_compute_dtype),
    ("torch-mse-in-compute-dtype", ("torch", "torch_compile"), "main",
     "MSELoss computed in its input's dtype: under autocast, a float16 loss that overflows",
     _torch_mse_in_input_dtype),
    ("torch-grad-scaler-default-initial-scale", ("torch", "torch_compile"), "main",
     "GradScaler keeps its default initial scale 2^16 over the one given (a different skipped-step sequence)",
     lambda: _patch_init(_torch().amp.GradScaler, _set(init_scale=2.0**16))),
    ("keras-mixed-policy-variables-in-compute-dtype", ("keras", "keras_xla"), "main",
     "a mixed DTypePolicy creates its variables in the compute dtype (master weights not float32)",
     _keras_policy_variables_in_compute_dtype),
    ("keras-loss-scale-default-initial-scale", TF_KERAS, "main",
     "LossScaleOptimizer keeps its default initial scale 2^15 over the one given",
     lambda: _patch_init(_tf_keras().optimizers.LossScaleOptimizer, _set(initial_scale=2.0**15))),
    ("optax-apply-if-finite-applies", ("jax",), "main",
     "optax.apply_if_finite applies non-finite updates: a dynamic loss scale's skip does nothing",
     _optax_apply_if_finite_applies),
]]


def _jax_pmean_as_psum() -> None:
    """lax.pmean summing instead of averaging over the replicas (the gradient R times too large)."""
    import jax

    jax.lax.pmean = jax.lax.psum


def _tf_average_loss_per_replica() -> None:
    """tf.nn.compute_average_loss dividing by each replica's own batch, not the global batch size:
    the mistake TensorFlow's distributed-training guide warns of (gradients R times too large
    after the all-reduce's sum)."""
    import tensorflow as tf

    original = tf.nn.compute_average_loss

    def per_replica(losses: Any, sample_weight: Any = None, global_batch_size: Any = None) -> Any:
        return original(losses, sample_weight=sample_weight, global_batch_size=tf.shape(losses)[0])

    tf.nn.compute_average_loss = per_replica


CATALOGUE += [Mutant(*fields) for fields in [  # v1.2: data parallelism
    ("jax-pmean-as-psum", ("jax",), "jax_sharded", "lax.pmean sums over the replicas instead of averaging",
     _jax_pmean_as_psum),
    ("tape-average-loss-per-replica", ("gradient_tape", "gradient_tape_xla"), "tf_replicated",
     "tf.nn.compute_average_loss divides by the replica's own batch, not the global batch size",
     _tf_average_loss_per_replica),
]]



def _keras_accumulation_ignored() -> None:
    """Keras 3's optimizers dropping gradient_accumulation_steps: a step every batch."""
    _patch_init(_tf_keras().optimizers.Optimizer, lambda kwargs: kwargs | {"gradient_accumulation_steps": None}
                if "gradient_accumulation_steps" in kwargs else kwargs)


def _optax_multisteps_summed() -> None:
    """optax.MultiSteps summing the accumulated gradients instead of averaging them."""
    _patch_init(_optax().MultiSteps, _set(use_grad_mean=False))


def _optax_multisteps_one_early() -> None:
    """optax.MultiSteps updating after N - 1 mini-steps (an off-by-one in its emit test)."""
    _patch_init(_optax().MultiSteps, lambda kwargs: kwargs | {"every_k_schedule": kwargs["every_k_schedule"] - 1})


def _lightning_accumulation_ignored() -> None:
    """Lightning's Trainer ignoring accumulate_grad_batches: a step every batch."""
    import pytorch_lightning

    _patch_init(pytorch_lightning.Trainer, _set(accumulate_grad_batches=1))


def _accelerate_scheduler_per_batch() -> None:
    """Accelerate's prepared scheduler stepping on every batch, not with the optimizer."""
    import accelerate

    _patch_init(accelerate.Accelerator, _set(step_scheduler_with_optimizer=False))


def _lightning_clip_per_micro_batch() -> None:
    """Lightning clipping after every backward pass (each micro-batch's partial sum), not once
    before the accumulated step: its precision plugin's post_backward clipping too."""
    from pytorch_lightning.plugins.precision import Precision

    original = Precision.post_backward

    def post_backward(self: Any, tensor: Any, module: Any) -> Any:
        trainer = module.trainer
        if trainer.gradient_clip_val:
            self.clip_gradients(trainer.optimizers[0], trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        return original(self, tensor, module)

    Precision.post_backward = post_backward


CATALOGUE += [Mutant(*fields) for fields in [  # v1.3: gradient accumulation
    ("lightning-clip-per-micro-batch", ("lightning",), "main",
     "Lightning clips the gradients after every micro-batch's backward pass, not once per step",
     _lightning_clip_per_micro_batch),
    ("lightning-accumulation-ignored", ("lightning",), "main",
     "Lightning's Trainer ignores accumulate_grad_batches and steps every batch", _lightning_accumulation_ignored),
    ("accelerate-scheduler-per-batch", ("accelerate",), "main",
     "Accelerate steps the scheduler on every batch instead of with the optimizer", _accelerate_scheduler_per_batch),
    ("keras-accumulation-ignored", ("keras", "keras_xla"), "main",
     "Keras's optimizer ignores gradient_accumulation_steps and steps every batch", _keras_accumulation_ignored),
    ("optax-multisteps-summed", ("jax",), "main",
     "optax.MultiSteps sums the accumulated gradients instead of averaging them", _optax_multisteps_summed),
    ("optax-multisteps-one-early", ("jax",), "main",
     "optax.MultiSteps updates after N - 1 mini-steps instead of N", _optax_multisteps_one_early),
]]

from tests.mutants_formulas import FORMULA_MUTANTS  # noqa: E402  (it imports the helpers above)

CATALOGUE += FORMULA_MUTANTS  # optimizer constants, rates, clipping thresholds and epsilon placement
BY_NAME = {mutant.name: mutant for mutant in CATALOGUE}


def selected() -> Mutant | None:
    """The mutant CONFORMANCE_MUTANT names; None without one; ValueError for an unknown name."""
    name = os.environ.get(VARIABLE)
    if not name:
        return None
    if name not in BY_NAME:
        raise ValueError(f"{VARIABLE}={name!r} is not in the catalogue ({', '.join(BY_NAME)})")
    return BY_NAME[name]


def in_worker() -> None:
    """Called by a Keras worker process at start: patch it when the mutant lives there."""
    mutant = selected()
    if mutant is not None and mutant.process == _worker_process():
        mutant.apply()


def _worker_process() -> str:
    """Which worker this process is: Keras on JAX or PyTorch, or a data-parallel worker (JAX with
    host devices, TensorFlow with logical devices)."""
    keras = {"jax": "keras_jax", "torch": "keras_torch"}.get(os.environ.get("KERAS_BACKEND", ""), "")
    if keras:
        return keras
    from conformance.backends import _tf_distributed

    if _tf_distributed.REPLICAS_VARIABLE in os.environ:
        return "tf_replicated"
    return "jax_sharded" if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") else ""


def pytest_configure(config: Any) -> None:
    mutant = selected()
    if mutant is None:
        return
    if mutant.process == "main":
        mutant.apply()
    else:
        os.environ["CONFORMANCE_WORKER_SETUP"] = "tests.mutants:in_worker"

"""Your own training loop as a backend: `pytest conformance --backend examples/my_training_loop.py`.

A copy of the loop a team already has (a plain PyTorch loop here), adapted to the harness's
interface: it receives the case as plain NumPy (`conformance.problem.Problem`: data in the
training dtype, initial parameters, each epoch's batch order, every hyperparameter) and returns
every epoch's parameters and loss (`conformance.problem.Trajectory`). What it does not train, it
refuses with `Unavailable` and a reason: those cases skip for it. Its results are checked like the
shipped backends': against the float64 replay of its own formulas (SWITCHES), at every epoch,
and against every other backend.
"""

from __future__ import annotations

import numpy as np

from conformance.backends import Unavailable
from conformance.problem import Problem, Trajectory

NAME = "my_loop"  # how results and item ids name it
LOOKED_FOR = ("cpu",)  # device kinds it asks for

# Where this loop computes differently from the case format, by a formula the replay knows
# (conformance/formulas.yaml names them all): torch's clip_grad_norm_ adds 1e-6 to the norm.
SWITCHES = [{"name": "clip_norm_plus_epsilon", "when": {"clip": "global_norm"},
             "reason": "our loop clips with torch.nn.utils.clip_grad_norm_, which divides by norm + 1e-6",
             "source": "torch/nn/utils/clip_grad.py", "shows": "examples/my_training_loop.py"}]


def available() -> str | None:
    """None when it can run here, else why not (the items skip with it)."""
    import importlib.util

    return None if importlib.util.find_spec("torch") else "torch is not installed"


def devices() -> list[str]:
    return ["cpu"]


def device_name(device: str) -> str:
    return "CPU"


def train(problem: Problem, device: str) -> Trajectory:
    import torch

    if problem.hidden or problem.precision or problem.replicas > 1 or problem.accumulate > 1 \
            or problem.schedule or problem.loss != "mse" or problem.optimizer.name not in ("sgd", "adam"):
        raise Unavailable("my_loop trains the linear model with mse, SGD or Adam, one replica, no schedule")
    dtype = getattr(torch, problem.dtype)
    model = torch.nn.Linear(problem.features, 1, bias=problem.has_bias, dtype=dtype)
    with torch.no_grad():  # the case's initial parameters, not our own init
        model.weight.copy_(torch.as_tensor(problem.init_weights).reshape(1, -1))
        if problem.has_bias:
            model.bias.copy_(torch.as_tensor(problem.init_bias).reshape(1))
    settings = problem.optimizer.settings
    if problem.optimizer.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings["learning_rate"], momentum=settings["momentum"],
                                    nesterov=settings["nesterov"], weight_decay=settings.get("weight_decay", 0.0))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"], eps=settings["epsilon"],
                                     betas=(settings["beta_1"], settings["beta_2"]), amsgrad=settings["amsgrad"],
                                     weight_decay=settings.get("weight_decay", 0.0))
    loss_function = torch.nn.MSELoss(reduction=problem.reduction)
    x, y = torch.as_tensor(problem.x), torch.as_tensor(problem.y).reshape(-1, 1)
    w = None if problem.sample_weight is None else torch.as_tensor(problem.sample_weight).reshape(-1, 1)
    params, losses = [], []
    for epoch in range(problem.epochs):
        total = 0.0
        for rows in problem.batches(epoch):  # the harness's batches, in its order
            optimizer.zero_grad()
            if w is None:
                loss = loss_function(model(x[rows]), y[rows])
            else:
                per_sample = (model(x[rows]) - y[rows]) ** 2 * w[rows]
                loss = per_sample.mean() if problem.reduction == "mean" else per_sample.sum()
            loss.backward()
            if problem.clip is not None:
                if problem.clip["kind"] != "global_norm":
                    raise Unavailable("my_loop clips by the global norm only")
                torch.nn.utils.clip_grad_norm_(model.parameters(), problem.clip["threshold"])
            optimizer.step()
            total += float(loss) * len(y[rows])
        layout = [model.weight.detach().reshape(-1)] + ([model.bias.detach()] if problem.has_bias else [])
        params.append(torch.cat(layout).double().numpy())  # [weights..., bias], the harness's layout
        losses.append(total / problem.n)
    predictions = None
    if problem.predict_x is not None:
        with torch.no_grad():
            predictions = model(torch.as_tensor(problem.predict_x))[:, 0].double().numpy()
    return Trajectory(np.array(params), np.array(losses), predictions, {"torch": torch.__version__})

"""The trainer backends (`lightning`, `accelerate`): what their skips and calls rest on, and the
float16 records read back from Lightning's GradScaler against the torch loop's own."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conformance.case import CaseFile, load
from conformance.prepare import prepare
from tests.conftest import ROOT

torch = pytest.importorskip("torch")


def case_problem(name: str):
    path = ROOT / "cases" / name
    return prepare(load(CaseFile(path, path.parent))).problem


def test_accelerate_fp16_on_the_cpu_makes_neither_autocast_nor_a_scaler():
    """The accelerate backend's float16 skip says so: if this fails, Accelerate trains float16 on
    the CPU now and the skip must go."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="fp16")
    try:
        assert accelerator.native_amp is False and accelerator.scaler is None
        with accelerator.autocast():
            output = torch.nn.Linear(2, 1)(torch.ones(1, 2))
        assert output.dtype == torch.float32
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_lightning_16_mixed_on_the_cpu_becomes_bfloat16_unless_the_plugin_is_passed():
    """Why the lightning backend passes MixedPrecision('16-mixed', 'cpu', scaler) itself."""
    pl = pytest.importorskip("pytorch_lightning")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = pl.Trainer(accelerator="cpu", devices=1, precision="16-mixed", logger=False)
        plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        passed = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False)
    assert flagged.precision_plugin.precision == "bf16-mixed"
    assert passed.precision_plugin.precision == "16-mixed"


def test_lightning_float16_scales_and_skips_as_the_torch_loop_does():
    """Lightning runs torch's GradScaler with the case's settings: the same scale at every epoch's
    end and the same skipped steps as the torch loop (decisions: compared exactly)."""
    pytest.importorskip("pytorch_lightning")
    from conformance.backends import lightning
    from conformance.backends import torch as torch_backend

    problem = case_problem("precision/float16-adam-dynamic-overflow.yaml")
    trained, loop = lightning.train(problem, "cpu"), torch_backend.train(problem, "cpu")
    assert loop.skipped.sum() > 0, "the case must skip steps for this to test anything"
    np.testing.assert_array_equal(trained.loss_scale, loop.loss_scale)
    np.testing.assert_array_equal(trained.skipped, loop.skipped)
    np.testing.assert_array_equal(trained.params, loop.params)
    assert trained.info["precision"]["output_dtype"] == "float16"

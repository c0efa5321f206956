"""Device discovery and selection without a GPU: the frameworks' device queries are faked here
(the guide's allowance for discovery tests); training itself is never faked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conformance.backends import _frameworks, _tensorflow
from conformance.backends import torch as torch_backend
from conformance.items import plan

CASE = """\
dataset: {inline: {x: [1, 2, 3], y: [2, 4, 6]}}
training: {epochs: 3, optimizer: {sgd: {learning_rate: 0.01}}, dtype: %s}
"""


def fake_torch(gpus: int, mps: bool | None):
    backends = SimpleNamespace() if mps is None else SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps))
    return SimpleNamespace(cuda=SimpleNamespace(device_count=lambda: gpus, get_device_name=lambda i: f"Fake GPU {i}"),
                           backends=backends)


def fake_tensorflow(gpus: int, xla: bool = True):
    physical = [SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(gpus)]
    experimental = SimpleNamespace(get_device_details=lambda gpu: {"device_name": f"Fake TF {gpu.name[-1]}"})
    return SimpleNamespace(config=SimpleNamespace(
        list_physical_devices=lambda kind: physical if kind == "GPU" else [], experimental=experimental),
        test=SimpleNamespace(is_built_with_xla=lambda: xla))


def fake_jax(gpus: int):
    def devices(kind: str):
        if kind == "gpu" and not gpus:
            raise RuntimeError("Unknown backend: 'gpu' requested, but no platforms that are instances of gpu")
        found = [SimpleNamespace(device_kind=f"Fake JAX {kind} {i}") for i in range(gpus if kind == "gpu" else 1)]
        return found

    return SimpleNamespace(devices=devices)


@pytest.fixture
def machine(monkeypatch):
    """machine(torch_gpus, mps, tf_gpus): pretend the frameworks see these devices."""

    def pretend(torch_gpus: int = 0, mps: bool | None = False, tf_gpus: int = 0, xla: bool = True) -> None:
        monkeypatch.setattr(_frameworks, "installed", lambda module: True)
        monkeypatch.setattr(_frameworks, "distribution_version", lambda name: "3.0.0-fake")
        monkeypatch.setattr(_frameworks, "torch", lambda: fake_torch(torch_gpus, mps))
        monkeypatch.setattr(_frameworks, "tensorflow", lambda: fake_tensorflow(tf_gpus, xla))
        monkeypatch.setattr(_frameworks, "jax", lambda: fake_jax(tf_gpus))
        monkeypatch.setattr(_frameworks, "cpu_name", lambda: "Fake CPU")
        # not through the fake TensorFlow: _tensorflow.keras() caches the module it first gets
        monkeypatch.setattr(_tensorflow, "keras_version", lambda: "3.0.0-fake")

    return pretend


def test_torch_sees_cpu_every_cuda_device_and_mps(machine):
    machine(torch_gpus=2, mps=True)
    assert torch_backend.devices() == ["cpu", "cuda:0", "cuda:1", "mps"]
    assert torch_backend.device_name("cuda:1") == "Fake GPU 1"


def test_torch_without_an_mps_backend_module_has_no_mps(machine):
    machine(torch_gpus=0, mps=None)
    assert torch_backend.devices() == ["cpu"]


def test_tensorflow_gpus_use_the_suites_cuda_names(machine):
    machine(tf_gpus=1)
    assert _tensorflow.devices() == ["cpu", "cuda:0"]
    assert _tensorflow.tf_device("cuda:0") == "/GPU:0" and _tensorflow.tf_device("cpu") == "/CPU:0"
    assert _tensorflow.device_name("cuda:0") == "Fake TF 0" and _tensorflow.device_name("cpu") == "Fake CPU"


def ids(items):
    return {item.id: item for item in items}


def test_every_case_runs_on_every_device_each_backend_sees(machine, tmp_path):
    machine(torch_gpus=1, mps=True, tf_gpus=1)
    (tmp_path / "f32.yaml").write_text(CASE % "float32")
    (tmp_path / "f64.yaml").write_text(CASE % "float64")
    planned = plan([tmp_path], [], [])
    items = ids(planned.items)
    for backend in ("keras", "gradient_tape", "torch"):
        assert f"f32-{backend}-cpu-parity" in items and f"f32-{backend}-cuda:0-parity" in items
    assert "f32-torch-mps-parity" in items and "f32-keras-mps-parity" not in items
    assert items["f64-torch-mps-unavailable"].skip == "mps has no float64; this case trains in float64"
    assert planned.runs["f32"].pairs[:2] == [("keras", "cpu"), ("keras", "cuda:0")]  # compared across devices too
    assert planned.devices["torch"] == {"looked_for": ["cpu", "cuda", "mps"], "devices": ["cpu", "cuda:0", "mps"],
                                        "names": {"cpu": "Fake CPU", "cuda:0": "Fake GPU 0", "mps": "Apple MPS"},
                                        "not_found": [], "selected": True}


def test_cpu_only_machine_reports_what_was_looked_for_and_not_found(machine, tmp_path):
    machine()
    (tmp_path / "f32.yaml").write_text(CASE % "float32")
    planned = plan([tmp_path], [], [])
    assert planned.devices["torch"]["not_found"] == ["cuda", "mps"]
    assert planned.devices["keras"]["not_found"] == ["cuda"]
    assert {item.device for item in planned.items if item.device} == {"cpu"}


def test_device_option_and_case_devices_select_and_explain(machine, tmp_path):
    machine(torch_gpus=2, tf_gpus=1)
    (tmp_path / "gpu1.yaml").write_text(CASE % "float32" + "devices: [cuda:1]\n")
    items = ids(plan([tmp_path], [], ["cuda:1"]).items)
    assert "gpu1-torch-cuda:1-parity" in items
    assert items["gpu1-keras-cuda:1-unavailable"].skip == "cuda:1 is not available to keras (found: cpu, cuda:0)"
    assert not any(item.device == "cpu" for item in items.values())


def test_a_missing_framework_skips_its_backends_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_frameworks, "installed", lambda module: module != "tensorflow")
    monkeypatch.setattr(_frameworks, "torch", lambda: fake_torch(0, False))
    monkeypatch.setattr(_frameworks, "jax", lambda: fake_jax(0))  # said installed: faked like torch
    monkeypatch.setattr(_frameworks, "cpu_name", lambda: "Fake CPU")
    (tmp_path / "f32.yaml").write_text(CASE % "float32")
    planned = plan([tmp_path], [], [])
    items = ids(planned.items)
    assert items["f32-keras-cpu-unavailable"].skip == "tensorflow is not installed"
    assert planned.devices["keras"] == {"looked_for": ["cpu", "cuda"], "unavailable": "tensorflow is not installed",
                                        "selected": True}
    assert "f32-torch-cpu-parity" in items


def test_compiled_backends_see_the_same_devices_and_torch_compile_waits_to_be_selected(machine, tmp_path):
    machine(torch_gpus=1, tf_gpus=1)
    (tmp_path / "f32.yaml").write_text(CASE % "float32")
    (tmp_path / "mine.yaml").write_text(CASE % "float32" + "backends: [torch_compile]\n")
    planned = plan([tmp_path], [], [])
    items = ids(planned.items)
    for backend in ("keras_xla", "gradient_tape_xla"):
        assert f"f32-{backend}-cpu-parity" in items and f"f32-{backend}-cuda:0-parity" in items
    assert not any(item.backend == "torch_compile" for item in planned.items if item.case == "f32")
    assert planned.devices["torch_compile"]["selected"] is False  # the report: available, not selected
    assert planned.devices["torch_compile"]["devices"] == ["cpu", "cuda:0"]
    assert "mine-torch_compile-cuda:0-parity" in items  # a case that names it runs it
    chosen = ids(plan([tmp_path], ["torch_compile"], []).items)
    assert "f32-torch_compile-cpu-parity" in chosen and "f32-torch-cpu-parity" not in chosen


def test_a_missing_compiler_skips_the_compiled_backends_with_the_reason(machine, monkeypatch, tmp_path):
    machine(xla=False)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    (tmp_path / "f32.yaml").write_text(CASE % "float32")
    items = ids(plan([tmp_path], ["keras_xla", "torch_compile"], []).items)
    assert items["f32-keras_xla-cpu-unavailable"].skip == \
        "this TensorFlow build has no XLA (tf.test.is_built_with_xla() is False)"
    assert "needs a C++ compiler: '/nonexistent/g++' was not found" in items["f32-torch_compile-cpu-unavailable"].skip


def test_jax_sees_its_gpus_as_cuda_devices_and_explains_a_missing_install(machine, monkeypatch):
    from conformance.backends import jax as jax_backend

    machine(tf_gpus=2)
    assert jax_backend.devices() == ["cpu", "cuda:0", "cuda:1"]
    assert jax_backend.device_name("cuda:1") == "Fake JAX gpu 1"
    monkeypatch.setattr(_frameworks, "installed", lambda module: module != "optax")
    assert jax_backend.available() == "optax not installed (pip install '.[jax]')"


@pytest.mark.parametrize("backend", ["keras", "gradient_tape", "torch", "keras_xla", "gradient_tape_xla", "jax"])
def test_each_result_records_where_the_framework_placed_the_weights(backend):
    """Real training on the CPU: the framework's own placement of the trained weights is recorded."""
    pytest.importorskip({"torch": "torch", "jax": "optax"}.get(backend, "tensorflow"))
    import numpy as np

    from conformance import backends
    from conformance.problem import Optimizer, Problem

    x = np.arange(4.0, dtype=np.float32).reshape(-1, 1)
    problem = Problem("placement", x, 2 * x[:, 0], np.zeros(1, np.float32), np.zeros((), np.float32), 2, 4,
                      None, "mean", Optimizer("sgd", {"learning_rate": 0.1, "momentum": 0.0, "nesterov": False,
                                                      "weight_decay": 0.0}), "float32")
    info = backends.load(backend).train(problem, "cpu").info
    expected = {"torch": "cpu", "jax": "cpu:0"}.get(backend)
    assert info["placed_on"] == expected if expected else info["placed_on"].endswith("device:CPU:0")
    if backend.endswith("_xla"):  # what really ran: XLA, must-compile, and the compile time apart
        assert info["xla"]["must_compile"] is True and info["compile_seconds"] is not None


def test_doctor_shows_backends_devices_selection_and_switches(machine, monkeypatch, capsys):
    from conformance import doctor

    machine(torch_gpus=1, tf_gpus=1)
    monkeypatch.setattr(doctor, "_switches", lambda: {"torch.backends.cuda.matmul.allow_tf32": False})
    assert doctor.main() == 0
    shown = capsys.readouterr().out
    for backend in ("keras", "gradient_tape", "torch", "keras_xla", "gradient_tape_xla", "torch_compile", "jax",
                    "keras_jax", "keras_torch"):
        assert f"\n  {backend} " in shown
    assert "cpu (Fake CPU), cuda:0 (Fake GPU 0); not found: mps" in shown
    assert "[available, not selected: --backend torch_compile]" in shown
    assert ("A run without --backend selects: keras, gradient_tape, torch, keras_xla, gradient_tape_xla, jax, "
            "keras_jax, keras_torch") in shown
    assert "cuda:0 (Fake JAX gpu 0)" in shown
    assert "torch.backends.cuda.matmul.allow_tf32" in shown and "tensorflow " in shown


def test_doctor_explains_a_backend_that_cannot_run(machine, monkeypatch, capsys):
    from conformance import doctor

    machine(xla=False)
    monkeypatch.setattr(doctor, "_switches", dict)
    doctor.main(as_json=True)
    found = json.loads(capsys.readouterr().out)
    assert found["backends"]["keras_xla"]["unavailable"].startswith("this TensorFlow build has no XLA")
    assert "(its items skip, with the reason above, for: keras_xla, gradient_tape_xla)" in doctor.render(found)


def test_native_lines_repeated_at_tensorflow_import_are_passed_on_once(capfd):
    """TensorFlow >= 2.19 logs its oneDNN notice twice at import, with two time stamps; the
    import keeps it once, and keeps every other line."""
    import os

    from conformance.backends._frameworks import _repeated_stderr_lines_once

    with _repeated_stderr_lines_once():
        os.write(2, b"I0000 00:00:1796352369.057947   18004 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"something else\n")
        os.write(2, b"I0000 00:00:1796352373.719982   18004 port.cc:153] oneDNN custom operations are on.\n")
    assert capfd.readouterr().err.splitlines() == [
        "I0000 00:00:1796352369.057947   18004 port.cc:153] oneDNN custom operations are on.", "something else"]

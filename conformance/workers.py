"""Long-lived worker processes for backends that cannot share the test process.

Keras reads `KERAS_BACKEND` once per process, so Keras on JAX or on PyTorch trains in a process
of its own; a future backend that needs another framework version side by side can do the same
with another interpreter. A worker is started on first use, once per test process and kind, and
serves every later case. Calls go in and results come out as plain data (pickled dicts and NumPy
arrays) over the worker's stdin and stdout; the worker's own prints go to its stderr, kept in a
log file so that a crash can say what the process wrote before it died.

A worker that dies mid-call raises `WorkerDied` with what is known (exit status, signal, the
log's tail); the next call starts a fresh worker, so nothing else in the run is lost.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, BinaryIO

LOG_TAIL_LINES = 20


class WorkerDied(RuntimeError):
    """The worker process exited while it was serving a call."""


class WorkerError(RuntimeError):
    """The called function raised inside the worker; `kind` is the exception's class name."""

    def __init__(self, kind: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{kind}: {message}\n\nin the worker process:\n{remote_traceback}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class WorkerKind:
    """What makes workers interchangeable: their environment variables and interpreter.

    setup: "module:function" called once in the worker before any call (imports, settings).
    """

    name: str
    environment: dict[str, str] = field(default_factory=dict)
    setup: str | None = None
    python: str = sys.executable

    @property
    def key(self) -> tuple[Any, ...]:
        return self.name, tuple(sorted(self.environment.items())), self.setup, self.python


class Worker:
    """One worker process and its pipes; `call` runs a function there and returns its result."""

    def __init__(self, kind: WorkerKind) -> None:
        self.kind = kind
        self.log = tempfile.NamedTemporaryFile(prefix=f"conformance-worker-{kind.name}-", suffix=".log", delete=False)
        environment = os.environ | kind.environment | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        started = time.perf_counter()
        self.process = subprocess.Popen([kind.python, "-m", "conformance.workers"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, env=environment)
        self.calls = 0
        self.start_seconds: float | None = None
        if kind.setup is not None:
            self.call(kind.setup)
        self.start_seconds = time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, function: str, *args: Any) -> Any:
        """Run `module:function(*args)` in the worker and return what it returned."""
        self.send(function, *args)
        return self.receive(function)

    def send(self, function: str, *args: Any) -> None:
        """Start `module:function(*args)` in the worker without waiting for it (`receive` gets the
        result): how a group of workers runs one call in all of them at once."""
        self.calls += 1
        try:
            _send(self.process.stdin, {"function": function, "args": args})
        except OSError as error:  # BrokenPipeError: the worker is gone
            raise WorkerDied(self._death_notice(function, error)) from None

    def receive(self, function: str) -> Any:
        """Wait for the result of the call `send` started; WorkerDied if the worker died first."""
        try:
            reply = _receive(self.process.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError) as error:
            raise WorkerDied(self._death_notice(function, error)) from None
        if "error" in reply:
            raise WorkerError(**reply["error"])
        return reply["result"]

    def stop(self) -> None:
        """Ask the worker to exit, and make sure it does."""
        if self.alive():
            try:
                _send(self.process.stdin, None)
                self.process.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()
        if self.process.returncode == 0:
            os.unlink(self.log.name)

    def _death_notice(self, function: str, error: Exception) -> str:
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the pipe broke but the process lives on: end it
            self.process.kill()
            status = self.process.wait()
        if status < 0:
            how = f"killed by signal {-status} ({signal.Signals(-status).name})"
        else:
            how = f"exited with status {status}"
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as log:
            tail = "".join(log.readlines()[-LOG_TAIL_LINES:]).rstrip()
        return (f"the {self.kind.name} worker process (pid {self.pid}) {how} during {function} "
                f"(call {self.calls} of this worker; {type(error).__name__} on its pipe). "
                f"A fresh worker serves the next call. Its log ({self.log.name}) ends:\n{tail or '(empty)'}")


class Pool:
    """At most one live worker per kind in this process, started on first use, replaced after a
    death, stopped when the process exits."""

    def __init__(self) -> None:
        self._workers: dict[tuple[Any, ...], Worker] = {}
        self._lock = threading.Lock()
        self.started: list[tuple[str, int, float]] = []  # (kind, pid, start-up seconds) for the report
        atexit.register(self.stop_all)

    def worker(self, kind: WorkerKind) -> Worker:
        with self._lock:
            current = self._workers.get(kind.key)
            if current is None or not current.alive():
                if current is not None:
                    current.stop()
                current = self._workers[kind.key] = Worker(kind)
                self.started.append((kind.name, current.pid, current.start_seconds or 0.0))
            return current

    def call(self, kind: WorkerKind, function: str, *args: Any) -> Any:
        """Run `function` in this process's worker of `kind`; WorkerDied if the worker died."""
        worker = self.worker(kind)
        try:
            return worker.call(function, *args)
        except WorkerDied:
            with self._lock:
                if self._workers.get(kind.key) is worker:
                    del self._workers[kind.key]
            worker.stop()
            raise

    def stop_all(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.stop()


POOL = Pool()


def _send(stream: BinaryIO | None, message: Any) -> None:
    assert stream is not None
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _receive(stream: BinaryIO | None) -> Any:
    assert stream is not None
    return pickle.load(stream)


EXTRA_SETUP = "CONFORMANCE_WORKER_SETUP"


def extra_setup() -> list[str]:
    """Call the `module:function`s named (comma-separated) in CONFORMANCE_WORKER_SETUP, after a
    worker's own setup has imported its frameworks: how the suite's own tests put a
    deliberately wrong framework into a worker (tests/mutants.py). Returns what it called."""
    names = [name.strip() for name in os.environ.get(EXTRA_SETUP, "").split(",") if name.strip()]
    for name in names:
        resolve(name)()
    return names


def resolve(function: str) -> Any:
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)


def serve() -> None:
    """The worker's loop: read a call, run it, write the result or the error; None ends it.

    The protocol keeps the process's original stdout; file descriptor 1 then points at stderr,
    so that whatever a framework prints cannot corrupt a reply.
    """
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    while True:
        try:
            request = _receive(requests)
        except EOFError:  # the test process is gone
            return
        if request is None:
            return
        try:
            reply = {"result": resolve(request["function"])(*request["args"])}
        except Exception as error:  # sent back to the caller, which raises it there
            reply = {"error": {"kind": type(error).__name__, "message": str(error),
                               "remote_traceback": traceback.format_exc()}}
        _send(replies, reply)


if __name__ == "__main__":
    serve()

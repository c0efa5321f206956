"""PyTorch DistributedDataParallel for the `torch` and `torch_compile` backends (replicas > 1).

As its users run it (torchrun): one process per replica, `torch.distributed.init_process_group`
once per process ("gloo" on a CPU, "nccl" on CUDA, one GPU per rank), the model wrapped in
`DistributedDataParallel`, each rank feeding its own shard of every step (the harness's
`Problem.shards`: rank r trains shard r), and the one-process loop of conformance/backends/
torch.py unchanged around it (its optimizer, scheduler, clip and autocast code). DDP all-reduces
and averages the gradients inside `backward()`, so every rank applies the same update; the ranks'
parameters are compared bit for bit after training.

Start-up is paid once per run: a group of R long-lived worker processes (conformance.workers),
joined in one process group, serves every case with R replicas (torch and torch_compile alike).
The ranks run as torchrun starts them: OMP_NUM_THREADS=1 (torchrun's default for several
processes per machine).

Crash safety: the ranks of a case are waited on together. A rank that dies, or raises while the
others are still running, or a case that outlives its time limit (a deadlocked collective: gloo's
own timeout, `collective_timeout()`, ends a rank waiting in one; the parent's limit catches the
rest) gets the whole group killed and raises workers.WorkerDied: the item is reported as crashed,
and the next case starts a fresh group.

What DDP does differently from the one-replica replay (kept, it is what users get; measured in
docs): it averages the ranks' gradients, so with `reduction: mean` each rank's mean counts the
same however many samples its shard has (a short last batch, a batch R does not divide), and
with `reduction: sum` the update uses the batch's summed gradient divided by R.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance import backends, workers
from conformance.backends import Unavailable, _frameworks
from conformance.problem import Problem, Trajectory

TIMEOUT_VARIABLE = "CONFORMANCE_DDP_TIMEOUT"  # seconds a rank waits in a collective (gloo's timeout)
DEFAULT_COLLECTIVE_TIMEOUT = 60.0
GRACE_SECONDS = 10.0  # after one rank fails, how long the others get to answer before the group is killed
START_SECONDS = 180.0  # importing torch in R processes and joining the group
CASE_SECONDS = 180.0  # a case's time limit: this (compiling included) plus STEP_SECONDS per optimizer step
STEP_SECONDS = 0.02  # measured: under 1 ms a DDP step on a CPU


def collective_timeout() -> float:
    return float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_COLLECTIVE_TIMEOUT))


@dataclass(frozen=True)
class Replica:
    """One rank of a process group, as the training loop (torch.train_steps) sees it."""

    rank: int
    replicas: int
    backend: str

    def wrap(self, torch: Any, model: Any, device: str) -> Any:
        """The model under DistributedDataParallel (its constructor broadcasts rank 0's parameters)."""
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def rows(self, torch: Any, problem: Problem, epoch: int, start: int, device: str) -> Any:
        """This rank's shard of the step starting at `start`: a slice in file order, else indices."""
        shard = problem.shards(problem.batch(epoch, start // problem.batch_size))[self.rank]
        if problem.orders is None:
            return slice(int(shard[0]), int(shard[-1]) + 1)
        return torch.as_tensor(shard, device=device)


# --- in the test process -----------------------------------------------------------------------

def train(name: str, problem: Problem, device: str) -> Trajectory:
    """Train `problem` with backend `name` (torch or torch_compile) in a group of
    `problem.replicas` processes; rank 0's trajectory, with the batch losses and info["replicas"]."""
    backend, placed = placement(device, problem.replicas)
    seconds = CASE_SECONDS + STEP_SECONDS * problem.epochs * problem.steps_per_epoch
    calls = [(name, problem.to_data(), rank_device) for rank_device in placed]
    try:
        group, answers = GROUPS.run(problem.replicas, backend, f"{__name__}:train_rank", calls, seconds)
    except workers.WorkerError as error:
        if error.kind == Unavailable.__name__:
            raise Unavailable(error.message) from None
        raise
    return combined(problem, [Trajectory.from_data(answer) for answer in answers], group)


def placement(device: str, replicas: int) -> tuple[str, list[str]]:
    """The process-group backend and each rank's device: every rank on the CPU (gloo), or one
    GPU per rank from `device` on (nccl); Unavailable where torch.distributed cannot."""
    if device == "cpu":
        return "gloo", ["cpu"] * replicas
    if device.startswith("cuda"):
        count = _frameworks.torch().cuda.device_count()
        if count < replicas:
            raise Unavailable(f"DistributedDataParallel on CUDA (nccl) needs one GPU per replica: {replicas} "
                              f"replicas, {count} GPU(s) here")
        first = int(device.split(":")[1])
        return "nccl", [f"cuda:{(first + rank) % count}" for rank in range(replicas)]
    raise Unavailable(f"torch.distributed has no process-group backend for {device} tensors "
                      "(gloo: CPU, nccl: CUDA)")


def combined(problem: Problem, ranks: list[Trajectory], group: Group) -> Trajectory:
    """Rank 0's trajectory with each step's batch loss (the ranks' shard losses weighted by
    shard size for a mean, summed for a sum) and info["replicas"]."""
    losses = np.stack([trajectory.info.pop("shard_losses") for trajectory in ranks])
    sizes = np.tile(shard_sizes(problem), problem.epochs)
    batch = (losses * sizes).sum(axis=0) / sizes.sum(axis=0) if problem.reduction == "mean" else losses.sum(axis=0)
    first = ranks[0]
    first.loss = problem.epoch_losses(batch)
    first.info["replicas"] = describe(ranks, group)
    return first


def shard_sizes(problem: Problem) -> np.ndarray:
    """(replicas, steps per epoch): how many samples each rank trains in each step."""
    return np.array([[len(shard) for shard in problem.shards(problem.batch(0, step))]
                     for step in range(problem.steps_per_epoch)]).T


def describe(ranks: list[Trajectory], group: Group) -> dict[str, Any]:
    """info["replicas"]: the group, where each rank's copy lived, the calls, and whether the
    ranks' parameters (every epoch's) came out bit for bit equal."""
    params = [trajectory.params for trajectory in ranks]
    equal = all(np.array_equal(params[0], other) for other in params[1:])
    own = [trajectory.info.pop("rank") for trajectory in ranks]  # what each rank said of itself
    placed = [trajectory.info["placed_on"] for trajectory in ranks]
    record = {
        "replicas": len(ranks), "devices": [mine["device"] for mine in own],
        "processes": [mine["pid"] for mine in own], "ranks": [mine["rank"] for mine in own],
        "collective": f"{group.backend} all-reduce (DistributedDataParallel's bucketed gradient all-reduce, "
                      f"averaged over {len(ranks)} ranks)",
        "placement": [f"rank {mine['rank']}: its own copy on {where} in process {mine['pid']}"
                      for mine, where in zip(own, placed)],
        "api": f"torch.distributed.init_process_group({group.backend!r}, init_method='tcp://...', rank, world_size) "
               "once per group of processes; DistributedDataParallel(model); each rank's loss on its shard; "
               "loss.backward() all-reduces the gradients; the loop's clip, optimizer.step and scheduler per rank",
        "omp_num_threads": [mine["omp_num_threads"] for mine in own],
        "group": {"started_seconds": round(group.start_seconds, 3), "case": group.cases},
        "parameters_equal_across_replicas": bool(equal),
    }
    if not equal:
        record["parameters_max_difference_across_replicas"] = float(
            max(np.nanmax(np.abs(params[0] - other)) for other in params[1:]))
    return record


class Group:
    """R worker processes joined in one process group: rank r is `workers[r]`."""

    def __init__(self, replicas: int, backend: str) -> None:
        self.replicas, self.backend, self.cases = replicas, backend, 0
        self.workers: list[workers.Worker] = []
        started = time.perf_counter()
        try:
            for rank in range(replicas):
                self.workers.append(workers.Worker(_kind(rank, replicas)))
            address = f"tcp://127.0.0.1:{_free_port()}"
            self.run(f"{__name__}:join", [(backend, address, rank, replicas, collective_timeout())
                                          for rank in range(replicas)], START_SECONDS)
        except BaseException:
            self.kill()
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def alive(self) -> bool:
        return all(worker.alive() for worker in self.workers)

    def run(self, function: str, calls: list[tuple[Any, ...]], seconds: float) -> list[Any]:
        """Call `function` in every rank at once (rank r with calls[r]) and return their results.
        WorkerDied when a rank died or the ranks did not all answer (the group is then killed);
        a rank's WorkerError when every rank answered but one raised (the group lives on)."""
        for worker, arguments in zip(self.workers, calls):
            worker.send(function, *arguments)
        outcomes, killed = self._gather(function, seconds)
        failures = {rank: outcome for rank, outcome in outcomes.items() if isinstance(outcome, Exception)}
        if not failures:
            return [outcomes[rank] for rank in range(self.replicas)]
        died = [rank for rank, outcome in failures.items() if isinstance(outcome, workers.WorkerDied)]
        if not died and not killed:
            raise failures[min(failures)]
        self.kill()
        self.close()
        raise workers.WorkerDied(self._failure(function, failures, killed, seconds))

    def _gather(self, function: str, seconds: float) -> tuple[dict[int, Any], list[int]]:
        """Every rank's result or exception; ranks that have not answered by the deadline are
        killed (the deadline shortens to GRACE_SECONDS once one rank fails, and to the collective
        timeout once one rank succeeds: the ranks finish together)."""
        answers: queue.Queue = queue.Queue()
        for rank, worker in enumerate(self.workers):
            threading.Thread(target=_answer, args=(worker, function, rank, answers), daemon=True).start()
        outcomes: dict[int, Any] = {}
        killed: list[int] = []
        deadline = time.monotonic() + seconds
        while len(outcomes) < self.replicas:
            try:
                rank, outcome = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if killed:  # killed and still silent: give up on them
                    outcomes |= {rank: workers.WorkerDied("no answer after SIGKILL") for rank in killed
                                 if rank not in outcomes}
                    break
                killed = [rank for rank in range(self.replicas) if rank not in outcomes]
                self.kill()
                deadline = time.monotonic() + 30.0
                continue
            outcomes[rank] = outcome
            limit = GRACE_SECONDS if isinstance(outcome, Exception) else collective_timeout() + GRACE_SECONDS
            deadline = min(deadline, time.monotonic() + limit)
        return outcomes, killed

    def _failure(self, function: str, failures: dict[int, Exception], killed: list[int], seconds: float) -> str:
        """What went wrong, the cause first: a rank's death, else a rank's error, else the hang."""
        died = [f"rank {rank} of {self.replicas} died: {error}" for rank, error in sorted(failures.items())
                if isinstance(error, workers.WorkerDied) and rank not in killed]
        lines = died + [f"rank {rank} of {self.replicas} raised {_summary(error)}" for rank, error
                        in sorted(failures.items()) if not isinstance(error, workers.WorkerDied)]
        if killed:
            lines.append(f"rank(s) {killed} had not answered {function} in time (the case's limit of {seconds:.0f} s, "
                         f"{GRACE_SECONDS:.0f} s after another rank failed, or the collective timeout of "
                         f"{collective_timeout():.0f} s after another finished): hung, as in a deadlocked collective")
        lines.append(f"The group's processes (pids {self.pids}) were killed; the next case starts a fresh group "
                     f"of {self.replicas}.")
        return "\n".join(lines)

    def kill(self) -> None:
        """End every rank at once (SIGKILL: a rank waiting in a collective would wait on); each
        rank's log is kept (conformance.workers keeps the log of a worker that did not exit 0)."""
        for worker in self.workers:
            if worker.alive():
                worker.process.kill()
        for worker in self.workers:
            worker.process.wait()

    def close(self) -> None:
        """After `kill`, once no thread reads the ranks' pipes any more: close their logs."""
        for worker in self.workers:
            worker.stop()

    def stop(self) -> None:
        """Let every rank exit at once (its input closed: its loop ends), killing any that has
        not within 10 s; then close their logs."""
        for worker in self.workers:
            worker.process.stdin.close()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.close()


class Groups:
    """At most one live group per (replicas, process-group backend) in this process, started on
    first use, replaced after a failure, stopped when the process exits."""

    def __init__(self) -> None:
        self._groups: dict[tuple[int, str], Group] = {}
        self._lock = threading.Lock()
        self.started: list[tuple[int, list[int], float]] = []  # (replicas, pids, start-up seconds)
        atexit.register(self.stop_all)

    def run(self, replicas: int, backend: str, function: str, calls: list[tuple[Any, ...]],
            seconds: float) -> tuple[Group, list[Any]]:
        """Run one call in every rank of the group for `replicas` (started if need be)."""
        with self._lock:
            group = self._group(replicas, backend)
            group.cases += 1
            try:
                return group, group.run(function, calls, seconds)
            except workers.WorkerDied:
                self._groups.pop((replicas, backend), None)
                group.kill()
                group.close()
                raise

    def _group(self, replicas: int, backend: str) -> Group:
        group = self._groups.get((replicas, backend))
        if group is not None and group.alive():
            return group
        if group is not None:
            group.kill()
            group.close()
        try:
            group = Group(replicas, backend)
        except workers.WorkerError as error:
            raise workers.WorkerDied(f"a process group of {replicas} ({backend}) could not start: {error}") from None
        self._groups[(replicas, backend)] = group
        self.started.append((replicas, group.pids, group.start_seconds))
        return group

    def stop_all(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            group.stop()


GROUPS = Groups()


def _kind(rank: int, replicas: int) -> workers.WorkerKind:
    environment = {"OMP_NUM_THREADS": "1"}
    if _frameworks.determinism_requested():
        environment["CONFORMANCE_DETERMINISM"] = "1"
    return workers.WorkerKind(f"torch_ddp_{replicas}_rank{rank}", environment, setup=f"{__name__}:setup")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _summary(error: Exception) -> str:
    """An exception's kind and the last line of its message."""
    if isinstance(error, workers.WorkerError):
        return f"{error.kind}: {(error.message.strip().splitlines() or [''])[-1]}"
    return f"{type(error).__name__}: {error}"


def _answer(worker: workers.Worker, function: str, rank: int, answers: queue.Queue) -> None:
    """Wait (in a thread) for one rank's answer: its result or the exception it came as."""
    try:
        answers.put((rank, worker.receive(function)))
    except Exception as error:  # WorkerDied, WorkerError: the group decides
        answers.put((rank, error))


# --- in a rank's worker process ----------------------------------------------------------------

def setup() -> dict[str, Any]:
    """Import torch with the suite's settings, then any extra setup (the suite's own tests)."""
    if os.environ.get("CONFORMANCE_DETERMINISM") == "1":
        _frameworks.request_determinism()
    torch = _frameworks.torch()
    return {"torch": torch.__version__, "extra_setup": workers.extra_setup()}


def join(backend: str, address: str, rank: int, replicas: int, timeout: float) -> dict[str, Any]:
    """Join the process group: once per process, as a training script does at its start."""
    distributed = _frameworks.torch().distributed
    distributed.init_process_group(backend, init_method=address, rank=rank, world_size=replicas,
                                   timeout=datetime.timedelta(seconds=timeout))
    return {"pid": os.getpid(), "rank": distributed.get_rank()}


def train_rank(name: str, data: dict[str, Any], device: str) -> dict[str, Any]:
    """This rank's training of the case with backend `name`'s loop under DDP."""
    distributed = _frameworks.torch().distributed
    replica = Replica(distributed.get_rank(), distributed.get_world_size(), distributed.get_backend())
    trajectory = backends.load(name).train_replica(Problem.from_data(data), device, replica)
    trajectory.info["rank"] = {"rank": replica.rank, "pid": os.getpid(), "device": device,
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return trajectory.to_data()

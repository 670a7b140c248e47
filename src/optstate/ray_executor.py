"""The Ray executor: each node of the run tree is a Ray task, submitted once its parent is done.

The driver (the `optstate run` process) keeps everything the local executor
keeps: the lock on OUT, plan.json, pruning, the progress bar, the report. A task
trains one node exactly as the local executor would (`train.train_node`), reading
its parent's checkpoint from OUT and writing its own there, so OUT must be one
folder that the driver and every worker see (a shared file system); `check_shared`
proves it before any training. A task whose worker dies is started again by Ray
(`max_retries`) and continues from the node's last finished epoch (progress.pt).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import torch

from optstate.errors import UserError

INSTALL = "pip install 'optstate[ray]'"


def check_installed() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None


def _train_task(node_id: str, plan_json: str, study, out: str, keep_checkpoints: bool, data_root: str,
                device: str, precision: str, compile: bool, threads: int, cwd: str, progress) -> tuple:
    """Runs in a Ray worker: train one node; ("done", rows) or ("diverged", step)."""
    from optstate import data as datasets
    from optstate.data.batches import Batches
    from optstate.plan import Plan
    from optstate.runtime import Runtime
    from optstate.store import Store
    from optstate.study import dataset_label, load_plugins
    from optstate.train import Context, Diverged, train_node

    os.chdir(cwd)  # relative dataset and plugin paths mean what they meant to the driver
    torch.set_num_threads(threads)  # as the driver would: the same arithmetic, the same numbers
    load_plugins(study.plugins)
    plan = Plan.from_json(plan_json)
    node = plan.nodes[node_id]
    entry = next(e for e in study.datasets if dataset_label(e) == node.dataset)
    runtime = Runtime.make(device, precision, compile)
    data = datasets.load(entry, study, Path(data_root), download=False)
    size = datasets.resolved_image_size(entry, study)
    ctx = Context(study, data, Batches(data, study, size, runtime.device), size, runtime,
                  Store(Path(out), keep_checkpoints), plan)
    pending, last = 0, time.monotonic()

    def on_step(n: int) -> None:  # progress reaches the driver's bar a few times a second, not every step
        nonlocal pending, last
        pending += n
        if time.monotonic() - last > 0.5:
            progress.add.remote(pending)
            pending, last = 0, time.monotonic()

    ctx.on_step = on_step
    try:
        rows = train_node(node, ctx)
    except Diverged as d:
        return ("diverged", d.step)
    finally:
        progress.add.remote(pending)
    return ("done", rows)


class _Progress:
    """Steps trained by all tasks since the driver last asked."""

    def __init__(self):
        self.steps = 0

    def add(self, n: int) -> None:
        self.steps += n

    def take(self) -> int:
        n, self.steps = self.steps, 0
        return n


def _write_marker(path: str, token: str) -> str:
    Path(path).write_text(token)
    return os.uname().nodename


def check_shared(ray, out: Path) -> None:
    """A worker writes a marker into OUT and the driver must read it back."""
    token = uuid.uuid4().hex
    marker = out / f".ray-shared-{token}"
    host = ray.get(ray.remote(num_cpus=0)(_write_marker).remote(str(marker.resolve()), token))
    try:
        ok = marker.read_text() == token
    except OSError:
        ok = False
    marker.unlink(missing_ok=True)
    if not ok:
        raise UserError(f"--out {out} is not shared with the Ray workers: a worker on {host} wrote a file into it "
                        f"that this machine cannot see. With --executor ray, --out (and the data root) must be "
                        f"on a file system that every node of the cluster mounts at the same path")


def train(plan, study, store, runtime, data_root: Path, contexts, executor, bar, finished, diverged) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=executor.address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, configure_logging=True)
    try:
        check_shared(ray, store.out)
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        on_gpu = runtime.device.type == "cuda"
        threads = torch.get_num_threads()
        cpus = executor.cpus_per_run or (1 if on_gpu else threads)
        gpus = executor.gpus_per_run if on_gpu else 0
        have = ray.cluster_resources()
        for what, need in (("CPU", cpus), ("GPU", gpus)):
            if need > have.get(what, 0):  # Ray would wait forever for a task it can never place
                raise UserError(f"each task asks for {need:g} {what}(s) (--{what.lower()}s-per-run) but the Ray "
                                f"cluster has {have.get(what, 0):g}")
        task = ray.remote(_train_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=executor.max_retries,
                                               retry_exceptions=False)
        device = "cuda" if on_gpu else "cpu"
        running: dict = {}

        def submit_ready() -> None:
            busy = set(running.values())
            for node in plan.ordered():
                parent = plan.nodes.get(node.parent) if node.parent else None
                if node.status == "pending" and node.id not in busy and (parent is None or parent.status == "done"):
                    ref = task.remote(node.id, plan.to_json(), study, str(store.out.resolve()), store.keep_checkpoints,
                                      str(data_root.resolve()), device, runtime.precision, runtime.compile, threads,
                                      os.getcwd(), progress)
                    running[ref] = node.id

        submit_ready()
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            bar.update(ray.get(progress.take.remote()))
            for ref in done:
                node = plan.nodes[running.pop(ref)]
                try:
                    outcome, value = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the node's own error, raised again here as itself
                    cause = getattr(e, "cause", None)  # (as_instanceof_cause's text carries the remote traceback)
                    raise (cause if isinstance(cause, BaseException) else e.as_instanceof_cause()) from None
                except ray.exceptions.WorkerCrashedError:
                    raise UserError(f"the Ray worker training {node.dataset} {','.join(node.arms)} seed{node.seed} "
                                    f"session {node.session + 1} died {executor.max_retries + 1} times; finished "
                                    f"sessions are kept: rerun the same command to continue") from None
                if outcome == "diverged":
                    diverged(node, value)
                else:
                    finished(node, value)
            submit_ready()
        bar.update(ray.get(progress.take.remote()))
    finally:
        if started_here:
            ray.shutdown()

"""Run a study's plan on this machine: load data, train pending nodes in order, write runs."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from optstate import data as datasets
from optstate import models, plan as planning
from optstate.data.batches import Batches
from optstate.errors import UserError
from optstate.runtime import Runtime
from optstate.store import Store, write_atomic
from optstate.study import Study, dataset_label
from optstate.schedules import SCHEDULES
from optstate.train import Context, Diverged, make_optimizer, train_node


def preflight(study: Study, plan: planning.Plan, contexts: dict[str, Context], dev: torch.device) -> None:
    """Fail before any training on what only shows once device and step counts are known."""
    probe = torch.zeros(4, device=dev, requires_grad=True)
    kernels = next(iter(contexts.values())).kernels
    try:
        opt = make_optimizer([probe], study, 1e-3, kernels)
        probe.grad = torch.zeros_like(probe)
        opt.step()
    except Exception as e:  # noqa: BLE001 - e.g. capturable=true on a CPU
        raise UserError(f"study: `optimizer` cannot run on {dev}: {e}") from None
    for node in plan.nodes.values():
        steps = node.epochs * contexts[node.dataset].batches.steps_per_epoch
        schedule = SCHEDULES[node.schedule]
        why = schedule.check_steps(node.settings, steps)
        if why:
            raise UserError(f"study: session {node.session + 1} of {', '.join(node.arms)} on {node.dataset}: {why}")
        try:
            schedule.attach(make_optimizer([probe], study, 1e-3), node.settings, steps)
        except UserError as e:
            raise UserError(f"study: {', '.join(node.arms)} with the {study.optimizer['name']} optimizer: {e}") from None


@dataclass(frozen=True)
class Executor:
    """Where nodes train: `local` (this process, one node after another) or `ray` (a Ray task per node)."""

    name: str = "local"
    address: str | None = None  # ray: a running cluster; None starts a local instance for the run
    gpus_per_run: float = 1.0  # ray, on CUDA: GPUs each node's task asks for (fractions share a GPU)
    cpus_per_run: float | None = None  # ray: CPUs each task asks for; None: 1 on CUDA, else the thread count
    max_retries: int = 3  # ray: times a task whose worker died is started again


def run_study(study: Study, out: Path, device: str = "auto", data_root: str | None = None,
              download: bool = True, mirror: str | None = None, keep_checkpoints: bool = False,
              precision: str = "auto", compile: bool = False, executor: Executor = Executor(),
              max_bad_images: float = 0.01, log=print) -> planning.Plan:
    runtime = Runtime.make(device, precision, compile)
    if executor.name == "ray":
        from optstate import ray_executor

        ray_executor.check_installed()
    store = Store(out, keep_checkpoints)
    with store.lock():
        return _run_locked(study, store, runtime, data_root, download, mirror, executor, max_bad_images, log)


def check_bad_images(data, max_bad_images: float) -> None:
    """A few undecodable files are left out; many mean a broken copy, which should not be trained on."""
    if data.skipped and len(data.skipped) > max_bad_images * data.files:
        shown = ", ".join(data.skipped[:5]) + (" ..." if len(data.skipped) > 5 else "")
        raise UserError(f"{data.name}: {len(data.skipped)} of {data.files} image files "
                        f"({100 * len(data.skipped) / data.files:.1f}%) cannot be decoded ({shown}), more than "
                        f"--max-bad-images {max_bad_images:g} allows; check the copy of the data, or raise the "
                        f"limit to train without them")


def out_of_memory(dev: torch.device, study: Study, what: str) -> UserError:
    smaller = max(1, study.batch_size // 2)
    return UserError(f"out of memory on {dev} while training {what} with batch_size {study.batch_size}; try a "
                     f"smaller batch, e.g. --set batch_size={smaller} (a different study: give it another --out), "
                     f"or a smaller image_size or model. Finished sessions are kept.")


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))  # the CPU allocator's words


def _run_locked(study: Study, store: Store, runtime: Runtime, data_root: str | None, download: bool,
                mirror: str | None, executor: Executor, max_bad_images: float, log) -> planning.Plan:
    out = store.out
    dev = runtime.device
    # With Ray the workers hold the data on their devices; the driver keeps its copy on the CPU.
    batch_device = dev if executor.name == "local" else torch.device("cpu")
    plan = planning.build(study)
    root = datasets.data_root(data_root)

    # Everything that can fail on input fails here, before any training.
    contexts: dict[str, Context] = {}
    described = {}
    for entry in study.datasets:
        label = dataset_label(entry)
        data = datasets.load(entry, study, root, download=download, mirror=mirror)
        check_bad_images(data, max_bad_images)
        size = datasets.resolved_image_size(entry, study)
        models.check_input(models.build(study.model, len(data.classes)), size)
        log(f"{label}: {len(data.train)} train / {len(data.val)} validation images, "
            f"{len(data.classes)} classes, {size}px ({data.source})")
        if data.skipped:
            log(f"{label}: {len(data.skipped)} file(s) could not be decoded and are left out "
                f"(listed in the report): {', '.join(data.skipped[:5])}{' ...' if len(data.skipped) > 5 else ''}")
        described[label] = {"source": data.source, "classes": len(data.classes), "train_images": len(data.train),
                            "val_images": len(data.val), "image_size": size, "skipped": data.skipped}
        try:  # the whole dataset goes onto the training device as uint8
            batches = Batches(data, study, size, batch_device)
        except Exception as e:
            if _is_out_of_memory(e):
                raise UserError(f"out of memory on {batch_device} while placing {label} on it ({len(data.train)} + "
                                f"{len(data.val)} images at {size}px, kept as uint8); use fewer images "
                                f"(train_images, val_images), a smaller image_size, or a device with more "
                                f"memory") from None
            raise
        contexts[label] = Context(study, data, batches, size, runtime, store, plan)
    preflight(study, plan, contexts, dev)
    plan = store.begin(study, plan, runtime.precision, warn=log)
    write_atomic(out / "data.json", json.dumps(described, indent=1) + "\n")

    store.prune(plan)
    pending = [n for n in plan.ordered() if n.status == "pending"]
    total = sum(n.epochs * contexts[n.dataset].batches.steps_per_epoch for n in pending)
    done = sum(n.status == "done" for n in plan.nodes.values())
    stopped = len(plan.nodes) - done - len(pending)
    log(f"{len(plan.runs)} runs, {len(plan.nodes)} sessions to train ({done} already done"
        + (f", {stopped} diverged or skipped" if stopped else "")
        + f") on {dev}{' with Ray' if executor.name == 'ray' else ''}, {runtime.precision}{', compiled' if runtime.compile else ''}, optimizer kernels "
        f"{', '.join(f'{k}={v}' for k, v in next(iter(contexts.values())).kernels.items()) or 'default'}; "
        f"output in {out}")
    bar = tqdm(total=total, unit="step", desc=study.name, dynamic_ncols=True, file=sys.stderr,
               mininterval=0.2 if sys.stderr.isatty() else 10, disable=not pending)

    def where(node) -> str:
        return f"{node.dataset} {','.join(node.arms)} seed{node.seed} session {node.session + 1}"

    def finished(node, rows: list[dict]) -> None:
        """Record a trained node (the executor calls this in the driver, one node at a time)."""
        last = rows[-1]
        bar.write(f"{where(node)}: val top-1 {100 * last['val_acc']:.1f}%, val loss {last['val_loss']:.4f}, "
                  f"train loss {last['train_loss']:.4f} ({sum(r['seconds'] for r in rows):.0f} s)")
        node.status, node.precision = "done", runtime.precision
        store.write_plan(plan)
        store.prune(plan)

    def diverged(node, step: int) -> None:
        node.status, node.diverged_at, node.precision = "diverged", step, runtime.precision
        skipped = plan.descendants(node.id)
        for child in skipped:
            child.status = "skipped"
            bar.update(child.epochs * contexts[child.dataset].batches.steps_per_epoch)
        store.write_plan(plan)
        bar.write(f"{where(node)}: DIVERGED at step {step} (non-finite training loss)"
                  + (f"; {len(skipped)} later session{'s' if len(skipped) > 1 else ''} skipped" if skipped else ""))

    try:
        if executor.name == "ray":
            from optstate import ray_executor

            try:
                ray_executor.train(plan, study, store, runtime, root, contexts, executor, bar, finished, diverged)
            except Exception as e:
                if _is_out_of_memory(e):
                    raise out_of_memory(dev, study, "a Ray task") from None
                raise
        else:
            for node in pending:
                if node.status != "pending":  # skipped: an ancestor diverged in this run
                    continue
                ctx = contexts[node.dataset]
                if store.progress_path(node.id).exists():
                    bar.write(f"continuing {where(node)} from its last finished epoch")
                ctx.on_step = bar.update
                ctx.on_epoch = lambda n, e: bar.set_postfix_str(f"{where(n)} epoch {e + 1}/{n.epochs}")
                try:
                    rows = train_node(node, ctx)
                except Diverged as d:
                    diverged(node, d.step)
                    continue
                except Exception as e:
                    if _is_out_of_memory(e):
                        raise out_of_memory(dev, study, where(node)) from None
                    raise
                finished(node, rows)
    finally:
        bar.close()
    for run in plan.runs:
        store.materialize_run(run, plan)
    log(f"trained {plan.epochs_trained()} epochs; without sharing sessions it would have been "
        f"{plan.epochs_unshared()}")
    diverged = [r for r in plan.runs if plan.run_status(r) == "diverged"]
    if diverged:
        log(f"{len(diverged)} of {len(plan.runs)} runs diverged (see report.md): "
            + ", ".join(f"{r.dataset} {r.arm} seed{r.seed}" for r in diverged))
    return plan

"""Train one node: one session of one run, starting from its parent's end state.

Read it top to bottom: build the model, take over the parent's weights and
optimizer, apply the handoff, attach the session's schedule, then the plain
loop of forward, backward, optimizer step, scheduler step, log; evaluate at
every epoch end; save the end state for the children.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from optstate import models
from optstate.data.batches import Batches
from optstate.data.images import ImageData
from optstate.handoff import HANDOFFS, NextSession
from optstate.plan import Node, Plan
from optstate.runtime import Runtime, kernel_kwargs
from optstate.schedules import SCHEDULES, momentum_of
from optstate.store import Store, step_columns
from optstate.study import Study, optimizer_class, optimizer_kwargs, probe_optimizer


@dataclass
class Context:
    """What every node of one dataset shares."""

    study: Study
    data: ImageData
    batches: Batches
    image_size: int
    runtime: Runtime
    store: Store
    plan: Plan
    on_step: Callable[[int], None] = lambda n: None
    on_epoch: Callable[[Node, int], None] = lambda node, epoch: None
    momentum_name: str = field(init=False)
    state_keys: list[str] = field(init=False)  # per-parameter buffers this optimizer keeps, e.g. exp_avg
    step_columns: list[str] = field(init=False)
    kernels: dict = field(init=False)  # fused=True or foreach=True, as this device allows

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def __post_init__(self):
        param = torch.zeros(2, requires_grad=True)
        probe = probe_optimizer(self.study.optimizer, [param])
        self.momentum_name = "momentum" if "momentum" in probe.defaults and "betas" not in probe.defaults else "beta1"
        param.grad = torch.ones_like(param)
        probe.step()
        self.state_keys = [k for k, v in probe.state[param].items() if torch.is_tensor(v) and v.shape == param.shape]
        self.step_columns = step_columns(self.momentum_name, self.state_keys)
        opt = self.study.optimizer
        self.kernels = kernel_kwargs(optimizer_class(opt["name"]), optimizer_kwargs(opt), self.device)


class Diverged(Exception):
    """A node's training loss became non-finite at global step `step`; its metrics so far are written."""

    def __init__(self, step: int):
        super().__init__(f"non-finite training loss at step {step}")
        self.step = step


def derive_seed(*parts) -> int:
    """A seed that depends only on its parts: (seed, dataset, purpose, global epoch)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def make_optimizer(params, study: Study, lr: float, kernels: dict | None = None) -> torch.optim.Optimizer:
    return optimizer_class(study.optimizer["name"])(params, lr=lr, **optimizer_kwargs(study.optimizer),
                                                    **(kernels or {}))


def start_lr(schedule: str, settings: dict) -> float:
    """The learning rate a session's first step uses (what a fresh optimizer is built with)."""
    return SCHEDULES[schedule].first_lr(settings)


def start_node(node: Node, ctx: Context):
    """Model, optimizer and scheduler as the node's first step will see them."""
    torch.manual_seed(derive_seed(node.seed, node.dataset, "init"))
    model = models.build(ctx.study.model, len(ctx.data.classes)).to(ctx.device)
    steps = node.epochs * ctx.batches.steps_per_epoch

    def new_optimizer() -> torch.optim.Optimizer:
        return make_optimizer(model.parameters(), ctx.study, start_lr(node.schedule, node.settings), ctx.kernels)

    if node.parent is None:
        optimizer = new_optimizer()
    else:
        parent = ctx.store.load_checkpoint(node.parent, ctx.device)
        model.load_state_dict(parent["model"])
        # The parent's optimizer exactly as it ended: state tensors, step counts, param_groups.
        optimizer = new_optimizer()
        optimizer.load_state_dict(parent["optimizer"])
        session = NextSession(node.session, node.schedule, dict(node.settings), node.epochs, steps, new_optimizer)
        optimizer = HANDOFFS[node.handoff](model, optimizer, session)
    scheduler = SCHEDULES[node.schedule].attach(optimizer, node.settings, steps)
    return model, optimizer, scheduler


@torch.no_grad()
def diagnostics(optimizer: torch.optim.Optimizer, before: list[torch.Tensor], keys: list[str]) -> dict[str, float]:
    """The norm of each kind of state buffer over all parameters, and ||Δθ|| / ||θ|| of the step just taken."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norms = []
    for key in keys:
        buffers = [s[key] for s in optimizer.state.values() if torch.is_tensor(s.get(key))]
        norms.append(torch.stack(torch._foreach_norm(buffers)).norm() if buffers else torch.zeros((), device=before[0].device))
    step = torch.stack(torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], before))).norm()
    size = torch.stack(torch._foreach_norm(before)).norm()
    values = torch.stack([n.float() for n in norms] + [step / size]).tolist()  # one sync
    return {f"norm_{k}": v for k, v in zip(keys, values)} | {"update_ratio": values[-1]}


def train_step(forward: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (in the run's precision), loss in fp32, backward, optimizer step; returns logits and loss."""
    with runtime.autocast():
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), loss.detach()


@torch.inference_mode()
def evaluate(forward: Callable, model: torch.nn.Module, batches: Batches, runtime: Runtime) -> dict[str, float]:
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=batches.device)
    top1 = torch.zeros((), dtype=torch.int64, device=batches.device)
    top3 = torch.zeros((), dtype=torch.int64, device=batches.device)
    n = 0
    for x, y in batches.val_batches():
        with runtime.autocast():
            logits = forward(x)
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        best = logits.topk(min(3, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == y).sum()
        top3 += (best == y[:, None]).any(dim=1).sum()
        n += len(y)
    model.train()
    return {"val_loss": loss.item() / n, "val_acc": top1.item() / n, "val_top3": top3.item() / n}


def train_node(node: Node, ctx: Context) -> list[dict]:
    """Train the node's session; returns its epoch rows."""
    study, b = ctx.study, ctx.batches
    model, optimizer, scheduler = start_node(node, ctx)
    rt = ctx.runtime
    forward = torch.compile(model) if rt.compile else model  # checkpoints hold the plain module
    spe = b.steps_per_epoch
    total = node.epochs * spe
    step0 = node.first_epoch * spe  # global step of this node's first step
    epoch_rows, step_rows = [], []
    done = 0  # epochs of this node already trained by an earlier, interrupted run
    progress = ctx.store.load_progress(node.id, ctx.device)
    if progress is not None:
        model.load_state_dict(progress["model"])
        optimizer.load_state_dict(progress["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(progress["scheduler"])
        epoch_rows, step_rows = progress["epoch_rows"], progress["step_rows"]
        done = len(epoch_rows)
        ctx.on_step(done * spe)
    runs = [r for r in ctx.plan.runs if node.id in r.nodes]
    # purge_step hides TensorBoard events that an interrupted run wrote past the resume point
    writers = [SummaryWriter(str(ctx.store.tensorboard_dir(r)), purge_step=step0 + done * spe if done else None)
               for r in runs]
    mom = ctx.momentum_name
    # The first step whose loss was not finite, kept on the device so that watching costs no sync;
    # it is read where the loop syncs anyway (logged steps, epoch ends).
    first_bad = torch.full((), -1, dtype=torch.int64, device=ctx.device)
    try:
        for e in range(done, node.epochs):
            ctx.on_epoch(node, e)
            global_epoch = node.first_epoch + e
            # Batches and dropout depend on (seed, dataset, global epoch) only: branches
            # after a fork see the same data, and a rerun sees what the first run saw.
            order = torch.Generator().manual_seed(derive_seed(node.seed, node.dataset, "data", global_epoch))
            torch.manual_seed(derive_seed(node.seed, node.dataset, "noise", global_epoch))
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
            seen = 0
            model.train()
            for i, (x, y) in enumerate(b.train_epoch(order)):
                k = e * spe + i  # step within the session
                group = optimizer.param_groups[0]
                lr, beta = float(group["lr"]), momentum_of(group)  # what this step uses
                logged = k == 0 or (step0 + k) % study.log_every == 0
                if logged:  # the weights before the step, for the update size
                    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

                logits, loss = train_step(forward, optimizer, x, y, rt)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step0 + k, first_bad)
                if scheduler is not None and k + 1 < total:  # never past the schedule's last step
                    scheduler.step()

                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if (logged or i + 1 == spe) and first_bad.item() >= 0:
                    ctx.store.write_node_metrics(node.id, epoch_rows, step_rows, ctx.step_columns)
                    ctx.store.clear_progress(node.id)
                    ctx.on_step(total - k)  # the bar skips what this node will not train
                    raise Diverged(first_bad.item())
                if logged:
                    state = diagnostics(optimizer, before, ctx.state_keys)
                    row = {"step": step0 + k, "session": node.session + 1, "global_epoch": global_epoch + 1,
                           "lr": lr, mom: beta, "loss": loss.item(), "acc": correct.item() / seen, **state}
                    step_rows.append(row)
                    for w in writers:
                        w.add_scalar("train/loss", row["loss"], row["step"])
                        w.add_scalar("train/acc_running", row["acc"], row["step"])
                        w.add_scalar("schedule/lr", lr, row["step"])
                        if beta is not None:
                            w.add_scalar(f"schedule/{mom}", beta, row["step"])
                        for key, value in state.items():
                            w.add_scalar(f"state/{key}", value, row["step"])
                ctx.on_step(1)
            train_loss = loss_sum.item() / seen
            row = {"session": node.session + 1, "epoch": e + 1, "global_epoch": global_epoch + 1,
                   "step": step0 + (e + 1) * spe, "train_loss": train_loss, "train_acc": correct.item() / seen,
                   **evaluate(forward, model, b, rt), "lr": lr, "seconds": time.perf_counter() - t0}
            epoch_rows.append(row)
            for w in writers:
                for key in ("train_loss", "train_acc"):
                    w.add_scalar(f"epoch/{key}", row[key], row["step"])
                for key in ("val_loss", "val_acc", "val_top3"):
                    w.add_scalar(f"val/{key[4:]}", row[key], row["step"])
                w.flush()
            if e + 1 < node.epochs:  # the last epoch's state is the final checkpoint below
                ctx.store.save_progress(node.id, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "epoch_rows": epoch_rows, "step_rows": step_rows}, global_epoch + 1)
    finally:
        for w in writers:
            w.close()
    ctx.store.write_node_metrics(node.id, epoch_rows, step_rows, ctx.step_columns)
    ctx.store.save_checkpoint(node.id, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "global_epoch": node.first_epoch + node.epochs, "steps": total})
    ctx.store.clear_progress(node.id)
    return epoch_rows

"""`optstate inspect`: the post's "quick optimizer review", current and correct.

Runs one arm's sessions on a tiny model for a few steps with the installed
PyTorch and prints the optimizer's param_groups and a summary of its state
before and after each handoff, so that what each handoff keeps, and what a
schedule rewrites (OneCycle's initial_lr, max_lr, beta1), can be seen.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from optstate.handoff import HANDOFFS, NextSession
from optstate.schedules import SCHEDULES, momentum_of
from optstate.study import Study
from optstate.train import make_optimizer, start_lr


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v)


def describe_groups(opt: torch.optim.Optimizer) -> list[str]:
    lines = []
    for i, g in enumerate(opt.param_groups):
        lines.append(f"  param_groups[{i}] ({len(g['params'])} params)")
        lines += [f"    {k}: {_fmt(v)}" for k, v in sorted(g.items()) if k != "params"]
    return lines


def describe_state(opt: torch.optim.Optimizer) -> list[str]:
    if not opt.state:
        return ["  state: empty"]
    keys: dict[str, list[torch.Tensor]] = {}
    for s in opt.state.values():
        for k, v in s.items():
            keys.setdefault(k, []).append(v if torch.is_tensor(v) else torch.tensor(v))
    lines = [f"  state: {len(opt.state)} parameters with state"]
    for k, vs in keys.items():
        if vs[0].numel() == 1:
            vals = sorted({float(v) for v in vs})
            lines.append(f"    {k}: {', '.join(_fmt(x) for x in vals)}")
        else:
            norm = torch.sqrt(sum(v.float().pow(2).sum() for v in vs))
            lines.append(f"    {k}: {sum(v.numel() for v in vs)} values, L2 norm {float(norm):.6g}")
    return lines


def review(study: Study, arm: str, steps: int = 4, say: Callable[[str], None] = print) -> None:
    schedule, _, handoff = arm.partition("/")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    say(f"optstate inspect: arm {arm}, optimizer {study.optimizer}, torch {torch.__version__}")
    say(f"(a tiny model, {steps} steps per session; the study's session settings)")
    optimizer = None
    for i in range(len(study.sessions)):
        settings = study.settings(arm, i)
        lr0 = start_lr(schedule, settings)

        def new_optimizer(lr0: float = lr0) -> torch.optim.Optimizer:
            return make_optimizer(model.parameters(), study, lr0)

        say("")
        say(f"== session {i + 1}: {schedule} {', '.join(f'{k}={_fmt(v)}' for k, v in settings.items())}")
        if optimizer is None:
            optimizer = new_optimizer()
            say("new optimizer:")
        else:
            say(f"before handoff `{handoff}`:")
            for line in describe_groups(optimizer) + describe_state(optimizer):
                say(line)
            before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for p, s in optimizer.state.items()}
            old = optimizer
            optimizer = HANDOFFS[handoff](model, optimizer, NextSession(i, schedule, settings, steps, steps, new_optimizer))
            same = optimizer is old
            kept = same and all(
                all(torch.equal(v, before[id(p)][k]) if torch.is_tensor(v) else v == before[id(p)][k]
                    for k, v in s.items()) for p, s in optimizer.state.items())
            say(f"after handoff `{handoff}`: {'the same optimizer object' if same else 'a different optimizer object'}"
                f"{'; every state tensor unchanged' if kept else ''}")
            if schedule == "onecycle":
                optimizer.param_groups[0]["initial_lr"] = 12345.0
                say("  (as the original notebooks did, param_groups[0]['initial_lr'] is now set by hand to 12345.0)")
        why = SCHEDULES[schedule].check_steps(settings, steps)
        if why:
            from optstate.errors import UserError

            raise UserError(f"--steps {steps}: {why}")
        scheduler = SCHEDULES[schedule].attach(optimizer, settings, steps)
        say(f"after attaching the {schedule} schedule:")
        for line in describe_groups(optimizer) + describe_state(optimizer):
            say(line)
        if schedule == "onecycle" and i > 0:
            got = optimizer.param_groups[0]["initial_lr"]
            say(f"  -> OneCycleLR overwrote the hand-set initial_lr with {got:.6g} = max_lr / div_factor: "
                f"the starting LR is chosen with div_factor, not initial_lr")
        for k in range(steps):
            g = optimizer.param_groups[0]
            lr, m = g["lr"], momentum_of(g)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None and k + 1 < steps:
                scheduler.step()
            say(f"  step {k + 1}: lr {lr:.6g}" + (f", beta1/momentum {m:.6g}" if m is not None else "")
                + f", loss {loss.item():.4f}")
    say("")
    say("after the last session:")
    for line in describe_groups(optimizer) + describe_state(optimizer):
        say(line)

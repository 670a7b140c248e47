"""What happens to the optimizer at a session boundary.

A handoff is a small function ``(model, optimizer, session) -> optimizer``: it
receives the optimizer that finished the previous session, exactly as it was
(state tensors, step counts, param_groups), and returns the optimizer for the
next one. The next session's schedule is attached afterwards and sets only the
hyperparameters it owns (the learning rate; OneCycle also cycles beta1).

Add your own with ``@register("name")``; an arm is ``"<schedule>/<handoff>"``.
A handoff that cannot apply to the study's optimizer raises ``NotApplicable``;
the study is then refused before anything trains. This module needs nothing but torch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class NextSession:
    """What a handoff may know about the session that follows the boundary."""

    index: int  # 0-based session number of the session about to start
    schedule: str  # "constant", "onecycle", ...
    settings: dict  # the schedule's resolved settings for this arm and session
    epochs: int
    steps: int  # optimizer steps the session will take
    new_optimizer: Callable[[], torch.optim.Optimizer] = field(repr=False)  # fresh, study hyperparameters


class NotApplicable(Exception):
    """Raised by a handoff that makes no sense for this optimizer (e.g. reset-v on SGD)."""


Handoff = Callable[[torch.nn.Module, torch.optim.Optimizer, NextSession], torch.optim.Optimizer]

HANDOFFS: dict[str, Handoff] = {}


def register(name: str) -> Callable[[Handoff], Handoff]:
    """Register a handoff under ``name`` (used in arms as ``schedule/name``)."""

    def add(fn: Handoff) -> Handoff:
        if name in HANDOFFS:
            raise ValueError(f"handoff {name!r} is already registered")
        HANDOFFS[name] = fn
        return fn

    return add


@register("new")
def new(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """Throw the optimizer away: a freshly built one, empty state, study hyperparameters."""
    return session.new_optimizer()


@register("keep")
def keep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """The same object: every state tensor and step count carries over untouched."""
    return optimizer


@register("reload")
def reload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """What a real restart does: state_dict() to a file, a new optimizer, load_state_dict() from it."""
    file = io.BytesIO()
    torch.save(optimizer.state_dict(), file)
    file.seek(0)
    fresh = session.new_optimizer()
    fresh.load_state_dict(torch.load(file, weights_only=True))
    return fresh


@register("reset-state")
def reset_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """Keep the param groups (hyperparameters as they ended), drop every per-parameter state entry."""
    optimizer.state.clear()
    return optimizer


# Step counters and what an optimizer derives from them for bias correction.
STEP_KEYS = {"step": 0.0, "mu_product": 1.0}  # NAdam's running product of momentum factors restarts at 1
# The first and second moment estimates, by the names torch.optim gives them.
FIRST_MOMENT = ("exp_avg", "momentum_buffer")
SECOND_MOMENT = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "exp_inf")  # all start at zero


def _kinds(optimizer: torch.optim.Optimizer) -> set[str]:
    return {k for state in optimizer.state.values() for k, v in state.items() if v is not None}


@register("reset-step")
def reset_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """Keep the moment estimates, restart the step count (so Adam's bias correction starts again)."""
    if "step" not in _kinds(optimizer):
        raise NotApplicable(f"torch.optim.{type(optimizer).__name__} keeps no step count")
    for state in optimizer.state.values():
        for key, start in STEP_KEYS.items():
            if key in state:
                value = state[key]
                if torch.is_tensor(value):
                    value.fill_(start)
                else:
                    state[key] = type(value)(start)
    return optimizer


def _drop(optimizer: torch.optim.Optimizer, keys: tuple[str, ...], what: str) -> torch.optim.Optimizer:
    if not _kinds(optimizer) & set(keys):
        raise NotApplicable(f"torch.optim.{type(optimizer).__name__} keeps no {what} ({' or '.join(keys)}) "
                            f"with these settings")
    for state in optimizer.state.values():
        for key in keys:
            if state.get(key) is None:
                continue
            if key == "momentum_buffer":
                del state[key]  # SGD starts a buffer from the first gradient, as a new optimizer would
            else:
                state[key].zero_()  # Adam-like moments start at zero
    return optimizer


@register("reset-m")
def reset_m(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """Drop the first moment only (Adam's exp_avg, SGD's momentum_buffer); keep the rest."""
    return _drop(optimizer, FIRST_MOMENT, "first moment")


@register("reset-v")
def reset_v(model: torch.nn.Module, optimizer: torch.optim.Optimizer, session: NextSession) -> torch.optim.Optimizer:
    """Drop the second moment only (Adam's exp_avg_sq and max_exp_avg_sq, RMSprop's square_avg, ...)."""
    return _drop(optimizer, SECOND_MOMENT, "second moment")

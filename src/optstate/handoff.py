"""What happens to the optimizer at a session boundary.

A handoff is a small function ``(model, optimizer, session) -> optimizer``: it
receives the optimizer that finished the previous session, exactly as it was
(state tensors, step counts, param_groups), and returns the optimizer for the
next one. The next session's schedule is attached afterwards and sets only the
hyperparameters it owns (the learning rate; OneCycle also cycles beta1).

Add your own with ``@register("name")``; an arm is ``"<schedule>/<handoff>"``.
This module needs nothing but torch.
"""
from __future__ import annotations

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

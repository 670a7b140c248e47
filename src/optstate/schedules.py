"""What drives the learning rate inside a session.

A schedule is attached to an optimizer at the start of every session (after the
handoff) and returns the scheduler to step after each optimizer step, or None.
Each schedule declares the settings it accepts so that a study file can be
validated before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Setting:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] = lambda v: True
    why: str = ""
    required: bool = False


def _positive(v):
    return v > 0


def _unit_open(v):
    return 0 < v < 1


def _unit(v):
    return 0 <= v < 1


_NUM = (int, float)


@dataclass(frozen=True)
class Schedule:
    name: str
    settings: dict[str, Setting]
    defaults: dict[str, Any]
    attach: Callable[[torch.optim.Optimizer, dict, int], Any]
    # why a session of this many steps cannot run these settings, or None
    check_steps: Callable[[dict, int], str | None] = lambda settings, steps: None


def _onecycle_steps(settings: dict, steps: int) -> str | None:
    # OneCycleLR's warm-up ends at step pct_start*steps - 1: at or below step 0 the cycle
    # skips its start (or divides by zero); three_phase also needs room for its last phase.
    p = float(settings["pct_start"])
    if p * steps <= 1:
        return (f"pct_start {p} over {steps} steps leaves no warm-up (OneCycle needs pct_start x steps > 1); "
                f"raise pct_start or the session's epochs, or lower batch_size")
    if settings["three_phase"] and 2 * p * steps - 2 >= steps - 1:
        return f"three_phase with pct_start {p} over {steps} steps leaves no room for the last phase"
    return None


def _attach_constant(optimizer: torch.optim.Optimizer, settings: dict, total_steps: int):
    # Only the learning rate changes; every other hyperparameter and all state stay.
    for group in optimizer.param_groups:
        group["lr"] = float(settings["lr"])
    return None


def _attach_onecycle(optimizer: torch.optim.Optimizer, settings: dict, total_steps: int):
    # OneCycleLR (last_epoch=-1) overwrites initial_lr = max_lr / div_factor, max_lr
    # and min_lr on every param group, so a hand-set initial_lr is ignored; the
    # start of the cycle is chosen with div_factor (see the README).
    try:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=float(settings["max_lr"]),
            total_steps=total_steps,
            pct_start=float(settings["pct_start"]),
            anneal_strategy=settings["anneal_strategy"],
            cycle_momentum=bool(settings["cycle_momentum"]),
            base_momentum=float(settings["base_momentum"]),
            max_momentum=float(settings["max_momentum"]),
            div_factor=float(settings["div_factor"]),
            final_div_factor=float(settings["final_div_factor"]),
            three_phase=bool(settings["three_phase"]),
        )
    except ValueError as e:  # e.g. cycle_momentum on an optimizer without momentum
        from optstate.errors import UserError

        raise UserError(f"onecycle schedule: {e}") from None


_EPOCHS = Setting(int, _positive, "a whole number of epochs > 0")

SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(
        name="constant",
        settings={"lr": Setting(_NUM, _positive, "> 0", required=True), "epochs": _EPOCHS},
        defaults={},
        attach=_attach_constant,
    ),
    "onecycle": Schedule(
        name="onecycle",
        settings={
            "max_lr": Setting(_NUM, _positive, "> 0", required=True),
            "div_factor": Setting(_NUM, _positive, "> 0"),
            "final_div_factor": Setting(_NUM, _positive, "> 0"),
            "pct_start": Setting(_NUM, _unit_open, "between 0 and 1"),
            "anneal_strategy": Setting(str, lambda v: v in ("cos", "linear"), '"cos" or "linear"'),
            "cycle_momentum": Setting(bool),
            "base_momentum": Setting(_NUM, _unit, "in [0, 1)"),
            "max_momentum": Setting(_NUM, _unit, "in [0, 1)"),
            "three_phase": Setting(bool),
            "epochs": _EPOCHS,
        },
        # PyTorch's own defaults, written out so that study.toml records them.
        defaults={
            "div_factor": 25.0,
            "final_div_factor": 1e4,
            "pct_start": 0.3,
            "anneal_strategy": "cos",
            "cycle_momentum": True,
            "base_momentum": 0.85,
            "max_momentum": 0.95,
            "three_phase": False,
        },
        attach=_attach_onecycle,
        check_steps=_onecycle_steps,
    ),
}


def momentum_of(group: dict) -> float | None:
    """beta1 for Adam-like optimizers, momentum for SGD-like ones, else None."""
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None

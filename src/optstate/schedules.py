"""What drives the learning rate inside a session.

A schedule is attached to an optimizer at the start of every session (after the
handoff) and returns the scheduler to step after each optimizer step, or None.
Each schedule declares the settings it accepts so that a study file can be
validated before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import math

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
    first_lr: Callable[[dict], float]  # the learning rate of a session's first step
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


def cosine_factor(settings: dict, total_steps: int) -> Callable[[int], float]:
    """Step k's learning rate as a fraction of max_lr: a linear warm-up from 1/div_factor
    over warmup_pct of the session, then a half cosine down to 1/final_div_factor at the last step."""
    warm = int(float(settings["warmup_pct"]) * total_steps)
    start, floor = 1 / float(settings["div_factor"]), 1 / float(settings["final_div_factor"])

    def factor(k: int) -> float:
        if k < warm:
            return start + (1 - start) * k / warm
        progress = (k - warm) / max(1, total_steps - 1 - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _attach_cosine(optimizer: torch.optim.Optimizer, settings: dict, total_steps: int):
    # LambdaLR only *sets default* initial_lr, so a kept optimizer would scale the previous
    # session's peak; set this session's peak explicitly (the trap OneCycle avoids by overwriting).
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = float(settings["max_lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(settings, total_steps))


_EPOCHS = Setting(int, _positive, "a whole number of epochs > 0")
_MAX_LR = Setting(_NUM, _positive, "> 0", required=True)
_FACTOR = Setting(_NUM, _positive, "> 0")

SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(
        name="constant",
        settings={"lr": Setting(_NUM, _positive, "> 0", required=True), "epochs": _EPOCHS},
        defaults={},
        attach=_attach_constant,
        first_lr=lambda s: float(s["lr"]),
    ),
    "onecycle": Schedule(
        name="onecycle",
        settings={
            "max_lr": _MAX_LR,
            "div_factor": _FACTOR,
            "final_div_factor": _FACTOR,
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
        first_lr=lambda s: float(s["max_lr"]) / float(s["div_factor"]),
        check_steps=_onecycle_steps,
    ),
    "cosine": Schedule(
        name="cosine",
        settings={
            "max_lr": _MAX_LR,
            "warmup_pct": Setting(_NUM, _unit, "in [0, 1)"),
            "div_factor": _FACTOR,
            "final_div_factor": _FACTOR,
            "epochs": _EPOCHS,
        },
        defaults={"warmup_pct": 0.1, "div_factor": 25.0, "final_div_factor": 1e4},
        attach=_attach_cosine,
        first_lr=lambda s: float(s["max_lr"]) * cosine_factor(s, 2**31)(0),
    ),
}


def momentum_of(group: dict) -> float | None:
    """beta1 for Adam-like optimizers, momentum for SGD-like ones, else None."""
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None

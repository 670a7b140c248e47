"""Handoffs and schedules, proven on optimizer state tensors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optstate import study as studies
from optstate.handoff import HANDOFFS, NextSession, register
from optstate.schedules import SCHEDULES, momentum_of
from optstate.train import make_optimizer


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def train_steps(model, opt, n, scheduler=None, total=None):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    used = []
    for k in range(n):
        g = opt.param_groups[0]
        used.append((g["lr"], momentum_of(g)))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None and (total is None or k + 1 < total):
            scheduler.step()
    return used


def snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def study_with(**opt):
    raw = studies.preset("smoke") | {"optimizer": {"name": "adam", **opt}}
    return studies.Study(studies.validate(raw))


def session(model, study, schedule="constant", settings=None, steps=10, lr=1e-3):
    return NextSession(1, schedule, settings or {"lr": lr}, 1, steps,
                       lambda: make_optimizer(model.parameters(), study, lr))


def test_keep_carries_every_state_tensor_and_step_bit_for_bit():
    model, st = tiny(), study_with()
    opt = make_optimizer(model.parameters(), st, 1e-3)
    train_steps(model, opt, 7)
    before = snapshot(opt)
    kept = HANDOFFS["keep"](model, opt, session(model, st))
    assert kept is opt
    SCHEDULES["onecycle"].attach(kept, SCHEDULES["onecycle"].defaults | {"max_lr": 1e-2}, 20)
    assert len(kept.state) == len(before) == 4
    for p, s in kept.state.items():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k]), k
            assert v.dtype == before[id(p)][k].dtype
        assert float(s["step"]) == 7.0
    # the next step continues the count: no fresh bias correction
    train_steps(model, kept, 1)
    assert all(float(s["step"]) == 8.0 for s in kept.state.values())


def test_new_starts_empty_with_the_configured_hyperparameters():
    model, st = tiny(), study_with(betas=[0.8, 0.99], eps=1e-6, weight_decay=0.01)
    opt = make_optimizer(model.parameters(), st, 1e-3)
    train_steps(model, opt, 3)
    opt.param_groups[0]["betas"] = (0.5, 0.5)  # as OneCycle would have left it
    fresh = HANDOFFS["new"](model, opt, session(model, st, lr=3e-4))
    assert fresh is not opt
    assert len(fresh.state) == 0
    g = fresh.param_groups[0]
    assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 and g["weight_decay"] == 0.01
    assert "initial_lr" not in g and "max_lr" not in g
    assert [p for p in g["params"]] == list(model.parameters())


def test_constant_on_kept_optimizer_changes_only_lr():
    model, st = tiny(), study_with()
    opt = make_optimizer(model.parameters(), st, 1e-3)
    train_steps(model, opt, 3)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    before = snapshot(opt)
    assert SCHEDULES["constant"].attach(opt, {"lr": 5e-5}, 10) is None
    for g, old in zip(opt.param_groups, groups):
        assert g["lr"] == 5e-5
        assert {k: v for k, v in g.items() if k not in ("params", "lr")} == {k: v for k, v in old.items() if k != "lr"}
    assert all(torch.equal(v, before[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


@pytest.mark.parametrize("div_factor", [25.0, 10.0, 2.0])
def test_onecycle_on_kept_optimizer_starts_at_max_lr_over_div_factor(div_factor):
    model, st = tiny(), study_with()
    opt = make_optimizer(model.parameters(), st, 1e-3)
    first = SCHEDULES["onecycle"].attach(opt, SCHEDULES["onecycle"].defaults | {"max_lr": 1e-3}, 12)
    train_steps(model, opt, 12, first, total=12)
    assert first.last_epoch == 11  # never stepped past its 12 steps
    opt.param_groups[0]["initial_lr"] = 0.05  # the original's trick: ignored by today's OneCycleLR
    kept = HANDOFFS["keep"](model, opt, session(model, st))
    settings = SCHEDULES["onecycle"].defaults | {"max_lr": 1e-5, "div_factor": div_factor}
    total = 10  # pct_start 0.3: the peak falls exactly on step 2
    sched = SCHEDULES["onecycle"].attach(kept, settings, total)
    assert kept.param_groups[0]["initial_lr"] == pytest.approx(1e-5 / div_factor)
    used = train_steps(model, kept, total, sched, total=total)
    assert used[0][0] == pytest.approx(1e-5 / div_factor)
    assert used[0][1] == 0.95  # beta1 starts at max_momentum
    assert max(lr for lr, _ in used) == pytest.approx(1e-5, rel=1e-6)
    assert used[-1][0] == pytest.approx(1e-5 / div_factor / 1e4)  # the cycle's last step
    assert sched.last_epoch == total - 1
    with pytest.raises(ValueError):  # one more step would be past the schedule's total
        sched.step()
        sched.step()
    assert all(float(s["step"]) == 12 + total for s in kept.state.values())


def test_a_user_handoff_registers_by_name():
    @register("zero-moments-test")
    def zero(model, opt, nxt):
        for s in opt.state.values():
            s["exp_avg"].zero_()
        return opt

    try:
        raw = studies.preset("smoke") | {"arms": ["constant/zero-moments-test"]}
        st = studies.Study(studies.validate(raw))
        assert st.arms == ["constant/zero-moments-test"]
        with pytest.raises(ValueError):
            register("keep")(zero)
    finally:
        HANDOFFS.pop("zero-moments-test")

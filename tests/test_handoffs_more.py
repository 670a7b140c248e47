"""reload, reset-state, reset-step, reset-m, reset-v, plugins, the cosine schedule and the
state diagnostics, proven on optimizer state tensors of several torch.optim optimizers."""
import math

import pytest
import torch

from optstate import study as studies
from optstate.errors import UserError
from optstate.handoff import HANDOFFS, NextSession
from optstate.schedules import SCHEDULES, cosine_factor
from optstate.train import diagnostics, make_optimizer
from tests.test_handoff import snapshot, tiny, train_steps

OPTIMIZERS = {
    "adam": {"name": "adam"},
    "adamw": {"name": "adamw"},
    "sgd": {"name": "sgd", "momentum": 0.9, "nesterov": True},
    "rmsprop": {"name": "rmsprop"},
    "nadam": {"name": "nadam"},
    "radam": {"name": "radam"},
}


def study_with(opt, arms=("constant/keep",)):
    raw = studies.preset("smoke") | {"optimizer": opt, "arms": list(arms)}
    return studies.Study(studies.validate(raw))


def trained(opt=None, steps=5, seed=0):
    st = study_with(opt or {"name": "adam"})
    model = tiny()
    optimizer = make_optimizer(model.parameters(), st, 1e-3)
    torch.manual_seed(seed)
    train_steps(model, optimizer, steps)
    return model, optimizer, st


def session(model, st, lr=1e-3):
    return NextSession(1, "constant", {"lr": lr}, 1, 10, lambda: make_optimizer(model.parameters(), st, lr))


def test_reload_equals_keep_on_every_tensor_and_in_training():
    runs = []
    for name in ("keep", "reload"):
        model, opt, st = trained({"name": "adam", "amsgrad": True}, steps=6)
        opt.param_groups[0]["betas"] = (0.93, 0.999)  # as a schedule may have left it
        out = HANDOFFS[name](model, opt, session(model, st))
        runs.append((model, out, snapshot(out), [dict(g) for g in out.param_groups]))
    (m1, keep, s1, g1), (m2, reload, s2, g2) = runs
    assert reload is not keep
    assert [{k: v for k, v in g.items() if k != "params"} for g in g1] == \
           [{k: v for k, v in g.items() if k != "params"} for g in g2]
    assert list(s1.values()) and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for a, b in zip(s1.values(), s2.values()) for k in a)
    torch.manual_seed(1)
    train_steps(m1, keep, 4)
    torch.manual_seed(1)
    train_steps(m2, reload, 4)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_reset_state_keeps_the_param_groups_and_drops_all_state():
    for opt in ({"name": "adam"}, {"name": "sgd", "momentum": 0.9}):
        model, optimizer, st = trained(opt)
        optimizer.param_groups[0]["weight_decay"] = 0.123  # hyperparameters as they ended
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        out = HANDOFFS["reset-state"](model, optimizer, session(model, st))
        assert out is optimizer and len(out.state) == 0
        assert [{k: v for k, v in g.items() if k != "params"} for g in out.param_groups] == groups


def test_reset_step_keeps_moments_and_restarts_the_count():
    model, opt, st = trained(steps=7)
    before = snapshot(opt)
    HANDOFFS["reset-step"](model, opt, session(model, st))
    for p, s in opt.state.items():
        assert float(s["step"]) == 0.0 and s["step"].dtype == before[id(p)]["step"].dtype
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], before[id(p)][k])
    # the next step is bias-corrected as step 1: update = lr * m1_hat / (sqrt(v1_hat) + eps)
    p0 = next(iter(opt.state))
    old = p0.detach().clone()
    m, v = before[id(p0)]["exp_avg"], before[id(p0)]["exp_avg_sq"]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    g = p0.grad.clone()
    opt.step()
    m1, v1 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    expected = old - 1e-3 * (m1 / 0.1) / ((v1 / 0.001).sqrt() + 1e-8)
    assert torch.allclose(p0.detach(), expected, rtol=1e-5, atol=1e-8)


def test_reset_step_on_nadam_restarts_its_momentum_product():
    model, opt, st = trained({"name": "nadam"})
    HANDOFFS["reset-step"](model, opt, session(model, st))
    assert all(float(s["step"]) == 0 and float(s["mu_product"]) == 1.0 for s in opt.state.values())


@pytest.mark.parametrize("handoff,dropped,kept", [
    ("reset-m", {"exp_avg"}, {"exp_avg_sq", "max_exp_avg_sq", "step"}),
    ("reset-v", {"exp_avg_sq", "max_exp_avg_sq"}, {"exp_avg", "step"}),
])
def test_reset_m_and_v_drop_exactly_one_moment_of_adam(handoff, dropped, kept):
    model, opt, st = trained({"name": "adam", "amsgrad": True})
    before = snapshot(opt)
    HANDOFFS[handoff](model, opt, session(model, st))
    for p, s in opt.state.items():
        assert set(s) == dropped | kept
        assert all(torch.count_nonzero(s[k]) == 0 for k in dropped)
        assert all(torch.count_nonzero(before[id(p)][k]) > 0 for k in dropped)
        assert all(torch.equal(s[k], before[id(p)][k]) for k in kept)


def test_reset_m_on_sgd_drops_the_momentum_buffer_which_restarts_from_the_gradient():
    model, opt, st = trained({"name": "sgd", "momentum": 0.9})
    assert all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in opt.state.values())
    HANDOFFS["reset-m"](model, opt, session(model, st))
    assert all("momentum_buffer" not in s for s in opt.state.values())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], g) for p, g in grads.items())  # as a new SGD


@pytest.mark.parametrize("opt", list(OPTIMIZERS), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("handoff", ["new", "keep", "reload", "reset-state", "reset-step", "reset-m", "reset-v"])
def test_every_handoff_works_on_each_optimizer_or_is_refused_clearly(opt, handoff):
    refused = {("sgd", "reset-step"), ("sgd", "reset-v"), ("rmsprop", "reset-m")}
    if (opt, handoff) in refused:
        with pytest.raises(UserError, match=f"the {handoff} handoff does not apply to this optimizer"):
            study_with(OPTIMIZERS[opt], [f"constant/{handoff}"])
        return
    st = study_with(OPTIMIZERS[opt], [f"constant/{handoff}", "onecycle/keep"])
    model = tiny()
    optimizer = make_optimizer(model.parameters(), st, 1e-3)
    first = SCHEDULES["onecycle"].attach(optimizer, SCHEDULES["onecycle"].defaults | {"max_lr": 1e-3}, 5)
    train_steps(model, optimizer, 5, first, total=5)
    out = HANDOFFS[handoff](model, optimizer, session(model, st))
    sched = SCHEDULES["onecycle"].attach(out, SCHEDULES["onecycle"].defaults | {"max_lr": 1e-3}, 10)
    train_steps(model, out, 10, sched, total=10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert out.param_groups[0]["lr"] == pytest.approx(1e-3 / 25 / 1e4)  # the cycle ran to its end


def test_sgd_under_onecycle_cycles_momentum():
    model, opt, st = trained({"name": "sgd", "momentum": 0.9})
    sched = SCHEDULES["onecycle"].attach(opt, SCHEDULES["onecycle"].defaults | {"max_lr": 0.1}, 10)
    used = train_steps(model, opt, 10, sched, total=10)
    assert used[0][1] == 0.95 and min(m for _, m in used) == pytest.approx(0.85)


def test_cosine_warms_up_then_decays_and_a_kept_optimizer_uses_this_sessions_peak():
    model, opt, st = trained(steps=3)
    settings = SCHEDULES["cosine"].defaults | {"max_lr": 1e-2}
    first = SCHEDULES["cosine"].attach(opt, settings, 20)
    used = [lr for lr, _ in train_steps(model, opt, 20, first, total=20)]
    assert used[0] == pytest.approx(1e-2 / 25) and max(used) == pytest.approx(1e-2)
    assert used.index(max(used)) == 2  # warm-up: 10% of 20 steps
    assert used[-1] == pytest.approx(1e-2 / 1e4)
    assert all(a >= b for a, b in zip(used[2:], used[3:]))
    kept = HANDOFFS["keep"](model, opt, session(model, st))
    second = SCHEDULES["cosine"].attach(kept, settings | {"max_lr": 1e-4}, 10)
    used = [lr for lr, _ in train_steps(model, kept, 10, second, total=10)]
    assert used[0] == pytest.approx(1e-4 / 25) and max(used) == pytest.approx(1e-4)  # not the old 1e-2
    f = cosine_factor(settings, 100)
    assert f(55) == pytest.approx(1 / 1e4 + (1 - 1 / 1e4) * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_diagnostics_are_the_norms_of_the_state_and_of_the_update():
    model, opt, st = trained(steps=4)
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 1)
    d = diagnostics(opt, before, ["exp_avg", "exp_avg_sq"])
    for key in ("exp_avg", "exp_avg_sq"):
        expected = math.sqrt(sum(float((s[key].double() ** 2).sum()) for s in opt.state.values()))
        assert d[f"norm_{key}"] == pytest.approx(expected, rel=1e-5)
    step = math.sqrt(sum(float(((p.detach() - b).double() ** 2).sum()) for p, b in zip(model.parameters(), before)))
    size = math.sqrt(sum(float((b.double() ** 2).sum()) for b in before))
    assert d["update_ratio"] == pytest.approx(step / size, rel=1e-5)


def test_a_plugin_module_registers_a_handoff(tmp_path, monkeypatch):
    (tmp_path / "my_handoffs_test.py").write_text(
        "from optstate.handoff import register\n"
        "@register('halve-m-test')\n"
        "def halve(model, optimizer, session):\n"
        "    for s in optimizer.state.values():\n"
        "        s['exp_avg'].mul_(0.5)\n"
        "    return optimizer\n")
    monkeypatch.chdir(tmp_path)
    try:
        st = studies.load(None, "smoke", ['arms=["constant/halve-m-test"]'], ["my_handoffs_test"])
        assert st.plugins == ["my_handoffs_test"] and "halve-m-test" in HANDOFFS
        st = studies.load(None, "smoke", ['arms=["constant/halve-m-test"]', 'plugins=["my_handoffs_test.py"]'])
        assert st.arms == ["constant/halve-m-test"]
        with pytest.raises(UserError, match="cannot load 'no_such_module'"):
            studies.load(None, "smoke", [], ["no_such_module"])
    finally:
        HANDOFFS.pop("halve-m-test", None)

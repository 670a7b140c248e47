"""A node's handoff through the real training path: checkpoints, branches, determinism."""
import pytest
import torch

from optstate import data as datasets
from optstate import plan as planning
from optstate import study as studies
from optstate.data.batches import Batches
from optstate.store import Store
from optstate.runtime import Runtime
from optstate.train import Context, start_node, train_node


def setup(tmp_path, *sets):
    st = studies.load(None, "smoke", ["train_images=192", "val_images=64", "batch_size=32", *sets])
    plan = planning.build(st)
    store = Store(tmp_path / "out")
    store.begin(st, plan)
    data = datasets.load(st.datasets[0], st, tmp_path)
    ctx = Context(st, data, Batches(data, st, 28, torch.device("cpu")), 28, Runtime(torch.device("cpu")), store, plan)
    return st, plan, store, ctx


def node(plan, schedule, session, handoff=None):
    (n,) = [n for n in plan.nodes.values() if n.schedule == schedule and n.session == session and n.handoff == handoff]
    return n


def test_child_nodes_receive_the_parents_optimizer_exactly(tmp_path):
    st, plan, store, ctx = setup(tmp_path)
    root = node(plan, "onecycle", 0)
    train_node(root, ctx)
    saved = store.load_checkpoint(root.id)["optimizer"]
    assert saved["state"], "the parent trained, so Adam has state"

    _, kept, sched = start_node(node(plan, "onecycle", 1, "keep"), ctx)
    state = kept.state_dict()["state"]
    assert state.keys() == saved["state"].keys()
    for i in state:
        for k in saved["state"][i]:
            assert torch.equal(state[i][k], saved["state"][i][k])
    g = kept.param_groups[0]
    settings = node(plan, "onecycle", 1, "keep").settings
    assert g["lr"] == pytest.approx(settings["max_lr"] / settings["div_factor"], rel=1e-12)
    assert g["betas"][0] == settings["max_momentum"]

    _, fresh, _ = start_node(node(plan, "onecycle", 1, "new"), ctx)
    assert not fresh.state
    assert fresh.param_groups[0]["lr"] == pytest.approx(settings["max_lr"] / settings["div_factor"], rel=1e-12)


def test_branches_share_the_first_session_and_see_the_same_batches(tmp_path):
    st, plan, store, ctx = setup(tmp_path)
    roots = [n for n in plan.nodes.values() if n.parent is None]
    assert len(roots) == 2 and all(len(n.arms) == 2 for n in roots)
    b = ctx.batches
    from optstate.train import derive_seed

    one = [x for x, _ in b.train_epoch(torch.Generator().manual_seed(derive_seed(0, "d", "data", 1)))]
    two = [x for x, _ in b.train_epoch(torch.Generator().manual_seed(derive_seed(0, "d", "data", 1)))]
    assert all(torch.equal(p, q) for p, q in zip(one, two))


def test_a_node_trains_the_same_twice(tmp_path):
    st, plan, store, ctx = setup(tmp_path)
    root = node(plan, "constant", 0)
    train_node(root, ctx)
    first = (store.node_dir(root.id) / "epochs.csv").read_text()
    w1 = store.load_checkpoint(root.id)["model"]
    train_node(root, ctx)
    second = (store.node_dir(root.id) / "epochs.csv").read_text()
    w2 = store.load_checkpoint(root.id)["model"]
    drop_time = lambda t: [line.rsplit(",", 1)[0] for line in t.splitlines()]  # noqa: E731
    assert drop_time(first) == drop_time(second)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_both_branches_train_on_the_same_batches_after_the_fork(tmp_path):
    st, plan, store, ctx = setup(tmp_path, 'augment="standard"', "image_size=24")
    ctx = Context(st, ctx.data, Batches(ctx.data, st, 24, torch.device("cpu")), 24, Runtime(torch.device("cpu")), store, plan)
    seen = {}
    real = ctx.batches.train_epoch

    def recording(generator):
        for x, y in real(generator):
            seen.setdefault(current, []).append((x.sum().item(), y.tolist()))
            yield x, y

    ctx.batches.train_epoch = recording
    for current in [node(plan, "onecycle", 0).id, node(plan, "onecycle", 1, "keep").id,
                    node(plan, "onecycle", 1, "new").id]:
        torch.manual_seed(1234 + len(seen))  # whatever earlier work did to the global RNG
        train_node(plan.nodes[current], ctx)
    keep, new = seen[node(plan, "onecycle", 1, "keep").id], seen[node(plan, "onecycle", 1, "new").id]
    assert keep == new and len(keep) == ctx.batches.steps_per_epoch
    assert keep != seen[node(plan, "onecycle", 0).id]  # a different epoch, different batches


def test_a_onecycle_session_ends_on_its_last_step_never_past_it(tmp_path):
    st, plan, store, ctx = setup(tmp_path, "log_every=1")
    root = node(plan, "onecycle", 0)
    train_node(root, ctx)
    s = root.settings
    end = store.load_checkpoint(root.id)["optimizer"]["param_groups"][0]
    # stepping once more would move the cosine past its end and the lr back up
    assert end["lr"] == pytest.approx(s["max_lr"] / s["div_factor"] / s["final_div_factor"], rel=1e-9)
    steps = (store.node_dir(root.id) / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + ctx.batches.steps_per_epoch * root.epochs
    first = steps[1].split(",")
    assert float(first[3]) == pytest.approx(s["max_lr"] / s["div_factor"]) and float(first[4]) == 0.95

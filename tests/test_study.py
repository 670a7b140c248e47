"""Study files: validation that names the key, --set overrides, presets, arm overrides."""
import pytest

from optstate import plan as planning
from optstate import study as studies
from optstate.errors import UserError


def load_text(tmp_path, text, *sets):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return studies.load(p, None, list(sets))


MINIMAL = '''
datasets = ["fashion-mnist-embedded"]
model = "small-cnn"
[[sessions]]
epochs = 1
constant = { lr = 1e-3 }
onecycle = { max_lr = 1e-2 }
'''


def test_minimal_file_gets_every_default(tmp_path):
    st = load_text(tmp_path, MINIMAL)
    assert st.arms == ["constant/new", "constant/keep", "onecycle/new", "onecycle/keep"]
    assert st.optimizer["name"] == "adam" and st.seeds == 1
    assert st.settings("onecycle/keep", 0)["div_factor"] == 25.0
    # study.toml records every default: the optimizer's and each schedule's
    written = studies.tomllib.loads(st.to_toml())
    assert written["optimizer"]["betas"] == [0.9, 0.999] and written["optimizer"]["eps"] == 1e-8
    assert written["sessions"][0]["onecycle"]["div_factor"] == 25.0
    assert written["sessions"][0]["onecycle"]["max_momentum"] == 0.95
    # the resolved study round-trips through its own TOML
    assert studies.validate(studies.tomllib.loads(st.to_toml())) == st.raw


@pytest.mark.parametrize("text,key", [
    ("sedes = 2\n", "`sedes`"),
    ("seeds = 0\n", "`seeds`"),
    ("batch_size = -3\n", "`batch_size`"),
    ('optimizer = { name = "adam", weight_decay = 0.1, momentun = 0.9 }\n', "`optimizer.momentun`"),
    ('optimizer = { name = "adamm" }\n', "`optimizer.name`"),
    ('optimizer = { name = "adam", weight_decay = -1.0 }\n', "`optimizer`"),
    ('arms = ["onecycle/kept"]\n', "`arms`"),
    ('model = "resnet5000"\n', "`model`"),
    ('crop_scale = [0.9, 0.1]\n', "`crop_scale`"),
    ('crop_scale = [true, 1]\n', "`crop_scale`"),
    ('optimizer = { name = "lbfgs" }\n', "`optimizer.name`"),
    ('optimizer = { name = "adam", betas = [0.9] }\n', "`optimizer`"),
])
def test_bad_keys_and_values_are_errors_naming_the_key(tmp_path, text, key):
    body = MINIMAL.replace('model = "small-cnn"\n', "") if text.startswith("model") else MINIMAL
    with pytest.raises(UserError) as e:
        load_text(tmp_path, text + body)
    assert key in str(e.value)


@pytest.mark.parametrize("session,key", [
    ("epochs = 1\nconstant = { lr = 1e-3, lrr = 2 }\nonecycle = { max_lr = 1e-2 }", "`sessions[0].constant.lrr`"),
    ("epochs = 1\nconstant = { lr = -1e-3 }\nonecycle = { max_lr = 1e-2 }", "`sessions[0].constant.lr`"),
    ("epochs = 1\nconstant = { lr = 1e-3 }\nonecycle = { max_lr = 1e-2, pct_start = 1.5 }", "`sessions[0].onecycle.pct_start`"),
    ("epochs = 1\nconstant = { lr = 1e-3 }", "`sessions[0].onecycle.max_lr`"),
    ("epochs = 0\nconstant = { lr = 1e-3 }\nonecycle = { max_lr = 1e-2 }", "`sessions[0].epochs`"),
    ("epochs = 1\nconstant = { lr = 1e-3 }\nonecycle = { max_lr = 1e-2 }\nlinear = {}", "`sessions[0].linear`"),
])
def test_session_errors_name_the_key(tmp_path, session, key):
    text = 'datasets = ["fashion-mnist-embedded"]\nmodel = "small-cnn"\n[[sessions]]\n' + session + "\n"
    with pytest.raises(UserError) as e:
        load_text(tmp_path, text)
    assert key in str(e.value)


def test_set_overrides_with_dotted_keys_and_toml_values(tmp_path):
    st = load_text(tmp_path, MINIMAL, "seeds=2", 'arms=["onecycle/keep"]', "optimizer.weight_decay=0.01",
                   "sessions.0.epochs=3", "name=mine", "sessions.0.onecycle/keep.div_factor=10")
    assert st.seeds == 2 and st.arms == ["onecycle/keep"] and st.name == "mine"
    assert st.optimizer["weight_decay"] == 0.01 and st.optimizer["name"] == "adam"
    assert st.settings("onecycle/keep", 0) | {} == st.settings("onecycle/keep", 0)
    assert st.settings("onecycle/keep", 0)["epochs"] == 3 and st.settings("onecycle/keep", 0)["div_factor"] == 10
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_text(tmp_path, MINIMAL, "seeds")
    with pytest.raises(UserError, match="not an index"):
        load_text(tmp_path, MINIMAL, "sessions.4.epochs=1")
    with pytest.raises(UserError, match="one line only"):
        load_text(tmp_path, MINIMAL, 'seeds=2\nname="x"')
    quoted = load_text(tmp_path, MINIMAL, 'sessions.0."onecycle/keep".div_factor=4')
    assert quoted.settings("onecycle/keep", 0)["div_factor"] == 4


def test_a_preset_can_run_a_subset_of_its_arms():
    st = studies.load(None, "seed-faithful", ['arms=["constant/new", "constant/keep"]'])
    assert st.arms == ["constant/new", "constant/keep"]
    with pytest.raises(UserError, match="sessions"):
        studies.load(None, "seed-faithful", ['sessions.1.onecycle/kept.div_factor=3'])


def test_a_non_utf8_study_file_is_a_clear_error(tmp_path):
    p = tmp_path / "s.toml"
    p.write_bytes(b"name = \"\xff\xfe\"\n")
    with pytest.raises(UserError, match="cannot read the study file"):
        studies.load(p)


def test_no_file_and_no_preset_means_the_embedded_study():
    st = studies.load(None)
    assert st.name == "embedded" and st.datasets == ["fashion-mnist-embedded"]


@pytest.mark.parametrize("name", studies.PRESETS)
def test_presets_are_valid(name):
    st = studies.load(None, name)
    assert st.name == name


def test_seed_faithful_runs_the_notebooks_sessions():
    st = studies.load(None, "seed-faithful")
    assert [st.settings("constant/new", i)["epochs"] for i in range(3)] == [10, 10, 5]
    assert [st.settings("onecycle/new", i)["epochs"] for i in range(3)] == [10, 5, 3]
    keep = [st.settings("onecycle/keep", i) for i in range(3)]
    new = [st.settings("onecycle/new", i) for i in range(3)]
    # what the kept optimizer actually started at: 1e-6 then 5e-6, peaks 1e-5
    assert keep[1]["max_lr"] / keep[1]["div_factor"] == pytest.approx(1e-6)
    assert keep[2]["max_lr"] / keep[2]["div_factor"] == pytest.approx(5e-6)
    assert new[1]["max_lr"] / new[1]["div_factor"] == pytest.approx(4e-7)
    assert new[2]["max_lr"] / new[2]["div_factor"] == pytest.approx(4e-8)
    assert (st.resize, st.augment, st.normalize, st.batch_size, st.image_size) == ("squash", "none", False, 100, 224)


def test_seed_plan_trains_80_instead_of_100_epochs_per_dataset_and_seed():
    plan = planning.build(studies.load(None, "seed"))
    assert plan.epochs_trained() == 160 and plan.epochs_unshared() == 200
    roots = [n for n in plan.nodes.values() if n.parent is None]
    assert len(roots) == 4 and all(len(n.arms) == 2 for n in roots)
    assert {tuple(sorted(n.arms)) for n in roots} == {("constant/keep", "constant/new"), ("onecycle/keep", "onecycle/new")}


def test_an_arm_override_in_the_first_session_splits_the_shared_node():
    st = studies.load(None, "smoke", ["sessions.0.onecycle/keep.div_factor=5"])
    plan = planning.build(st)
    roots = [n for n in plan.nodes.values() if n.parent is None and n.schedule == "onecycle"]
    assert len(roots) == 2

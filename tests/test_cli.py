"""The command line as a user meets it: a smoke study, report, inspect, and bad input."""
import csv
import json
import subprocess
import sys

import pytest

from helpers import make_folder
from optstate.cli import main
from optstate.store import EPOCH_COLUMNS


def optstate(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "optstate", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out"
    p = optstate("run", "--preset", "smoke", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out, p


def test_smoke_study_writes_every_file_of_the_output_contract(smoke_dir):
    out, p = smoke_dir
    for name in ("study.toml", "plan.json", "results.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "figures" / "fashion-mnist-embedded-curves.png").stat().st_size > 10_000
    assert (out / "figures" / "fashion-mnist-embedded-schedule.png").stat().st_size > 10_000
    plan = json.loads((out / "plan.json").read_text())
    assert all(n["status"] == "done" for n in plan["nodes"])
    for n in plan["nodes"]:
        assert (out / "nodes" / n["id"] / "epochs.csv").is_file()
    assert not list(out.glob("nodes/*/*.pt"))  # no session is left to train, so no checkpoint is kept
    for arm in ("constant-new", "constant-keep", "onecycle-new", "onecycle-keep"):
        run = out / "runs" / "fashion-mnist-embedded" / arm / "seed0"
        rows = list(csv.DictReader(open(run / "epochs.csv")))
        assert list(rows[0]) == EPOCH_COLUMNS
        assert [int(r["session"]) for r in rows] == [1, 2, 3]
        assert [int(r["global_epoch"]) for r in rows] == [1, 2, 3]
        steps = list(csv.DictReader(open(run / "steps.csv")))
        assert {"step", "session", "lr", "beta1", "loss", "acc"} <= set(steps[0])
        firsts = {}
        for s in steps:
            firsts.setdefault(s["session"], int(s["step"]))
        assert sorted(firsts.values()) == [0, 32, 64]  # the first step of every session is logged
        first = {r["session"]: r for r in reversed(steps)}  # each session's first logged row
        if arm.startswith("onecycle"):  # the lr and beta1 that the step used, not the next step's
            assert [float(first[k]["lr"]) for k in "123"] == pytest.approx([4e-3 / 25, 1e-3 / 25, 3e-4 / 25])
            assert [float(first[k]["beta1"]) for k in "123"] == [0.95, 0.95, 0.95]
        else:
            assert [float(first[k]["lr"]) for k in "123"] == [1e-3, 1e-3, 3e-4]
            assert {float(r["beta1"]) for r in steps} == {0.9}
        events = list((out / "tensorboard" / "fashion-mnist-embedded" / arm / "seed0").glob("events.out.tfevents.*"))
        assert events
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["runs"]} == {"constant/new", "constant/keep", "onecycle/new", "onecycle/keep"}
    assert any("`new` instead of `keep`" in line for line in results["answer"])
    report = (out / "report.md").read_text()
    assert report.startswith("# optstate study `smoke`") and "## Verdict" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "figures/fashion-mnist-embedded-curves.png" in report and "```toml" in report
    assert "trained 10 epochs; without sharing sessions it would have been 12" in p.stdout


def test_shared_first_session_is_identical_in_both_arms(smoke_dir):
    out, _ = smoke_dir
    base = out / "runs" / "fashion-mnist-embedded"
    keep = (base / "onecycle-keep" / "seed0" / "epochs.csv").read_text().splitlines()
    new = (base / "onecycle-new" / "seed0" / "epochs.csv").read_text().splitlines()
    assert keep[:2] == new[:2] and keep[2:] != new[2:]


def test_rerun_resumes_and_report_rebuilds(smoke_dir, tmp_path):
    out, _ = smoke_dir
    before = (out / "runs" / "fashion-mnist-embedded" / "onecycle-keep" / "seed0" / "epochs.csv").read_text()
    p = optstate("run", "--preset", "smoke", "--out", str(out))
    assert p.returncode == 0 and "(10 already done)" in p.stdout
    assert (out / "runs" / "fashion-mnist-embedded" / "onecycle-keep" / "seed0" / "epochs.csv").read_text() == before
    (out / "report.md").unlink()
    for f in (out / "figures").iterdir():
        f.unlink()
    p = optstate("report", str(out))
    assert p.returncode == 0, p.stderr
    assert (out / "report.md").is_file() and (out / "figures" / "fashion-mnist-embedded-curves.png").is_file()


def test_a_different_study_on_the_same_out_is_refused(smoke_dir):
    out, _ = smoke_dir
    p = optstate("run", "--preset", "smoke", "--set", "seeds=2", "--out", str(out))
    assert p.returncode == 2 and "different study (differs in: seeds)" in p.stderr and "Traceback" not in p.stderr


def test_inspect_shows_what_each_handoff_does():
    p = optstate("inspect", "--preset", "smoke", "--arm", "onecycle/keep")
    assert p.returncode == 0, p.stderr
    assert "the same optimizer object; every state tensor unchanged" in p.stdout
    assert "OneCycleLR overwrote the hand-set initial_lr" in p.stdout
    assert "exp_avg_sq" in p.stdout and "initial_lr" in p.stdout
    p = optstate("inspect", "--preset", "smoke", "--arm", "constant/new")
    assert p.returncode == 0 and "a different optimizer object" in p.stdout and "state: empty" in p.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "--preset", "nope"], "unknown preset"),
    (["run", "--preset", "smoke", "--set", "seeds=0"], "`seeds`"),
    (["run", "/no/such/study.toml"], "does not exist"),
    (["run", "--preset", "smoke", "--set", 'datasets=["./no-such-folder"]'], "no-such-folder"),
    (["report", "/no/such/dir"], "not a directory"),
    (["inspect", "--arm", "cosine/keep"], "not one of the study's arms"),
    (["run", "--preset", "smoke", "--out", "/dev/null/out"], "/dev/null"),
    (["run", "--preset", "smoke", "--set", "sessions.0.onecycle.pct_start=0.01"], "no warm-up"),
    (["run", "--preset", "smoke", "--set", 'optimizer={name="nadam", capturable=true}'], "cannot run on cpu"),
    (["run", "--preset", "smoke", "--set", 'optimizer={name="adagrad"}'], "momentum"),
    (["inspect", "--steps", "2"], "no warm-up"),
    (["run", "--preset", "smoke", "--set", "batch_szie=16"], "`batch_szie` is not a study key (did you mean `batch_size`?"),
    (["run", "--preset", "smoke", "--executor", "ray", "--cpus-per-run", "64"], "asks for 64 CPU(s)"),
])
def test_bad_input_gets_one_message_and_exit_2(tmp_path, capsys, args, message):
    # in-process: main() is what the console script calls
    code = main(args + (["--out", str(tmp_path / "o")] if args[0] == "run" and "--out" not in args else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("optstate: error:") == 1


def test_bad_toml_is_a_clear_error_through_the_console_script(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("seeds = = 2\n")
    p = optstate("run", str(f), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "not valid TOML" in p.stderr and "Traceback" not in p.stderr


def test_a_diverged_arm_is_reported_and_every_other_run_completes(smoke_dir, tmp_path):
    base, _ = smoke_dir
    out = tmp_path / "out"
    p = optstate("run", "--preset", "smoke", "--set", 'sessions.1."constant/keep".lr=1e30', "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "DIVERGED at step 33" in p.stdout and "Traceback" not in p.stderr
    nodes = {n["id"].split(".")[3]: n for n in json.loads((out / "plan.json").read_text())["nodes"]
             if ".constant." in n["id"]}
    assert nodes["s2-keep"]["status"] == "diverged" and nodes["s2-keep"]["diverged_at"] == 33
    assert nodes["s3-keep-keep"]["status"] == "skipped" and nodes["s3-new-new"]["status"] == "done"
    results = json.loads((out / "results.json").read_text())
    assert [(d["arm"], d["session"], d["step"]) for d in results["diverged"]] == [("constant/keep", 2, 33)]
    assert {r["arm"] for r in results["runs"]} == {"constant/new", "onecycle/new", "onecycle/keep"}
    assert any("constant/keep seed 0 diverged" in line for line in results["answer"])
    report = (out / "report.md").read_text()
    assert "## Diverged runs" in report and "| fashion-mnist-embedded | constant/keep | 0 | 2 | 33 | 1 |" in report

    def rows(d, arm):
        return [{k: v for k, v in r.items() if k != "seconds"}
                for r in csv.DictReader(open(d / "runs" / "fashion-mnist-embedded" / arm / "seed0" / "epochs.csv"))]

    for arm in ("constant-new", "onecycle-new", "onecycle-keep"):  # untouched by the divergence
        assert rows(out, arm) == rows(base, arm)
    assert rows(out, "constant-keep") == rows(base, "constant-keep")[:1]  # up to the divergence
    again = optstate("run", "--preset", "smoke", "--set", 'sessions.1."constant/keep".lr=1e30', "--out", str(out))
    assert again.returncode == 0 and "(8 already done, 2 diverged or skipped)" in again.stdout


def test_bench_times_original_optstate_and_bound_side_by_side(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "small-cnn", "--image-size", "28", "--batch-size", "16", "--steps", "3",
                 "--blocks", "1", "--log-every", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    for key in ("device", "model", "image_size", "batch_size", "original_img_s", "optstate_img_s", "bound_img_s",
                "ratio_vs_original", "ratio_vs_bound", "seed_preset_projected_s"):
        assert key in result, key
    assert result["model"] == "small-cnn" and result["image_size"] == 28 and result["batch_size"] == 16
    assert result["ratio_vs_original"] == pytest.approx(result["optstate_img_s"] / result["original_img_s"])
    assert result["ratio_vs_bound"] == pytest.approx(result["optstate_img_s"] / result["bound_img_s"])
    p = result["seed_preset_projection"]
    assert p["epochs"] == 160  # the seed study's run tree: 80 epochs per dataset
    assert result["seed_preset_projected_s"] == pytest.approx(p["train_s"] + p["eval_s"] + p["decode_s"])
    # 2 x 80 epochs x 9400 (9469 // 100 * 100) + 9000 training images at the measured speed
    assert p["train_s"] == pytest.approx(80 * (9400 + 9000) / result["optstate_img_s"])
    out = capsys.readouterr().out
    assert "original (PIL per item" in out and "--preset seed here" in out


def test_bench_reads_an_image_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", ["a", "b"], per_class=(10, 2))
    assert main(["bench", "--model", "small-cnn", "--image-size", "16", "--batch-size", "8", "--steps", "2",
                 "--blocks", "1", "--data", str(root)]) == 0
    assert f"images: {root}" in capsys.readouterr().out
    assert main(["bench", "--model", "small-cnn", "--batch-size", "64", "--data", str(root)]) == 2
    assert "fewer than one batch of 64" in capsys.readouterr().err
    assert main(["bench", "--model", "nope"]) == 2


def test_an_internal_fault_is_one_line_and_exit_1_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    import optstate.execute

    def broken(*args, **kwargs):
        raise RuntimeError("a bug deep inside")

    monkeypatch.setattr(optstate.execute, "run_study", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["run", "--preset", "smoke", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "optstate: internal error: RuntimeError: a bug deep inside" in err and "Traceback" not in err
    crash = next(tmp_path.glob("optstate-crash-*.txt")).read_text()
    assert "Traceback" in crash and "a bug deep inside" in crash and "broken" in crash

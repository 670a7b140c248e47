"""A run killed at any moment continues where it stopped and ends with the same metrics."""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest

STUDY = ["run", "--preset", "smoke", "--set", "sessions.0.epochs=3", "--set", 'arms=["constant/new", "onecycle/keep"]']


def start(out):
    return subprocess.Popen([sys.executable, "-m", "optstate", *STUDY, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tables(out):
    """Every run's epochs.csv (timing dropped) and steps.csv."""
    found = {}
    for path in sorted(out.glob("runs/*/*/seed*/*.csv")):
        rows = list(csv.DictReader(open(path)))
        found[str(path.relative_to(out))] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return found


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    p = start(out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return tables(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_an_interrupted_run_resumes_to_identical_metrics(uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    p = start(out)
    deadline = time.time() + 120
    # a session is finished and an epoch has ended inside another one (the first OneCycle session)
    while not (list(out.glob("nodes/*/progress.pt")) and '"status": "done"' in _read(out / "plan.json")):
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert p.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert "rerun the same command to continue" in err and "Traceback" not in err
    plan = json.loads((out / "plan.json").read_text())
    assert any(n["status"] != "done" for n in plan["nodes"]), "the interruption came too late"
    finished = {p: p.read_bytes() for n in plan["nodes"] if n["status"] == "done"
                for p in (out / "nodes" / n["id"]).glob("*.csv")}
    assert finished, "the interruption came too early"

    again = subprocess.run([sys.executable, "-m", "optstate", *STUDY, "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "from its last finished epoch" in again.stderr + again.stdout  # resumed, not retrained
    assert tables(out) == uninterrupted
    assert all(p.read_bytes() == data for p, data in finished.items())  # finished sessions were not retrained
    assert not list(out.glob("nodes/*/*.pt"))  # no session left to train needs a checkpoint


def test_each_arm_alone_equals_the_same_arm_in_the_shared_study(tmp_path, capsys):
    from optstate.cli import main

    arms = ["constant/new", "constant/keep", "onecycle/new", "onecycle/keep"]
    small = ["--set", "train_images=320", "--set", "val_images=64"]
    assert main(["run", "--preset", "smoke", *small, "--out", str(tmp_path / "all")]) == 0
    together = tables(tmp_path / "all")
    for arm in arms:
        out = tmp_path / arm.replace("/", "-")
        assert main(["run", "--preset", "smoke", *small, "--set", f'arms=["{arm}"]', "--out", str(out)]) == 0
        alone = tables(out)
        assert alone and all(together[k] == v for k, v in alone.items()), arm
    capsys.readouterr()


SMALL = ["--preset", "smoke", "--set", "train_images=320", "--set", "val_images=64"]


def test_a_second_live_run_on_the_same_out_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from optstate.store import Store\n"
         f"with Store({str(out)!r}).lock():\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = subprocess.run([sys.executable, "-m", "optstate", "run", *SMALL, "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert f"in use by another optstate run (process {holder.pid})" in p.stderr
        assert not (out / "plan.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # the dead process's lock file stays
    p = subprocess.run([sys.executable, "-m", "optstate", "run", *SMALL, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_keep_checkpoints_and_a_missing_parent_checkpoint_is_retrained(tmp_path, capsys):
    from optstate.cli import main

    arms = ["--set", 'arms=["constant/new", "constant/keep"]', "--set", "sessions.0.epochs=2"]
    kept = tmp_path / "kept"
    assert main(["run", *SMALL, *arms, "--keep-checkpoints", "--out", str(kept)]) == 0
    plan = json.loads((kept / "plan.json").read_text())
    for n in plan["nodes"]:
        assert (kept / "nodes" / n["id"] / "final.pt").is_file()
    first = next(n for n in plan["nodes"] if n["session"] == 0)
    assert (kept / "nodes" / first["id"] / "epoch001.pt").is_file()  # every epoch of a 2-epoch session

    out = tmp_path / "out"
    assert main(["run", *SMALL, *arms, "--out", str(out)]) == 0
    before = tables(out)
    assert not list(out.glob("nodes/*/*.pt"))
    # Pretend the last session of constant/keep was lost: its parent's checkpoint is gone
    # too, so the parent (and its own parent) are trained again, to the same numbers.
    plan = json.loads((out / "plan.json").read_text())
    leaf = next(n for n in plan["nodes"] if n["id"].split(".")[3] == "s3-keep-keep")
    leaf["status"] = "pending"
    (out / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["run", *SMALL, *arms, "--out", str(out)]) == 0
    assert "(2 already done)" in capsys.readouterr().out  # s1, s2-keep and s3-keep-keep train again
    assert tables(out) == before
    assert tables(kept) == before

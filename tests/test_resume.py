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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    p = start(out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return tables(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_an_interrupted_run_resumes_to_identical_metrics(uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    p = start(out)
    deadline = time.time() + 120
    while not list(out.glob("nodes/*/progress.pt")):  # an epoch has ended inside a node
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "rerun the same command to continue" in err and "Traceback" not in err
    plan = json.loads((out / "plan.json").read_text())
    assert any(n["status"] != "done" for n in plan["nodes"]), "the interruption came too late"

    again = subprocess.run([sys.executable, "-m", "optstate", *STUDY, "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "from its last finished epoch" in again.stderr + again.stdout  # resumed, not retrained
    assert tables(out) == uninterrupted
    assert not list(out.glob("nodes/*/progress.pt"))  # finished nodes keep only their final checkpoint


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

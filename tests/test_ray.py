"""The Ray executor: the same numbers as the local executor, and a killed worker costs nothing."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # installed by the test extra; CI always has it

from optstate.cli import main  # noqa: E402


def metrics(out: Path) -> dict:
    """Every runs/ CSV, every column but the wall-clock seconds."""
    tables = {}
    for path in sorted((out / "runs").rglob("*.csv")):
        with path.open() as f:
            tables[str(path.relative_to(out))] = [{k: v for k, v in row.items() if k != "seconds"}
                                                  for row in csv.DictReader(f)]
    assert tables
    return tables


def test_smoke_with_two_seeds_on_ray_equals_the_local_executor(tmp_path):
    study = ["--preset", "smoke", "--set", "seeds=2"]
    assert main(["run", *study, "--out", str(tmp_path / "local")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["run", *study, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    finally:
        ray.shutdown()
    assert metrics(tmp_path / "ray") == metrics(tmp_path / "local")
    assert not list((tmp_path / "ray").glob(".ray-shared-*"))  # the shared-storage marker is cleaned up


def _task_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ray::_train_task" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_killed_worker_is_retried_and_the_study_ends_with_the_same_numbers(tmp_path):
    study = ["--preset", "smoke", "--set", 'arms=["constant/keep"]',
             "--set", "sessions=[{epochs=3, constant={lr=1e-3}}]"]
    assert main(["run", *study, "--out", str(tmp_path / "local")]) == 0
    out = tmp_path / "ray"
    driver = subprocess.Popen([sys.executable, "-m", "optstate", "run", *study, "--executor", "ray", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        workers = _task_processes()
        if workers and list((out / "nodes").glob("*/progress.pt")):  # mid-node, after a finished epoch
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    output, _ = driver.communicate(timeout=600)
    assert killed is not None, output[-2000:]
    assert driver.returncode == 0, output[-3000:]
    assert metrics(out) == metrics(tmp_path / "local")


def test_ray_options_without_ray_executor_are_refused(capsys):
    assert main(["run", "--preset", "smoke", "--gpus-per-run", "0.5"]) == 2
    assert "belong to --executor ray" in capsys.readouterr().err


def test_ray_executor_without_ray_installed_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(["run", "--preset", "smoke", "--executor", "ray", "--out", "/tmp/never-written"]) == 2
    assert "pip install 'optstate[ray]'" in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()


def test_an_out_that_workers_cannot_see_is_refused(tmp_path):
    import types

    from optstate.errors import UserError
    from optstate.ray_executor import check_shared

    class Elsewhere:  # a worker on another machine: it writes its marker into its own file system
        def remote(self, **options):
            return lambda fn: types.SimpleNamespace(remote=lambda path, token: "worker-7")

        def get(self, value):
            return value

    with pytest.raises(UserError, match="not shared with the Ray workers: a worker on worker-7"):
        check_shared(Elsewhere(), tmp_path)


def test_an_error_inside_a_task_reaches_the_user_as_itself(tmp_path, capsys):
    """A full disk met by a Ray task gets the same one line as with the local executor: the task's own
    exception, not Ray's wrapper with the remote traceback in its text."""
    plugin = tmp_path / "full_disk_handoff.py"
    plugin.write_text(
        "import errno, os\n"
        "from optstate.handoff import register\n"
        "@register('full-disk-test')\n"
        "def full(model, optimizer, session):\n"
        "    if session.steps > 10:  # a real session, not the study's probe\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/somewhere/final.pt')\n"
        "    return optimizer\n")
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = main(["run", "--preset", "smoke", "--plugin", str(plugin), "--set", 'arms=["constant/full-disk-test"]',
                     "--executor", "ray", "--out", str(out)])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "optstate: error: the disk is full (no space left writing /somewhere/final.pt)" in err
    assert "Traceback" not in err
    assert '"status": "done"' in (out / "plan.json").read_text()  # the first session, trained before, is kept

"""The catalogue of docs/reliability.md, through the command line as a user meets it: one message
naming the cause, the documented exit code, no traceback, and nothing finished lost."""
import errno
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from helpers import image_bytes, make_folder
from optstate.cli import main
from test_resume import tables

SMOKE = resources.files("optstate.presets").joinpath("smoke.toml").read_text()


def run(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, stdout + stderr)."""
    capsys.readouterr()
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def refused(capsys, *argv) -> str:
    code, text = run(capsys, *argv)
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("optstate: error:")]
    assert len(errors) == 1, text
    return errors[0]


# -- study files ------------------------------------------------------------------------------------

EDITS = {  # case: (edit of the smoke study's text, words the message must hold)
    "unknown key": (("batch_size = 32", "batch_sise = 32"), ["`batch_sise`", "did you mean `batch_size`"]),
    "wrong type": (("seeds = 1", 'seeds = "two"'), ["`seeds`", "whole number"]),
    "zero epochs": (("epochs = 1", "epochs = 0"), ["`sessions[0].epochs`", ">= 1"]),
    "negative epochs": (("epochs = 1", "epochs = -3"), ["`sessions[0].epochs`", "got -3"]),
    "negative lr": (("constant = { lr = 1e-3 }", "constant = { lr = -1e-3 }"), ["`sessions[0].constant.lr`", "> 0"]),
    "lr not a number": (("constant = { lr = 1e-3 }", 'constant = { lr = "fast" }'), ["`sessions[0].constant.lr`"]),
    "beta2 = 1": (('{ name = "adam" }', '{ name = "adam", betas = [0.9, 1.0] }'), ["`optimizer`", "beta"]),
    "negative beta1": (('{ name = "adam" }', '{ name = "adam", betas = [-0.1, 0.99] }'), ["`optimizer`", "beta"]),
    "unknown model": (('model = "small-cnn"', 'model = "resnet5"'), ["`model`", "did you mean `resnet50`"]),
    "unknown optimizer": (('name = "adam"', 'name = "adamm"'), ["`optimizer.name`", "adamw", "sgd"]),
    "unknown schedule": (('"constant/new"', '"cosin/new"'), ["'cosin/new'", "'cosine'", "'onecycle'"]),
    "unknown handoff": (('"constant/new"', '"constant/neww"'), ["'constant/neww'", "'keep'", "'reset-m'"]),
    "TOML syntax error": (("seeds = 1", "seeds = = 1"), ["not valid TOML", "line 5", "column 9"]),
}


@pytest.mark.parametrize("case", EDITS)
def test_a_bad_study_file_is_one_message_naming_the_key(tmp_path, capsys, case):
    (old, new), words = EDITS[case]
    assert old in SMOKE
    study = tmp_path / "study.toml"
    study.write_text(SMOKE.replace(old, new, 1))
    line = refused(capsys, "run", study, "--out", tmp_path / "out")
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_empty_session_list_is_refused(tmp_path, capsys):
    study = tmp_path / "study.toml"
    study.write_text(SMOKE.split("[[sessions]]")[0] + "sessions = []\n")
    assert "`sessions` must be one or more [[sessions]] tables" in refused(capsys, "run", study, "--out", tmp_path / "o")


# -- data folders -----------------------------------------------------------------------------------

def folder_study(tmp_path: Path, root: Path) -> Path:
    study = tmp_path / "folder.toml"
    study.write_text(SMOKE.replace('datasets = ["fashion-mnist-embedded"]', f'datasets = ["{root}"]')
                     .replace("image_size = 28", "image_size = 16").replace("batch_size = 32", "batch_size = 4")
                     .replace("train_images = 1024", "train_images = 0").replace("val_images = 256", "val_images = 0")
                     .replace('"constant/new", "constant/keep", ', ""))
    return study


def test_data_folder_problems_are_named(tmp_path, capsys):
    root = tmp_path / "d"
    study = folder_study(tmp_path, root)
    out = ["--out", tmp_path / "out"]
    assert f"dataset folder {root} does not exist" in refused(capsys, "run", study, *out)
    root.mkdir()
    assert "holds neither train/<class>/ and val/<class>/ folders" in refused(capsys, "run", study, *out)
    make_folder(root, ["a", "b"])
    shutil.rmtree(root / "val")
    assert "has no val/ folder" in refused(capsys, "run", study, *out)
    make_folder(root, ["a", "b"], start=100)
    (root / "train" / "c").mkdir()
    assert "only in train: ['c']" in refused(capsys, "run", study, *out)
    (root / "val" / "c").mkdir()
    assert f"{root / 'train' / 'c'} holds no images" in refused(capsys, "run", study, *out)
    (root / "train" / "c").rmdir(), (root / "val" / "c").rmdir()
    shutil.copy(root / "train" / "a" / "a_0.JPEG", root / "val" / "b" / "copy.JPEG")
    line = refused(capsys, "run", study, *out)
    assert "byte-for-byte copies of training images" in line and "train/a/a_0.JPEG = val/b/copy.JPEG" in line


def test_bad_images_are_listed_and_above_the_limit_stop_the_run(tmp_path, capsys):
    root = make_folder(tmp_path / "d", ["a", "b"], per_class=(12, 4))  # 32 files
    good = (root / "train" / "a" / "a_1.JPEG").read_bytes()
    (root / "train" / "a" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    (root / "val" / "a" / "notes.png").write_text("not an image")
    study = folder_study(tmp_path, root)
    line = refused(capsys, "run", study, "--out", tmp_path / "strict")
    assert "3 of 35 image files (8.6%) cannot be decoded" in line and "--max-bad-images 0.01" in line
    assert "train/a/truncated.JPEG" in line

    out = tmp_path / "out"
    code, text = run(capsys, "run", study, "--max-bad-images", "0.1", "--out", out)
    assert code == 0, text
    assert "3 file(s) could not be decoded" in text
    report = (out / "report.md").read_text()
    for name in ("train/a/truncated.JPEG", "train/b/empty.jpg", "val/a/notes.png"):
        assert name in report
    assert json.loads((out / "data.json").read_text())["d"]["train_images"] == 24
    assert "--max-bad-images must be a fraction" in refused(capsys, "run", study, "--max-bad-images", "2")


# -- checkpoints ------------------------------------------------------------------------------------

SMALL = ["--preset", "smoke", "--set", "train_images=320", "--set", "val_images=64",
         "--set", 'arms=["constant/new", "constant/keep"]', "--set", "sessions.0.epochs=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small study run once without any fault, with every checkpoint kept."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["run", *SMALL, "--keep-checkpoints", "--out", str(out)]) == 0
    return out


def copy_with_pending(reference: Path, dest: Path, which: str) -> tuple[dict, dict]:
    """A copy of the reference run directory in which node `which` (by its name in the id,
    e.g. s1 or s3-keep-keep) is to train again; returns that node and the plan."""
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns(".lock"))
    plan = json.loads((dest / "plan.json").read_text())
    node = next(n for n in plan["nodes"] if n["id"].split(".")[3] == which)
    node["status"] = "pending"
    (dest / "plan.json").write_text(json.dumps(plan))
    return node, plan


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class Payload:
    """Unpickling this runs a shell command, as a checkpoint from a stranger might."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["flipped bytes", "crafted pickle"])
def test_a_damaged_progress_checkpoint_is_set_aside_and_its_session_trained_again(reference, tmp_path, capsys, damage):
    out = tmp_path / "out"
    node, _ = copy_with_pending(reference, out, "s1")
    progress = out / "nodes" / node["id"] / "progress.pt"
    marker = tmp_path / "code-ran"
    if damage == "flipped bytes":
        shutil.copy(out / "nodes" / node["id"] / "epoch001.pt", progress)
        flip_bytes(progress)
    else:
        torch.save({"model": Payload(marker)}, progress)
    code, text = run(capsys, "run", *SMALL, "--keep-checkpoints", "--out", out)
    assert code == 0, text
    assert f"checkpoint {progress} is damaged" in text and "its session starts again from its beginning" in text
    assert "from its last finished epoch" not in text  # not resumed from the damaged file
    assert not marker.exists()  # weights_only: the payload never ran
    assert (progress.parent / "progress.pt.damaged").exists()
    assert tables(out) == tables(reference)


@pytest.mark.parametrize("also_grandparent", [False, True], ids=["parent", "parent and grandparent"])
def test_a_truncated_parent_checkpoint_is_set_aside_and_the_parent_trained_again(reference, tmp_path, capsys,
                                                                                 also_grandparent):
    out = tmp_path / "out"
    leaf, plan = copy_with_pending(reference, out, "s3-keep-keep")
    parent = out / "nodes" / leaf["parent"] / "final.pt"
    parent.write_bytes(parent.read_bytes()[: parent.stat().st_size // 2])
    grandparent = out / "nodes" / next(n for n in plan["nodes"] if n["id"] == leaf["parent"])["parent"] / "final.pt"
    if also_grandparent:  # found only once the parent is to train again
        flip_bytes(grandparent)
    code, text = run(capsys, "run", *SMALL, "--keep-checkpoints", "--out", out)
    assert code == 0, text
    assert f"checkpoint {parent} is damaged" in text
    assert (f"checkpoint {grandparent} is damaged" in text) == also_grandparent
    retrained = 3 if also_grandparent else 2  # the leaf, its parent (and the first session)
    assert f"({len(plan['nodes']) - retrained} already done)" in text
    assert tables(out) == tables(reference)
    assert torch.load(parent, weights_only=True)["global_epoch"] == 3


# -- resources --------------------------------------------------------------------------------------

def snapshot(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def assert_intact(before: dict[Path, bytes], after: dict[Path, bytes]) -> None:
    """Every file that existed at the fault is there, unchanged; no temporary file is left."""
    assert before
    for path, data in before.items():
        if path.name.endswith(".tmp"):  # the write the fault interrupted
            continue
        if "tensorboard" in path.parts:  # event files are appended to, never rewritten
            assert after[path][: len(data)] == data, path
        else:
            assert after.get(path) == data, path
    assert not [p for p in after if p.name.endswith(".tmp")]


@pytest.mark.parametrize("victim,nth", [("final.pt", 2), ("epochs.csv", 3), ("progress.pt", 1), ("plan.json", 4)])
def test_a_full_disk_keeps_every_file_written_before_and_the_rerun_finishes(reference, tmp_path, capsys,
                                                                            monkeypatch, victim, nth):
    out = tmp_path / "out"
    real_fsync, seen, before = os.fsync, [], {}

    def fsync(fd):  # the nth write of `victim` finds the disk full
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".{victim}.tmp"):
            seen.append(fd)
            if len(seen) == nth:
                before.update(snapshot(out))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    line = refused(capsys, "run", *SMALL, "--out", out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "the disk is full" in line and victim in line and "rerun the same command" in line
    assert_intact(before, snapshot(out))
    code, text = run(capsys, "run", *SMALL, "--out", out)
    assert code == 0, text
    assert tables(out) == tables(reference)


def test_out_of_memory_names_the_batch_size_and_keeps_finished_sessions(reference, tmp_path, capsys, monkeypatch):
    import optstate.train

    out = tmp_path / "out"
    real_step, calls, before = optstate.train.train_step, [], {}

    def step(*args):
        calls.append(1)
        if len(calls) == 25:  # in the second node
            before.update(snapshot(out))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args)

    monkeypatch.setattr(optstate.train, "train_step", step)
    line = refused(capsys, "run", *SMALL, "--out", out)
    monkeypatch.setattr(optstate.train, "train_step", real_step)
    assert "out of memory" in line and "batch_size 32" in line and "--set batch_size=16" in line
    assert_intact(before, snapshot(out))
    plan = json.loads((out / "plan.json").read_text())
    done = [out / "nodes" / n["id"] for n in plan["nodes"] if n["status"] == "done"]
    assert len(done) == 1
    code, text = run(capsys, "run", *SMALL, "--out", out)
    assert code == 0, text
    assert "(1 already done)" in text
    assert all(p.read_bytes() == data for p, data in before.items() if p.parent in done and p.suffix == ".csv")
    assert tables(out) == tables(reference)


FULL_UNDER_TENSORBOARD = """
import errno, os, sys
from tensorboard.summary.writer import record_writer
from optstate.cli import main
real, calls = record_writer.RecordWriter.write, []
def write(self, data):
    calls.append(1)
    if len(calls) > 40:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, data)
record_writer.RecordWriter.write = write
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_under_tensorboard_is_one_line_too(reference, tmp_path, capsys):
    """TensorBoard writes from a thread of its own; its error must not print that thread's traceback.
    A process of its own, because pytest catches thread errors itself and would hide that traceback."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", FULL_UNDER_TENSORBOARD, "run", *SMALL, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stdout + p.stderr and "Exception in thread" not in p.stderr
    assert "optstate: error: the disk is full" in p.stderr
    code, text = run(capsys, "run", *SMALL, "--out", out)
    assert code == 0, text
    assert tables(out) == tables(reference)


def test_a_full_disk_while_decoding_leaves_no_half_cache(tmp_path, capsys, monkeypatch):
    """The decoded cache is written through a memory map: its blocks are reserved first, so a full
    disk is an OSError, not a SIGBUS."""
    root = make_folder(tmp_path / "d", ["a", "b"], per_class=(12, 4))
    study = folder_study(tmp_path, root)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    line = refused(capsys, "run", study, "--out", tmp_path / "out")
    assert "the disk is full" in line and "train.npy" in line
    cache = Path(os.environ["OPTSTATE_DATA"]) / "cache"
    assert not list(cache.iterdir())
    monkeypatch.undo()
    monkeypatch.setenv("OPTSTATE_DATA", str(cache.parent))
    code, text = run(capsys, "run", study, "--out", tmp_path / "out")
    assert code == 0, text


# -- output directory -------------------------------------------------------------------------------

def test_an_out_that_is_a_file_or_cannot_be_written_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert str(afile) in refused(capsys, "run", "--preset", "smoke", "--out", afile)
    assert afile.read_text() == "mine"
    if os.geteuid() == 0:  # permissions do not stop root; /sys (read-only or kernel-owned) does
        locked = Path("/sys/optstate-out")
        try:
            locked.mkdir()
        except OSError:
            pass
        else:
            locked.rmdir()
            pytest.skip("running as root with a writable /sys: no folder to try that root cannot write")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        locked = tmp_path / "ro" / "out"
    assert str(locked) in refused(capsys, "run", "--preset", "smoke", "--out", locked)

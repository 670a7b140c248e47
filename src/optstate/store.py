"""The output directory (contract): study, plan, node checkpoints, per-run metrics, TensorBoard.

Nodes write their own metrics (nodes/<id>/epochs.csv, steps.csv); a run's
files under runs/ are the concatenation of its nodes' files, root to leaf, so
a session shared by several arms is written once and appears in each of them.
Every file that must survive a crash is written to a temporary name and renamed.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import tomllib
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from optstate.errors import UserError
from optstate.plan import Plan, Run, arm_folder
from optstate.study import Study

EPOCH_COLUMNS = ["session", "epoch", "global_epoch", "step", "train_loss", "train_acc",
                 "val_loss", "val_acc", "val_top3", "lr", "seconds"]


def step_columns(momentum: str, state_keys: list[str]) -> list[str]:
    return (["step", "session", "global_epoch", "lr", momentum, "loss", "acc"]
            + [f"norm_{k}" for k in state_keys] + ["update_ratio"])


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary name, then rename: a crash or a full disk leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # so that the message can name the file
            e.filename = str(path)
        raise


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be trusted, or None. torch.save writes a zip whose members carry
    CRC-32s: reading them all finds truncation and flipped bytes; unpickling the small index with
    weights_only=True (the tensors memory-mapped, not read) finds anything that is not plain tensors."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            return f"member {bad} fails its CRC check"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (PermissionError, MemoryError):  # the machine's problem, not the file's
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, UnpicklingError, RuntimeError, EOFError, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Store:
    def __init__(self, out: Path, keep_checkpoints: bool = False):
        self.out = Path(out)
        self.keep_checkpoints = keep_checkpoints

    # -- one writer
    @contextmanager
    def lock(self):
        """Hold OUT/.lock for the whole run. The kernel drops a flock when its process
        dies, however it dies, so a lock left by a killed run never blocks."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(f"{self.out} is in use by another optstate run (process {holder}); wait for it to "
                                f"finish, stop it, or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- study and plan
    def begin(self, study: Study, plan: Plan, precision: str = "fp32", warn=print) -> Plan:
        """Write study.toml and plan.json; on an existing run directory keep the finished nodes.
        Sessions trained at another precision are not mixed with this run's: that is refused.
        A damaged checkpoint is set aside (warn says so) and its node trained again from its parent."""
        self.out.mkdir(parents=True, exist_ok=True)
        existing = self.out / "study.toml"
        if existing.exists():
            try:
                before = tomllib.loads(existing.read_text())
            except tomllib.TOMLDecodeError:
                before = {}
            if before != study.raw:
                differ = sorted(k for k in set(before) | set(study.raw) if before.get(k) != study.raw.get(k))
                raise UserError(f"{self.out} holds results of a different study (differs in: {', '.join(differ)}); "
                                f"use another --out, or delete {self.out} to start over")
        write_atomic(existing, study.to_toml())
        old = self.out / "plan.json"
        if old.exists():
            previous = Plan.from_json(old.read_text())
            for node_id, node in plan.nodes.items():
                prev = previous.nodes.get(node_id)
                # A finished node is kept when its metrics are; a diverged one would diverge again.
                if prev and prev.status in ("done", "diverged") and (self.node_dir(node_id) / "epochs.csv").exists():
                    if (prev.precision or "fp32") != precision:
                        raise UserError(f"{self.out} holds sessions trained with --precision {prev.precision}, and "
                                        f"this run would train at {precision}; rerun with --precision "
                                        f"{prev.precision}, or use another --out")
                    node.status, node.diverged_at, node.precision = prev.status, prev.diverged_at, prev.precision
            # A node still to train needs its parent's final checkpoint; if that is gone (or damaged),
            # train the parent again, which needs its own parent's, and so on.
            checked: set[Path] = set()
            missing = True
            while missing:
                self._set_aside_damaged(plan, warn, checked)
                missing = False
                for node in plan.nodes.values():
                    parent = plan.nodes.get(node.parent) if node.parent else None
                    if node.status == "pending" and parent and parent.status == "done" \
                            and not self.checkpoint_path(parent.id).exists():
                        parent.status, missing = "pending", True
            for node in plan.nodes.values():
                if node.status == "diverged":
                    for d in plan.descendants(node.id):
                        d.status = "skipped"
        self.write_plan(plan)
        return plan

    def _set_aside_damaged(self, plan: Plan, warn, checked: set[Path]) -> None:
        """Check the checkpoints this run will read (each once); rename a damaged one to <name>.damaged.
        A damaged progress.pt makes its node start again from its parent; a damaged final.pt counts as missing."""
        for node in plan.nodes.values():
            paths = [self.progress_path(node.id)] if node.status == "pending" else []
            if node.status == "done" and any(c.status == "pending" for c in plan.children(node.id)):
                paths.append(self.checkpoint_path(node.id))
            for path in paths:
                if path in checked or not path.exists():
                    continue
                checked.add(path)
                if why := checkpoint_problem(path):
                    aside = path.with_name(path.name + ".damaged")
                    os.replace(path, aside)
                    again = "its session starts again from its beginning" if path.name == "progress.pt" \
                        else "the session that wrote it is trained again"
                    warn(f"warning: checkpoint {path} is damaged ({why}); set aside as {aside.name}, and "
                         f"{again} (to the same numbers)")

    def write_plan(self, plan: Plan) -> None:
        write_atomic(self.out / "plan.json", plan.to_json())

    # -- node checkpoints and metrics
    def node_dir(self, node_id: str) -> Path:
        return self.out / "nodes" / node_id

    def checkpoint_path(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "final.pt"

    def save_checkpoint(self, node_id: str, payload: dict[str, Any]) -> None:
        _save_torch(self.checkpoint_path(node_id), payload)

    def load_checkpoint(self, node_id: str, device: torch.device | str = "cpu") -> dict[str, Any]:
        return _load_torch(self.checkpoint_path(node_id), device)

    def progress_path(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "progress.pt"

    def save_progress(self, node_id: str, payload: dict[str, Any], global_epoch: int) -> None:
        """The node's state at an epoch end, so that a killed run continues from there.
        With keep_checkpoints it also stays as epoch<NNN>.pt (a hard link, no copy)."""
        path = self.progress_path(node_id)
        _save_torch(path, payload)
        if self.keep_checkpoints:
            kept = self.node_dir(node_id) / f"epoch{global_epoch:03d}.pt"
            kept.unlink(missing_ok=True)
            os.link(path, kept)

    def load_progress(self, node_id: str, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        path = self.progress_path(node_id)
        if not path.exists():
            return None
        return _load_torch(path, device)

    def clear_progress(self, node_id: str) -> None:
        self.progress_path(node_id).unlink(missing_ok=True)

    def prune(self, plan: Plan) -> None:
        """Delete final checkpoints that no node still to train needs (unless keep_checkpoints)."""
        if self.keep_checkpoints:
            return
        for node in plan.nodes.values():
            if node.status == "done" and all(c.status != "pending" for c in plan.children(node.id)):
                self.checkpoint_path(node.id).unlink(missing_ok=True)

    def write_node_metrics(self, node_id: str, epochs: list[dict], steps: list[dict], columns: list[str]) -> None:
        d = self.node_dir(node_id)
        write_atomic(d / "epochs.csv", _csv(EPOCH_COLUMNS, epochs))
        write_atomic(d / "steps.csv", _csv(columns, steps))

    # -- runs
    def run_dir(self, run: Run) -> Path:
        return self.out / run.folder

    def tensorboard_dir(self, run: Run) -> Path:
        return self.out / "tensorboard" / run.dataset / arm_folder(run.arm) / f"seed{run.seed}"

    def materialize_run(self, run: Run, plan: Plan) -> None:
        """runs/<dataset>/<arm>/seed<k>/{epochs,steps}.csv from the run's nodes, root to leaf
        (up to and including a diverged one)."""
        nodes = [n for n in run.nodes if plan.nodes[n].status in ("done", "diverged")]
        if not nodes:
            return
        for name in ("epochs.csv", "steps.csv"):
            parts = [(self.node_dir(n) / name).read_text().splitlines(keepends=True) for n in nodes]
            text = parts[0][0] + "".join(line for p in parts for line in p[1:])
            write_atomic(self.run_dir(run) / name, text)


def _load_torch(path: Path, device: torch.device | str) -> dict[str, Any]:
    """weights_only: a checkpoint holds tensors and plain data, and unpickling can run no code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - damaged after this run checked it at the start
        raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}); rerun the same command: a damaged "
                        f"checkpoint is set aside at the start and its session trained again") from None


def _save_torch(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(path, buf.getvalue())


def _csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # exact, so that repeated runs can be compared bit for bit
    return v

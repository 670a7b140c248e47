"""The study file: load, fill defaults, validate, override with --set, presets.

A study is plain data (a dict read from TOML); ``Study`` wraps the resolved,
validated dict and answers questions about it. Every error names the key.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from optstate.errors import UserError
from optstate.handoff import HANDOFFS, NextSession, NotApplicable
from optstate.schedules import SCHEDULES

PRESETS = ("embedded", "smoke", "seed", "seed-faithful")

DEFAULTS: dict[str, Any] = {
    "name": "study",
    "seeds": 1,
    "batch_size": 64,
    "image_size": "auto",
    "resize": "crop",
    "augment": "standard",
    "crop_scale": [0.35, 1.0],
    "normalize": True,
    "train_images": 0,
    "val_images": 0,
    "log_every": 10,
    "optimizer": {"name": "adam"},
    "arms": ["constant/new", "constant/keep", "onecycle/new", "onecycle/keep"],
    "plugins": [],
}
REQUIRED = ("datasets", "model", "sessions")
KEYS = set(DEFAULTS) | set(REQUIRED)


def _fail(key: str, msg: str) -> UserError:
    return UserError(f"study: `{key}` {msg}")


def _int(raw: dict, key: str, low: int) -> None:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _fail(key, f"must be a whole number >= {low}, got {v!r}")


def _choice(raw: dict, key: str, choices: tuple) -> None:
    if raw[key] not in choices:
        raise _fail(key, f"must be one of {', '.join(map(repr, choices))}, got {raw[key]!r}")


UNSUPPORTED = {"lbfgs": "needs a closure in step()", "sparseadam": "needs sparse gradients"}


def _check_optimizer(opt: Any) -> dict:
    """Check the optimizer table and return it with the class's own defaults written out."""
    if not isinstance(opt, dict) or not isinstance(opt.get("name"), str):
        raise _fail("optimizer", 'must be a table with a `name`, e.g. { name = "adam" }')
    cls = optimizer_class(opt["name"])
    if cls.__name__.lower() in UNSUPPORTED:
        raise _fail("optimizer.name", f"torch.optim.{cls.__name__} {UNSUPPORTED[cls.__name__.lower()]}; "
                    f"optstate's training step cannot drive it")
    kwargs = {k: v for k, v in opt.items() if k != "name"}
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self", "params"}
    for k in kwargs:
        if k == "lr":
            raise _fail("optimizer.lr", "is set per session ([[sessions]] constant.lr / onecycle.max_lr)")
        if k not in accepted:
            raise _fail(f"optimizer.{k}", f"is not an argument of torch.optim.{cls.__name__} ({', '.join(sorted(accepted))})")
    try:  # let torch judge the values (negative weight decay, bad betas, ...)
        cls([torch.zeros(1, requires_grad=True)], lr=1e-3, **optimizer_kwargs(opt))
    except Exception as e:  # noqa: BLE001 - any complaint from torch is a bad value in the study
        raise _fail("optimizer", f"is rejected by torch.optim.{cls.__name__}: {e}") from None
    filled = {"name": opt["name"]}
    for k, p in params.items():  # record the defaults that TOML can hold (not None)
        if k in ("self", "params", "lr") or k in kwargs or p.default is inspect.Parameter.empty:
            continue
        d = p.default
        if isinstance(d, tuple) and all(isinstance(x, (int, float)) for x in d):
            filled[k] = list(d)
        elif isinstance(d, (bool, int, float, str)):
            filled[k] = d
    return filled | kwargs


def optimizer_kwargs(opt: dict) -> dict:
    """The optimizer table as constructor keyword arguments (TOML lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opt.items() if k != "name"}


def probe_optimizer(opt: dict, params: list) -> "torch.optim.Optimizer":
    """The study's optimizer for a probe on the CPU: device-only options (capturable, fused) off,
    since probes only look at which state the optimizer keeps and what a handoff does to it."""
    kwargs = optimizer_kwargs(opt)
    for k in ("capturable", "fused"):
        if k in kwargs:
            kwargs[k] = False if k == "capturable" else None
    return optimizer_class(opt["name"])(params, lr=1e-3, **kwargs)


def optimizer_class(name: str) -> type:
    classes = {
        n.lower(): getattr(torch.optim, n)
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    }
    if name.lower() not in classes:
        raise _fail("optimizer.name", f"{name!r} is not a torch.optim optimizer (one of {', '.join(sorted(classes))})")
    return classes[name.lower()]


def _check_settings(table: Any, key: str, schedule: str) -> None:
    if not isinstance(table, dict):
        raise _fail(key, "must be a table, e.g. { lr = 3e-4 }")
    spec = SCHEDULES[schedule].settings
    for k, v in table.items():
        if k not in spec:
            raise _fail(f"{key}.{k}", f"is not a {schedule} setting (one of {', '.join(spec)})")
        s = spec[k]
        kinds = s.kind if isinstance(s.kind, tuple) else (s.kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok or not s.check(v):
            raise _fail(f"{key}.{k}", f"must be {s.why or kinds[0].__name__}, got {v!r}")


def validate(raw: dict) -> dict:
    """Fill defaults and check every key; returns the resolved study dict."""
    if not isinstance(raw, dict):
        raise UserError("study: the study must be a TOML table")
    for k in raw:
        if k not in KEYS:
            close = difflib.get_close_matches(k, sorted(KEYS), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise _fail(k, f"is not a study key ({hint}known: {', '.join(sorted(KEYS))})")
    for k in REQUIRED:
        if k not in raw:
            raise _fail(k, "is required")
    out = copy.deepcopy(DEFAULTS) | copy.deepcopy(raw)

    if not isinstance(out["name"], str) or not out["name"]:
        raise _fail("name", "must be a non-empty string")
    ds = out["datasets"]
    if not isinstance(ds, list) or not ds or not all(isinstance(d, str) and d for d in ds):
        raise _fail("datasets", 'must be a non-empty list of names or folders, e.g. ["imagenette-160"]')
    if len(set(ds)) != len(ds):
        raise _fail("datasets", "lists a dataset twice")
    from optstate.data import check_entry

    for d in ds:
        check_entry(d)
    from optstate import models

    if out["model"] not in models.names():
        close = difflib.get_close_matches(str(out["model"]), sorted(models.names()), n=3) if isinstance(out["model"], str) else []
        hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}? " if close else ""
        raise _fail("model", f"{out['model']!r} is neither a torchvision classification model "
                    f"({hint}all of them: torchvision.models.list_models(module=torchvision.models)) nor one of "
                    f"optstate's ({', '.join(models.OWN_MODELS)})")
    _int(out, "seeds", 1)
    _int(out, "batch_size", 1)
    _int(out, "train_images", 0)
    _int(out, "val_images", 0)
    _int(out, "log_every", 1)
    if out["image_size"] != "auto":
        _int(out, "image_size", 8)
    _choice(out, "resize", ("crop", "squash"))
    _choice(out, "augment", ("standard", "flip", "none"))
    cs = out["crop_scale"]
    if not (isinstance(cs, list) and len(cs) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cs) and 0 < cs[0] <= cs[1] <= 1):
        raise _fail("crop_scale", f"must be [low, high] with 0 < low <= high <= 1, got {cs!r}")
    if not isinstance(out["normalize"], bool):
        raise _fail("normalize", "must be true or false")
    out["optimizer"] = _check_optimizer(out["optimizer"])

    arms = out["arms"]
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) for a in arms):
        raise _fail("arms", 'must be a non-empty list like ["onecycle/keep"]')
    if len(set(arms)) != len(arms):
        raise _fail("arms", "lists an arm twice")
    for a in arms:
        sched, _, hand = a.partition("/")
        if sched not in SCHEDULES or hand not in HANDOFFS:
            raise _fail("arms", f"has {a!r}; an arm is <schedule>/<handoff> with schedule in "
                        f"{sorted(SCHEDULES)} and handoff in {sorted(HANDOFFS)}")

    sessions = out["sessions"]
    if not isinstance(sessions, list) or not sessions or not all(isinstance(s, dict) for s in sessions):
        raise _fail("sessions", "must be one or more [[sessions]] tables")
    for i, s in enumerate(sessions):
        where = f"sessions[{i}]"
        if "epochs" not in s:
            raise _fail(f"{where}.epochs", "is required")
        for k, v in s.items():
            if k == "epochs":
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise _fail(f"{where}.epochs", f"must be a whole number >= 1, got {v!r}")
            elif k in SCHEDULES:
                _check_settings(v, f"{where}.{k}", k)
            elif "/" in k and k.partition("/")[0] in SCHEDULES and k.partition("/")[2] in HANDOFFS:
                # an override for an arm this study does not run (e.g. a preset's arm left out by --set arms)
                _check_settings(v, f'{where}."{k}"', k.partition("/")[0])
            else:
                raise _fail(f"{where}.{k}", f"is not a session key (epochs, a schedule in {sorted(SCHEDULES)}, or an arm)")
        for name in SCHEDULES:
            if name in s:  # written out, so that study.toml records every setting used
                s[name] = SCHEDULES[name].defaults | s[name]
        for a in arms:
            settings = arm_settings(out, a, i)
            for name, spec in SCHEDULES[a.partition("/")[0]].settings.items():
                if spec.required and name not in settings:
                    raise _fail(f"{where}.{a.partition('/')[0]}.{name}", f"is required by the arm {a}")
    _probe_handoffs(out)
    return out


def _probe_handoffs(out: dict) -> None:
    """Run each arm's handoff once on a tiny optimizer of the study's kind, so that one that
    cannot apply (reset-v on SGD, a plugin's bug) is refused before any data is read."""
    for arm in out["arms"]:
        schedule, _, name = arm.partition("/")
        param = torch.zeros(2, 2, requires_grad=True)
        model = torch.nn.Module()
        model.weight = param

        def fresh(param=param):
            return probe_optimizer(out["optimizer"], [param])

        optimizer = fresh()
        param.grad = torch.ones_like(param)
        optimizer.step()
        session = NextSession(1, schedule, arm_settings(out, arm, min(1, len(out["sessions"]) - 1)), 1, 10, fresh)
        try:
            HANDOFFS[name](model, optimizer, session)
        except NotApplicable as e:
            raise _fail("arms", f"has {arm!r}, but the {name} handoff does not apply to this optimizer: {e}") from None
        except Exception as e:  # noqa: BLE001 - a user's handoff failing on a probe is a bad study, not a crash
            raise _fail("arms", f"has {arm!r}: the {name} handoff failed on a probe optimizer "
                        f"({type(e).__name__}: {e})") from None


def dataset_label(entry: str) -> str:
    """The name a dataset goes by in the output tree: a folder's last part for paths."""
    if "/" in entry:
        entry = entry.rstrip("/").rsplit("/", 1)[-1] or "data"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", entry)


def arm_settings(raw: dict, arm: str, session: int) -> dict:
    """The schedule settings of one arm in one session: defaults < schedule table < arm table."""
    schedule = arm.partition("/")[0]
    s = raw["sessions"][session]
    settings = dict(SCHEDULES[schedule].defaults) | dict(s.get(schedule, {})) | dict(s.get(arm, {}))
    settings.setdefault("epochs", s["epochs"])
    return settings


@dataclass(frozen=True)
class Study:
    raw: dict

    def __getattr__(self, key: str) -> Any:
        try:  # through __dict__: while unpickling, `raw` itself is not there yet
            return self.__dict__["raw"][key]
        except KeyError:
            raise AttributeError(key) from None

    def settings(self, arm: str, session: int) -> dict:
        return arm_settings(self.raw, arm, session)

    def to_toml(self) -> str:
        return dumps_toml(self.raw)


def _load_toml_text(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {e}") from None


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    text = resources.files("optstate.presets").joinpath(f"{name}.toml").read_text()
    return _load_toml_text(text, f"preset {name}")


def parse_value(text: str) -> Any:
    """A --set value is a TOML value; a bare word is taken as a string."""
    if "\n" in text or "\r" in text:
        raise UserError(f"--set value {text!r}: one line only")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(raw: dict, assignment: str) -> None:
    key, eq, value = assignment.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set seeds=2")
    parts = [p.strip().strip('"') for p in key.split(".")]
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: {part!r} is not an index of {'.'.join(parts[:i]) or 'the study'} (0..{len(node) - 1})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:i])} is not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"--set {key}: {last!r} is not an index (0..{len(node) - 1})")
        node[int(last)] = parse_value(value)
    elif isinstance(node, dict):
        node[last] = parse_value(value)
    else:
        raise UserError(f"--set {key}: {'.'.join(parts[:-1])} is not a table")


def load(path: str | Path | None = None, preset_name: str | None = None, sets: list[str] = (),
         plugins: list[str] = ()) -> Study:
    """Preset (default `embedded` when no file is given), then the file's keys, then --set."""
    raw: dict = {}
    if preset_name or path is None:
        raw = preset(preset_name or "embedded")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"study file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"{p}: cannot read the study file ({e})") from None
        raw |= _load_toml_text(text, str(p))
    raw = copy.deepcopy(DEFAULTS) | raw  # so that --set optimizer.weight_decay=... extends the default table
    for s in sets:
        apply_set(raw, s)
    if plugins:
        if not isinstance(raw["plugins"], list):
            raise _fail("plugins", 'must be a list of module names, e.g. ["my_handoffs"]')
        raw["plugins"] = list(dict.fromkeys([*raw["plugins"], *plugins]))
    load_plugins(raw["plugins"])
    return Study(validate(raw))


def load_plugins(names: Any) -> None:
    """Import the user's modules (a module name, or a path to a .py file) so that their
    @register calls add handoffs before the arms are checked."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _fail("plugins", 'must be a list of module names, e.g. ["my_handoffs"]')
    if os.getcwd() not in sys.path:  # the console script does not put the working folder on the path
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
                    continue
                spec = importlib.util.spec_from_file_location(path.stem, path)
                if spec is None or not path.is_file():
                    raise ImportError(f"no such file {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is a bad study
            sys.modules.pop(Path(name).stem if name.endswith(".py") else name, None)
            raise _fail("plugins", f"cannot load {name!r}: {type(e).__name__}: {e}") from None


# -- a small TOML writer for resolved studies (scalars, lists, tables, arrays of tables)

def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(raw: dict) -> str:
    lines = []
    tables = []
    for k, v in raw.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, items in tables:
        for item in items:
            lines.append("")
            lines.append(f"[[{_toml_key(k)}]]")
            lines.extend(f"{_toml_key(ik)} = {_toml_value(iv)}" for ik, iv in item.items())
    return "\n".join(lines) + "\n"

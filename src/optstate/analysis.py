"""Aggregate a run directory's metrics into results: finals per run, per arm, comparisons.

Reads only what the store wrote (study.toml, plan.json, runs/*/epochs.csv), so
results can be rebuilt from a run directory alone.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from statistics import mean, stdev

from optstate.errors import UserError
from optstate.plan import Plan
from optstate.store import read_csv

FINAL_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top3")


def _spread(xs: list[float]) -> float | None:
    return stdev(xs) if len(xs) > 1 else None


def load_run_dir(out: Path) -> tuple[dict, Plan]:
    for name in ("study.toml", "plan.json"):
        if not (out / name).is_file():
            raise UserError(f"{out} is not an optstate run directory (no {name})")
    try:
        study = tomllib.loads((out / "study.toml").read_text())
        plan = Plan.from_json((out / "plan.json").read_text())
        study["name"], study["arms"]  # noqa: B018 - what the report needs
    except (ValueError, KeyError, TypeError) as e:  # TOML and JSON decode errors are ValueErrors
        raise UserError(f"{out}: study.toml or plan.json is damaged ({type(e).__name__}: {e})") from None
    return study, plan


def analyse(out: Path) -> dict:
    study, plan = load_run_dir(out)
    runs, diverged = [], []
    for r in plan.runs:
        status = plan.run_status(r)
        if status == "diverged":
            node = next(plan.nodes[i] for i in r.nodes if plan.nodes[i].status == "diverged")
            path = out / r.folder / "epochs.csv"
            diverged.append({"dataset": r.dataset, "arm": r.arm, "seed": r.seed, "folder": r.folder,
                             "session": node.session + 1, "step": node.diverged_at,
                             "epochs_finished": len(read_csv(path)) if path.is_file() else 0})
            continue
        path = out / r.folder / "epochs.csv"
        if status != "done" or not path.is_file():
            continue  # not finished yet
        rows = read_csv(path)
        if not rows:
            continue
        last = rows[-1]
        best = max(rows, key=lambda x: float(x["val_acc"]))
        runs.append({
            "dataset": r.dataset, "arm": r.arm, "seed": r.seed, "folder": r.folder,
            "epochs": len(rows), "seconds": sum(float(x["seconds"]) for x in rows),
            "final": {k: float(last[k]) for k in FINAL_KEYS},
            "best_val_acc": float(best["val_acc"]), "best_epoch": int(best["global_epoch"]),
            "sessions": sorted({int(x["session"]) for x in rows}),
        })
    arms = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        for arm in study["arms"]:
            mine = [r for r in runs if r["dataset"] == ds and r["arm"] == arm]
            if not mine:
                continue
            entry = {"dataset": ds, "arm": arm, "n": len(mine)}
            for k in FINAL_KEYS:
                xs = [r["final"][k] for r in mine]
                entry[f"{k}_mean"], entry[f"{k}_std"] = mean(xs), _spread(xs)
            arms.append(entry)
    comparisons = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        by = {(r["arm"], r["seed"]): r for r in runs if r["dataset"] == ds}
        for a, b in _pairs(study["arms"]):
            seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
            if not seeds:
                continue
            diffs = [by[(a, s)]["final"]["val_acc"] - by[(b, s)]["final"]["val_acc"] for s in seeds]
            comparisons.append({
                "dataset": ds, "a": a, "b": b, "metric": "val_acc", "n": len(seeds),
                "diffs": diffs, "diff_mean": mean(diffs), "diff_std": _spread(diffs),
                "a_mean": mean(by[(a, s)]["final"]["val_acc"] for s in seeds),
                "b_mean": mean(by[(b, s)]["final"]["val_acc"] for s in seeds),
            })
    return {"study": study["name"], "runs": runs, "arms": arms, "comparisons": comparisons,
            "diverged": diverged, "answer": answer(comparisons) + diverged_lines(diverged)}


def diverged_lines(diverged: list[dict]) -> list[str]:
    return [f"{d['dataset']}: {d['arm']} seed {d['seed']} diverged (non-finite training loss at step {d['step']}, "
            f"session {d['session']}); that run is left out of the metrics and comparisons." for d in diverged]


def _pairs(arms: list[str]) -> list[tuple[str, str]]:
    """keep vs new (and any other handoff vs new) under the same schedule; then schedules under the same handoff."""
    out = []
    for a in arms:
        sched, _, hand = a.partition("/")
        if hand != "new" and f"{sched}/new" in arms:
            out.append((a, f"{sched}/new"))
    for a in arms:
        sched, _, hand = a.partition("/")
        if sched != "constant" and f"constant/{hand}" in arms:
            out.append((a, f"constant/{hand}"))
    return out


def answer(comparisons: list[dict]) -> list[str]:
    lines = []
    for c in comparisons:
        sa, ha = c["a"].split("/")
        sb, hb = c["b"].split("/")
        d = 100 * c["diff_mean"]
        d = 0.0 if round(d, 2) == 0 else d  # no "-0.00 points"
        if sa == sb:
            what = f"under {sa} LR, `{ha}` instead of `{hb}`"
        else:
            what = f"with `{ha}` handoffs, {sa} instead of {sb} LR"
        spread = ""
        if c["n"] > 1 and c["diff_std"] is not None:
            se = 100 * c["diff_std"] / math.sqrt(c["n"])
            spread = f" ± {se:.1f} (standard error over {c['n']} paired seeds)"
        else:
            spread = " (one seed)"
        lines.append(f"{c['dataset']}: {what} changed final validation top-1 by {d:+.2f} points"
                     f"{spread}: {100 * c['a_mean']:.2f}% vs {100 * c['b_mean']:.2f}%.")
    return lines

"""Aggregate a run directory's metrics into results: finals per run, per arm, comparisons.

Reads only what the store wrote (study.toml, plan.json, runs/*/epochs.csv), so
results can be rebuilt from a run directory alone.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from statistics import mean, stdev

from optstate import stats
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


TARGET = 0.95  # time to target: validation top-1 >= this fraction of the best arm's mean final
RECOVERY = 0.10  # recovery: every state norm within this fraction of the keep branch's


def _run_record(r, rows: list[dict]) -> dict:
    last = rows[-1]
    best = max(rows, key=lambda x: float(x["val_acc"]))
    return {
        "dataset": r.dataset, "arm": r.arm, "seed": r.seed, "folder": r.folder,
        "epochs": len(rows), "seconds": sum(float(x["seconds"]) for x in rows),
        "final": {k: float(last[k]) for k in FINAL_KEYS},
        "best_val_acc": float(best["val_acc"]), "best_epoch": int(best["global_epoch"]),
        "best_val_loss": min(float(x["val_loss"]) for x in rows),
        "sessions": sorted({int(x["session"]) for x in rows}),
        "val_acc_curve": [float(x["val_acc"]) for x in rows],
    }


METRICS = {  # per-arm statistics: name -> how to read it from a run record
    "final_val_acc": lambda r: r["final"]["val_acc"],
    "best_val_acc": lambda r: r["best_val_acc"],
    "final_val_loss": lambda r: r["final"]["val_loss"],
    "best_val_loss": lambda r: r["best_val_loss"],
}


def analyse(out: Path, target: float = TARGET) -> dict:
    study, plan = load_run_dir(out)
    runs, diverged = [], []
    for r in plan.runs:
        status = plan.run_status(r)
        path = out / r.folder / "epochs.csv"
        if status == "diverged":
            node = next(plan.nodes[i] for i in r.nodes if plan.nodes[i].status == "diverged")
            diverged.append({"dataset": r.dataset, "arm": r.arm, "seed": r.seed, "folder": r.folder,
                             "session": node.session + 1, "step": node.diverged_at,
                             "epochs_finished": len(read_csv(path)) if path.is_file() else 0})
            continue
        if status != "done" or not path.is_file():
            continue  # not finished yet
        rows = read_csv(path)
        if rows:
            runs.append(_run_record(r, rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))

    arms = []
    for ds in datasets:
        for arm in study["arms"]:
            mine = [r for r in runs if r["dataset"] == ds and r["arm"] == arm]
            if not mine:
                continue
            entry = {"dataset": ds, "arm": arm, "n": len(mine),
                     "stats": {m: stats.summary([f(r) for r in mine]) for m, f in METRICS.items()}}
            for k in FINAL_KEYS:
                xs = [r["final"][k] for r in mine]
                entry[f"{k}_mean"], entry[f"{k}_std"] = mean(xs), _spread(xs)
            arms.append(entry)

    # Time to target, per dataset: the target is a fraction of the best arm's mean final top-1.
    targets = {}
    for ds in datasets:
        best = max(a["stats"]["final_val_acc"]["mean"] for a in arms if a["dataset"] == ds)
        targets[ds] = target * best
    for r in runs:
        r["epochs_to_target"] = next((i + 1 for i, v in enumerate(r["val_acc_curve"]) if v >= targets[r["dataset"]]),
                                     None)
    for a in arms:
        reached = [r["epochs_to_target"] for r in runs if r["dataset"] == a["dataset"] and r["arm"] == a["arm"]]
        hit = [e for e in reached if e is not None]
        a["epochs_to_target"] = {"target": targets[a["dataset"]], "reached": len(hit), "n": len(reached),
                                 "mean": mean(hit) if hit else None}

    _recovery(out, runs, study["arms"])

    comparisons = []
    for ds in datasets:
        by = {(r["arm"], r["seed"]): r for r in runs if r["dataset"] == ds}
        for a, b, kind in _pairs(study["arms"]):
            seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
            if not seeds:
                continue
            xs, ys = [by[(a, s)]["final"]["val_acc"] for s in seeds], [by[(b, s)]["final"]["val_acc"] for s in seeds]
            d = stats.paired(xs, ys)
            sa, ha = a.split("/")
            sb, hb = b.split("/")
            what = f"`{ha}` instead of `{hb}`" if kind == "handoff" else f"{sa} instead of {sb} LR"
            comparisons.append({
                "dataset": ds, "a": a, "b": b, "kind": kind, "metric": "val_acc", "n": d["n"],
                "diffs": d["diffs"], "diff_mean": d["mean"], "diff_std": d["std"],
                "ci_low": d["ci_low"], "ci_high": d["ci_high"], "a_mean": mean(xs), "b_mean": mean(ys),
                "verdict": f"{ds}, {sa if kind == 'handoff' else f'`{ha}` handoffs'}: "
                           + stats.verdict(d, what) + f" ({100 * mean(xs):.2f}% vs {100 * mean(ys):.2f}%)",
            })
    for r in runs:
        del r["val_acc_curve"]
    return {"study": study["name"], "runs": runs, "arms": arms, "comparisons": comparisons,
            "diverged": diverged, "target_fraction": target, "recovery_tolerance": RECOVERY,
            "answer": [c["verdict"] for c in comparisons] + diverged_lines(diverged)}


def _recovery(out: Path, runs: list[dict], arms: list[str]) -> None:
    """Per run that is not `keep`: after each boundary, the steps until every state norm is within
    RECOVERY of the `keep` run's (same dataset, schedule, seed) at the same logged step; None if never
    within that session. Resolution: the study's log_every."""
    by = {(r["dataset"], r["arm"], r["seed"]): r for r in runs}
    for r in runs:
        sched, _, hand = r["arm"].partition("/")
        keep = by.get((r["dataset"], f"{sched}/keep", r["seed"]))
        if hand == "keep" or keep is None:
            continue
        mine, ref = read_csv(out / r["folder"] / "steps.csv"), read_csv(out / keep["folder"] / "steps.csv")
        keys = [k for k in mine[0] if k.startswith("norm_")] if mine else []
        ref_at = {row["step"]: row for row in ref}
        recovery = {}
        for session in r["sessions"][1:]:
            rows = [row for row in mine if int(row["session"]) == session]
            first = int(rows[0]["step"])
            recovery[str(session)] = next(
                (int(row["step"]) - first for row in rows if row["step"] in ref_at and all(
                    abs(float(row[k]) - float(ref_at[row["step"]][k])) <= RECOVERY * abs(float(ref_at[row["step"]][k]))
                    for k in keys)), None) if keys else None
        r["recovery_steps"] = recovery


def _pairs(arms: list[str]) -> list[tuple[str, str, str]]:
    """Each handoff against `keep` under the same schedule (against `new` where there is no keep arm);
    then each schedule against constant under the same handoff."""
    out = []
    for a in arms:
        sched, _, hand = a.partition("/")
        ref = f"{sched}/keep" if f"{sched}/keep" in arms else f"{sched}/new"
        if a != ref and ref in arms:
            out.append((a, ref, "handoff"))
    for a in arms:
        sched, _, hand = a.partition("/")
        if sched != "constant" and f"constant/{hand}" in arms:
            out.append((a, f"constant/{hand}", "schedule"))
    return out


def diverged_lines(diverged: list[dict]) -> list[str]:
    return [f"{d['dataset']}: {d['arm']} seed {d['seed']} diverged (non-finite training loss at step {d['step']}, "
            f"session {d['session']}); that run is left out of the metrics and comparisons." for d in diverged]

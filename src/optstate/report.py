"""Figures, results.json and report.md, rebuilt from a run directory alone."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from optstate.analysis import analyse, load_run_dir  # noqa: E402
from optstate.store import read_csv, write_atomic  # noqa: E402

PANELS = [("train_loss", "train loss"), ("train_acc", "train top-1"), ("val_loss", "validation loss"),
          ("val_acc", "validation top-1")]


def _colors(arms: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def _style(arm: str) -> str:
    """Dashed for every handoff but `new`, so that arms which coincide stay visible."""
    return "-" if arm.endswith("/new") else "--"


def _mean_curves(out: Path, runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_epoch = defaultdict(list)
    for r in runs:
        for row in read_csv(out / r["folder"] / "epochs.csv"):
            per_epoch[int(row["global_epoch"])].append(float(row[key]))
    xs = sorted(per_epoch)
    ys = [sum(per_epoch[x]) / len(per_epoch[x]) for x in xs]
    return xs, ys, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs]


def _boundaries(out: Path, run: dict) -> list[float]:
    rows = read_csv(out / run["folder"] / "epochs.csv")
    return [int(a["global_epoch"]) + 0.5 for a, b in zip(rows, rows[1:]) if a["session"] != b["session"]]


def curves_figure(out: Path, results: dict, arms: list[str], dataset: str) -> Path:
    colors = _colors(arms)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for arm in arms:
            mine = [r for r in results["runs"] if r["dataset"] == dataset and r["arm"] == arm]
            if not mine:
                continue
            xs, ys, lo, hi = _mean_curves(out, mine, key)
            ax.plot(xs, ys, marker="o", ms=3, color=colors[arm], ls=_style(arm), label=f"{arm} (n={len(mine)})")
            if len(mine) > 1:
                ax.fill_between(xs, lo, hi, color=colors[arm], alpha=0.15, lw=0)
            for b in _boundaries(out, mine[0]):
                ax.axvline(b, color=colors[arm], ls=":", lw=1, alpha=0.7)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("epoch (dotted lines: session boundaries, in each arm's colour)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{results['study']}: {dataset} (mean over seeds; band: min to max)")
    fig.tight_layout()
    path = out / "figures" / f"{dataset}-curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule_figure(out: Path, results: dict, arms: list[str], dataset: str) -> Path:
    colors = _colors(arms)
    fig, (ax_lr, ax_m) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    momentum = "beta1"
    for arm in arms:
        mine = sorted((r for r in results["runs"] if r["dataset"] == dataset and r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        rows = read_csv(out / mine[0]["folder"] / "steps.csv")
        momentum = "momentum" if "momentum" in rows[0] else "beta1"
        steps = [int(r["step"]) for r in rows]
        ax_lr.plot(steps, [float(r["lr"]) for r in rows], color=colors[arm], ls=_style(arm), label=arm, lw=1.2)
        if rows[0][momentum] != "":
            ax_m.plot(steps, [float(r[momentum]) for r in rows], color=colors[arm], ls=_style(arm), label=arm, lw=1.2)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_m.set_ylabel(momentum)
    ax_m.set_xlabel("optimizer step (logged steps)")
    for ax in (ax_lr, ax_m):
        ax.grid(alpha=0.3)
    ax_lr.legend(fontsize=8)
    fig.suptitle(f"{results['study']}: {dataset}: the learning rate and {momentum} each step used (seed 0)")
    fig.tight_layout()
    path = out / "figures" / f"{dataset}-schedule.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _pm(mean: float, std: float | None, pct: bool = True) -> str:
    if pct:
        return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def build_report(out: Path) -> dict:
    """Write results.json, figures/*.png and report.md for the run directory `out`."""
    out = Path(out)
    study, plan = load_run_dir(out)
    results = analyse(out)
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    arms = study["arms"]
    datasets = list(dict.fromkeys(r["dataset"] for r in results["runs"]))
    figures = []
    for ds in datasets:
        figures.append(curves_figure(out, results, arms, ds))
        figures.append(schedule_figure(out, results, arms, ds))

    done = sum(1 for n in plan.nodes.values() if n.status == "done")
    md = [f"# optstate study `{study['name']}`", ""]
    md += ["## The answer", ""]
    md += [f"- {line}" for line in results["answer"]] or ["- No finished runs yet."]
    if results["runs"] and all(c["n"] == 1 for c in results["comparisons"]):
        md += ["", "One seed per arm: these differences carry no error bar. Rerun with `--set seeds=3` "
               "(or more) to measure how much they vary from seed to seed."]
    md += ["", "Differences are measured on each dataset's validation split (never training images), "
           "at the last epoch of the last session; arms with the same schedule share their first session, "
           "so each comparison starts from the same weights.", ""]
    md += ["## Final metrics", "",
           "| dataset | arm | seeds | val top-1 | val top-3 | val loss | train loss | best val top-1 (epoch) |",
           "|---|---|---|---|---|---|---|---|"]
    for a in results["arms"]:
        mine = [r for r in results["runs"] if r["dataset"] == a["dataset"] and r["arm"] == a["arm"]]
        best = max(mine, key=lambda r: r["best_val_acc"])
        md.append(f"| {a['dataset']} | {a['arm']} | {a['n']} | {_pm(a['val_acc_mean'], a['val_acc_std'])} | "
                  f"{_pm(a['val_top3_mean'], a['val_top3_std'])} | {_pm(a['val_loss_mean'], a['val_loss_std'], False)} | "
                  f"{_pm(a['train_loss_mean'], a['train_loss_std'], False)} | {_pct(best['best_val_acc'])} ({best['best_epoch']}) |")
    md += ["", "(mean ± standard deviation over seeds where there is more than one)", ""]
    if results["diverged"]:
        md += ["## Diverged runs", "",
               "A non-finite training loss stopped these runs; their later sessions were skipped. Their metrics up "
               "to the last finished epoch are in their `runs/` folder; they are left out of the tables, figures "
               "and comparisons above.", "",
               "| dataset | arm | seed | session | step | epochs finished |", "|---|---|---|---|---|---|"]
        md += [f"| {d['dataset']} | {d['arm']} | {d['seed']} | {d['session']} | {d['step']} | {d['epochs_finished']} |"
               for d in results["diverged"]]
        md.append("")
    md += ["## Figures", ""]
    for f in figures:
        md += [f"![{f.stem}](figures/{f.name})", ""]
    md += ["## Runs", "", f"{done} of {len(plan.nodes)} sessions trained; "
           f"{plan.epochs_trained()} epochs in the run tree instead of {plan.epochs_unshared()} without sharing.", ""]
    for r in results["runs"]:
        md.append(f"- `{r['folder']}`: {r['epochs']} epochs, {r['seconds']:.0f} s of training")
    md += ["", "## Settings", "", "The resolved study (`study.toml`):", "", "```toml",
           (out / "study.toml").read_text().rstrip(), "```", ""]
    write_atomic(out / "report.md", "\n".join(md))
    return results

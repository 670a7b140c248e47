"""Figures, results.json, report.md and report.html, rebuilt from a run directory alone."""
from __future__ import annotations

import base64
import html
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


def state_figure(out: Path, results: dict, arms: list[str], dataset: str) -> Path | None:
    """State norms and update size at every logged step, seed 0, for the arms of one schedule."""
    runs = {r["arm"]: r for r in results["runs"] if r["dataset"] == dataset and r["seed"] == 0}
    schedules = list(dict.fromkeys(a.partition("/")[0] for a in arms if a in runs))
    if not schedules:
        return None
    # the schedule with the most arms (ties: the later one in the study, usually onecycle)
    schedule = max(reversed(schedules), key=lambda s: sum(a.startswith(s + "/") for a in runs))
    mine = [a for a in arms if a.startswith(schedule + "/") and a in runs]
    tables = {a: read_csv(out / runs[a]["folder"] / "steps.csv") for a in mine}
    keys = [k for k in next(iter(tables.values()))[0] if k.startswith("norm_")] + ["update_ratio"]
    colors = _colors(arms)
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 2.6 * len(keys) + 0.8), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for arm in mine:
            rows = tables[arm]
            ax.plot([int(r["step"]) for r in rows], [float(r[key]) for r in rows], color=colors[arm],
                    ls=_style(arm), lw=1.2, label=arm)
        starts = {}
        for r in tables[mine[0]]:
            starts.setdefault(r["session"], int(r["step"]))
        for b in list(starts.values())[1:]:
            ax.axvline(b, color="0.4", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel(key.removeprefix("norm_") if key != "update_ratio" else "||Δθ|| / ||θ||", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step (logged steps; dotted: session boundaries)")
    fig.suptitle(f"{results['study']}: {dataset}, {schedule} arms, seed 0: optimizer state norms "
                 f"(over all parameters) and relative update size")
    fig.tight_layout()
    path = out / "figures" / f"{dataset}-state.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CAPTIONS = {
    "curves": "Training and validation loss and top-1 per epoch, mean over seeds (band: min to max); "
              "dashed arms keep some optimizer state across boundaries, dotted lines mark the boundaries.",
    "schedule": "The learning rate and momentum (beta1) that each logged step used: what each schedule "
                "does inside a session and at each boundary.",
    "state": "How large each kind of optimizer state is, summed over all parameters, and how large each "
             "update is relative to the weights, around the session boundaries: a reset branch's "
             "state starts over where `keep` carries on.",
}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _pm(mean: float, std: float | None, pct: bool = True) -> str:
    if pct:
        return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _ci(s: dict, pct: bool = True) -> str:
    """mean [95% CI low, high], or the mean alone for one seed."""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.4f}")
    if s["ci_low"] is None:
        return f(s["mean"]) + ("%" if pct else "")
    return f"{f(s['mean'])}{'%' if pct else ''} [{f(s['ci_low'])}, {f(s['ci_high'])}]"


def _diff(c: dict | None) -> str:
    if c is None:
        return "reference"
    d = f"{100 * c['diff_mean']:+.2f}".replace("-0.00", "+0.00")
    if c["ci_low"] is None:
        return f"{d} (1 seed)"
    return f"{d} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"


def _recovery_text(runs: list[dict]) -> str:
    per = [r.get("recovery_steps") for r in runs]
    if not per or per[0] is None:
        return "–"
    parts = []
    for session in per[0]:
        xs = [p.get(session) for p in per if p]
        got = [x for x in xs if x is not None]
        if len(got) == len(xs):
            parts.append(f"s{session}: {sum(got) / len(got):.0f}")
        else:
            parts.append(f"s{session}: never" + (f" ({len(xs) - len(got)}/{len(xs)} seeds)" if len(xs) > 1 else ""))
    return ", ".join(parts)


def _target_text(a: dict) -> str:
    t = a["epochs_to_target"]
    if t["mean"] is None:
        return "never"
    return f"{t['mean']:.1f}" + (f" ({t['reached']}/{t['n']} seeds)" if t["reached"] < t["n"] else "")


def build_report(out: Path, target: float | None = None) -> dict:
    """Write results.json, figures/*.png, report.md and report.html for the run directory `out`."""
    out = Path(out)
    study, plan = load_run_dir(out)
    results = analyse(out) if target is None else analyse(out, target)
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    arms = study["arms"]
    datasets = list(dict.fromkeys(r["dataset"] for r in results["runs"]))
    figures = []
    for ds in datasets:
        figures.append(("curves", curves_figure(out, results, arms, ds)))
        figures.append(("schedule", schedule_figure(out, results, arms, ds)))
        state = state_figure(out, results, arms, ds)
        if state is not None:
            figures.append(("state", state))

    blocks = [("h1", f"optstate study `{study['name']}`")]
    blocks += [("h2", "Verdict")]
    if results["runs"]:
        seeds = max(a["n"] for a in results["arms"])
        blocks.append(("p", f"Final validation top-1 of each arm minus that of the `keep` arm with the same "
                            f"schedule, seed by seed (paired: both branches fork from the same weights), in points; "
                            f"[95% confidence interval] over {seeds} seed{'s' if seeds > 1 else ''}. Recovery: "
                            f"steps after each boundary until every optimizer state norm is within "
                            f"{100 * results['recovery_tolerance']:.0f}% of `keep`'s (to the nearest logged step). "
                            f"Epochs to target: until validation top-1 first reaches "
                            f"{100 * results['target_fraction']:.0f}% of the best arm's mean final."))
        rows = []
        for a in results["arms"]:
            sched, _, hand = a["arm"].partition("/")
            comp = next((c for c in results["comparisons"] if c["dataset"] == a["dataset"] and c["a"] == a["arm"]
                         and c["kind"] == "handoff"), None)
            mine = [r for r in results["runs"] if r["dataset"] == a["dataset"] and r["arm"] == a["arm"]]
            rows.append([a["dataset"], sched, f"`{hand}`", _ci(a["stats"]["final_val_acc"]),
                         _diff(comp) if comp or hand == "keep" else "–", _recovery_text(mine), _target_text(a)])
        blocks.append(("table", ["dataset", "schedule", "handoff", "final val top-1", "vs keep (points)",
                                 "recovery steps", "epochs to target"], rows))
        blocks.append(("ul", results["answer"]))
        if all(c["n"] == 1 for c in results["comparisons"]):
            blocks.append(("p", "One seed per arm: these differences carry no error bars. Rerun with "
                                "`--set seeds=3` (or more) to measure how much they vary from seed to seed."))
        blocks.append(("p", "Measured on each dataset's validation split (never training images), at the last "
                            "epoch of the last session."))
    else:
        blocks.append(("p", "No finished runs yet."))
        blocks += [("ul", results["answer"])] if results["answer"] else []

    if figures:
        blocks.append(("h2", "Figures"))
        for kind, f in figures:
            blocks.append(("figure", f"figures/{f.name}", f"{f.stem}: {CAPTIONS[kind]}"))

    if results["arms"]:
        blocks.append(("h2", "Metrics per arm"))
        blocks.append(("p", "Mean [95% confidence interval] over seeds; the interval needs two seeds or more."))
        rows = []
        for a in results["arms"]:
            st = a["stats"]
            rows.append([a["dataset"], a["arm"], str(a["n"]), _ci(st["final_val_acc"]), _ci(st["best_val_acc"]),
                         _ci(st["final_val_loss"], False), _ci(st["best_val_loss"], False),
                         _pm(a["val_top3_mean"], a["val_top3_std"]), _pm(a["train_loss_mean"], a["train_loss_std"], False)])
        blocks.append(("table", ["dataset", "arm", "seeds", "final val top-1", "best val top-1", "final val loss",
                                 "best val loss", "final val top-3 (± sd)", "final train loss (± sd)"], rows))

    if results["diverged"]:
        blocks.append(("h2", "Diverged runs"))
        blocks.append(("p", "A non-finite training loss stopped these runs; their later sessions were skipped. Their "
                            "metrics up to the last finished epoch are in their `runs/` folder; they are left out of "
                            "the tables, figures and comparisons above."))
        blocks.append(("table", ["dataset", "arm", "seed", "session", "step", "epochs finished"],
                       [[d["dataset"], d["arm"], str(d["seed"]), str(d["session"]), str(d["step"]),
                         str(d["epochs_finished"])] for d in results["diverged"]]))

    blocks += data_blocks(out)
    done = sum(1 for n in plan.nodes.values() if n.status == "done")
    precisions = sorted({n.precision for n in plan.nodes.values() if n.precision})
    blocks.append(("h2", "Runs"))
    blocks.append(("p", f"{done} of {len(plan.nodes)} sessions trained; {plan.epochs_trained()} epochs in the run "
                        f"tree instead of {plan.epochs_unshared()} without sharing"
                        + (f"; trained in {', '.join(precisions)}." if precisions else ".")))
    blocks.append(("ul", [f"`{r['folder']}`: {r['epochs']} epochs, {r['seconds']:.0f} s of training"
                          for r in results["runs"]]))
    blocks.append(("h2", "Settings"))
    blocks.append(("p", "The resolved study (`study.toml`):"))
    blocks.append(("code", (out / "study.toml").read_text().rstrip()))

    write_atomic(out / "report.md", render_markdown(blocks))
    write_atomic(out / "report.html", render_html(blocks, out, study["name"]))
    return results


def data_blocks(out: Path) -> list[tuple]:
    """The datasets as this run loaded them (data.json), with the files that could not be decoded."""
    path = out / "data.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    blocks = [("h2", "Data"), ("table", ["dataset", "source", "classes", "train images", "validation images",
                                          "image size", "files not decodable"],
                               [[name, d["source"], str(d["classes"]), str(d["train_images"]), str(d["val_images"]),
                                 f"{d['image_size']} px", str(len(d["skipped"]))] for name, d in data.items()])]
    for name, d in data.items():
        if d["skipped"]:
            shown = ", ".join(f"`{f}`" for f in d["skipped"][:20])
            more = f" and {len(d['skipped']) - 20} more (all in data.json)" if len(d["skipped"]) > 20 else ""
            blocks.append(("p", f"{name}: {len(d['skipped'])} file(s) could not be decoded (truncated, damaged or "
                                f"not images) and were left out: {shown}{more}."))
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    md = []
    for kind, *rest in blocks:
        if kind == "h1":
            md += [f"# {rest[0]}", ""]
        elif kind == "h2":
            md += [f"## {rest[0]}", ""]
        elif kind == "p":
            md += [rest[0], ""]
        elif kind == "ul":
            md += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, rows = rest
            md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "figure":
            md += [f"![{Path(rest[0]).stem}]({rest[0]})", "", f"*{rest[1]}*", ""]
        elif kind == "code":
            md += ["```toml", rest[0], "```", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """Escape, then `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[tuple], out: Path, title: str) -> str:
    """One self-contained page: figures embedded as base64 PNG."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                        + "</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode((out / rest[0]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(Path(rest[0]).stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(rest[1])}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{font-style:italic;color:#444}"
             "code{background:#f3f3f3;padding:0 3px}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>optstate: {html.escape(title)}'
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

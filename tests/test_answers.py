"""Studies that answer the question: several seeds, more handoffs, SGD; the verdict and its numbers."""
import csv
import json

import torch

from optstate.cli import main
from tests.test_resume import tables


def test_three_seeds_four_handoffs_give_a_verdict_table_and_reload_equals_keep(tmp_path, capsys):
    out = tmp_path / "out"
    arms = '["onecycle/keep", "onecycle/new", "onecycle/reload", "onecycle/reset-step"]'
    assert main(["run", "--preset", "smoke", "--set", "seeds=3", "--set", f"arms={arms}", "--set", "train_images=512",
                 "--keep-checkpoints", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    comps = {c["a"]: c for c in results["comparisons"] if c["kind"] == "handoff"}
    assert set(comps) == {"onecycle/new", "onecycle/reload", "onecycle/reset-step"}
    for c in comps.values():
        assert c["b"] == "onecycle/keep" and c["n"] == 3 and len(c["diffs"]) == 3
        assert c["ci_low"] <= c["diff_mean"] <= c["ci_high"]
        assert c["verdict"] in printed
    assert comps["onecycle/reload"]["diffs"] == [0.0, 0.0, 0.0]
    assert "no detectable difference: within ±0.0 points at 95% confidence (3 seeds)" in comps["onecycle/reload"]["verdict"]
    report = (out / "report.md").read_text()
    table = report[report.index("## Verdict"):report.index("## Figures")]
    for hand in ("keep", "new", "reload", "reset-step"):
        assert f"| fashion-mnist-embedded | onecycle | `{hand}` |" in table
    assert "| reference |" in table and "figures/fashion-mnist-embedded-state.png" in report
    arms = {a["arm"]: a for a in results["arms"]}
    assert arms["onecycle/keep"]["stats"]["final_val_acc"]["ci_low"] is not None
    new_runs = [r for r in results["runs"] if r["arm"] == "onecycle/new"]
    assert all(set(r["recovery_steps"]) == {"2", "3"} for r in new_runs)

    # reload trains exactly like keep: same metrics, and the same optimizer state at every boundary
    found = tables(out)
    for seed in range(3):
        keep = {k.split("/")[-1]: v for k, v in found.items() if f"onecycle-keep/seed{seed}/" in k}
        reload = {k.split("/")[-1]: v for k, v in found.items() if f"onecycle-reload/seed{seed}/" in k}
        assert keep and keep == reload
    plan = json.loads((out / "plan.json").read_text())
    for node in plan["nodes"]:
        if node["handoff"] == "reload":
            twin = node["id"].replace("reload", "keep").rsplit(".", 1)[0]
            twin = next(n["id"] for n in plan["nodes"] if n["id"].rsplit(".", 1)[0] == twin)
            a = torch.load(out / "nodes" / node["id"] / "final.pt", weights_only=True)["optimizer"]
            b = torch.load(out / "nodes" / twin / "final.pt", weights_only=True)["optimizer"]
            assert a["param_groups"] == b["param_groups"]
            assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_an_sgd_study_cycles_momentum_and_logs_its_buffer(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--preset", "smoke", "--set", 'optimizer={name="sgd", momentum=0.9, nesterov=true}',
                 "--set", 'arms=["onecycle/keep", "onecycle/new", "onecycle/reset-m"]',
                 "--set", "sessions.0.onecycle.max_lr=0.1", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(out / "runs/fashion-mnist-embedded/onecycle-keep/seed0/steps.csv")))
    assert {"momentum", "norm_momentum_buffer", "update_ratio"} <= set(rows[0]) and "beta1" not in rows[0]
    momenta = [float(r["momentum"]) for r in rows]
    assert momenta[0] == 0.95 and min(momenta) < 0.86
    results = json.loads((out / "results.json").read_text())
    assert {c["a"] for c in results["comparisons"]} == {"onecycle/new", "onecycle/reset-m"}
    assert "| fashion-mnist-embedded | onecycle | `reset-m` |" in (out / "report.md").read_text()

"""The fast path (cache, batch augmentation, channels_last, fused kernels, precision) does not
change results beyond noise, and its runtime choices are what the docs say."""
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from optstate import data as datasets
from optstate import models, runtime
from optstate import study as studies
from optstate.cli import main
from optstate.data.batches import channel_stats

SEEDS = 3
SETS = [f"seeds={SEEDS}", 'arms=["constant/keep"]', 'augment="standard"', "val_images=512"]


def plain_final_accuracy(seed: int, tmp_path) -> float:
    """The smoke study's constant/keep arm the plain way: torchvision transforms image by image,
    fp32, NCHW, a for-loop Adam kept across the three sessions."""
    st = studies.load(None, "smoke", SETS)
    data = datasets.load("fashion-mnist-embedded", st, tmp_path)
    mean, std = (t.float().view(1, 1, 1) for t in channel_stats(data.train.images))
    augment = v2.Compose([v2.RandomResizedCrop(st.image_size, scale=tuple(st.crop_scale), antialias=True),
                          v2.RandomHorizontalFlip()])
    torch.manual_seed(seed)
    model = models.build("small-cnn", 10).to(memory_format=torch.contiguous_format)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False, fused=False)
    for session in st.sessions:
        for group in opt.param_groups:
            group["lr"] = session["constant"]["lr"]
        for _ in range(session["epochs"]):
            order = torch.randperm(len(data.train))
            for i in range(len(order) // st.batch_size):
                idx = order[i * st.batch_size:(i + 1) * st.batch_size]
                x = torch.stack([augment(data.train.images[j].float()) for j in idx])
                x = ((x / 255 - mean) / std).expand(-1, 3, -1, -1).contiguous()
                loss = F.cross_entropy(model(x), data.train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    o = (data.val.images.shape[-1] - st.image_size) // 2
    with torch.no_grad():
        x = data.val.images[..., o:o + st.image_size, o:o + st.image_size].float()
        x = ((x / 255 - mean) / std).expand(-1, 3, -1, -1).contiguous()
        return float((model(x).argmax(1) == data.val.labels).float().mean())


def test_fast_path_accuracy_is_within_noise_of_the_plain_path(tmp_path, capsys):
    out = tmp_path / "fast"
    assert main(["run", "--preset", "smoke", *[a for s in SETS for a in ("--set", s)], "--out", str(out)]) == 0
    fast = [r["final"]["val_acc"] for r in json.loads((out / "results.json").read_text())["runs"]]
    plain = [plain_final_accuracy(s, tmp_path) for s in range(SEEDS)]
    assert len(fast) == SEEDS
    spread = (statistics.variance(fast) / SEEDS + statistics.variance(plain) / SEEDS) ** 0.5
    diff = statistics.mean(fast) - statistics.mean(plain)
    # both learn (10 classes: chance is 0.1), and differ by no more than seed-to-seed noise allows
    assert min(fast) > 0.55 and min(plain) > 0.55, (fast, plain)
    assert abs(diff) <= max(0.03, 4 * spread), (fast, plain)


def test_bf16_autocast_trains_like_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["run", "--preset", "smoke", "--set", 'arms=["constant/keep"]', "--set", "val_images=512",
                     "--precision", precision, "--out", str(out)]) == 0
        runs[precision] = json.loads((out / "results.json").read_text())["runs"][0]["final"]["val_acc"]
        plan = json.loads((out / "plan.json").read_text())
        assert {n["precision"] for n in plan["nodes"]} == {precision}
    assert runs["bf16"] > 0.55 and abs(runs["bf16"] - runs["fp32"]) < 0.05, runs


def test_a_run_directory_keeps_its_precision(tmp_path, capsys):
    out = tmp_path / "out"
    sets = ["--set", 'arms=["constant/keep"]', "--set", "sessions=[{epochs=1, constant={lr=1e-3}}]"]
    assert main(["run", "--preset", "smoke", *sets, "--precision", "fp32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", "--preset", "smoke", *sets, "--precision", "bf16", "--out", str(out)]) == 2
    assert "trained with --precision fp32" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", *sets, "--precision", "fp32", "--out", str(out)]) == 0


def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "native_bf16", lambda d: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "native_bf16", lambda d: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("name,user,expected", [
    ("adam", {}, {"fused": True}),
    ("sgd", {"momentum": 0.9}, {"fused": True}),
    ("rmsprop", {}, {"foreach": True}),  # no fused RMSprop kernel
    ("adam", {"foreach": False}, {}),  # the study's own choice stands
    ("adam", {"differentiable": True}, {}),
])
def test_optimizer_kernels(name, user, expected):
    assert runtime.kernel_kwargs(studies.optimizer_class(name), user, torch.device("cpu")) == expected


def test_fused_adam_follows_the_for_loop_adam():
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = torch.optim.Adam(a, lr=1e-2, foreach=False)
    opt_b = torch.optim.Adam(b, lr=1e-2, **runtime.kernel_kwargs(torch.optim.Adam, {}, torch.device("cpu")))
    for _ in range(20):
        g = [torch.randn(5, 3) for _ in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt_a.state[p][key], opt_b.state[q][key], atol=1e-7)


def test_compile_trains_and_checkpoints_the_plain_module(tmp_path):
    out = tmp_path / "compiled"
    sets = ["--set", 'arms=["constant/keep"]', "--set",
            "sessions=[{epochs=1, constant={lr=1e-3}}, {epochs=1, constant={lr=1e-3}}]"]
    assert main(["run", "--preset", "smoke", *sets, "--compile", "--keep-checkpoints", "--out", str(out)]) == 0
    plain = tmp_path / "plain"
    assert main(["run", "--preset", "smoke", *sets, "--out", str(plain)]) == 0
    finals = [{r["arm"]: r["final"]["val_acc"] for r in json.loads((d / "results.json").read_text())["runs"]}
              for d in (out, plain)]
    for arm in finals[1]:
        assert abs(finals[0][arm] - finals[1][arm]) < 0.05, finals  # the same maths, fused differently
    for ckpt in (out / "nodes").glob("*/final.pt"):
        keys = torch.load(ckpt, weights_only=True)["model"].keys()
        assert not any(k.startswith("_orig_mod") for k in keys)  # loadable without torch.compile

"""`optstate bench`: three training paths timed side by side in one run, on the same
model, resolution, batch size and images.

- `original`: the original notebooks' loop: a Dataset that opens each JPEG with PIL
  per item, `Resize((s, s))` + `ToTensor()`, a DataLoader with `num_workers=0`,
  fp32, NCHW, torch.optim defaults, the loss read every step;
- `optstate`: optstate's own path as `optstate run` drives it: the decoded uint8
  cache, batch augmentation on the device, the run's precision, channels_last,
  fused/foreach kernels, `train_step`, and the state diagnostics at logged steps;
- `bound`: the model alone: `train_step` on one batch already on the device, with
  optstate's precision, layout and kernels.

The variants alternate block by block, so a machine that speeds up or slows down
during the run affects all three alike; each figure is its median block. The same
run times evaluation and decoding, which, with the run tree of `--preset seed`,
give that study's projected wall time here.
"""
from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from optstate import models
from optstate import plan as planning
from optstate import study as studies
from optstate.errors import UserError
from optstate.runtime import Runtime, kernel_kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _cudnn_benchmark(on: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def make_image_folder(root: Path, classes: int = 10, train_per_class: int = 32, val_per_class: int = 4,
                      short_side: int = 160, seed: int = 0) -> Path:
    """An Imagenette-like folder: JPEGs with a `short_side`-pixel shorter side and landscape or
    portrait shapes up to 3:2, smooth colour fields with noise (they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                long_side = int(short_side * rng.uniform(1.0, 1.5))
                w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
                coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
                img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"img{c:02d}_{i:04d}.JPEG", quality=90)
    return root


class OriginalDataset(torch.utils.data.Dataset):
    """The notebooks' dataset: one PIL decode per item, squash-resize, ToTensor."""

    def __init__(self, files: list[tuple[Path, int]], size: int):
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        return self.transform(Image.open(path).convert("RGB")), label


def projected_seed_wall_time(optstate_img_s: float, eval_img_s: float, decode_img_s: float) -> dict:
    """`--preset seed` on this hardware: its run tree's training and evaluation at the measured
    speeds, plus decoding each dataset once into the cache (downloads not counted)."""
    from optstate.data import fetch

    seed = studies.load(None, "seed", [])
    plan = planning.build(seed)
    train = evaluate = decode = 0.0
    epochs = 0
    for entry in seed.datasets:
        archive = fetch.ARCHIVES[entry]
        label = studies.dataset_label(entry)
        n = sum(node.epochs for node in plan.nodes.values() if node.dataset == label)
        epochs += n
        train += n * (archive.train_images // seed.batch_size) * seed.batch_size / optstate_img_s
        evaluate += n * archive.val_images / eval_img_s
        decode += (archive.train_images + archive.val_images) / decode_img_s
    return {"total_s": train + evaluate + decode, "train_s": train, "eval_s": evaluate, "decode_s": decode,
            "epochs": epochs, "batch_size": seed.batch_size, "image_size": seed.image_size, "model": seed.model}


def bench(model_name: str = "resnet50", image_size: int = 128, batch_size: int = 32, steps: int = 10,
          blocks: int = 3, device: str = "auto", precision: str = "auto", compile: bool = False,
          optimizer: str = "adam", data: Path | None = None, log_every: int = 10,
          json_path: Path | None = None, log=print) -> dict:
    from optstate.data import folder
    from optstate.data.batches import Batches, storage_size
    from optstate.train import diagnostics, evaluate, make_optimizer, train_step

    if model_name not in models.names():
        raise UserError(f"--model {model_name!r} is not a torchvision classification model nor one of "
                        f"optstate's ({', '.join(models.OWN_MODELS)})")
    for name, value, low in (("--image-size", image_size, 8), ("--batch-size", batch_size, 2), ("--steps", steps, 1),
                             ("--blocks", blocks, 1), ("--log-every", log_every, 1)):
        if value < low:
            raise UserError(f"--{name.lstrip('-')} must be at least {low}, got {value}")
    rt = Runtime.make(device, precision, compile)
    dev = rt.device
    # The seed study with this bench's shape: its augmentation, normalisation and optimizer settings.
    study = studies.load(None, "seed", [f"batch_size={batch_size}", f"image_size={image_size}",
                                        f'model="{model_name}"', f'optimizer={{ name = "{optimizer}" }}',
                                        f"log_every={log_every}"])
    with tempfile.TemporaryDirectory(prefix="optstate-bench-") as tmp:
        tmp = Path(tmp)
        if data is None:
            per_class = max(32, -(-2 * batch_size // 10))
            root = make_image_folder(tmp / "images", train_per_class=per_class, short_side=round(image_size * 1.25))
            source = f"generated: 10 classes x {per_class} JPEGs, shorter side {round(image_size * 1.25)} px"
        else:
            root = Path(data).expanduser()
            source = str(root)
        classes, files = folder.scan(root)
        if len(files["train"]) < batch_size:
            raise UserError(f"--data {root}: {len(files['train'])} training images, fewer than one batch of {batch_size}")

        # optstate: decode once into the cache (timed: it is part of a study's cost), then batches on the device
        t0 = time.perf_counter()
        images = folder.load(root, "bench", storage_size(image_size, study.augment), study.resize, tmp / "cache", source)
        decode_img_s = (len(files["train"]) + len(files["val"])) / (time.perf_counter() - t0)
        batches = Batches(images, study, image_size, dev)
        n_classes = len(classes)

        models.check_input(models.build(model_name, n_classes), image_size)
        torch.manual_seed(0)
        nets = {k: models.build(model_name, n_classes).to(dev) for k in ("original", "optstate", "bound")}
        nets["original"] = nets["original"].to(memory_format=torch.contiguous_format)
        kernels = kernel_kwargs(studies.optimizer_class(optimizer), studies.optimizer_kwargs(study.optimizer), dev)
        opts = {"original": studies.optimizer_class(optimizer)(nets["original"].parameters(), lr=1e-4)}
        for k in ("optstate", "bound"):
            opts[k] = make_optimizer(nets[k].parameters(), study, 1e-4, kernels)
        forward = {k: torch.compile(nets[k]) if compile else nets[k] for k in ("optstate", "bound")}
        keys: list[str] = []

        loader = torch.utils.data.DataLoader(OriginalDataset(files["train"], image_size), batch_size=batch_size,
                                             shuffle=True, num_workers=0, drop_last=True)
        original_batches = (b for _ in itertools.count() for b in loader)

        def run_original(n: int) -> None:
            model, opt = nets["original"], opts["original"]
            for _ in range(n):
                x, y = next(original_batches)
                x, y = x.to(dev), y.to(dev)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.item()

        epoch = itertools.count()
        optstate_batches = (b for e in epoch for b in batches.train_epoch(torch.Generator().manual_seed(e)))
        first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)

        step = itertools.count()  # one count across blocks: diagnostics every log_every steps, as in a run

        def run_optstate(n: int) -> None:  # the loop of train.train_node, step for step
            nonlocal first_bad, loss_sum, correct
            opt = opts["optstate"]
            for _ in range(n):
                k = next(step)
                x, y = next(optstate_batches)
                logged = k % log_every == 0
                if logged:
                    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
                logits, loss = train_step(forward["optstate"], opt, x, y, rt)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), k, first_bad)
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                if logged:
                    first_bad.item()
                    diagnostics(opt, before, keys)
                    loss.item()

        x_bound = torch.randn(batch_size, 3, image_size, image_size, device=dev).contiguous(
            memory_format=torch.channels_last)
        y_bound = torch.randint(0, n_classes, (batch_size,), device=dev)

        bound_step = itertools.count()

        def run_bound(n: int) -> None:
            for _ in range(n):
                _, loss = train_step(forward["bound"], opts["bound"], x_bound, y_bound, rt)
                if next(bound_step) % log_every == 0:
                    loss.item()

        variants = {"original": run_original, "optstate": run_optstate, "bound": run_bound}

        def timed(name: str, n: int) -> float:
            with _cudnn_benchmark(dev.type == "cuda" and name != "original"):
                _sync(dev)
                t = time.perf_counter()
                variants[name](n)
                _sync(dev)
                return time.perf_counter() - t

        log(f"bench: {model_name} at {image_size}px, batch {batch_size}, {optimizer} on {_device_name(dev)}, "
            f"optstate at {rt.precision}{' compiled' if compile else ''} with "
            f"{', '.join(f'{k}={v}' for k, v in kernels.items()) or 'default kernels'}; images: {source}; "
            f"{blocks} blocks of {steps} steps per variant, alternating")
        for name in variants:  # warm-up: kernels, allocator, optimizer state, compilation
            timed(name, 2 if compile else 1)
        keys = [k for k, v in next(iter(opts["optstate"].state.values())).items() if torch.is_tensor(v) and v.dim() > 0]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for b in range(blocks):
            for name in variants:
                times[name].append(timed(name, steps))
            log(f"  block {b + 1}/{blocks}: " + ", ".join(f"{k} {batch_size * steps / v[-1]:.1f}" for k, v in times.items())
                + " img/s")
        speed = {name: batch_size * steps / statistics.median(t) for name, t in times.items()}

        # evaluation as optstate run does it (inference mode, the run's precision), for the projection
        _sync(dev)
        t = time.perf_counter()
        evaluate(forward["optstate"], nets["optstate"], batches, rt)
        _sync(dev)
        eval_img_s = len(batches.val) / (time.perf_counter() - t)

    projection = projected_seed_wall_time(speed["optstate"], eval_img_s, decode_img_s)
    result = {
        "device": _device_name(dev), "model": model_name, "image_size": image_size, "batch_size": batch_size,
        "optimizer": optimizer, "precision": rt.precision, "compile": compile, "kernels": kernels,
        "steps": steps, "blocks": blocks, "log_every": log_every, "images": source,
        "original_img_s": speed["original"], "optstate_img_s": speed["optstate"], "bound_img_s": speed["bound"],
        "ratio_vs_original": speed["optstate"] / speed["original"], "ratio_vs_bound": speed["optstate"] / speed["bound"],
        "eval_img_s": eval_img_s, "decode_img_s": decode_img_s,
        "seed_preset_projected_s": projection["total_s"], "seed_preset_projection": projection,
        "block_seconds": times, "torch": torch.__version__,
    }
    log(f"  original (PIL per item, fp32, NCHW)  {speed['original']:10.1f} img/s")
    log(f"  optstate (cache, device augment.)    {speed['optstate']:10.1f} img/s   "
        f"{result['ratio_vs_original']:.2f}x original")
    log(f"  bound (the model alone)              {speed['bound']:10.1f} img/s   "
        f"optstate reaches {100 * result['ratio_vs_bound']:.0f}% of it")
    log(f"  evaluation {eval_img_s:.1f} img/s, decoding into the cache {decode_img_s:.0f} img/s")
    p = projection
    log(f"  --preset seed here: about {_duration(p['total_s'])} ({p['epochs']} epochs of {p['model']} at "
        f"{p['image_size']} px: training {_duration(p['train_s'])}, evaluation {_duration(p['eval_s'])}, "
        f"decoding {_duration(p['decode_s'])}; at this bench's batch size {batch_size}, the preset uses "
        f"{p['batch_size']}; downloads not counted)")
    if (model_name, image_size) != (p["model"], p["image_size"]):
        log(f"  (the projection assumes {p['model']} at {p['image_size']} px trains at the speed measured here for "
            f"{model_name} at {image_size} px)")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {json_path}")
    return result


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.machine())
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"

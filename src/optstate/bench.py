"""`optstate bench`: speeds measured side by side in one run, on one model and batch shape.

So far it measures what the optimizer-state diagnostics cost: the model's training
step alone (`bound`: forward, backward, optimizer step on tensors already on the
device) against the same step with the diagnostics that `optstate run` computes at
every logged step (a copy of the weights before the step, the state norms and the
update size after it). The two alternate in blocks so that a machine that speeds
up or slows down during the run affects both alike; each figure is the median block.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optstate import models
from optstate.errors import UserError
from optstate.train import diagnostics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str = "resnet50", image_size: int = 128, batch_size: int = 32, steps: int = 10,
          blocks: int = 3, log_every: int = 10, device: str = "auto", optimizer: str = "adam",
          json_path: Path | None = None, log=print) -> dict:
    from optstate.execute import pick_device
    from optstate.study import optimizer_class

    dev = pick_device(device)
    if model_name not in models.names():
        raise UserError(f"--model {model_name!r} is not a torchvision classification model nor one of "
                        f"optstate's ({', '.join(models.OWN_MODELS)})")
    for name, value, low in (("--image-size", image_size, 8), ("--batch-size", batch_size, 1), ("--steps", steps, 1),
                             ("--blocks", blocks, 1), ("--log-every", log_every, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    torch.manual_seed(0)
    model = models.build(model_name, 10).to(dev)
    models.check_input(model, image_size)
    opt = optimizer_class(optimizer)(model.parameters(), lr=1e-4)
    keys: list[str] = []
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=dev)

    def run(n: int, with_diagnostics: bool) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for k in range(n):
            logged = k % log_every == 0
            if logged and with_diagnostics:
                before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if logged:  # a logged step reads the loss either way, as optstate run does
                if with_diagnostics:
                    diagnostics(opt, before, keys)
                loss.item()
        _sync(dev)
        return time.perf_counter() - t0

    log(f"bench: {model_name} at {image_size}px, batch {batch_size}, {optimizer} on {dev}; "
        f"{blocks} blocks of {steps} steps each, alternating")
    run(2, True)  # warm-up: kernels, allocator, optimizer state
    keys = [k for k, v in next(iter(opt.state.values())).items() if torch.is_tensor(v) and v.dim() > 0]
    times = {"bound": [], "diagnostics": []}
    for _ in range(blocks):
        times["bound"].append(run(steps, False))
        times["diagnostics"].append(run(steps, True))
    bound = batch_size * steps / statistics.median(times["bound"])
    with_diag = batch_size * steps / statistics.median(times["diagnostics"])
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "model": model_name, "image_size": image_size, "batch_size": batch_size, "optimizer": optimizer,
        "steps": steps, "blocks": blocks, "log_every": log_every,
        "bound_img_s": bound, "bound_with_diagnostics_img_s": with_diag,
        "diagnostics_overhead": bound / with_diag - 1,
    }
    log(f"  bound (model alone)           {bound:10.1f} img/s")
    log(f"  bound + state diagnostics     {with_diag:10.1f} img/s  (every {log_every} steps)")
    log(f"  diagnostics overhead          {100 * result['diagnostics_overhead']:+10.2f} %")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {json_path}")
    return result

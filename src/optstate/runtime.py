"""How the training step runs on this machine: device, precision, optimizer kernels, compile.

None of this is part of a study: the same study runs on a laptop or an H200. Each
choice is the fastest one the hardware supports unless the user says otherwise:
- precision `auto`: bf16 autocast on CUDA devices with bf16, and on CPUs whose
  oneDNN has native bf16 (AVX512-BF16 or AMX); elsewhere fp32, because emulated
  bf16 is several times slower than fp32 (measured: 10x on a 2-core AVX2 EPYC);
- optimizer kernels: `fused=True` where the optimizer class and device have a
  fused kernel, else `foreach=True`; a study that sets either key keeps its own;
- `compile`: torch.compile of the model (the checkpoint still holds the plain module).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from optstate.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to PyTorch on this machine")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix maths runs natively here (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def kernel_kwargs(cls: type, user: dict, device: torch.device) -> dict:
    """fused=True or foreach=True for this optimizer class on this device, unless the study chose."""
    if "fused" in user or "foreach" in user or user.get("differentiable"):
        return {}
    accepted = inspect.signature(cls.__init__).parameters
    probe = torch.zeros(2, device=device, requires_grad=True)
    for kwargs in ({"fused": True}, {"foreach": True}):
        if next(iter(kwargs)) not in accepted:
            continue
        try:  # the class decides whether it has the kernel for this device and these options
            opt = cls([probe], lr=1e-3, **user, **kwargs)
            probe.grad = torch.zeros_like(probe)
            opt.step()
        except Exception:  # noqa: BLE001 - torch answers with RuntimeError, AssertionError, ...; the study's
            continue  # own options are checked, with a clear message, before training
        return kwargs
    return {}


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to CUDA through pinned memory in chunks, so that a
    memory-mapped split never needs a second full copy in host memory."""
    if device.type != "cuda":
        return x.to(device)
    out = torch.empty(x.shape, dtype=x.dtype, device=device)
    rows = max(1, (256 << 20) // max(1, x[:1].numel() * x.element_size()))
    for i in range(0, len(x), rows):
        out[i:i + rows].copy_(x[i:i + rows].pin_memory(), non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the pinned chunk must outlive its copy
    return out


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"  # resolved: fp32 or bf16
    compile: bool = False

    @classmethod
    def make(cls, device: str = "auto", precision: str = "auto", compile: bool = False) -> "Runtime":
        dev = pick_device(device)
        return cls(dev, resolve_precision(precision, dev), compile)

    def autocast(self):
        """The context a forward pass runs in."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "compile": self.compile}

"""Batches for training and evaluation, cut from uint8 tensors held on the device.

As in airbench, the whole split lives on the training device as uint8 and
augmentation is done per batch with tensor ops: a random resized crop is one
`roi_align` call over the batch (one box per image), a flip is one `where`.
Random draws come from a CPU generator that the caller seeds per epoch, so a
batch depends only on (seed, dataset, global epoch), never on earlier work.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torchvision.ops import roi_align

from optstate.data.images import ImageData, Split
from optstate.runtime import to_device

CENTER_CROP = 0.875  # validation sees the centre 87.5%, the usual ImageNet ratio


def storage_size(image_size: int, augment: str) -> int:
    """Images are kept a little larger than they are trained at when crops are random."""
    return round(image_size / CENTER_CROP) if augment == "standard" else image_size


def crop_boxes(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes for n square images of side `size`, as [n, 4] (x1, y1, x2, y2).

    Same distribution as torchvision.transforms.RandomResizedCrop.get_params:
    10 tries of (area, log-uniform aspect ratio), the first that fits wins,
    else the whole image (the fallback for a square image within the ratio range).
    """
    tries = 10
    area = size * size * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((n,), float(size)))
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((n,), float(size)))
    u = torch.rand(n, 2, generator=generator)
    # randint(0, size - h + 1) for the top and likewise for the left edge
    top = torch.floor(u[:, 0] * (size - h + 1))
    left = torch.floor(u[:, 1] * (size - w + 1))
    return torch.stack([left, top, left + w, top + h], 1)


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images in [0, 1], in chunks (a float copy of a
    whole split would take gigabytes)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.pow_(2).sum(dim=(0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (squares / n - mean**2).clamp(min=1e-6).sqrt()
    return mean, std


class Batches:
    """Serves one dataset's batches for one study on one device."""

    def __init__(self, data: ImageData, study, image_size: int, device: torch.device):
        self.device = device
        self.image_size = image_size
        self.augment = study.augment
        self.scale = tuple(study.crop_scale)
        self.batch_size = study.batch_size
        self.train = Split(to_device(data.train.images, device), data.train.labels.to(device))
        self.val = Split(to_device(data.val.images, device), data.val.labels.to(device))
        c = data.channels
        if study.normalize:
            mean, std = channel_stats(data.train.images)
        else:
            mean, std = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        self.mean = (mean * 255).float().view(1, c, 1, 1).to(device)
        self.std = (std * 255).float().view(1, c, 1, 1).to(device)

    @property
    def steps_per_epoch(self) -> int:
        # the last partial batch is dropped: BatchNorm cannot train on a batch of one
        return max(1, len(self.train) // self.batch_size)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if x.shape[1] == 1:  # grayscale: every torchvision model takes three channels
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last)

    def _draws(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An epoch's random choices, drawn on the CPU batch by batch: image order, crop boxes, flips."""
        n, steps = len(self.train), self.steps_per_epoch
        bs = min(self.batch_size, n)
        order = torch.randperm(n, generator=generator)[:steps * bs]
        boxes = torch.zeros(steps, bs, 4)
        flips = torch.zeros(steps, bs, dtype=torch.bool)
        for i in range(steps):
            if self.augment == "standard":
                boxes[i] = crop_boxes(bs, self.train.images.shape[-1], self.scale, (3 / 4, 4 / 3), generator)
            if self.augment in ("standard", "flip"):
                flips[i] = torch.rand(bs, generator=generator) < 0.5
        return order.view(steps, bs), boxes, flips

    def train_epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One host-to-device copy per epoch (pinned, asynchronous on CUDA), none per step.
        order, boxes, flips = (t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda"
                               else t for t in self._draws(generator))
        image = torch.arange(order.shape[1], device=self.device, dtype=torch.float32).unsqueeze(1)
        for i in range(len(order)):
            x = self.train.images[order[i]].float()
            if self.augment == "standard":
                x = roi_align(x, torch.cat([image, boxes[i]], 1), self.image_size, spatial_scale=1.0,
                              sampling_ratio=0, aligned=True)
            if self.augment in ("standard", "flip"):
                x = torch.where(flips[i].view(-1, 1, 1, 1), x.flip(3), x)
            yield self._finish(x), self.train.labels[order[i]]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size * 2
        for i in range(0, len(self.val), bs):
            x = self.val.images[i:i + bs]
            if self.augment == "standard":
                o = (x.shape[-1] - self.image_size) // 2
                x = x[..., o:o + self.image_size, o:o + self.image_size]
            yield self._finish(x.float()), self.val.labels[i:i + bs]

"""A dataset as the training loop sees it: uint8 image tensors and int64 labels."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int, seed: int = 0) -> "Split":
        """A fixed random subset of n images (n=0: all), the same in every run."""
        if n <= 0 or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return Split(self.images[idx], self.labels[idx])


@dataclass
class ImageData:
    name: str  # label in the output tree
    classes: list[str]  # index = position in sorted order, same for both splits
    train: Split
    val: Split
    source: str  # where it came from, for the report
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded, relative to the folder
    files: int = 0  # image files found in the folder, decoded or not (0: not read from a folder)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

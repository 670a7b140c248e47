"""Fashion-MNIST in its original IDX files: the embedded 10k pair and the full set."""
from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from optstate.data.images import ImageData, Split
from optstate.errors import UserError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_VAL_FRACTION = 0.2


def _read(raw: bytes, magic: int, name: str) -> np.ndarray:
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise UserError(f"{name} is not an IDX file (bad magic number)")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{name} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def read_pair(images_gz: bytes, labels_gz: bytes, name: str) -> Split:
    try:
        x = _read(gzip.decompress(images_gz), 0x00000803, f"{name} images")
        y = _read(gzip.decompress(labels_gz), 0x00000801, f"{name} labels")
    except (OSError, EOFError) as e:
        raise UserError(f"{name}: not a readable gzip file ({e})") from None
    if len(x) != len(y):
        raise UserError(f"{name}: {len(x)} images but {len(y)} labels")
    if x.ndim != 3 or len(y) == 0 or int(y.max()) >= len(CLASSES):
        raise UserError(f"{name}: not Fashion-MNIST (expected N x 28 x 28 images and labels 0-9)")
    return Split(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))


def stratified_split(split: Split, val_fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """Deterministic: a fixed permutation per class, the first share of each class goes to val."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in split.labels.unique(sorted=True):
        idx = (split.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * val_fraction)
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return Split(split.images[tr], split.labels[tr]), Split(split.images[va], split.labels[va])


def embedded() -> ImageData:
    """The t10k pair shipped in the package, split 80/20 into train and validation."""
    pkg = resources.files("optstate.data.embedded")
    whole = read_pair(pkg.joinpath(FILES["test"][0]).read_bytes(), pkg.joinpath(FILES["test"][1]).read_bytes(),
                      "embedded Fashion-MNIST")
    train, val = stratified_split(whole, EMBEDDED_VAL_FRACTION)
    return ImageData("fashion-mnist-embedded", list(CLASSES), train, val,
                     "Fashion-MNIST t10k (embedded), stratified 80/20 train/validation split")


def has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FILES.values() for f in pair)


def full(folder: Path, label: str = "fashion-mnist") -> ImageData:
    """All 60,000 training images; the 10,000 test images serve as validation."""
    def pair(kind: str) -> Split:
        xi, yi = FILES[kind]
        return read_pair((folder / xi).read_bytes(), (folder / yi).read_bytes(), str(folder / xi))

    return ImageData(label, list(CLASSES), pair("train"), pair("test"),
                     f"Fashion-MNIST from {folder} (train 60k; t10k as validation)")

"""Where a study's images come from: names and folders -> ImageData.

Dataset entries in a study:
- `fashion-mnist-embedded`: the 10k Fashion-MNIST pair shipped in the package;
- `fashion-mnist`: the full set, from <data root>/fashion-mnist or Debian's folder;
- `imagenette-160|320`, `imagenette`, `imagewoof-160|320`, `imagewoof`: fetched and verified;
- a path (contains `/`): a folder with train/<class>/ and val/<class>/, or the four
  Fashion-MNIST IDX files.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from optstate.data import fetch, folder, idx
from optstate.data.batches import storage_size
from optstate.data.images import ImageData, Split
from optstate.errors import UserError
from optstate.study import dataset_label

NAMED = ("fashion-mnist-embedded", "fashion-mnist", *sorted(fetch.ARCHIVES))


def data_root(arg: str | None = None) -> Path:
    """--data-root, else $OPTSTATE_DATA, else the user's cache folder."""
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("OPTSTATE_DATA"):
        return Path(os.environ["OPTSTATE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "optstate"


def check_entry(entry: str) -> None:
    if "/" not in entry and entry not in NAMED:
        raise UserError(f"study: `datasets` has {entry!r}, which is neither a known dataset "
                        f"({', '.join(NAMED)}) nor a folder path (a path contains '/', e.g. ./mydata)")


def default_image_size(entry: str) -> int:
    if entry.startswith("fashion-mnist"):
        return 28
    if entry in fetch.ARCHIVES:
        return 128 if entry.endswith("-160") else 224
    return 128


def _resize(split: Split, size: int) -> Split:
    if split.images.shape[-1] == size and split.images.shape[-2] == size:
        return split
    x = F.interpolate(split.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return Split(x.round_().clamp_(0, 255).to(torch.uint8), split.labels)


def load(entry: str, study, root: Path, download: bool = True, mirror: str | None = None) -> ImageData:
    """The dataset named by a study entry, decoded at the study's storage size."""
    check_entry(entry)
    label = dataset_label(entry)
    store = storage_size(resolved_image_size(entry, study), study.augment)
    if entry == "fashion-mnist-embedded":
        data = idx.embedded()
    elif entry == "fashion-mnist":
        for d in (root / "fashion-mnist", idx.DEBIAN_DIR):
            if idx.has_files(d):
                data = idx.full(d)
                break
        else:
            raise UserError(f"fashion-mnist is missing: its four IDX .gz files are in neither {root / 'fashion-mnist'} "
                            f"nor {idx.DEBIAN_DIR}; place them there (or `apt install dataset-fashion-mnist`)")
    elif entry in fetch.ARCHIVES:
        archive = fetch.ARCHIVES[entry]
        path = fetch.fetch(archive, root, mirror=mirror, download_ok=download)
        data = folder.load(path, label, store, study.resize, root / "cache", f"{archive.folder} ({path})")
    else:
        path = Path(entry).expanduser()
        if not path.exists():
            raise UserError(f"dataset folder {path} does not exist (from `datasets` in the study)")
        if idx.has_files(path):
            data = idx.full(path, label)
        elif path.is_dir() and (path / "train").is_dir():
            data = folder.load(path, label, store, study.resize, root / "cache", str(path))
        else:
            raise UserError(f"dataset folder {path} holds neither train/<class>/ and val/<class>/ folders "
                            f"nor the four Fashion-MNIST IDX files")
    data.train = _resize(data.train.take(study.train_images, seed=1), store)
    data.val = _resize(data.val.take(study.val_images, seed=2), store)
    return data


def resolved_image_size(entry: str, study) -> int:
    return study.image_size if study.image_size != "auto" else default_image_size(entry)

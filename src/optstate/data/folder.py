"""Image folders (`train/<class>/`, `val/<class>/`): scan, check, decode once, cache.

Labels come from the sorted class names, one mapping for both splits. The
same image bytes in both splits (the original study's bug in another form)
are refused. Decoded images are cached as uint8 .npy files under the data
root, keyed by the files' names, sizes and modification times.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from optstate.data.images import ImageData, Split
from optstate.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 1


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and (file, label) lists per split; refuses a layout it cannot trust."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    found = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise UserError(f"{root} has no {split}/ folder; expected {root}/train/<class>/ and {root}/val/<class>/")
        found[split] = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found[split]:
            raise UserError(f"{d} has no class folders; expected {d}/<class>/<image files>")
    if found["train"] != found["val"]:
        only_t = sorted(set(found["train"]) - set(found["val"]))
        only_v = sorted(set(found["val"]) - set(found["train"]))
        raise UserError(f"{root}: train/ and val/ have different classes (only in train: {only_t}; only in val: {only_v})")
    classes = found["train"]
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "val"):
        files[split] = []
        for label, c in enumerate(classes):
            imgs = sorted(p for p in (root / split / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not imgs:
                raise UserError(f"{root / split / c} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            files[split] += [(p, label) for p in imgs]
    return classes, files


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def check_overlap(root: Path, files: dict[str, list[tuple[Path, int]]]) -> None:
    """Refuse a dataset whose validation split holds images that are also in training."""
    train = {}
    for p, _ in files["train"]:
        train.setdefault(_digest(p), p)
    both = [(train[h], p) for p, _ in files["val"] if (h := _digest(p)) in train]
    if both:
        shown = "; ".join(f"{t.relative_to(root)} = {v.relative_to(root)}" for t, v in both[:5])
        more = f" and {len(both) - 5} more" if len(both) > 5 else ""
        raise UserError(f"{root}: {len(both)} validation image(s) are byte-for-byte copies of training images "
                        f"({shown}{more}); validation must never see training images, remove them from one split")


def decode(path: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 [3, size, size]: shorter side to size and centre crop, or squash."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if mode == "squash":
                im = im.resize((size, size), Image.BILINEAR)
            else:
                w, h = im.size
                s = size / min(w, h)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except OSError as e:
        raise UserError(f"cannot decode {path}: {e}") from None


def _decode_job(args: tuple[str, int, str]) -> np.ndarray:
    return decode(Path(args[0]), args[1], args[2])


def _cache_key(files: dict[str, list[tuple[Path, int]]], size: int, mode: str) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}:{size}:{mode}".encode())
    for split in ("train", "val"):
        for p, label in files[split]:
            st = p.stat()
            h.update(f"{split}:{p}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int, mode: str, desc: str) -> np.ndarray:
    out = np.empty((len(paths), 3, size, size), np.uint8)
    jobs = [(str(p), size, mode) for p in paths]
    workers = min(os.cpu_count() or 1, 16)
    if len(jobs) < 256 or workers == 1:
        it = map(_decode_job, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers)
        it = pool.map(_decode_job, jobs, chunksize=64)
    try:
        for i, arr in enumerate(tqdm(it, total=len(jobs), desc=desc, unit="img", leave=False)):
            out[i] = arr
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return out


def load(root: Path, label: str, size: int, mode: str, cache_dir: Path, source: str) -> ImageData:
    classes, files = scan(root)
    key = _cache_key(files, size, mode)
    splits = {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {s: cache_dir / f"{label}-{s}-{mode}{size}-{key}.npy" for s in ("train", "val")}
    if not all(p.exists() for p in paths.values()):
        check_overlap(root, files)
        for split in ("train", "val"):
            arr = _decode_all([p for p, _ in files[split]], size, mode, f"decode {label} {split}")
            tmp = paths[split].with_suffix(".tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, paths[split])
    for split in ("train", "val"):
        images = torch.from_numpy(np.load(paths[split]))
        labels = torch.tensor([lab for _, lab in files[split]], dtype=torch.int64)
        splits[split] = Split(images, labels)
    return ImageData(label, classes, splits["train"], splits["val"], source)

"""Image folders (`train/<class>/`, `val/<class>/`): scan, check, decode once, cache.

Labels come from the sorted class names, one mapping for both splits. The
same image bytes in both splits (the original study's bug in another form)
are refused. Each (folder, resolution) is decoded once, in parallel, into a
memory-mapped uint8 cache under the data root, keyed by the files' names, sizes
and modification times, so any change to the folder rebuilds it. Files that
cannot be decoded are left out and listed (the report names them).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from optstate.data.images import ImageData, Split
from optstate.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 2


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


def decode(path: Path, size: int, mode: str) -> np.ndarray | None:
    """One image as uint8 [3, size, size]: shorter side to size and centre crop, or squash.
    None when the file cannot be decoded (truncated, not an image, too large)."""
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
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None


def _decode_job(args: tuple[str, int, str]) -> np.ndarray | None:
    return decode(Path(args[0]), args[1], args[2])


def _cache_key(files: dict[str, list[tuple[Path, int]]], size: int, mode: str) -> str:
    """Changes when any file is added, removed, renamed, relabelled, rewritten or touched."""
    h = hashlib.sha1(f"v{CACHE_VERSION}:{size}:{mode}".encode())
    for split in ("train", "val"):
        for p, label in files[split]:
            st = p.stat()
            h.update(f"{split}:{p}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _reserved_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy array mapped for writing, its disk blocks reserved first: writing a full disk through
    a map of a sparse file ends in SIGBUS, while reserving raises a plain OSError(ENOSPC)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            del array
            os.close(fd)
            fd = -1
            path.unlink(missing_ok=True)
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
        # a file system without fallocate: write through the map as before
    finally:
        if fd >= 0:
            os.close(fd)
    return array


def _decode_split(files: list[tuple[Path, int]], size: int, mode: str, dest: Path, desc: str) -> list[Path]:
    """Decode a split into dest/<name>.npy (images) and <name>-labels.npy, in parallel; returns the
    files that could not be decoded, which are left out of both arrays."""
    n = len(files)
    images = _reserved_memmap(dest.with_suffix(".npy"), (n, 3, size, size))
    jobs = [(str(p), size, mode) for p, _ in files]
    workers = min(os.cpu_count() or 1, 16)
    pool = ProcessPoolExecutor(workers) if n >= 256 and workers > 1 else None
    results = pool.map(_decode_job, jobs, chunksize=64) if pool else map(_decode_job, jobs)
    ok = np.zeros(n, bool)
    try:
        for i, arr in enumerate(tqdm(results, total=n, desc=desc, unit="img", leave=False)):
            if arr is not None:
                images[i], ok[i] = arr, True
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if not ok.all():  # compact: the cache holds only the images that decoded
        kept = np.flatnonzero(ok)
        compact = _reserved_memmap(dest.with_suffix(".tmp.npy"), (len(kept), 3, size, size))
        for j in range(0, len(kept), 1024):
            compact[j:j + 1024] = images[kept[j:j + 1024]]
        compact.flush()
        del images, compact
        os.replace(dest.with_suffix(".tmp.npy"), dest.with_suffix(".npy"))
    else:
        images.flush()
        del images
    labels = np.array([lab for (_, lab), good in zip(files, ok) if good], np.int64)
    np.save(dest.parent / f"{dest.name}-labels.npy", labels)
    return [p for (p, _), good in zip(files, ok) if not good]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(root: Path, label: str, size: int, mode: str, cache_dir: Path, source: str) -> ImageData:
    """The folder's images decoded once into a memory-mapped uint8 cache, reused while the folder is unchanged."""
    classes, files = scan(root)
    prefix = f"{label}-{mode}{size}-"
    cache = cache_dir / (prefix + _cache_key(files, size, mode))
    if not (cache / "skipped.json").exists():
        check_overlap(root, files)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_dir / f".{cache.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        skipped = []
        try:
            for split in ("train", "val"):
                skipped += _decode_split(files[split], size, mode, partial / split, f"decode {label} {split}")
            names = [str(p.relative_to(root)) for p in skipped]
            for split in ("train", "val"):
                if np.load(partial / f"{split}-labels.npy").size == 0:
                    raise UserError(f"{root / split}: none of its {len(files[split])} images could be decoded")
            (partial / "skipped.json").write_text(json.dumps(names, indent=0) + "\n")
        except BaseException:  # a full disk, Ctrl-C, a refused folder: no half cache left behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(partial, cache)  # the cache appears whole or not at all
        for old in cache_dir.glob(prefix + "*"):  # earlier versions of this folder's cache
            if old != cache:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        for old in cache_dir.glob(f".{prefix}*.partial-*"):  # left by a decoder that died
            if not _alive(int(old.name.rsplit("-", 1)[1])):
                shutil.rmtree(old, ignore_errors=True)
    splits = {}
    for split in ("train", "val"):
        # copy-on-write map: pages are read from disk when used, and nothing is written back
        images = torch.from_numpy(np.load(cache / f"{split}.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(cache / f"{split}-labels.npy"))
        splits[split] = Split(images, labels)
    skipped = json.loads((cache / "skipped.json").read_text())
    return ImageData(label, classes, splits["train"], splits["val"], source, skipped,
                     len(files["train"]) + len(files["val"]))

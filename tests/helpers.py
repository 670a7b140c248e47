"""Small image folders and archives with the real datasets' layout, made on the spot."""
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size=(20, 16), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, classes, per_class=(3, 2), ext=".JPEG", start=0) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, every image distinct."""
    seed = start
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                (d / f"{c}_{i}{ext}").write_bytes(image_bytes(seed))
    return root


def make_tgz(path: Path, top: str, classes, per_class=(3, 2), extra=()) -> str:
    """An Imagenette-like .tgz; `extra` adds (member name, bytes) pairs. Returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        seed = 0
        for split, n in zip(("train", "val"), per_class):
            for c in classes:
                for i in range(n):
                    seed += 1
                    add(f"{top}/{split}/{c}/{c}_{i}.JPEG", image_bytes(seed))
        add(f"{top}/noisy_imagenette.csv", b"path,noisy_labels_0,is_valid\n")
        for name, data in extra:
            add(name, data)
    return hashlib.md5(path.read_bytes()).hexdigest()

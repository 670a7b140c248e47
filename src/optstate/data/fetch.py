"""Download, verify and safely extract the fast.ai Imagenette/Imagewoof archives."""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from optstate.errors import UserError

DEFAULT_HOST = "https://s3.amazonaws.com/fast-ai-imageclas/"


@dataclass(frozen=True)
class Archive:
    """One published archive and what a correct copy of it looks like."""

    dataset: str  # e.g. "imagenette-160"
    filename: str  # e.g. "imagenette2-160.tgz"
    folder: str  # top folder inside the archive, e.g. "imagenette2-160"
    md5s: tuple[str, ...]  # every checksum in circulation (the archives were re-uploaded)
    classes: tuple[str, ...]
    train_images: int
    val_images: int

    @property
    def fetch_command(self) -> str:
        name, _, size = self.dataset.partition("-")
        return f"optstate data fetch {name} --size {size or 'full'}"


IMAGENETTE_CLASSES = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)
IMAGEWOOF_CLASSES = (
    "n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
    "n02096294", "n02099601", "n02105641", "n02111889", "n02115641",
)

ARCHIVES: dict[str, Archive] = {}
for _size, _suffix, _nette, _woof in (
    ("full", "", ("2c774ecb40005b35d7937d50f5d42336", "fe2fc210e6bb7c5664d602c3cd71e612"),
     ("2cc1c1e36e20cb6fd24ffb978edcb487",)),
    ("320", "-320", ("1f1f74f133caff120e575856659b87a2", "3df6f0d01a2c9592104656642f5e78a3"),
     ("7a1fd92672a559a85de76e4810a20c21",)),
    ("160", "-160", ("c475f8f7617a200ba35b9facc48443c3", "e793b78cc4c9e9a4ccc0c1155377a412"),
     ("3559b194123981a540b87132dbda412f", "3d200a7be99704a0d7509be2a9fbfe15", "fcd23cc7dfce8837c95a8f9d63a128b7")),
):
    _name = "" if _size == "full" else f"-{_size}"
    ARCHIVES[f"imagenette{_name}"] = Archive(
        f"imagenette{_name}", f"imagenette2{_suffix}.tgz", f"imagenette2{_suffix}", _nette, IMAGENETTE_CLASSES, 9469, 3925)
    ARCHIVES[f"imagewoof{_name}"] = Archive(
        f"imagewoof{_name}", f"imagewoof2{_suffix}.tgz", f"imagewoof2{_suffix}", _woof, IMAGEWOOF_CLASSES, 9025, 3929)


def archive_for(name: str, size: str | None = None) -> Archive:
    """`imagenette` + size 160, or `imagenette-160` alone."""
    key = name if size in (None, "full") else f"{name}-{size}"
    if key not in ARCHIVES:
        raise UserError(f"no archive named {key!r}; known: {', '.join(sorted(ARCHIVES))}")
    return ARCHIVES[key]


def mirror_url(archive: Archive, mirror: str | None) -> str:
    host = mirror or os.environ.get("OPTSTATE_MIRROR") or DEFAULT_HOST
    return host.rstrip("/") + "/" + archive.filename


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, timeout: float = 30) -> None:
    """Stream url to dest with a progress bar; a partial file never takes dest's name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    got, total = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got != total:
                raise http.client.IncompleteRead(b"", total - got)
    except http.client.IncompleteRead:
        part.unlink(missing_ok=True)
        raise UserError(f"could not download {url}: the connection ended after {got} of {total} bytes; the "
                        f"partial file was deleted, try again") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk, not the download: the command line says so
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url}: {reason}") from None
    part.replace(dest)


def check_members(tar: tarfile.TarFile, archive_name: str) -> list[tarfile.TarInfo]:
    """Refuse any member that could land outside the target folder."""
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in (p.parts[0] if p.parts else ""):
            raise UserError(f"refusing {archive_name}: member {m.name!r} would be extracted outside the target folder")
        if not (m.isfile() or m.isdir()):
            raise UserError(f"refusing {archive_name}: member {m.name!r} is a link or special file")
    return members


def extract(path: Path, dest: Path) -> None:
    """Extract a .tgz into dest through a temporary folder, so a failure leaves nothing half-done."""
    tmp = dest / f".extract-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = check_members(tar, path.name)
            for m in tqdm(members, desc=f"extract {path.name}", unit="file", leave=False):
                try:
                    tar.extract(m, tmp, filter="data")
                except TypeError:  # Python < 3.11.4 has no filters; check_members already vetted m
                    tar.extract(m, tmp)
        for top in tmp.iterdir():
            target = dest / top.name
            if target.exists():
                shutil.rmtree(target)
            top.replace(target)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # a cut-off or damaged gzip stream too
        raise UserError(f"{path} is not a readable archive ({type(e).__name__}: {e}); delete it and fetch "
                        f"again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_layout(root: Path, archive: Archive) -> None:
    """Class folders and image counts as published; a short or odd folder is refused."""
    for split, expected in (("train", archive.train_images), ("val", archive.val_images)):
        d = root / split
        if not d.is_dir():
            raise UserError(f"{root} has no {split}/ folder: not an extracted {archive.filename}")
        classes = tuple(sorted(p.name for p in d.iterdir() if p.is_dir()))
        if classes != tuple(sorted(archive.classes)):
            raise UserError(f"{d} has class folders {list(classes)}, expected {list(archive.classes)}")
        n = sum(1 for c in d.iterdir() if c.is_dir() for f in c.iterdir() if f.is_file())
        if n != expected:
            raise UserError(f"{d} holds {n} images, expected {expected}: the copy is incomplete or altered "
                            f"(delete {root} and fetch again)")


def fetch(archive: Archive, data_root: Path, mirror: str | None = None, download_ok: bool = True,
          accept_md5: str | None = None) -> Path:
    """The extracted dataset folder under data_root, downloading it if needed. accept_md5 (or
    $OPTSTATE_ACCEPT_MD5): one more checksum to trust, for an archive re-uploaded since this release."""
    accept_md5 = (accept_md5 or os.environ.get("OPTSTATE_ACCEPT_MD5") or "").strip().lower() or None
    root = data_root / archive.folder
    marker = root / ".optstate-verified"
    if marker.exists():
        return root
    if root.is_dir():  # placed by hand, or extracted by another tool
        check_layout(root, archive)
        marker.touch()
        return root
    tgz = data_root / "downloads" / archive.filename
    bad = tgz.with_name(tgz.name + ".bad")
    if not tgz.exists() and accept_md5 and bad.exists():  # refused before; now accepted deliberately
        bad.replace(tgz)
    if not tgz.exists():
        url = mirror_url(archive, mirror)
        if not download_ok:
            raise UserError(f"{archive.dataset} is missing: no folder {root}. Run `{archive.fetch_command}` "
                            f"(add --data-root {data_root} if that is not your default), or download {url} "
                            f"and extract it under {data_root}.")
        try:
            download(url, tgz)
        except UserError as e:
            raise UserError(f"{archive.dataset} is missing and could not be downloaded ({e}). Download {url} "
                            f"on a machine with internet and extract it under {data_root} "
                            f"(or place the .tgz in {tgz.parent}), or set --mirror / OPTSTATE_MIRROR.") from None
    digest = md5_of(tgz)
    if digest not in archive.md5s and digest != accept_md5:
        tgz.replace(bad)
        raise UserError(f"{tgz.name}: md5 {digest} matches none of the published checksums "
                        f"({', '.join(archive.md5s)}"
                        + (f", nor the accepted {accept_md5}" if accept_md5 else "") + f"); kept as {bad} and "
                        f"not extracted. A truncated or damaged download: fetch it again. An archive re-uploaded "
                        f"since this release of optstate, from a source you trust: accept it deliberately with "
                        f"`{archive.fetch_command} --accept-md5 {digest}` (its classes and image counts are still "
                        f"checked).")
    extract(tgz, data_root)
    if not root.is_dir():
        raise UserError(f"{tgz.name} did not contain the folder {archive.folder}/")
    check_layout(root, archive)
    marker.touch()
    tgz.unlink()  # the extracted, verified folder is what we keep
    return root

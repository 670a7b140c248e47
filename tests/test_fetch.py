"""The download path, end to end, against small Imagenette-like archives served on 127.0.0.1."""
import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import make_tgz
from optstate.cli import main
from optstate.data import fetch

CLASSES = fetch.IMAGENETTE_CLASSES


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture
def small_archive(monkeypatch):
    """Make `imagenette-160` expect a small archive: the test's own checksum and counts."""
    def use(md5):
        real = fetch.ARCHIVES["imagenette-160"]
        monkeypatch.setitem(fetch.ARCHIVES, "imagenette-160", fetch.Archive(
            real.dataset, real.filename, real.folder, (md5,), real.classes, 3 * len(CLASSES), 2 * len(CLASSES)))
    return use


def test_fetch_downloads_verifies_and_extracts(tmp_path, server, small_archive, capsys):
    www, url = server
    small_archive(make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES))
    root = tmp_path / "root"
    assert main(["data", "fetch", "imagenette", "--size", "160", "--data-root", str(root), "--mirror", url]) == 0
    folder = root / "imagenette2-160"
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(CLASSES)
    assert len(list((folder / "val").rglob("*.JPEG"))) == 20
    assert not (root / "downloads" / "imagenette2-160.tgz").exists()
    assert "verified" in capsys.readouterr().out
    # a second fetch finds the verified folder and downloads nothing
    (www / "imagenette2-160.tgz").unlink()
    assert main(["data", "fetch", "imagenette", "--size", "160", "--data-root", str(root), "--mirror", url]) == 0


def test_checksum_mismatch_is_refused(tmp_path, server, small_archive, capsys):
    www, url = server
    make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES)
    small_archive("0" * 32)
    root = tmp_path / "root"
    assert main(["data", "fetch", "imagenette", "--data-root", str(root), "--mirror", url]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and "matches none of the published checksums" in err and "Traceback" not in err
    assert not (root / "imagenette2-160").exists()


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/optstate-absolute-member.txt", "imagenette2-160/../../x"])
def test_members_outside_the_target_are_refused(tmp_path, server, small_archive, capsys, evil):
    www, url = server
    small_archive(make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES, extra=[(evil, b"gotcha")]))
    root = tmp_path / "root"
    assert main(["data", "fetch", "imagenette", "--data-root", str(root), "--mirror", url]) == 2
    assert "outside the target folder" in capsys.readouterr().err
    assert not (root / "imagenette2-160").exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/optstate-absolute-member.txt").exists()


def test_a_symlink_member_is_refused(tmp_path):
    import io
    import tarfile

    path = tmp_path / "a.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("imagenette2-160/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO())
    with pytest.raises(fetch.UserError, match="link or special file"):
        fetch.extract(path, tmp_path / "out")


def test_incomplete_folder_is_refused(tmp_path, small_archive):
    from helpers import make_folder

    small_archive("x")
    root = tmp_path / "root"
    make_folder(root / "imagenette2-160", CLASSES, per_class=(3, 1))
    with pytest.raises(fetch.UserError, match="holds 10 images, expected 20"):
        fetch.fetch(fetch.ARCHIVES["imagenette-160"], root, download_ok=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_seed_preset_without_data_or_network_fails_fast_with_one_sentence(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "OPTSTATE_DATA": str(tmp_path / "empty"), "OPTSTATE_MIRROR": f"http://127.0.0.1:{_closed_port()}/"}
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "optstate", "run", "--preset", "seed", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert time.time() - t < 60
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("optstate: error:")]
    assert len(lines) == 1
    assert "imagenette-160 is missing" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "imagenette2-160.tgz" in lines[0]

    p = subprocess.run([sys.executable, "-m", "optstate", "run", "--preset", "seed", "--no-download",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "imagenette-160 is missing" in p.stderr and "optstate data fetch imagenette --size 160" in p.stderr


def test_a_study_fetches_its_dataset_and_trains_on_it(tmp_path, server, small_archive, capsys):
    www, url = server
    small_archive(make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES))
    out = tmp_path / "out"
    code = main(["run", "--preset", "smoke", "--set", 'datasets=["imagenette-160"]', "--set", "image_size=32",
                 "--set", 'augment="standard"', "--set", "train_images=0", "--set", "val_images=0",
                 "--set", "batch_size=5", "--set", 'arms=["onecycle/new", "onecycle/keep"]',
                 "--mirror", url, "--data-root", str(tmp_path / "root"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for arm in ("onecycle-new", "onecycle-keep"):
        rows = (out / "runs" / "imagenette-160" / arm / "seed0" / "epochs.csv").read_text().splitlines()
        assert len(rows) == 4  # header + three sessions of one epoch
    assert (out / "figures" / "imagenette-160-curves.png").is_file()


def test_a_truncated_download_is_refused_and_leaves_no_partial_file(tmp_path, small_archive, capsys):
    """The server promises the whole archive and closes the connection half way."""
    tgz = tmp_path / "whole.tgz"
    small_archive(make_tgz(tgz, "imagenette2-160", CLASSES))
    body = tgz.read_bytes()

    class HalfWay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfWay)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    root = tmp_path / "root"
    try:
        code = main(["data", "fetch", "imagenette", "--data-root", str(root),
                     "--mirror", f"http://127.0.0.1:{httpd.server_address[1]}/"])
    finally:
        httpd.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"the connection ended after {len(body) // 2} of {len(body)} bytes" in err
    assert not list((root / "downloads").iterdir()) and not (root / "imagenette2-160").exists()


def test_a_hard_link_member_pointing_outside_is_refused_and_nothing_is_written(tmp_path, server, small_archive, capsys):
    import io
    import tarfile

    www, url = server
    outside = tmp_path / "victim.txt"
    outside.write_text("precious")
    tgz = www / "imagenette2-160.tgz"
    make_tgz(tgz, "imagenette2-160", CLASSES)
    with tarfile.open(tgz, "r:gz") as src:  # the same archive with a hard link to a file outside
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    with tarfile.open(tgz, "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        link = tarfile.TarInfo("imagenette2-160/train/evil")
        link.type, link.linkname = tarfile.LNKTYPE, str(outside)
        tar.addfile(link)
    small_archive(fetch.md5_of(tgz))
    root = tmp_path / "root"
    assert main(["data", "fetch", "imagenette", "--data-root", str(root), "--mirror", url]) == 2
    err = capsys.readouterr().err
    assert "'imagenette2-160/train/evil' is a link or special file" in err and "Traceback" not in err
    assert outside.read_text() == "precious" and not (root / "imagenette2-160").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "victim.txt", "www"]


@pytest.mark.parametrize("via", ["option", "variable"])
def test_an_unknown_checksum_is_refused_until_accepted_deliberately(tmp_path, server, small_archive, capsys,
                                                                    monkeypatch, via):
    www, url = server
    reuploaded = make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES)
    small_archive("0" * 32)  # the checksums this release knows
    root = tmp_path / "root"
    fetch_cmd = ["data", "fetch", "imagenette", "--data-root", str(root), "--mirror", url]
    assert main(fetch_cmd) == 2
    err = capsys.readouterr().err
    assert f"md5 {reuploaded} matches none of the published checksums" in err and "Traceback" not in err
    assert f"optstate data fetch imagenette --size 160 --accept-md5 {reuploaded}" in err
    assert not (root / "imagenette2-160").exists()

    assert main([*fetch_cmd, "--accept-md5", "1" * 32]) == 2  # another checksum is still refused
    assert "nor the accepted " + "1" * 32 in capsys.readouterr().err
    (www / "imagenette2-160.tgz").unlink()  # accepting uses the file already downloaded
    if via == "variable":
        monkeypatch.setenv("OPTSTATE_ACCEPT_MD5", reuploaded.upper())
        assert main(fetch_cmd) == 0
    else:
        assert main([*fetch_cmd, "--accept-md5", reuploaded]) == 0
    assert "verified" in capsys.readouterr().out
    assert len(list((root / "imagenette2-160" / "val").rglob("*.JPEG"))) == 20


def test_an_accepted_archive_is_still_checked_for_its_layout(tmp_path, server, small_archive, capsys):
    www, url = server
    short = make_tgz(www / "imagenette2-160.tgz", "imagenette2-160", CLASSES, per_class=(3, 1))
    small_archive("0" * 32)
    root = tmp_path / "root"
    assert main(["data", "fetch", "imagenette", "--data-root", str(root), "--mirror", url, "--accept-md5", short]) == 2
    err = capsys.readouterr().err
    assert "holds 10 images, expected 20" in err and "Traceback" not in err


def test_a_cut_off_archive_is_not_readable_and_says_so(tmp_path):
    tgz = tmp_path / "a.tgz"
    make_tgz(tgz, "imagenette2-160", CLASSES)
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    with pytest.raises(fetch.UserError, match="is not a readable archive"):
        fetch.extract(tgz, tmp_path / "out")
    assert not (tmp_path / "out" / "imagenette2-160").exists()

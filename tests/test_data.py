"""Labels, splits, layout and overlap checks, the embedded data, batch augmentation."""
import math
import os

import pytest
import torch

from helpers import image_bytes, make_folder
from optstate import data as datasets
from optstate import study as studies
from optstate.data import folder, idx
from optstate.data.batches import Batches, crop_boxes
from optstate.errors import UserError


def smoke(*sets):
    return studies.load(None, "smoke", list(sets))


def test_labels_come_from_sorted_class_names_in_both_splits(tmp_path):
    root = tmp_path / "pets"
    # created in an order that a directory listing may return unsorted
    for i, c in enumerate(["zebra", "cat", "mouse"]):
        make_folder(root, [c], start=100 * i)  # distinct images in every folder
    classes, files = folder.scan(root)
    assert classes == ["cat", "mouse", "zebra"]
    for split in ("train", "val"):
        for path, label in files[split]:
            assert classes[label] == path.parent.name
    data = datasets.load(str(root), smoke("image_size=16", "train_images=0", "val_images=0"), tmp_path)
    assert data.classes == classes
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 16, 16)
    assert sorted(data.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(data.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_differing_class_sets_are_refused(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"])
    (root / "val" / "b").rename(root / "val" / "c")
    with pytest.raises(UserError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        folder.scan(root)


@pytest.mark.parametrize("breakage,message", [
    (lambda r: os.rename(r / "val", r / "validation"), "no val/ folder"),
    (lambda r: [p.unlink() for p in (r / "train" / "a").iterdir()], "train/a holds no images"),
    (lambda r: [os.rename(d, r / "train" / ("x" + d.name)) for d in list((r / "train").iterdir())], "different classes"),
])
def test_layout_errors_name_the_problem(tmp_path, breakage, message):
    root = make_folder(tmp_path / "d", ["a", "b"])
    breakage(root)
    with pytest.raises(UserError, match=message):
        folder.scan(root)


def test_overlap_between_train_and_val_is_refused_naming_files(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"])
    (root / "val" / "b" / "copy.JPEG").write_bytes((root / "train" / "a" / "a_1.JPEG").read_bytes())
    with pytest.raises(UserError, match=r"train/a/a_1.JPEG = val/b/copy.JPEG"):
        datasets.load(str(root), smoke("image_size=16"), tmp_path)


def test_folder_cache_is_reused_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", ["a", "b"])
    st = smoke("image_size=16", "train_images=0", "val_images=0")
    first = datasets.load(str(root), st, tmp_path)
    caches = sorted((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "train.npy").exists()
    # the second load decodes nothing: it maps the cache's arrays
    monkeypatch.setattr(folder, "decode", lambda *a: pytest.fail("decoded again"))
    again = datasets.load(str(root), st, tmp_path)
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.val.labels, again.val.labels)
    assert sorted((tmp_path / "cache").iterdir()) == caches
    monkeypatch.undo()
    (root / "train" / "a" / "new.JPEG").write_bytes(image_bytes(999))
    changed = datasets.load(str(root), st, tmp_path)
    assert len(changed.train) == len(first.train) + 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] != [p.name for p in caches]  # the stale one is gone
    assert len(list((tmp_path / "cache").iterdir())) == 1
    os.utime(root / "val" / "b" / "b_0.JPEG", ns=(1, 1))  # touched: rebuilt
    calls = []
    real = folder.decode
    monkeypatch.setattr(folder, "decode", lambda *a: calls.append(a) or real(*a))
    datasets.load(str(root), st, tmp_path)
    assert len(calls) == len(changed.train) + len(changed.val)


def test_files_that_cannot_be_decoded_are_left_out_and_listed(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"])
    good = (root / "train" / "a" / "a_1.JPEG").read_bytes()
    (root / "train" / "a" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "notes.jpg").write_text("not an image")
    (root / "val" / "a" / "empty.png").write_bytes(b"")
    st = smoke("image_size=16", "train_images=0", "val_images=0")
    data = datasets.load(str(root), st, tmp_path)
    assert sorted(data.skipped) == ["train/a/truncated.JPEG", "train/b/notes.jpg", "val/a/empty.png"]
    assert len(data.train) == 6 and len(data.val) == 4  # the good ones, with their labels
    assert sorted(data.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(datasets.load(str(root), st, tmp_path).skipped) == sorted(data.skipped)  # from the cache


def test_a_split_with_no_decodable_image_is_refused(tmp_path):
    root = make_folder(tmp_path / "d", ["a"])
    for p in (root / "val" / "a").iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of its 2 images could be decoded"):
        datasets.load(str(root), smoke("image_size=16"), tmp_path)


def test_large_folders_decode_in_parallel_like_serially(tmp_path):
    root = make_folder(tmp_path / "big", ["a", "b"], per_class=(150, 2))
    st = smoke("image_size=12", "train_images=0", "val_images=0", 'resize="squash"')
    data = datasets.load(str(root), st, tmp_path)
    assert len(data.train) == 300
    paths = [p for p, _ in folder.scan(root)[1]["train"]]
    for i in (0, 151, 299):
        assert torch.equal(data.train.images[i], torch.from_numpy(folder.decode(paths[i], 12, "squash")))


def test_channel_stats_match_the_direct_computation():
    from optstate.data.batches import channel_stats

    x = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    ref = x.double() / 255
    assert torch.allclose(mean, ref.mean(dim=(0, 2, 3)))
    assert torch.allclose(std, ref.std(dim=(0, 2, 3), unbiased=False))


def test_embedded_split_is_stratified_deterministic_and_disjoint():
    a, b = idx.embedded(), idx.embedded()
    assert len(a.train) == 8000 and len(a.val) == 2000
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.bincount(a.val.labels).tolist() == [200] * 10
    assert torch.bincount(a.train.labels).tolist() == [800] * 10
    train_rows = {bytes(x.numpy().tobytes()) for x in a.train.images}
    assert not any(bytes(x.numpy().tobytes()) in train_rows for x in a.val.images)
    assert a.channels == 1 and a.train.images.shape[1:] == (1, 28, 28)


def test_full_fashion_mnist_from_a_named_folder(tmp_path):
    import gzip

    d = tmp_path / "fm"  # a small but valid set of the four IDX files
    d.mkdir()
    for kind, n in (("train", 30), ("test", 10)):
        xs, ys = idx.FILES[kind]
        header = (0x803).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (d / xs).write_bytes(gzip.compress(header + bytes(n * 784)))
        (d / ys).write_bytes(gzip.compress((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n))))
    data = datasets.load(str(d), smoke("train_images=0", "val_images=0"), tmp_path)
    assert len(data.train) == 30 and len(data.val) == 10 and data.classes[0] == "T-shirt/top"
    (d / idx.FILES["test"][1]).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00"))
    with pytest.raises(UserError, match="truncated"):
        datasets.load(str(d), smoke(), tmp_path)


def test_unknown_dataset_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="neither a known dataset"):
        studies.load(None, "smoke", ['datasets=["imagenet"]'])
    with pytest.raises(UserError, match="does not exist|holds neither"):
        datasets.load(str(tmp_path / "nope"), smoke(), tmp_path)


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    size, n = 64, 20000
    boxes = crop_boxes(n, size, (0.35, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size).all() and (boxes[:, 3] <= size).all()
    scale = w * h / size**2
    ratio = w / h
    assert scale.min() >= 0.3 and scale.max() <= 1.0
    # torchvision draws the area uniformly: most tries fit, so the mean is near the middle
    assert 0.6 < scale.mean() < 0.72
    assert abs(torch.log(ratio).mean()) < 0.02
    assert math.isclose(float(torch.log(ratio).std()), (math.log(4 / 3) * 2) / math.sqrt(12), rel_tol=0.15)


def test_crop_boxes_match_torchvision_draw_for_draw_statistics():
    from torchvision.transforms import RandomResizedCrop

    size, n, scale, ratio = 40, 20000, (0.2, 0.6), (3 / 4, 4 / 3)
    boxes = crop_boxes(n, size, scale, ratio, torch.Generator().manual_seed(1))
    ours = torch.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1)
    torch.manual_seed(1)
    img = torch.zeros(1, size, size)
    theirs = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]).float()
    # top, left, height, width: means and spreads agree within sampling error
    for k, name in enumerate(("top", "left", "height", "width")):
        se = float(theirs[:, k].std()) / n**0.5
        assert abs(float(ours[:, k].mean() - theirs[:, k].mean())) < 5 * se * 2**0.5, name
        assert abs(float(ours[:, k].std() / theirs[:, k].std()) - 1) < 0.05, name
    assert (ours[:, :2] == ours[:, :2].round()).all()


@pytest.mark.parametrize("size,scale", [(146, (0.35, 1.0)), (146, (0.08, 1.0)), (32, (0.2, 0.6))])
def test_crop_scales_and_aspect_ratios_have_torchvision_distributions(size, scale):
    """Two-sample Kolmogorov-Smirnov tests, ours against RandomResizedCrop.get_params, on 20k draws each."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    n, ratio = 20000, (3 / 4, 4 / 3)
    boxes = crop_boxes(n, size, scale, ratio, torch.Generator().manual_seed(3))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    torch.manual_seed(3)
    img = torch.zeros(1, size, size)
    theirs = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]).float()
    tw, th = theirs[:, 3], theirs[:, 2]
    for name, a, b in (("area fraction", w * h / size**2, tw * th / size**2), ("aspect ratio", w / h, tw / th),
                       ("left edge / free room", boxes[:, 0] / (size - w + 1), theirs[:, 1] / (size - tw + 1))):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, name


def test_flip_rate_is_one_half_like_random_horizontal_flip(tmp_path):
    from scipy.stats import binomtest

    st = smoke("augment=\"standard\"", "image_size=24")
    b = Batches(datasets.load("fashion-mnist-embedded", st, tmp_path), st, 24, torch.device("cpu"))
    flips = torch.cat([b._draws(torch.Generator().manual_seed(e))[2].flatten() for e in range(5)])
    assert binomtest(int(flips.sum()), len(flips), 0.5).pvalue > 1e-3
    # and a flipped image in a batch is the mirror of its crop
    order, boxes, flip = b._draws(torch.Generator().manual_seed(7))
    x, _ = next(b.train_epoch(torch.Generator().manual_seed(7)))
    i = int(flip[0].nonzero()[0])
    from torchvision.ops import roi_align
    src = b.train.images[order[0, i]].float().unsqueeze(0)
    crop = roi_align(src, torch.cat([torch.zeros(1, 1), boxes[0, i:i + 1]], 1), 24, 1.0, 0, True)
    assert torch.allclose(x[i], b._finish(crop.flip(3))[0], atol=1e-5)


def test_roi_align_on_an_integer_box_is_the_plain_crop():
    from torchvision.ops import roi_align

    x = torch.rand(1, 3, 16, 16)
    box = torch.tensor([[0.0, 3, 5, 11, 12]])  # batch index, x1, y1, x2, y2: an 8 x 7 crop
    out = roi_align(x, box, (7, 8), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    assert torch.allclose(out, x[:, :, 5:12, 3:11], atol=1e-6)


def test_training_batches_are_a_function_of_the_generator(tmp_path):
    st = smoke("augment=\"standard\"", "image_size=24")
    data = datasets.load("fashion-mnist-embedded", st, tmp_path)
    b = Batches(data, st, 24, torch.device("cpu"))
    one = list(b.train_epoch(torch.Generator().manual_seed(5)))
    two = list(b.train_epoch(torch.Generator().manual_seed(5)))
    other = list(b.train_epoch(torch.Generator().manual_seed(6)))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(one, two))
    assert not torch.equal(one[0][0], other[0][0])
    x, y = one[0]
    assert x.shape == (st.batch_size, 3, 24, 24) and x.dtype == torch.float32
    val = list(b.val_batches())
    assert sum(len(y) for _, y in val) == len(data.val)
    assert abs(float(torch.cat([x for x, _ in val]).mean())) < 0.3  # normalised with train statistics

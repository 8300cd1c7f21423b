"""Tests of csdkit.data against independent oracles.

Oracles used:
- CIFAR files written by hand in torchvision's on-disk format (pickled dicts, row-major CHW
  uint8 rows), read back through torchvision's real CIFAR10/CIFAR100 classes (only the md5 sums
  are monkeypatched to those of the generated files) and checked pixel by pixel;
- scikit-learn's load_digits (the 1797 raw images) and its 0..16 -> 0..255 scaling by hand;
- torchvision.transforms.Resize / v2.functional.resize for the image resizing;
- the literature's iCaRL / PyCIL / FACIL CIFAR-100 class order, copied as a literal;
- brute-force per-image loops for random crop + flip, and hand arithmetic for normalisation.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.utils as tv_utils
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from csdkit.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    Dataset,
    ImageSet,
    augment,
    class_order,
    load_dataset,
    make_split,
    normalize,
)

torch.set_num_threads(1)

# numpy.random.seed(1993); numpy.random.permutation(100): the CIFAR-100 order of iCaRL, PyCIL,
# FACIL and PODNet, copied from those code bases (not recomputed here).
ICARL_ORDER = [
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
    19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31,
    54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18,
    94, 11, 12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29,
    49, 57, 33,
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# CIFAR, offline, through torchvision's own loading code


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, obj: dict) -> str:
    path.write_bytes(pickle.dumps(obj))
    return _md5(path)


def _cifar_rows(rng: np.random.Generator, per_class: int, n_classes: int):
    labels = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return data, labels.tolist()


def _write_cifar100(root: Path, monkeypatch, train_per_class=5, test_per_class=2, seed=0):
    """Write cifar-100-python/{train,test,meta} and point torchvision's md5s at them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    xtr, ytr = _cifar_rows(rng, train_per_class, 100)
    xte, yte = _cifar_rows(rng, test_per_class, 100)
    names = [f"fine{c:02d}" for c in range(100)]
    md5_train = _dump(folder / "train", {"data": xtr, "fine_labels": ytr, "coarse_labels": ytr})
    md5_test = _dump(folder / "test", {"data": xte, "fine_labels": yte, "coarse_labels": yte})
    md5_meta = _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": names})
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5_train]])
    monkeypatch.setattr(cls, "test_list", [["test", md5_test]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5_meta})
    return xtr, np.array(ytr), xte, np.array(yte), names


@pytest.mark.parametrize("preset", ["paper", "paper-short"])
def test_paper_presets_train_on_generated_cifar100(tmp_path, monkeypatch, preset):
    """`csdkit run --preset paper[-short]` end to end on CIFAR-100 files in torchvision's format
    (the CPU path of what a GPU runs; one epoch a task instead of 800 or 50)."""
    from csdkit.cli import main

    _write_cifar100(tmp_path, monkeypatch, train_per_class=2, test_per_class=2)
    out = tmp_path / "run"
    main(["run", "--preset", preset, "--method", "csd_official", "--data-root", str(tmp_path),
          "--epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"])
    r = json.loads((out / "result.json").read_text())
    assert r["identity"]["depth"] == 32 and r["increments"] == [50, 50]
    assert r["class_order"] == list(range(100))  # natural order, as the authors
    assert len(r["recall"]) == 2 and all(0 <= v <= 1 for v in r["recall"][-1])


def _write_cifar10(root: Path, monkeypatch, per_class_per_batch=2, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_list, xs, ys = [], [], []
    for i in range(1, 6):
        x, y = _cifar_rows(rng, per_class_per_batch, 10)
        name = f"data_batch_{i}"
        train_list.append([name, _dump(folder / name, {"data": x, "labels": y})])
        xs.append(x)
        ys += y
    xte, yte = _cifar_rows(rng, per_class_per_batch, 10)
    md5_test = _dump(folder / "test_batch", {"data": xte, "labels": yte})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    md5_meta = _dump(folder / "batches.meta", {"label_names": names})
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5_test]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5_meta})
    return np.concatenate(xs), np.array(ys), xte, np.array(yte), names


def _no_network(monkeypatch) -> list:
    """Make every download path in torchvision's CIFAR code raise URLError; record the calls."""
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in tests")

    for module in (tv_cifar, tv_utils):
        for fn in ("download_and_extract_archive", "download_url"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, offline)
    return calls


def _lookup(rows: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    """CIFAR row (3072 bytes, CHW) -> label; the random rows are all distinct."""
    table = {r.tobytes(): int(y) for r, y in zip(rows, labels, strict=True)}
    assert len(table) == len(rows)
    return table


def _check_pixels_by_hand(img: torch.Tensor, row: np.ndarray) -> None:
    """img uint8 [3, 32, 32] from csdkit vs a CIFAR row: pixel (c, y, x) is row[c*1024+y*32+x]."""
    assert img.shape == (3, 32, 32)
    for c in range(3):
        for y in range(32):
            for x in range(32):
                assert int(img[c, y, x]) == int(row[c * 1024 + y * 32 + x])


def test_cifar100_offline_reads_exact_pixels_names_and_split(tmp_path, monkeypatch):
    xtr, ytr, xte, yte, names = _write_cifar100(tmp_path, monkeypatch)
    calls = _no_network(monkeypatch)
    ds = load_dataset("cifar100", root=tmp_path, download=False, val_fraction=0.2)
    assert calls == []
    assert ds.name == "cifar100"
    assert ds.class_names == names and ds.n_classes == 100
    assert ds.mean == CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
    assert ds.std == CIFAR100_STD == (0.2675, 0.2565, 0.2761)
    assert ds.image_size == 32
    for s in (ds.train, ds.val, ds.test):
        assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64

    # test set: all the test rows, in file order, pixel for pixel
    assert len(ds.test) == len(yte) == 200
    assert torch.equal(ds.test.labels, torch.as_tensor(yte))
    for i in (0, 1, 137, 199):
        _check_pixels_by_hand(ds.test.images[i], xte[i])
    assert torch.equal(ds.test.images, torch.from_numpy(xte).reshape(-1, 3, 32, 32))

    # train + val: a partition of the 500 train rows, each with its own label
    assert len(ds.train) + len(ds.val) == 500
    table = _lookup(xtr, ytr)
    seen = Counter()
    for part in (ds.train, ds.val):
        for img, y in zip(part.images, part.labels, strict=True):
            key = img.numpy().reshape(-1).tobytes()
            assert table[key] == int(y)
            seen[key] += 1
    assert len(seen) == 500 and set(seen.values()) == {1}
    row0 = ds.val.images[0].numpy().reshape(-1).tobytes()
    idx = next(i for i in range(500) if xtr[i].tobytes() == row0)
    _check_pixels_by_hand(ds.val.images[0], xtr[idx])

    # stratified: 5 train images per class, 20% -> exactly 1 per class in val
    assert len(ds.val) == 100
    assert torch.equal(torch.bincount(ds.val.labels, minlength=100), torch.ones(100, dtype=int))
    assert torch.equal(torch.bincount(ds.train.labels, minlength=100), torch.full((100,), 4))


def test_cifar100_download_true_uses_present_files(tmp_path, monkeypatch):
    xtr, *_ = _write_cifar100(tmp_path, monkeypatch, train_per_class=2, test_per_class=1)
    calls = _no_network(monkeypatch)
    ds = load_dataset("cifar100", root=tmp_path, download=True, val_fraction=0.0)
    assert calls == []  # integrity check passed, nothing fetched
    assert len(ds.train) == 200 and len(ds.val) == 0 and len(ds.test) == 100
    assert torch.equal(ds.train.images, torch.from_numpy(xtr).reshape(-1, 3, 32, 32))


def test_cifar10_offline(tmp_path, monkeypatch):
    xtr, ytr, xte, yte, names = _write_cifar10(tmp_path, monkeypatch)
    _no_network(monkeypatch)
    ds = load_dataset("cifar10", root=str(tmp_path), download=False, val_fraction=0.2)
    assert ds.class_names == names
    assert (ds.mean, ds.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    assert len(ds.train) == 80 and len(ds.val) == 20 and len(ds.test) == 20
    assert torch.equal(torch.bincount(ds.val.labels, minlength=10), torch.full((10,), 2))
    _check_pixels_by_hand(ds.test.images[3], xte[3])
    assert torch.equal(ds.test.labels, torch.as_tensor(yte))
    table = _lookup(xtr, ytr)
    keys = []
    for part in (ds.train, ds.val):
        for img, y in zip(part.images, part.labels, strict=True):
            keys.append(img.numpy().reshape(-1).tobytes())
            assert table[keys[-1]] == int(y)
    assert len(set(keys)) == len(keys) == 100


def _assert_helpful_missing(err: pytest.ExceptionInfo, folder: Path) -> None:
    msg = str(err.value)
    assert str(folder) in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar" in msg  # where to fetch it
    assert "extract" in msg and "--data-root" in msg  # how to put the files there


@pytest.mark.parametrize("name, folder", [("cifar100", "cifar-100-python"),
                                          ("cifar10", "cifar-10-batches-py")])
def test_cifar_missing_without_download(tmp_path, monkeypatch, name, folder):
    calls = _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path, download=False)
    assert calls == []
    _assert_helpful_missing(err, tmp_path / folder)


@pytest.mark.parametrize("name, folder", [("cifar100", "cifar-100-python"),
                                          ("cifar10", "cifar-10-batches-py")])
def test_cifar_download_offline_gives_clear_error(tmp_path, monkeypatch, name, folder):
    calls = _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path, download=True)
    assert len(calls) == 1  # torchvision did try to download, and the URLError was translated
    assert isinstance(err.value.__cause__, urllib.error.URLError)
    _assert_helpful_missing(err, tmp_path / folder)


def test_cifar_corrupted_file_is_reported(tmp_path, monkeypatch):
    _write_cifar100(tmp_path, monkeypatch, train_per_class=1, test_per_class=1)
    _no_network(monkeypatch)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def raw_digits():
    d = load_digits()
    images = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)  # 16 ink levels -> 0..255
    return images, d.target


def _multiset(*sets: ImageSet) -> Counter:
    return Counter(
        (img[0].numpy().tobytes(), int(y)) for s in sets for img, y in zip(s.images, s.labels,
                                                                          strict=True)
    )


def test_digits_shapes_and_classes():
    ds = load_dataset("digits")
    assert ds.n_classes == 10 and ds.class_names == [str(c) for c in range(10)]
    for s in (ds.train, ds.val, ds.test):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 16, 16)
        assert s.labels.dtype == torch.int64
        assert set(s.labels.tolist()) == set(range(10))
    # grey digits: the three channels are equal
    assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])
    # mean/std: computed from the train images by hand
    x = ds.train.images[:, 0].double() / 255
    assert ds.mean == pytest.approx((x.mean().item(),) * 3, abs=1e-5)
    assert ds.std == pytest.approx((x.std().item(),) * 3, abs=1e-4)


def test_digits_splits_partition_sklearn_digits(raw_digits):
    images, target = raw_digits
    assert len(target) == 1797
    ds = load_dataset("digits", image_size=8, val_fraction=0.2, seed=3)  # 8x8: no resize
    assert len(ds.train) + len(ds.val) + len(ds.test) == len(target)
    expected = Counter((img.tobytes(), int(y)) for img, y in zip(images, target, strict=True))
    assert _multiset(ds.train, ds.val, ds.test) == expected  # disjoint and complete
    assert not (set(_multiset(ds.train)) & set(_multiset(ds.val)))
    assert not (set(_multiset(ds.train, ds.val)) & set(_multiset(ds.test)))


@pytest.mark.parametrize("val_fraction", [0.1, 0.3])
def test_digits_val_is_stratified(val_fraction):
    ds = load_dataset("digits", val_fraction=val_fraction)
    n_val = torch.bincount(ds.val.labels, minlength=10)
    n_pool = n_val + torch.bincount(ds.train.labels, minlength=10)
    for c in range(10):
        assert abs(n_val[c].item() - val_fraction * n_pool[c].item()) <= 1
    assert abs(len(ds.val) - val_fraction * (len(ds.train) + len(ds.val))) <= 1
    # the test split (25%) is stratified too
    n_test = torch.bincount(ds.test.labels, minlength=10)
    n_all = n_pool + n_test
    for c in range(10):
        assert abs(n_test[c].item() - 0.25 * n_all[c].item()) <= 1


def test_digits_deterministic_per_seed_and_the_test_split_never_moves():
    a, b, c = (load_dataset("digits", seed=s) for s in (5, 5, 6))
    for part in ("train", "val", "test"):
        sa, sb = getattr(a, part), getattr(b, part)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    # the seed draws the validation split out of the training images...
    assert not torch.equal(a.val.images, c.val.images)
    # ...and nothing else: the test images are the same for every seed, so no seed's test
    # image was ever another seed's validation (tuning) image
    assert torch.equal(a.test.images, c.test.images) and torch.equal(a.test.labels, c.test.labels)
    tuned = set(_multiset(load_dataset("digits", seed=100).val))
    for seed in range(5):
        assert not tuned & set(_multiset(load_dataset("digits", seed=seed).test))
    assert a.mean == b.mean


def test_dataset_digest_changes_with_any_image_label_or_order():
    a = load_dataset("digits", seed=0)
    assert a.digest() == load_dataset("digits", seed=0).digest()
    assert a.digest() != load_dataset("digits", seed=1).digest()  # another validation split
    assert a.relabel(list(range(10))).digest() == a.digest()
    assert a.relabel([1, 0, *range(2, 10)]).digest() != a.digest()
    b = load_dataset("digits", seed=0)
    b.test.images[3, 0, 0, 0] ^= 1  # one pixel of one test image
    b.info.pop("digest", None)
    assert b.digest() != a.digest()


def test_digits_image_size_32_matches_torchvision_resize():
    small = load_dataset("digits", image_size=8, seed=1)
    big = load_dataset("digits", image_size=32, seed=1)
    assert big.image_size == 32 and big.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(small.train.labels, big.train.labels)
    ref = TF.resize(small.test.images, [32, 32], antialias=True)  # bilinear, uint8 in and out
    diff = (ref.int() - big.test.images.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.1


def test_unknown_dataset_and_bad_val_fraction():
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    assert "mnist" in str(err.value)
    for name in DATASETS:
        assert name in str(err.value)
    assert set(DATASETS) == {"digits", "glyphs", "cifar10", "cifar100", "imagefolder"}
    for bad in (1.5, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            load_dataset("digits", val_fraction=bad)


# --------------------------------------------------------------------------------------------
# imagefolder

SIZES = [(10, 7), (13, 13), (6, 9), (20, 11)]
CLASSES = ["apple", "banana", "cherry"]


def _make_images(root: Path, seed: int) -> dict[tuple[str, str], Path]:
    """3 classes x 4 PNGs of different sizes (and modes) under root/<class>/."""
    rng = np.random.default_rng(seed)
    files = {}
    for ci, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for j, (w, h) in enumerate(SIZES):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            im = Image.fromarray(arr)
            if ci == 1 and j == 0:
                im = im.convert("L")  # a grey PNG must come back as 3 equal channels
            if ci == 2 and j == 1:
                im = im.convert("RGBA")
            path = root / cls / f"img{j}.png"
            im.save(path)
            files[cls, path.name] = path
    return files


def _tv_resized(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        return transforms.PILToTensor()(transforms.Resize((size, size))(im.convert("RGB")))


def test_imagefolder_flat_layout(tmp_path):
    files = _make_images(tmp_path / "pics", seed=0)
    ds = load_dataset("imagefolder", path=tmp_path / "pics", image_size=8, val_fraction=1 / 3)
    assert ds.class_names == CLASSES and ds.n_classes == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
    for s in (ds.train, ds.val, ds.test):
        assert s.images.shape[1:] == (3, 8, 8) and s.images.dtype == torch.uint8
        assert torch.equal(torch.bincount(s.labels, minlength=3), torch.full((3,), len(s) // 3))
    expected = {
        _tv_resized(p, 8).numpy().tobytes(): CLASSES.index(cls) for (cls, _), p in files.items()
    }
    got = [
        (img.numpy().tobytes(), int(y))
        for s in (ds.train, ds.val, ds.test)
        for img, y in zip(s.images, s.labels, strict=True)
    ]
    assert sorted(got) == sorted(expected.items())


def test_imagefolder_train_test_layout_matches_torchvision_resize(tmp_path):
    _make_images(tmp_path / "set" / "train", seed=1)
    test_files = _make_images(tmp_path / "set" / "test", seed=2)
    ds = load_dataset("imagefolder", path=str(tmp_path / "set"), image_size=8, val_fraction=0.0)
    assert ds.class_names == CLASSES
    assert len(ds.train) == 12 and len(ds.val) == 0 and len(ds.test) == 12
    # test: every file of test/, in ImageFolder's order (class, then file name)
    assert ds.test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, ((cls, _), path) in enumerate(sorted(test_files.items())):
        assert torch.equal(ds.test.images[i], _tv_resized(path, 8)), (cls, path)
    grey = ds.test.images[4]  # banana/img0.png was saved as an "L" image
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_imagefolder_resize_of_a_flat_colour_is_exact(tmp_path):
    for cls, colour in zip(CLASSES, [(255, 0, 0), (0, 128, 0), (10, 20, 30)], strict=True):
        (tmp_path / cls).mkdir()
        for j, size in enumerate([(5, 9), (17, 3), (8, 8), (30, 12)]):
            Image.new("RGB", size, colour).save(tmp_path / cls / f"{j}.png")
    ds = load_dataset("imagefolder", path=tmp_path, image_size=8, val_fraction=1 / 3)
    colours = torch.tensor([[255, 0, 0], [0, 128, 0], [10, 20, 30]], dtype=torch.uint8)
    for s in (ds.train, ds.val, ds.test):
        for img, y in zip(s.images, s.labels, strict=True):
            assert torch.equal(img, colours[y][:, None, None].expand(3, 8, 8))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_dataset("imagefolder")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("imagefolder", path=missing)
    msg = str(err.value)
    assert str(missing) in msg and "sub-folder per class" in msg and "train" in msg
    # train/ and test/ with different classes
    _make_images(tmp_path / "bad" / "train", seed=0)
    (tmp_path / "bad" / "test" / "apple").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "bad" / "test" / "apple" / "a.png")
    with pytest.raises(ValueError, match="classes"):
        load_dataset("imagefolder", path=tmp_path / "bad", image_size=8, val_fraction=0.0)


# --------------------------------------------------------------------------------------------
# class-incremental splits


def test_make_split_equal_tasks():
    s = make_split(100, n_tasks=5)
    assert s.n_tasks == 5 and s.increments == [20] * 5
    assert s.offsets == [0, 20, 40, 60, 80, 100]
    tasks = [s.classes(t) for t in range(5)]
    assert all(len(t) == 20 for t in tasks)
    flat = [c for t in tasks for c in t]
    assert sorted(flat) == list(range(100)) and len(set(flat)) == 100  # disjoint, covering
    assert tasks[1] == list(range(20, 40))
    assert [s.seen(t) for t in range(5)] == [20, 40, 60, 80, 100]
    assert s.class_order == ICARL_ORDER  # the default order


def test_make_split_first_and_increment():
    s = make_split(100, first=50, increment=10)
    assert s.increments == [50, 10, 10, 10, 10, 10] and s.n_tasks == 6
    assert s.classes(0) == list(range(50)) and s.classes(5) == list(range(90, 100))
    assert make_split(100, n_tasks=6, first=50, increment=10).increments == s.increments
    assert make_split(10, increment=2).increments == [2] * 5  # first defaults to increment
    assert make_split(10, first=10, increment=3).increments == [10]


def test_task_of_label_brute_force():
    s = make_split(100, first=50, increment=10)
    expected = []
    for label in range(100):
        owners = [t for t in range(s.n_tasks) if label in s.classes(t)]
        assert len(owners) == 1
        expected.append(owners[0])
    assert s.task_of_label().tolist() == expected
    assert s.task_of_label()[49] == 0 and s.task_of_label()[50] == 1
    assert s.task_of_label()[99] == 5


def test_class_order_icarl_matches_literature():
    assert class_order(100, "icarl")[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert class_order(100, "icarl") == ICARL_ORDER
    assert class_order(100, "icarl", seed=7) == ICARL_ORDER  # seed does not move it
    assert class_order(5, "natural") == [0, 1, 2, 3, 4]


def test_class_order_seed():
    a, b, c = class_order(100, "seed", 1), class_order(100, "seed", 1), class_order(100, "seed", 2)
    assert a == b and a != c
    assert sorted(a) == sorted(c) == list(range(100))
    assert a != ICARL_ORDER and a != list(range(100))
    assert make_split(100, 10, order="seed", seed=1).class_order == a


def test_class_order_explicit_list_is_validated():
    assert class_order(4, [2, 0, 3, 1]) == [2, 0, 3, 1]
    assert class_order(3, np.array([1, 2, 0])) == [1, 2, 0]
    assert make_split(4, 2, order=[3, 2, 1, 0]).class_order == [3, 2, 1, 0]
    for bad in ([0, 1, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4], [1, 2, 3, 4]):
        with pytest.raises(ValueError, match="permutation"):
            class_order(4, bad)
    with pytest.raises(ValueError, match="icarl"):
        class_order(4, "random")


def test_make_split_errors():
    with pytest.raises(ValueError) as err:
        make_split(100, n_tasks=7)
    msg = str(err.value)
    divisors = [d for d in range(1, 101) if 100 % d == 0]  # 1 2 4 5 10 20 25 50 100
    assert str(divisors) in msg and "first=" in msg
    for kwargs in (
        {"n_tasks": 0},
        {},
        {"first": 50},  # no increment
        {"first": 0, "increment": 10},
        {"first": 50, "increment": 0},
        {"first": 50, "increment": -10},
        {"first": 120, "increment": 10},
        {"first": 50, "increment": 15},  # 50 left is not a multiple of 15
        {"first": 50, "increment": 10, "n_tasks": 5},  # gives 6 tasks
    ):
        with pytest.raises(ValueError):
            make_split(100, **kwargs)


def _toy_dataset(n_classes=5, per_class=3, seed=0) -> Dataset:
    """Images whose every pixel is (original class * 10 + split id), labels = original class."""
    rng = np.random.default_rng(seed)

    def part(split_id: int) -> ImageSet:
        labels = torch.as_tensor(rng.permutation(np.repeat(np.arange(n_classes), per_class)))
        images = (labels * 10 + split_id).to(torch.uint8)[:, None, None, None].expand(-1, 3, 4, 4)
        return ImageSet(images.contiguous(), labels)

    names = [f"c{k}" for k in range(n_classes)]
    return Dataset("toy", part(0), part(1), part(2), names, (0.5,) * 3, (0.25,) * 3, {"a": 1})


def test_relabel_maps_class_order_i_to_label_i():
    ds = _toy_dataset()
    order = [3, 0, 4, 1, 2]
    r = ds.relabel(order)
    assert r.class_names == ["c3", "c0", "c4", "c1", "c2"]
    assert r.info == {"a": 1, "class_order": order}
    assert (r.mean, r.std, r.name) == (ds.mean, ds.std, ds.name)
    for split_id, (old, new) in enumerate(zip((ds.train, ds.val, ds.test),
                                              (r.train, r.val, r.test), strict=True)):
        assert torch.equal(old.images, new.images)  # images keep their positions
        for img, y_new, y_old in zip(new.images, new.labels, old.labels, strict=True):
            assert order[int(y_new)] == int(y_old)
            assert int(img[0, 0, 0]) == order[int(y_new)] * 10 + split_id
    assert ds.train.labels.max() == 4  # the original is left untouched
    assert ds.relabel(np.array([3, 0, 4, 1, 2])).info["class_order"] == order


@pytest.mark.parametrize("bad", [[0, 0, 1, 2, 3], [0, 1, 2], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
def test_relabel_rejects_a_non_permutation(bad):
    with pytest.raises(ValueError, match="permutation"):
        _toy_dataset().relabel(bad)


def test_relabel_with_split_makes_tasks_contiguous():
    ds = _toy_dataset(n_classes=6, per_class=2)
    split = make_split(6, first=2, increment=2, order="seed", seed=4)
    r = ds.relabel(split.class_order)
    task1 = r.train.of_classes(split.classes(1))
    assert len(task1) == 4
    originals = {int(img[0, 0, 0]) // 10 for img in task1.images}
    assert originals == set(split.class_order[2:4])


def test_imageset_validation_and_select():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))  # float
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    s = _toy_dataset().train
    sub = s.of_classes([1, 3])
    assert len(sub) == 6 and set(sub.labels.tolist()) == {1, 3}
    assert torch.equal(sub.images[:, 0, 0, 0], (sub.labels * 10).to(torch.uint8))


# --------------------------------------------------------------------------------------------
# augmentation and normalisation


def _batch(b=16, h=8, w=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _brute_force_augment(images, pad, flip, seed):
    """torchvision-style per-image RandomCrop(padding=pad) + RandomHorizontalFlip, in a loop.

    Offsets and flips come from the same draws csdkit makes (dy for the batch, then dx, then
    one uniform per image for the flip) so the two can be compared exactly.
    """
    b, c, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    mirror = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = torch.empty_like(images)
    for i in range(b):
        img = images[i]
        if pad > 0:
            padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=images.dtype)
            padded[:, pad : pad + h, pad : pad + w] = img
            y, x = int(dy[i]), int(dx[i])
            img = padded[:, y : y + h, x : x + w]
        if mirror[i]:
            img = torch.stack([img[:, :, w - 1 - j] for j in range(w)], dim=2)
        out[i] = img
    return out


def test_augment_shape_dtype_and_identity():
    x = _batch()
    y = augment(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.is_contiguous()
    assert torch.equal(augment(x, pad=0, flip=False), x)
    assert torch.equal(x, _batch())  # the input is not modified in place


def test_augment_flip_only_gives_image_or_mirror():
    x = _batch(b=64)
    y = augment(x, pad=0, flip=True, generator=torch.Generator().manual_seed(1))
    n_flipped = 0
    for i in range(64):
        mirror = x[i][:, :, list(range(x.shape[-1] - 1, -1, -1))]
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], mirror)
        n_flipped += torch.equal(y[i], mirror)
    assert 10 < n_flipped < 54  # both happen (p(fail) ~ 1e-7)


@pytest.mark.parametrize("pad, flip, seed", [(4, False, 0), (4, True, 1), (2, True, 2),
                                             (1, False, 3)])
def test_augment_matches_brute_force_loop(pad, flip, seed):
    x = _batch(b=32, h=8, w=6, seed=seed)
    got = augment(x, pad=pad, flip=flip, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got, _brute_force_augment(x, pad, flip, seed))


def test_augment_crop_covers_all_offsets_with_zero_padding():
    x = torch.full((400, 3, 4, 4), 200, dtype=torch.uint8)
    y = augment(x, pad=2, flip=False, generator=torch.Generator().manual_seed(0))
    # the number of bright rows/cols tells the offset: 4 - |offset - 2|
    rows = (y[:, 0, :, :] == 200).any(2).sum(1)
    cols = (y[:, 0, :, :] == 200).any(1).sum(1)
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {2, 3, 4}
    assert set(y.unique().tolist()) == {0, 200}  # padding is zeros
    assert (y > 0).sum((1, 2, 3)).eq(3 * rows * cols).all()  # each crop is one rectangle


def test_augment_deterministic_for_a_generator_seed():
    x = _batch(b=32)
    a = augment(x, generator=torch.Generator().manual_seed(11))
    b = augment(x, generator=torch.Generator().manual_seed(11))
    c = augment(x, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_by_hand():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)[None, :, None, None].expand(2, 3, 2, 2)
    mean, std = (0.5, 0.2, 0.0), (0.25, 0.1, 2.0)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    # channel 0: (0/255 - 0.5)/0.25 = -2; channel 1: (51/255 - 0.2)/0.1 = 0; channel 2: 1/2
    expected = torch.tensor([-2.0, 0.0, 0.5])[None, :, None, None].expand(2, 3, 2, 2)
    assert torch.allclose(y, expected, atol=1e-6)
    z = normalize(torch.tensor([[[[128]], [[64]], [[32]]]], dtype=torch.uint8),
                  CIFAR100_MEAN, CIFAR100_STD)
    for ch, v in enumerate((128, 64, 32)):
        hand = (v / 255 - CIFAR100_MEAN[ch]) / CIFAR100_STD[ch]
        assert z[0, ch, 0, 0].item() == pytest.approx(hand, abs=1e-6)


@pytest.mark.parametrize("size", [0, 2, 12.5])
def test_an_image_size_that_cannot_be_is_refused_not_replaced_by_the_default(size):
    from csdkit.data import load_dataset

    with pytest.raises(ValueError, match="image_size must be an integer >= 4"):
        load_dataset("digits", image_size=size)

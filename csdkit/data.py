"""Data: datasets as uint8 image tensors, class-incremental task splits, batch augmentation.

Every dataset becomes `ImageSet`s (train, val, test) of uint8 images [N, 3, H, W] and int64 labels
[N]: whole datasets as tensors (CIFAR-100's are 150 MB) augmented on batches, no DataLoader.
Datasets: `digits` (scikit-learn's bundled 8x8 handwritten digits, 10 classes; the offline default),
`glyphs` (40 letters rendered from the fonts matplotlib ships, split by font: csdkit.glyphs),
`cifar10`, `cifar100` (through torchvision, downloaded into `root`, default `data/`), `imagefolder`
(your own folder of class sub-folders: `path/train/<class>/*`, `path/test/...`). `make_split` orders
the classes and cuts them into tasks; datasets are relabelled so that label = position in the class
order: task t owns labels [offsets[t], offsets[t+1]) and a model's first n logits are "the classes
seen so far".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from csdkit import require

DATASETS = ("digits", "glyphs", "cifar10", "cifar100", "imagefolder")
CLASS_ORDERS = ("icarl", "natural", "seed")

# CIFAR's published channel statistics, not recomputed from our split: every seed then
# normalises alike, and models compare with the literature's.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
Stats = Sequence[float] | torch.Tensor  # per-channel mean or std: 3 numbers or [1, 3, 1, 1]


@dataclass
class ImageSet:
    """images: uint8 [N, 3, H, W]; labels: int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:  # where user-built sets enter
        x = self.images
        require(x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3, "ImageSet.images "
                f"must be uint8 [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        require(len(x) == len(self.labels), f"{len(x)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: torch.Tensor) -> ImageSet:
        """Rows where the boolean mask (or index tensor) `keep` selects."""
        return ImageSet(self.images[keep], self.labels[keep])

    def of_classes(self, classes: Iterable[int]) -> ImageSet:
        """Only the images whose label is in `classes` (any iterable of ints)."""
        wanted = torch.as_tensor(list(classes), dtype=torch.long)
        return self.select(torch.isin(self.labels, wanted))


@dataclass
class Dataset:
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def digest(self) -> str:
        """16 hex digits that change with any image, label (so also the class order) or class
        name of any split: the data part of a run's identity (csdkit.train.run_identity)."""
        if "digest" not in self.info:  # CIFAR-100: ~0.3 s of hashing, done once
            h = hashlib.sha1(json.dumps(self.class_names).encode())
            for s in (self.train, self.val, self.test):
                h.update(s.images.numpy().tobytes())
                h.update(s.labels.numpy().tobytes())
            self.info["digest"] = h.hexdigest()[:16]
        return self.info["digest"]

    def relabel(self, class_order: Sequence[int]) -> Dataset:
        """Relabel so that original class `class_order[i]` becomes label i."""
        class_order = [int(c) for c in class_order]
        # otherwise classes left out would keep uninitialised labels from torch.empty
        require(sorted(class_order) == list(range(self.n_classes)),
                f"relabel needs a permutation of 0..{self.n_classes - 1}, got {class_order}")
        lut = torch.empty(self.n_classes, dtype=torch.long)
        lut[torch.as_tensor(class_order)] = torch.arange(self.n_classes)
        splits = [ImageSet(s.images, lut[s.labels]) for s in (self.train, self.val, self.test)]
        info = {k: v for k, v in self.info.items() if k != "digest"}  # other labels: new digest
        return Dataset(self.name, *splits, [self.class_names[c] for c in class_order], self.mean,
                       self.std, {**info, "class_order": list(class_order)})


# Loading ------------------------------------------------------------------------------------------


def _to_imageset(images: np.ndarray, labels: np.ndarray, size: int) -> ImageSet:
    """images: uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB) -> ImageSet at size x size."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(x.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def _split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of range(len(labels)) into (keep, held_out)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:  # too few images per class to hold some out of every class
        raise ValueError(
            f"cannot hold out a stratified {fraction:.0%} of {len(labels)} images over "
            f"{len(np.unique(labels))} classes ({err}); give each class more images, or change "
            "the fraction (val_fraction=0 keeps no validation split)"
        ) from err
    return np.sort(keep), np.sort(held)


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def _digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)  # 0..16 ink levels -> 0..255
    # One fixed test split for every seed, like CIFAR's: the seed's validation split comes
    # from the training images, so no seed ever tests on what another seed tuned on.
    train, test = _split_indices(d.target, 0.25, seed=0)
    names = [str(c) for c in range(10)]
    return images[train], d.target[train], images[test], d.target[test], names


def _cifar(name: str, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    from torchvision import datasets

    cls = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    folder = root / cls.base_folder
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as err:  # offline: URLError; missing files without download: RuntimeError
        raise FileNotFoundError(
            f"{name} is not in {folder} and could not be downloaded ({type(err).__name__}: "
            f"{err}). On a machine with internet run `python -m csdkit run --dataset {name}` "
            f"once, or fetch {cls.url} yourself and extract it into {root}/ so that "
            f"{folder}/ holds the files, then pass --data-root {root}."
        ) from err
    return (train.data, np.array(train.targets), test.data, np.array(test.targets),
            list(train.classes))


def _imagefolder(path: Path, size: int) -> tuple[np.ndarray, ...]:
    from torchvision import datasets, transforms

    if not path.is_dir():
        raise FileNotFoundError(
            f"imagefolder: {path} is not a folder. Pass --data-path DIR where DIR holds one "
            "sub-folder per class (or DIR/train/<class>/ and DIR/test/<class>/)."
        )
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])

    def read(folder: Path, classes: list[str] | None = None) -> tuple[np.ndarray, ...]:
        ds = datasets.ImageFolder(str(folder), transform=lambda im: tf(im.convert("RGB")))
        if classes is not None and ds.classes != classes:
            raise ValueError(f"{folder} has classes {ds.classes}, expected {classes}")
        images = torch.stack([ds[i][0] for i in range(len(ds))]).permute(0, 2, 3, 1).numpy()
        return images, np.array(ds.targets), ds.classes

    if (path / "train").is_dir() and (path / "test").is_dir():
        xtr, ytr, names = read(path / "train")
        xte, yte, _ = read(path / "test", names)
        return xtr, ytr, xte, yte, names
    x, y, names = read(path)
    train, test = _split_indices(y, 0.25, seed=0)  # fixed, as for digits
    return x[train], y[train], x[test], y[test], names


def load_dataset(name: str = "digits", root: str | Path = "data", image_size: int | None = None,
                 seed: int = 0, val_fraction: float = 0.1, download: bool = True,
                 path: str | Path | None = None) -> Dataset:
    """Load a dataset as uint8 tensors with a seeded, stratified validation split of train.

    image_size defaults to 16 for digits and glyphs, 32 otherwise. The test split never depends
    on the seed (CIFAR's own; a fixed 25% of digits and of an imagefolder without train/test
    sub-folders; fixed fonts for glyphs) and validation comes from the training images (glyphs:
    fixed held-out fonts), so no seed tests on images another seed tuned on. Test images are
    never used for any decision."""
    require(name in DATASETS, f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    require(0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}")
    require(name != "imagefolder" or path is not None,
            "dataset 'imagefolder' needs path= (--data-path) to a folder")
    require(image_size is None or (isinstance(image_size, int) and image_size >= 4),
            f"image_size must be an integer >= 4 (or None), got {image_size!r}")
    root = Path(root)
    size = image_size if image_size is not None else 16 if name in ("digits", "glyphs") else 32
    info: dict = {}
    if name == "glyphs":
        from csdkit.glyphs import load_glyphs

        g = load_glyphs(root=root, seed=0, samples_per_font=8)  # a fixed font split
        train, val, test = (_to_imageset(g[f"{s}_images"], g[f"{s}_labels"], size)
                            for s in ("train", "val", "test"))
        names = list(g["class_names"])
        info = {k: list(g[k]) for k in ("train_fonts", "val_fonts", "test_fonts")}
    else:
        if name == "digits":
            xtr, ytr, xte, yte, names = _digits()
        elif name == "imagefolder":
            xtr, ytr, xte, yte, names = _imagefolder(Path(path), size)
        else:
            xtr, ytr, xte, yte, names = _cifar(name, root, download)
        keep, held = _split_indices(ytr, val_fraction, seed)
        train = _to_imageset(xtr[keep], ytr[keep], size)
        val = _to_imageset(xtr[held], ytr[held], size)
        test = _to_imageset(xte, yte, size)
    published = {"cifar100": (CIFAR100_MEAN, CIFAR100_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
    mean, std = published[name] if name in published else _mean_std(train.images)
    return Dataset(name, train, val, test, names, mean, std, info)


# Class-incremental splits -------------------------------------------------------------------------


@dataclass
class TaskSplit:
    """class_order[i] is the original class id that becomes label i; task t owns the labels
    offsets[t] .. offsets[t+1]-1."""

    class_order: list[int]
    increments: list[int]

    @property
    def n_tasks(self) -> int:
        return len(self.increments)

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.increments).tolist()]

    def classes(self, task: int) -> list[int]:
        """The (relabelled) classes that task `task` brings."""
        return list(range(self.offsets[task], self.offsets[task + 1]))

    def seen(self, task: int) -> int:
        """How many classes have been seen after training task `task`."""
        return self.offsets[task + 1]

    def task_of_label(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_tasks), self.increments)


def class_order(n_classes: int, order: str | list[int] = "icarl", seed: int = 0) -> list[int]:
    """The order in which classes are learned. "icarl": numpy.random.seed(1993);
    numpy.random.permutation(n) -- the fixed order iCaRL, PyCIL and FACIL use for CIFAR-100, so
    results compare with the literature; "natural": 0..n-1; "seed": a permutation drawn from
    `seed`; or an explicit list (a permutation)."""
    if isinstance(order, str):
        if order == "icarl":
            return np.random.RandomState(1993).permutation(n_classes).tolist()
        if order == "natural":
            return list(range(n_classes))
        if order == "seed":
            return np.random.RandomState(seed).permutation(n_classes).tolist()
        raise ValueError(f"unknown class order {order!r}; use one of {', '.join(CLASS_ORDERS)} "
                         "or a list")
    order = [int(c) for c in order]
    require(sorted(order) == list(range(n_classes)), "an explicit class order must be a "
            f"permutation of 0..{n_classes - 1} (each class exactly once); got {len(order)} "
            "entries")
    return order


def make_split(n_classes: int, n_tasks: int | None = None, first: int | None = None,
               increment: int | None = None, order: str | list[int] = "icarl", seed: int = 0
              ) -> TaskSplit:
    """Cut n_classes into tasks: `n_tasks` equal tasks, or a first task of `first` classes
    followed by tasks of `increment` classes each (e.g. CIFAR-100 as 50 + 5 x 10)."""
    if first is None and increment is None:
        require(n_tasks is not None and n_tasks >= 1,
                "make_split needs n_tasks >= 1, or first= and increment=")
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        require(n_classes % n_tasks == 0, f"{n_tasks} tasks do not divide {n_classes} classes "
                f"evenly; choose n_tasks among {divisors}, or give first= and increment= (e.g. "
                "first=50, increment=10)")
        increments = [n_classes // n_tasks] * n_tasks
    else:
        first = first if first is not None else increment
        require(increment is not None and first >= 1 and increment >= 1,
                "first and increment must be positive class counts")
        rest = n_classes - first
        require(rest >= 0 and rest % increment == 0, f"a first task of {first} classes plus "
                f"tasks of {increment} does not cover {n_classes} classes exactly; (n_classes - "
                "first) must be a multiple of increment")
        increments = [first] + [increment] * (rest // increment)
        require(n_tasks is None or n_tasks == len(increments), f"first={first}, increment="
                f"{increment} gives {len(increments)} tasks, not n_tasks={n_tasks}")
    return TaskSplit(class_order(n_classes, order, seed), increments)


# Augmentation and normalisation on batches (same code on CPU and GPU) -----------------------------


def augment(images: torch.Tensor, pad: int = 4, flip: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size, padding=pad) and RandomHorizontalFlip on a batch, on its own device:
    uint8 [B, 3, H, W] -> uint8 [B, 3, H, W]. Each image gets its own crop offset and flip, as
    torchvision's per-image transforms would give, but in a handful of tensor ops."""
    b, _, h, w = images.shape
    dev = images.device
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))  # zero padding, as RandomCrop(padding=4)
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # [B, 1, W]
        batch = torch.arange(b, device=dev)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(b, device=dev, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images.contiguous()


def channel_stats(mean: Stats, std: Stats, device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 [1, 3, 1, 1] tensors on `device`, for `normalize`. Build them
    once per task, not per batch: on CUDA, a tensor made from a Python tuple is a blocking
    host-to-device copy, which would make every training step wait."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                 for v in (mean, std))
    return mean, std


def normalize(images: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 (x/255 - mean) / std. mean and std: 3 numbers each, or the
    [1, 3, 1, 1] tensors of `channel_stats` (what a training loop passes, built once)."""
    if not isinstance(mean, torch.Tensor):
        mean, std = channel_stats(mean, std, images.device)
    return (images.float() / 255 - mean) / std

"""Feature drift in one 2-D frame: where did the old classes go when the model learned new ones?

The same test images are embedded by the old model (end of an earlier task) and by each new one
(end of a later task, one per method: fine-tuning, LwF, FD, CSD, all continuing from that old
model). `DriftMap` fits UMAP on the old model's features only and places each new model's
features into that map with UMAP's `transform`, so the old points stay put and the maps of
several methods share one frame: side by side, the same place means the same thing. An old
class's centroid can then be joined to its new centroid by an arrow: where the new model put the
class that a gallery indexed by the old model expects in one place.

Read the arrows as directions, not lengths: UMAP keeps neighbourhoods, not distances, and
`place` is approximate. The numbers to quote are computed in feature space, never on the map:
`drift_ratio` (how far classes moved, in units of the distance between two classes of the old
model) and `centroid_shift` (per class, the cosine distance between old and new mean direction).

UMAP is compiled by numba the first time it runs in a process (tens of seconds on a laptop CPU).
To pay that once per machine instead of once per kernel, call, before anything imports umap:

    from csdkit.drift import configure_numba_cache
    configure_numba_cache()          # NUMBA_CACHE_DIR = ~/.cache/csdkit/numba
    import umap                      # only now (DriftMap imports it for you)

`DriftMap` also turns on numba's on-disk cache for umap's own jitted functions, most of which
umap does not cache itself; without that, a warm NUMBA_CACHE_DIR only speeds up the import.
After upgrading umap or pynndescent, delete the folder (numba checks each cached function's own
source file, not the files of the functions it calls).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ARROWS = ("centroids", "samples", "both", None)


# --------------------------------------------------------------------------------------------
# numba's compile cache


def default_numba_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "csdkit" / "numba"


def configure_numba_cache(path: str | Path | None = None) -> Path:
    """Point numba's on-disk compile cache at `path` (default ~/.cache/csdkit/numba, created).

    Call it BEFORE `import umap` (or pynndescent): numba picks the cache folder of a function
    when the function is defined, that is, when its module is imported. Called later, it warns
    and only affects functions compiled from then on. Returns the folder.
    """
    path = Path(path).expanduser() if path is not None else default_numba_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    previous = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    if "numba" in sys.modules:
        # numba read its environment when it was imported; make it read NUMBA_CACHE_DIR again
        from numba.core import config

        config.reload_config()
    imported = [m for m in ("umap", "pynndescent") if m in sys.modules]
    if imported and previous != str(path):
        warnings.warn(
            f"configure_numba_cache() was called after {' and '.join(imported)} had been "
            "imported, so their cached functions keep their old cache folder; call it first "
            "(e.g. at the top of the notebook, or restart the kernel)",
            RuntimeWarning,
            stacklevel=2,
        )
    return path


def _import_umap():
    """`import umap`, then give umap's own jitted functions an on-disk cache.

    umap 0.5 declares only a few of its numba functions with cache=True (pynndescent caches all
    of its own). The rest, nearest neighbours, fuzzy simplicial set and the layout optimiser,
    about 30 s of compilation on a 2-core CPU, would be compiled again in every process.
    `Dispatcher.enable_caching()` is what numba's `cache=True` calls; doing it before their
    first call makes them load from the cache folder in the next process. Idempotent.
    """
    import umap
    from numba.core.dispatcher import Dispatcher

    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "umap" or modname.startswith("umap.")):
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, Dispatcher) or obj.py_func.__module__ != modname:
                continue
            if type(getattr(obj, "_cache", None)).__name__ != "NullCache":
                continue  # already caching (cache=True, or done on an earlier call)
            try:
                obj.enable_caching()
            except RuntimeError:  # no writable cache folder anywhere: compile as usual
                return umap
    return umap


# --------------------------------------------------------------------------------------------
# one frame: fitted on the old model, new models placed into it


def _as_2d_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_items, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_pair(old_features: Any, new_features: Any) -> tuple[np.ndarray, np.ndarray]:
    old = _as_2d_array(old_features, "old_features")
    new = _as_2d_array(new_features, "new_features")
    if old.shape != new.shape:
        raise ValueError(
            f"old_features {old.shape} and new_features {new.shape} must have the same shape: "
            "the same images (same order) embedded by the old and by the new model"
        )
    return old, new


@contextmanager
def _quiet_umap():
    """Import umap (with `_import_umap`'s caching) and silence umap's, pynndescent's and numba's
    warnings (e.g. a disconnected kNN graph), so that a notebook cell writes nothing to stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"umap(\..*)?$")
        warnings.filterwarnings("ignore", module=r"pynndescent(\..*)?$")
        warnings.filterwarnings("ignore", module=r"numba(\..*)?$")
        umap = _import_umap()
        from numba.core.errors import NumbaWarning

        warnings.simplefilter("ignore", NumbaWarning)
        yield umap


class DriftMap:
    """A 2-D UMAP frame fitted on the old model's features, into which new models are placed.

    old_features: [N, D] (numpy or torch), the old model's features of N images, L2-normalised
    (retrieval compares directions) and fitted with the cosine metric. `old_2d` [N, 2] float32
    is the fitted map. `place(new_features [N', D])` -> [N', 2] float32 puts the features of a
    model that continues the old one into the same frame with UMAP's `transform`, without
    moving `old_2d`, so several methods trained from the same old model share one frame.

    Deterministic for a seed: random_state=seed (which makes UMAP single-threaded, n_jobs=1)
    for the fit and transform_seed=seed for `place`. n_neighbors is capped at N - 1.
    n_epochs=None is UMAP's default (below 10k points 500, and 100 for `place`); a given
    n_epochs makes `place` run a third of it.
    Fit and `place` are silent: no warnings, nothing on stderr.

    `place` is approximate: features equal to the old ones land near their fitted positions,
    not on them (except an array identical to the fitted one, which UMAP recognises and answers
    with `old_2d`), so short arrows are placement noise, not drift.
    """

    def __init__(
        self,
        old_features: Any,
        seed: int = 0,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        n_epochs: int | None = None,
    ) -> None:
        old = _as_2d_array(old_features, "old_features")
        if len(old) < 4:  # with fewer points UMAP's spectral initialisation fails
            raise ValueError(f"need at least 4 images, got {len(old)}")
        if n_neighbors < 2:
            raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
        self.dim = old.shape[1]
        with _quiet_umap() as umap:
            self._reducer = umap.UMAP(
                n_neighbors=min(n_neighbors, len(old) - 1),
                min_dist=min_dist,
                metric="cosine",
                n_epochs=n_epochs,
                random_state=seed,
                transform_seed=seed,
                n_jobs=1,  # what random_state implies anyway; saying it avoids umap's warning
                verbose=False,  # no tqdm bars, no log lines
            )
            xy = self._reducer.fit_transform(_l2_normalise(old).astype(np.float32))
        self.old_2d = xy.astype(np.float32)  # a copy: the reducer keeps its own

    def place(self, new_features: Any) -> np.ndarray:
        """[N', D] features of a new model -> [N', 2] float32 positions in this frame."""
        new = _as_2d_array(new_features, "new_features")
        if new.shape[1] != self.dim or len(new) == 0:
            raise ValueError(
                f"new_features must be [N', {self.dim}] with N' >= 1 (the dimension the map "
                f"was fitted on), got shape {new.shape}"
            )
        with _quiet_umap():
            xy = self._reducer.transform(_l2_normalise(new).astype(np.float32))
        return xy.astype(np.float32)  # a copy: for the fitted array umap returns its own


# --------------------------------------------------------------------------------------------
# the numbers: how far classes moved, in feature space


def _pick_classes(labels: np.ndarray, classes: Iterable[int] | None) -> np.ndarray:
    present = np.unique(labels)
    classes = present if classes is None else np.asarray(list(classes))
    missing = sorted(set(classes.tolist()) - set(present.tolist()))
    if missing:
        raise ValueError(f"classes {missing[:5]} have no image in labels")
    return classes


def _centroids(x: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[C, D]: per class, the mean of its images' L2-normalised features (not re-normalised)."""
    x = _l2_normalise(x)
    return np.stack([x[labels == c].mean(0) for c in classes.tolist()])


def centroid_shift(
    old_features: Any, new_features: Any, labels: Any, classes: Iterable[int] | None = None
) -> dict[int, float]:
    """Cosine distance between each class's mean direction under the old and the new model.

    For class c: m_old = mean of the L2-normalised old features of its images, m_new the same
    for the new features, shift[c] = 1 - cos(m_old, m_new). 0: the class still points the same
    way; 1: orthogonal. Only meaningful when the two feature spaces are comparable, which is
    what distillation (FD, CSD) asks of the new model. classes: which classes (default: all
    present in labels, ascending). Returns {class: shift} with plain Python ints and floats.
    """
    old, new = _check_pair(old_features, new_features)
    labels = _labels_of(labels, len(old))
    classes = _pick_classes(labels, classes)
    out = {}
    for c, m_old, m_new in zip(classes.tolist(), _centroids(old, labels, classes),
                               _centroids(new, labels, classes), strict=True):
        cos = m_old @ m_new / max(np.linalg.norm(m_old) * np.linalg.norm(m_new), 1e-12)
        out[int(c)] = float(1.0 - cos)
    return out


def drift_ratio(
    old_features: Any, new_features: Any, labels: Any, classes: Iterable[int] | None = None
) -> float:
    """How far classes moved, in units of how far apart classes are: 0 nothing moved, 1 a class
    moved as far as two classes are apart.

    old_features, new_features: [N, D], the same N images under the old and the new model;
    labels [N]. For each class c, m_old(c) and m_new(c) are the means of its images'
    L2-normalised features; shift(c) = ||m_new(c) - m_old(c)||; gap = the mean over pairs of
    classes of ||m_old(c) - m_old(c')||, the typical distance between two class centroids of the
    old model. Returns mean shift / gap as a float. classes: which classes both means run over
    (default: all in labels; pass the old classes to ask how far what the old model knew moved).

    Only meaningful because the new model continues the old one, so that both share one feature
    space; two independently trained models would score high however good each is. Computed in
    feature space, never on the 2-D map, whose distances UMAP does not preserve.
    """
    old, new = _check_pair(old_features, new_features)
    labels = _labels_of(labels, len(old))
    classes = _pick_classes(labels, classes)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes for the distance between classes, got "
                         f"{len(classes)}")
    m_old, m_new = _centroids(old, labels, classes), _centroids(new, labels, classes)
    shift = np.linalg.norm(m_new - m_old, axis=1).mean()
    i, j = np.triu_indices(len(classes), k=1)  # each unordered pair once
    gap = np.linalg.norm(m_old[i] - m_old[j], axis=1).mean()
    if gap < 1e-12:
        raise ValueError("all class centroids coincide in the old model: no scale to judge by")
    return float(shift / gap)


def _labels_of(labels: Any, n: int) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"labels must be [N] with N = {n} (one per row), got shape "
                         f"{labels.shape}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# the picture


def _class_colours(n: int) -> list:
    import matplotlib as mpl

    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    return [mpl.colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]


def plot_drift(
    old_2d: Any,
    new_2d: Any,
    labels: Any,
    old_classes: Iterable[int],
    class_names: list[str],
    ax: Any = None,
    arrows: str | None = "centroids",
    max_sample_arrows: int = 200,
    seed: int = 0,
    title: str | None = "feature drift: old model (hollow) → new model (filled)",
):
    """Scatter both models' points in one frame and draw how the old classes moved.

    old_2d, new_2d [N, 2] in the same frame: `m = DriftMap(old_features)`, `m.old_2d` (the map
    fitted on the old model) and `m.place(new_features)` (the new model's points placed into it
    with UMAP's transform); to compare methods, call this once per axis with the same `m`.
    labels [N]; old_classes: the classes learned before the new model's task (coloured; the
    new task's classes are grey). Old-model points are hollow, new-model points filled. arrows:
    "centroids" (old class centroid -> the same class's new centroid, in the map), "samples"
    (image by image, for at most `max_sample_arrows` old-class images drawn with `seed`),
    "both", or None. Class names are written at the new centroids when there are at most 20
    old classes. Returns the Axes.

    Read the arrows as directions, not lengths: UMAP keeps neighbourhoods, not distances, and
    a placed point lands among its nearest old-model points however far away they are. The
    numbers to compare methods with are `drift_ratio` and `centroid_shift`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if arrows not in ARROWS:
        raise ValueError(f"arrows must be one of {ARROWS}, got {arrows!r}")
    old_2d, new_2d = _check_pair(old_2d, new_2d)
    if old_2d.shape[1] != 2:
        raise ValueError(f"old_2d and new_2d must be [N, 2] map coordinates, got {old_2d.shape}")
    labels = _labels_of(labels, len(old_2d))
    old_classes = sorted({int(c) for c in old_classes})
    missing = sorted(set(old_classes) - set(labels.tolist()))
    if missing:
        raise ValueError(f"old classes {missing[:5]} have no image in labels")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must index class_names (0..{len(class_names) - 1})")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 6.5))

    is_old = np.isin(labels, old_classes)
    grey = "0.7"
    ax.scatter(*old_2d[~is_old].T, s=12, facecolors="none", edgecolors=grey, linewidths=0.6)
    ax.scatter(*new_2d[~is_old].T, s=10, color=grey, linewidths=0)
    colours = dict(zip(old_classes, _class_colours(len(old_classes)), strict=True))
    for c in old_classes:
        m = labels == c
        ax.scatter(*old_2d[m].T, s=16, facecolors="none", edgecolors=[colours[c]],
                   linewidths=0.8)
        ax.scatter(*new_2d[m].T, s=14, color=colours[c], linewidths=0)

    if arrows in ("samples", "both"):
        idx = np.flatnonzero(is_old)
        if len(idx) > max_sample_arrows:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_sample_arrows, False))
        d = new_2d[idx] - old_2d[idx]
        ax.quiver(*old_2d[idx].T, *d.T, color=[colours[c] for c in labels[idx]],
                  angles="xy", scale_units="xy", scale=1, width=0.002, alpha=0.5)
    if arrows in ("centroids", "both"):
        for c in old_classes:
            m = labels == c
            a, b = old_2d[m].mean(0), new_2d[m].mean(0)
            # a black under-stroke keeps light colours visible over the points
            for colour, lw in (("black", 3.5), (colours[c], 2.0)):
                ax.annotate("", xy=b, xytext=a, arrowprops=dict(
                    arrowstyle="-|>", color=colour, lw=lw, shrinkA=0, shrinkB=0))
            ax.scatter(*a, s=90, facecolors="white", edgecolors=[colours[c]], linewidths=2,
                       zorder=3)
            ax.scatter(*b, s=90, color=colours[c], edgecolors="black", linewidths=1, zorder=3)
            if len(old_classes) <= 20:
                ax.annotate(class_names[c], b, xytext=(4, 4), textcoords="offset points",
                            fontsize=9, weight="bold")

    handles = [
        Line2D([], [], ls="", marker="o", mfc="none", mec="0.3", label="old model"),
        Line2D([], [], ls="", marker="o", color="0.3", label="new model"),
        Line2D([], [], ls="", marker="o", color=grey, label="new-task classes"),
    ]
    if len(old_classes) <= 10:
        handles += [Line2D([], [], ls="", marker="o", color=colours[c], label=class_names[c])
                    for c in old_classes]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    if title:
        ax.set_title(title)
    return ax

"""Feature drift in 2-D: where did the old classes go when the model learned new ones?

`DriftMap` fits UMAP on the old model's features of some test images; a new model's features of
the same images are drawn in their own UMAP map aligned onto the old one (`align`) or placed into
the old map (`place`). UMAP keeps neighbourhoods, not distances: the numbers to quote are
`map_recall_at_1` (does the picture separate the classes?) and, in feature space, `drift_ratio`
and `centroid_shift`. UMAP is compiled by numba the first time it runs in a process (about 30 s
on 2 CPU cores); `DriftMap` turns on numba's on-disk cache for umap's jitted functions. After
upgrading umap or pynndescent, delete numba's cache (numba checks a function's own source, not
its callees').
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy.linalg import orthogonal_procrustes

from csdkit import require

ARROWS = ("centroids", "samples", "both", None)
GREY = "0.7"  # plot_drift's colour for the new task's classes: context, not the subject


# checks of what a user passes in ------------------------------------------------------------------


def _as_2d_array(x: Any, name: str) -> np.ndarray:
    """numpy or torch (any device) -> float64 [N, D], finite."""
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    require(x.ndim == 2, f"{name} must be 2-D [num_items, dim], got shape {x.shape}")
    require(np.isfinite(x).all(), f"{name} contains NaN or inf")
    return x


def _check_pair(old: Any, new: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same N images under the old and the new model, [N, D] each, and their labels [N]."""
    old, new = _as_2d_array(old, "old_features"), _as_2d_array(new, "new_features")
    require(old.shape == new.shape,
            f"old_features {old.shape} and new_features {new.shape} must have the same shape: "
            "the same images (same order) embedded by the old and by the new model")
    labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    require(labels.ndim == 1 and len(labels) == len(old),
            f"labels must be [N] with N = {len(old)} (one per row), got shape {labels.shape}")
    return old, new, labels.astype(np.int64)


def _pick_classes(labels: np.ndarray, classes: Iterable[int] | None, what: str = "classes"):
    """The classes asked for (default: all in labels, ascending), each with an image."""
    present = np.unique(labels)
    classes = present if classes is None else np.asarray(list(classes))
    missing = sorted(set(classes.tolist()) - set(present.tolist()))
    require(not missing, f"{what} {missing[:5]} have no image in labels")
    return classes


# one frame: fitted on the old model, new models placed into it ------------------------------------


def _import_umap():
    """`import umap`, with numba's on-disk cache for umap's own jitted functions: umap 0.5
    declares few of them cache=True (pynndescent does all of its own), the rest would be
    compiled again in every process. `enable_caching()` is what `cache=True` calls."""
    import umap
    from numba.core.dispatcher import Dispatcher

    for modname, module in list(sys.modules.items()):
        if module is None or modname.split(".")[0] != "umap":
            continue
        for obj in list(vars(module).values()):
            # umap's own (not imported) functions, not yet caching: NullCache is numba's "none"
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == modname \
                    and type(getattr(obj, "_cache", None)).__name__ == "NullCache":
                try:
                    obj.enable_caching()
                except RuntimeError:  # no writable cache folder anywhere: compile as usual
                    return umap
    return umap


@contextmanager
def _quiet_umap():
    """umap, with umap's, pynndescent's and numba's warnings (e.g. a disconnected kNN graph)
    silenced: nbval compares a cell's stderr, so a notebook cell must write nothing there."""
    with warnings.catch_warnings():
        for module in ("umap", "pynndescent", "numba"):
            warnings.filterwarnings("ignore", module=rf"{module}(\..*)?$")
        umap = _import_umap()
        from numba.core.errors import NumbaWarning

        warnings.simplefilter("ignore", NumbaWarning)
        yield umap


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class DriftMap:
    """A 2-D UMAP map of the old model's features, and new models drawn against it.
    old_features: [N, D] (numpy or torch), L2-normalised and fitted with the cosine metric;
    `old_2d` [N, 2] float32 is the map. Deterministic for a seed (random_state, which makes UMAP
    single-threaded, and transform_seed); silent (nothing on stderr). n_neighbors is capped at
    N - 1; n_epochs=None is UMAP's default. `place` is approximate: features equal to the old
    ones land near their fitted positions, not on them, so short arrows there are noise."""

    def __init__(self, old_features: Any, seed: int = 0, n_neighbors: int = 15,
                 min_dist: float = 0.1, n_epochs: int | None = None) -> None:
        old = _as_2d_array(old_features, "old_features")
        require(len(old) >= 4, f"need at least 4 images, got {len(old)}")  # spectral init
        require(n_neighbors >= 2, f"n_neighbors must be >= 2, got {n_neighbors}")
        self.dim = old.shape[1]
        self._settings = dict(
            n_neighbors=min(n_neighbors, len(old) - 1), min_dist=min_dist, metric="cosine",
            n_epochs=n_epochs, random_state=seed, transform_seed=seed,
            n_jobs=1,  # what random_state implies anyway; saying it avoids umap's warning
            verbose=False)  # no tqdm bars, no log lines
        with _quiet_umap() as umap:
            self._reducer = umap.UMAP(**self._settings)
            xy = self._reducer.fit_transform(_l2_normalise(old).astype(np.float32))
        self.old_2d = xy.astype(np.float32)  # a copy: the reducer keeps its own

    def align(self, new_features: Any, labels: Any) -> np.ndarray:
        """The same N images under a new model, [N, D] -> [N, 2]: the new model's own UMAP map
        (same settings and seed), rotated, reflected, scaled and shifted so that its class
        centroids best match the old map's (least squares: Procrustes). Each model keeps its own
        neighbourhoods, so the picture shows how well it still separates the classes; `place`
        shows instead where the old model's neighbourhoods put its features (what a gallery
        embedded by the old model sees: compatibility)."""
        _, new, labels = _check_pair(np.zeros((len(self.old_2d), self.dim)), new_features,
                                     labels)
        with _quiet_umap() as umap:
            xy = umap.UMAP(**self._settings).fit_transform(_l2_normalise(new).astype(np.float32))
        classes = np.unique(labels)
        a = np.stack([xy[labels == c].mean(0) for c in classes])
        b = np.stack([self.old_2d[labels == c].mean(0) for c in classes])
        a0, b0 = a - a.mean(0), b - b.mean(0)
        rotation, singular_sum = orthogonal_procrustes(a0, b0)
        scale = singular_sum / max((a0**2).sum(), 1e-12)
        return ((xy - a.mean(0)) @ rotation * scale + b.mean(0)).astype(np.float32)

    def place(self, new_features: Any) -> np.ndarray:
        """[N', D] new features -> [N', 2] float32, placed into the old map by UMAP's transform."""
        new = _as_2d_array(new_features, "new_features")
        require(new.shape[1] == self.dim and len(new) > 0,
                f"new_features must be [N', {self.dim}] with N' >= 1 (the dimension the map "
                f"was fitted on), got shape {new.shape}")
        with _quiet_umap():
            xy = self._reducer.transform(_l2_normalise(new).astype(np.float32))
        return xy.astype(np.float32)  # a copy: for the fitted array umap returns its own


# the numbers: how far classes moved, in feature space ---------------------------------------------


def map_recall_at_1(xy: Any, labels: Any) -> float:
    """Leave-one-out nearest neighbour in a 2-D map (Euclidean): the share of points whose
    nearest other point has their label, the map's R@1 to set beside the features' R@1."""
    xy, labels = _as_2d_array(xy, "xy"), np.asarray(labels)
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def _centroids(x: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[C, D]: per class, the mean of its images' L2-normalised features (not re-normalised)."""
    x = _l2_normalise(x)
    return np.stack([x[labels == c].mean(0) for c in classes.tolist()])


def centroid_shift(
    old_features: Any, new_features: Any, labels: Any, classes: Iterable[int] | None = None
) -> dict[int, float]:
    """{class: 1 - cos(m_old, m_new)}: how far each class's mean direction turned (0 not at
    all, 1 orthogonal). old_features, new_features [N, D]: the same N images under both models;
    labels [N]; m_old, m_new the means of a class's L2-normalised features. classes: which
    (default: all in labels, ascending). Meaningful because the new model continues the old."""
    old, new, labels = _check_pair(old_features, new_features, labels)
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
    """How far classes moved, in units of how far apart classes are (0 nothing moved, 1 a class
    moved as far as two classes are apart): mean over classes of ||m_new(c) - m_old(c)|| over
    the mean over class pairs of ||m_old(c) - m_old(c')||, with the inputs and m as in
    `centroid_shift`. classes: which classes both means run over (default: all in labels)."""
    old, new, labels = _check_pair(old_features, new_features, labels)
    classes = _pick_classes(labels, classes)
    require(len(classes) >= 2,
            f"need at least 2 classes for the distance between classes, got {len(classes)}")
    m_old, m_new = _centroids(old, labels, classes), _centroids(new, labels, classes)
    shift = np.linalg.norm(m_new - m_old, axis=1).mean()
    i, j = np.triu_indices(len(classes), k=1)  # each unordered pair once
    gap = np.linalg.norm(m_old[i] - m_old[j], axis=1).mean()
    require(gap >= 1e-12, "all class centroids coincide in the old model: no scale to judge by")
    return float(shift / gap)


# the picture --------------------------------------------------------------------------------------


def plot_drift(
    old_2d: Any, new_2d: Any, labels: Any, old_classes: Iterable[int], class_names: list[str],
    ax: Any = None, arrows: str | None = "centroids", max_sample_arrows: int = 200, seed: int = 0,
    title: str | None = "feature drift: old model (hollow) → new model (filled)",
) -> Any:
    """Scatter both models' points in one frame and draw how the old classes moved.
    old_2d, new_2d [N, 2]: `m.old_2d` and `m.align(...)` or `m.place(...)` of one DriftMap `m`
    (to compare methods, one axis each with the same `m`). labels [N]; old_classes: the classes
    learned before the new model's task (coloured; the others grey). Old-model points hollow,
    new-model points filled. arrows: "centroids" (a class's old centroid -> its new one),
    "samples" (per image, at most `max_sample_arrows` drawn with `seed`), "both" or None. Class
    names mark the new centroids when there are at most 20 old classes. Returns the Axes."""
    import matplotlib.pyplot as plt

    require(arrows in ARROWS, f"arrows must be one of {ARROWS}, got {arrows!r}")
    old_2d, new_2d, labels = _check_pair(old_2d, new_2d, labels)
    require(old_2d.shape[1] == 2,
            f"old_2d and new_2d must be [N, 2] map coordinates, got {old_2d.shape}")
    old_classes = sorted({int(c) for c in old_classes})
    _pick_classes(labels, old_classes, "old classes")
    require(labels.min() >= 0 and labels.max() < len(class_names),
            f"labels must index class_names (0..{len(class_names) - 1})")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 6.5))

    colours = dict(zip(old_classes, _class_colours(len(old_classes)), strict=True))
    is_old = np.isin(labels, old_classes)
    ax.scatter(*old_2d[~is_old].T, s=12, facecolors="none", edgecolors=GREY, linewidths=0.6)
    ax.scatter(*new_2d[~is_old].T, s=10, color=GREY, linewidths=0)
    for c in old_classes:
        m = labels == c
        ax.scatter(*old_2d[m].T, s=16, facecolors="none", edgecolors=[colours[c]], linewidths=0.8)
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
            _centroid_arrow(ax, old_2d[m].mean(0), new_2d[m].mean(0), colours[c],
                            class_names[c] if len(old_classes) <= 20 else None)
    _legend(ax, colours, class_names)
    ax.set(xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    if title:
        ax.set_title(title)
    return ax


def _class_colours(n: int) -> list:
    import matplotlib as mpl

    if n <= 20:  # distinct qualitative colours while there are enough
        return [mpl.colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)]
    return [mpl.colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]


def _centroid_arrow(ax: Any, a: np.ndarray, b: np.ndarray, colour: Any, name: str | None):
    """An arrow from old centroid a (hollow) to new centroid b (filled), b named if `name`."""
    # a black under-stroke keeps light colours visible over the points
    for c, lw in (("black", 3.5), (colour, 2.0)):
        ax.annotate("", xy=b, xytext=a,
                    arrowprops=dict(arrowstyle="-|>", color=c, lw=lw, shrinkA=0, shrinkB=0))
    ax.scatter(*a, s=90, facecolors="white", edgecolors=[colour], linewidths=2, zorder=3)
    ax.scatter(*b, s=90, color=colour, edgecolors="black", linewidths=1, zorder=3)
    if name is not None:
        ax.annotate(name, b, xytext=(4, 4), textcoords="offset points", fontsize=9, weight="bold")


def _legend(ax: Any, colours: dict, class_names: list[str]) -> None:
    """Hollow / filled / grey, then each old class's colour when there are at most 10."""
    from matplotlib.lines import Line2D

    def dot(**style: Any) -> Line2D:
        return Line2D([], [], ls="", marker="o", **style)

    handles = [dot(mfc="none", mec="0.3", label="old model"), dot(color="0.3", label="new model"),
               dot(color=GREY, label="new-task classes")]
    if len(colours) <= 10:
        handles += [dot(color=colour, label=class_names[c]) for c, colour in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False)

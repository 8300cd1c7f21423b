"""A retrieval explorer for notebooks: pick a test image, see what each model retrieves for it.

Every test image can be a query; the gallery is all the *other* test images (leave-one-out, as
in csdkit.metrics and the paper), ranked by cosine similarity of the features. Two models side
by side (say fine-tuning and CSD after the last task) show what forgetting looks like for one
query: an old-class query whose neighbours turned into new-class images. With a gallery
control, each model's query searches another model's features of the other images instead (an
old gallery that was never re-embedded: compatibility, notebook 08). Two halves: the
ranking (`model_features`, `rank_query`: tensors in, plain dicts out) and the widget that shows
it, drawn with matplotlib's object API (no stray pyplot figure in a cell).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from csdkit import metrics, require
from csdkit.models import extract

NONE = "none"  # model B's "show one model only" choice
OWN = "own"  # the gallery control's "each model searches its own features" choice
MAX_K = 10  # the k slider's upper end: more thumbnails than this are too small to read
RIGHT, WRONG, QUERY = "#1a9850", "#d73027", "#2166ac"  # border colours: green, red, blue


# the ranking: no widgets, no drawing --------------------------------------------------------------


def model_features(models: Mapping[str, nn.Module | torch.Tensor | np.ndarray],
                   images: torch.Tensor, mean: Any, std: Any) -> dict[str, torch.Tensor]:
    """name -> float32 CPU features [N, D]: a model's are extracted once, an array is checked."""
    require(isinstance(models, Mapping) and len(models) > 0,
            "models must be a non-empty dict: display name -> model or features")
    out = {}
    for name, m in models.items():
        require(isinstance(name, str) and name != NONE,
                f"model names must be strings other than {NONE!r}, got {name!r}")
        if isinstance(m, nn.Module):
            require(mean is not None and std is not None,
                    f"model {name!r} needs mean and std to normalise the images")
            f = extract(m, images, mean, std)[0].cpu()
        else:
            require(isinstance(m, torch.Tensor | np.ndarray),
                    f"models[{name!r}] must be a model or features [N, D], got "
                    f"{type(m).__name__}")
            f = torch.as_tensor(m).detach().cpu().float()
        require(f.ndim == 2 and len(f) == len(images),
                f"features of {name!r} have shape {tuple(f.shape)}; expected "
                f"[{len(images)}, D], one row per image")
        out[name] = f
    return out


def rank_query(features: torch.Tensor, labels: torch.Tensor, query: int, k: int,
               gallery: torch.Tensor | None = None) -> dict:
    """Top-k of image `query` among all the others: one row of the leave-one-out evaluation.
    features [N, D], labels [N]; gallery [N, D]: the same images embedded by another model,
    which the query (always from `features`) searches instead of its own model's. Returns plain
    lists (indices, labels, scores: cosines to 6 digits, correct) of the top k, recall_at_1, ap
    (what metrics.mean_average_precision averages over queries; nan if the query is alone in its
    class), margin and first_hit_rank."""
    f, y = features, labels
    g = f if gallery is None else gallery
    others = torch.cat([torch.arange(query), torch.arange(query + 1, len(y))])
    scores, idx = metrics.retrieve(f[query : query + 1], g[others], k)  # [1, k] each
    indices = others[idx[0]]
    correct = (y[indices] == y[query]).tolist()
    try:
        ap = metrics.mean_average_precision(f[query : query + 1], y[query : query + 1],
                                            gallery=g[others], gallery_labels=y[others])
    except ValueError:  # the query is the only image of its class: AP is undefined
        ap = float("nan")
    # Pooled post-ReLU features are all >= 0, so every cosine is high (0.9 and up) for right
    # and wrong neighbours alike. What decides retrieval is the gap between them: the margin
    # of the best same-class image over the best other-class one (> 0: R@1 hit).
    sim = F.normalize(g[others].float(), dim=1) @ F.normalize(f[query].float(), dim=0)
    same = y[others] == y[query]
    best = sim[same].max() if same.any() else None
    return {
        "indices": indices.tolist(),
        "labels": y[indices].tolist(),
        "scores": [round(s, 6) for s in scores[0].tolist()],
        "correct": correct,
        "recall_at_1": float(correct[0]),  # R@1 of one query: is its nearest image a hit
        "ap": ap,
        "margin": (best - sim[~same].max()).item() if best is not None and (~same).any()
        else float("nan"),
        "first_hit_rank": int((sim > best).sum()) + 1 if best is not None else None,
    }


# the widget ---------------------------------------------------------------------------------------


class RetrievalExplorer:
    """Interactive leave-one-out retrieval for one query at a time, for one or two models.

    models: display name -> a model (its features are extracted once) or features [N, D];
    images: uint8 [N, 3, H, W]; labels: [N] ints indexing `class_names`; mean, std: the models'
    normalisation (None if every entry is features); k: neighbours shown (1..10); query,
    model_a, model_b: the initial selection (model_b: the second model, or "none" if only one).
    gallery_control: add a gallery dropdown (every model's features must then have one width):
    "own", or the model whose features of the other images every shown query searches.
    Widgets (CSS class for browser tests): query (csd-query), query_class (csd-class), model_a,
    model_b (csd-model-a, csd-model-b), gallery (csd-gallery; None without gallery_control),
    k (csd-k), summary (csd-summary), image (csd-results); `widget` is the whole VBox."""

    def __init__(
        self, models: Mapping[str, nn.Module | torch.Tensor | np.ndarray], images: torch.Tensor,
        labels: Any, mean: Any, std: Any, class_names: list[str], k: int = 5, *, query: int = 0,
        model_a: str | None = None, model_b: str | None = None, min_pixels: int = 64,
        gallery_control: bool = False,
    ) -> None:
        self.images, self.labels, self.class_names = _check_data(images, labels, class_names)
        self.features = model_features(models, self.images, mean, std)
        widths = {name: f.shape[1] for name, f in self.features.items()}
        require(not gallery_control or len(set(widths.values())) == 1, "gallery_control needs "
                f"features of one width, to search each other's gallery; got {widths}")
        self._cells: dict[tuple[str, str], float] = {}  # (query model, gallery) -> R@1, memo
        self.min_pixels = min_pixels
        n, names = len(self.labels), list(self.features)
        self.max_k = min(MAX_K, n - 1)  # a query can retrieve at most the n - 1 other images
        classes, first = np.unique(self.labels.numpy(), return_index=True)  # ascending
        self.first_of_class = dict(zip(classes.tolist(), first.tolist(), strict=True))

        # built with neutral values; select() below checks and sets the caller's
        self.query = _control(widgets.IntSlider, "query", "csd-query", "420px", min=0,
                              max=n - 1, continuous_update=False)
        self.query_class = _control(widgets.Dropdown, "class", "csd-class", "240px", options=[
            (f"{c}: {self.class_names[c]}", c) for c in self.first_of_class])
        self.model_a = _control(widgets.Dropdown, "model A", "csd-model-a", "300px", options=names)
        self.model_b = _control(widgets.Dropdown, "model B", "csd-model-b", "300px",
                                options=[NONE, *names])
        self.k = _control(widgets.IntSlider, "k", "csd-k", "260px", min=1, max=self.max_k,
                          continuous_update=False)
        self.gallery = _control(widgets.Dropdown, "gallery", "csd-gallery", "300px",
                                options=[OWN, *names]) if gallery_control else None
        self.summary = widgets.HTML()
        self.summary.add_class("csd-summary")
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.image.add_class("csd-results")
        self.widget = widgets.VBox([widgets.HBox([self.query, self.query_class]),
                                    widgets.HBox([self.model_a, self.model_b, self.k]),
                                    *([self.gallery] if self.gallery else []),
                                    self.summary, self.image])
        self.widget.add_class("csd-explorer")

        self.results: dict[str, dict] = {}
        self._syncing = False  # True while we move a widget ourselves: observers stand back
        self.query.observe(self._on_query, names="value")
        self.query_class.observe(self._on_class, names="value")
        for w in (self.model_a, self.model_b, self.k, self.gallery):
            if w is not None:
                w.observe(self._on_change, names="value")
        default_b = names[1] if len(names) > 1 else NONE  # one model: shown alone
        self.select(query, None, names[0] if model_a is None else model_a,
                    default_b if model_b is None else model_b, k)

    @property
    def shown_models(self) -> list[str]:
        """Model A, then model B unless it is "none" or the same model as A."""
        a, b = self.model_a.value, self.model_b.value
        return [a] if b in (NONE, a) else [a, b]

    def gallery_of(self, model: str) -> str:
        """Whose features of the other images `model`'s query searches now."""
        return model if self.gallery is None or self.gallery.value == OWN else self.gallery.value

    def recall_in_gallery(self, model: str, gallery: str) -> float:
        """R@1 of every image as a query of `model` in `gallery`'s features of the others: the
        compatibility matrix's cell for that pair (metrics.compatibility_matrix), memoised."""
        key = (model, gallery)
        if key not in self._cells:
            self._cells[key] = metrics.recall_at_k(self.features[model], self.labels,
                                                   gallery=self.features[gallery])
        return self._cells[key]

    def refresh(self) -> None:
        """Recompute `results`, the summary and the image for the current widget values."""
        q, k = self.query.value, self.k.value
        self.results = {}
        for m in self.shown_models:
            g = self.gallery_of(m)
            self.results[m] = {**rank_query(self.features[m], self.labels, q, k,
                                            gallery=self.features[g]),
                               "gallery": g, "recall_all": self.recall_in_gallery(m, g)}
        self.summary.value = _summary_html(self.results, q, k, self.labels, self.class_names)
        self.image.value = self.render_png()

    def select(
        self, query: int | None = None, query_class: int | None = None,
        model_a: str | None = None, model_b: str | None = None, k: int | None = None,
        gallery: str | None = None,
    ) -> None:
        """Set several controls at once (one refresh), with ValueErrors for bad values.
        query_class jumps to the first image of that class, like the dropdown; give query or
        query_class, not both."""
        require(query is None or query_class is None,
                "give query or query_class, not both (query_class picks a query)")
        if query_class is not None:
            _check_in("query_class", query_class, list(self.first_of_class))
            query = self.first_of_class[query_class]
        require(gallery is None or self.gallery is not None,
                "this explorer has no gallery control: build it with gallery_control=True")
        given = dict(query=query, model_a=model_a, model_b=model_b, k=k, gallery=gallery)
        moves = {name: v for name, v in given.items() if v is not None}
        # check every value before any widget moves, so that a bad one changes nothing
        for name, v in moves.items():
            w = getattr(self, name)
            _check_in(name, v, list(w.options) if isinstance(w, widgets.Dropdown)
                      else range(w.min, w.max + 1))
        with self._synced():
            for name, v in moves.items():
                getattr(self, name).value = v
            self.query_class.value = int(self.labels[self.query.value])
        self.refresh()

    # observers: a user's change in one widget, with the others kept in step

    @contextmanager
    def _synced(self):
        """While we move widgets ourselves, observers stand back (no refresh per widget)."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _on_query(self, change: dict) -> None:
        if not self._syncing:
            with self._synced():  # the class dropdown follows the query, without a jump
                self.query_class.value = int(self.labels[change["new"]])
            self.refresh()

    def _on_class(self, change: dict) -> None:
        if not self._syncing:
            self.query.value = self.first_of_class[change["new"]]  # _on_query refreshes

    def _on_change(self, change: dict) -> None:
        if not self._syncing:
            self.refresh()

    # drawing

    def _thumbnail(self, i: int) -> np.ndarray:
        """Image i as [H', W', 3] uint8, upscaled by a whole factor: 16x16 glyphs stay crisp."""
        x = self.images[i].permute(1, 2, 0).numpy()
        s = max(1, math.ceil(self.min_pixels / max(x.shape[:2])))
        return x.repeat(s, axis=0).repeat(s, axis=1)

    def figure(self) -> Figure:
        """The current grid as a matplotlib Figure: a row per shown model, the query first."""
        q, k, names = self.query.value, self.k.value, self.class_names
        fig = Figure(figsize=(1.3 * (k + 1) + 0.4, 1.75 * len(self.results)), dpi=100,
                     layout="constrained")
        axes = fig.subplots(len(self.results), k + 1, squeeze=False)
        for row, (name, r) in zip(axes, self.results.items(), strict=True):
            ap = "AP n/a" if math.isnan(r["ap"]) else f"AP {r['ap']:.2f}"
            hit = "R@1 hit" if r["recall_at_1"] else "R@1 miss"
            hit += "" if math.isnan(r["margin"]) else f"\nmargin {r['margin']:+.3f}"
            _show(row[0], self._thumbnail(q), f"query {q}\n{names[int(self.labels[q])]}", QUERY)
            where = "" if r["gallery"] == name else f"\nin {r['gallery']}'s gallery"
            row[0].set_ylabel(f"{name}{where}\n{hit}, {ap}", fontsize=8)
            for ax, i, lab, ok, s in zip(row[1:], r["indices"], r["labels"], r["correct"],
                                         r["scores"], strict=True):
                _show(ax, self._thumbnail(i), f"{'✓' if ok else '✗'} {names[lab]}\n{s:.2f}",
                      RIGHT if ok else WRONG)
        return fig

    def render_png(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """Display the explorer itself as its widget (`explorer` as a cell's last line)."""
        return self.widget._repr_mimebundle_(**kwargs)


def _control(kind: type, description: str, css: str, width: str, **kwargs: Any) -> Any:
    """A labelled control with its CSS class (the handle browser tests find it by)."""
    w = kind(description=description, style={"description_width": "initial"},
             layout=widgets.Layout(width=width), **kwargs)
    w.add_class(css)
    return w


def _summary_html(results: dict, q: int, k: int, labels: torch.Tensor, names: list[str]) -> str:
    """The summary table; data-* attributes carry the same state for browser tests."""
    y, e = int(labels[q]), html.escape
    rows = []
    for model, r in results.items():
        hits = ", ".join(f"{e(names[lab])} {'✓' if ok else '✗'} {s:.3f}"
                         for lab, ok, s in zip(r["labels"], r["correct"], r["scores"], strict=True))
        ids = ",".join(map(str, r["labels"]))
        ap = "n/a" if math.isnan(r["ap"]) else f"{r['ap']:.3f}"
        margin = "n/a" if math.isnan(r["margin"]) else f"{r['margin']:+.3f}"
        rows.append(f'<tr class="csd-row" data-model="{e(model)}" data-labels="{ids}" '
                    f'data-gallery="{e(r["gallery"])}"><td>{e(model)}</td>'
                    f'<td>{e(r["gallery"])}</td><td>{hits}</td><td class="csd-labels">{ids}</td>'
                    f"<td>{'hit' if r['recall_at_1'] else 'miss'}</td><td>{ap}</td>"
                    f"<td>{margin}</td><td>{r['first_hit_rank'] or 'n/a'}</td>"
                    f'<td class="csd-cell">{r["recall_all"]:.3f}</td></tr>')
    return (
        "<style>.csd-summary-text td, .csd-summary-text th "
        "{padding: 2px 10px; text-align: left}</style>"
        f'<div class="csd-summary-text" data-query="{q}" data-class="{y}" data-k="{k}">'
        f'<p>Query <b class="csd-query-index">{q}</b>: label {y}, class '
        f"<b>{e(names[y])}</b>. Gallery: the other {len(labels) - 1} "
        f"test images, by cosine similarity; the top {k} are shown. The last column is R@1 "
        "over every query of that model in that gallery.</p>"
        "<table><tr><th>query model</th><th>gallery</th><th>top-k: class ✓/✗ cosine</th>"
        "<th>label ids</th><th>R@1</th><th>AP</th><th>margin</th><th>first ✓ at rank</th>"
        "<th>R@1, all queries</th></tr>"
        + "".join(rows) + "</table><p>All cosines are high because the features are "
        "non-negative (averaged after a ReLU); the margin tells right from wrong: the "
        "cosine of the nearest same-class image minus that of the nearest other-class "
        "image (> 0: the top hit is right).</p></div>"
    )


def _show(ax: Any, image: np.ndarray, title: str, colour: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize=8, color=colour)
    for spine in ax.spines.values():  # the coloured frame says right (green) or wrong (red)
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


# checks of what a user passes in ------------------------------------------------------------------


def _check_in(what: str, value: Any, choices: list | range) -> None:
    """A choice from a list, or an integer (not a bool) in a range."""
    if isinstance(choices, range):
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
        require(ok and choices.start <= value < choices.stop, f"{what} must be an integer in "
                f"[{choices.start}, {choices.stop - 1}], got {value!r}")
    else:
        require(value in choices, f"unknown {what} {value!r}; choose one of {choices}")


def _check_data(images: Any, labels: Any, class_names: list[str]):
    """images as a CPU tensor, labels as a long tensor [N], class_names as a list."""
    require(isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            and images.ndim == 4 and images.shape[1] == 3,
            "images must be a uint8 tensor [N, 3, H, W], got "
            f"{tuple(images.shape) if hasattr(images, 'shape') else type(images).__name__}")
    labels = labels.cpu() if isinstance(labels, torch.Tensor) else labels
    labels, class_names = torch.as_tensor(np.asarray(labels)).long(), list(class_names)
    require(labels.ndim == 1 and len(labels) == len(images),
            f"labels must be [N] with N = {len(images)} (one per image), got shape "
            f"{tuple(labels.shape)}")
    require(len(labels) >= 2, "leave-one-out retrieval needs at least 2 images")
    require(0 <= labels.min() and labels.max() < len(class_names),
            f"labels must index class_names (0..{len(class_names) - 1}), got "
            f"range [{int(labels.min())}, {int(labels.max())}]")
    return images.cpu(), labels, class_names

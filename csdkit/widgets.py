"""A retrieval explorer for notebooks: pick a test image, see what each model retrieves for it.

Every test image can be a query; the gallery is all the *other* test images (leave-one-out, the
protocol of csdkit.metrics and of the paper), ranked by cosine similarity of the features. Two
models side by side (say fine-tuning and CSD after the last task) show what forgetting looks
like for one query: the old-class query whose neighbours turned into new-class images.

    explorer = RetrievalExplorer(
        {"finetune / task 5": ft_model, "csd / task 5": csd_model, "csd / task 1": csd_first},
        data.test.images, data.test.labels, data.mean, data.std, data.class_names,
    )
    explorer            # displays the controls, a summary and the image grid
    explorer.query.value = 7; explorer.results["csd / task 5"]["ap"]

Everything the display shows is also plain state (`explorer.results`, `explorer.summary.value`),
updated by the widgets' observers, so tests and notebooks can check it without a browser. The
grid is a PNG in an `ipywidgets.Image` drawn with matplotlib's object API (no pyplot), so no
stray figure or text lands in the cell's outputs: the notebook stays deterministic for nbval.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from csdkit import metrics
from csdkit.train import extract

NONE = "none"  # model B's "show one model only" choice
MAX_K = 10  # the k slider's upper end: more thumbnails than this are too small to read
RIGHT, WRONG, QUERY = "#1a9850", "#d73027", "#2166ac"  # border colours: green, red, blue


class RetrievalExplorer:
    """Interactive leave-one-out retrieval for one query at a time, for one or two models.

    models: display name -> a model (its features are extracted once here, with
        csdkit.train.extract, and cached) or precomputed features [N, D] (tensor or array).
    images: uint8 [N, 3, H, W], the test images, in the same order as the features.
    labels: [N] int labels, indexing `class_names`.
    mean, std: the normalisation used by the models (unused, may be None, when every entry of
        `models` is a feature array).
    k: how many neighbours to show (1..10).
    query, model_a, model_b: the initial selection; model_b defaults to the second model (or
        "none" when there is only one).

    Widgets (each with a stable description and a CSS class, for browser tests):
        query (IntSlider, csd-query), query_class (Dropdown, csd-class), model_a (Dropdown,
        csd-model-a), model_b (Dropdown, csd-model-b), k (IntSlider, csd-k),
        summary (HTML, csd-summary), image (Image, csd-results); `widget` is the whole VBox.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module | torch.Tensor | np.ndarray],
        images: torch.Tensor,
        labels: Any,
        mean: Any,
        std: Any,
        class_names: list[str],
        k: int = 5,
        *,
        query: int = 0,
        model_a: str | None = None,
        model_b: str | None = None,
        min_pixels: int = 64,
    ):
        self.images, self.labels, self.class_names = _check_data(images, labels, class_names)
        n = len(self.labels)
        self.features = _features_of(models, self.images, mean, std)  # name -> [N, D] float32
        self.min_pixels = min_pixels
        names = list(self.features)
        model_a = names[0] if model_a is None else model_a
        if model_b is None:
            model_b = names[1] if len(names) > 1 else NONE
        _check_choice("model_a", model_a, names)
        _check_choice("model_b", model_b, [NONE, *names])
        _check_int("query", query, 0, n - 1)
        self.max_k = min(MAX_K, n - 1)  # a query can retrieve at most the n - 1 other images
        _check_int("k", k, 1, self.max_k)

        # the first test image of each class: where the class dropdown jumps to
        first: dict[int, int] = {}
        for i, y in enumerate(self.labels.tolist()):
            first.setdefault(y, i)
        self.first_of_class = dict(sorted(first.items()))

        style = {"description_width": "initial"}
        self.query = widgets.IntSlider(
            value=query, min=0, max=n - 1, description="query", continuous_update=False,
            style=style, layout=widgets.Layout(width="420px"),
        )
        self.query_class = widgets.Dropdown(
            options=[(f"{c}: {self.class_names[c]}", c) for c in self.first_of_class],
            value=int(self.labels[query]), description="class", style=style,
            layout=widgets.Layout(width="240px"),
        )
        self.model_a = widgets.Dropdown(
            options=names, value=model_a, description="model A", style=style,
            layout=widgets.Layout(width="300px"),
        )
        self.model_b = widgets.Dropdown(
            options=[NONE, *names], value=model_b, description="model B", style=style,
            layout=widgets.Layout(width="300px"),
        )
        self.k = widgets.IntSlider(
            value=k, min=1, max=self.max_k, description="k", continuous_update=False,
            style=style, layout=widgets.Layout(width="260px"),
        )
        self.summary = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        for w, css in [(self.query, "csd-query"), (self.query_class, "csd-class"),
                       (self.model_a, "csd-model-a"), (self.model_b, "csd-model-b"),
                       (self.k, "csd-k"), (self.summary, "csd-summary"),
                       (self.image, "csd-results")]:
            w.add_class(css)
        self.widget = widgets.VBox([
            widgets.HBox([self.query, self.query_class]),
            widgets.HBox([self.model_a, self.model_b, self.k]),
            self.summary,
            self.image,
        ])
        self.widget.add_class("csd-explorer")

        self.results: dict[str, dict] = {}
        self._syncing = False  # True while we move a widget ourselves: observers stand back
        self.query.observe(self._on_query, names="value")
        self.query_class.observe(self._on_class, names="value")
        for w in (self.model_a, self.model_b, self.k):
            w.observe(self._on_change, names="value")
        self.refresh()

    # ----------------------------------------------------------------------------------------
    # what is shown

    @property
    def shown_models(self) -> list[str]:
        """Model A, then model B unless it is "none" or the same model as A."""
        names = [self.model_a.value]
        if self.model_b.value not in (NONE, self.model_a.value):
            names.append(self.model_b.value)
        return names

    def query_result(self, name: str, query: int, k: int) -> dict:
        """Top-k of `query` among the other images for model `name`, its R@1 and its AP.

        The gallery is every image but the query, so this is one row of the leave-one-out
        evaluation: its AP is what csdkit.metrics.mean_average_precision averages over queries.
        """
        f, labels = self.features[name], self.labels
        others = torch.cat([torch.arange(query), torch.arange(query + 1, len(labels))])
        scores, idx = metrics.retrieve(f[query : query + 1], f[others], k)  # [1, k] each
        indices = others[idx[0]]
        retrieved = labels[indices]
        correct = (retrieved == labels[query]).tolist()
        try:
            ap = metrics.mean_average_precision(
                f[query : query + 1], labels[query : query + 1],
                gallery=f[others], gallery_labels=labels[others],
            )
        except ValueError:  # the query is the only image of its class: AP is undefined
            ap = float("nan")
        # Pooled post-ReLU features are all >= 0, so every cosine is high (0.9 and up) for right
        # and wrong neighbours alike. What decides retrieval is the gap between them: the margin
        # of the best same-class image over the best other-class one (> 0: R@1 hit).
        sim = F.normalize(f[others].float(), dim=1) @ F.normalize(f[query].float(), dim=0)
        same = labels[others] == labels[query]
        margin = (sim[same].max() - sim[~same].max()).item() if same.any() and (~same).any() \
            else float("nan")
        first_hit = int((sim > sim[same].max()).sum()) + 1 if same.any() else None
        return {
            "indices": indices.tolist(),
            "labels": retrieved.tolist(),
            "scores": [round(s, 6) for s in scores[0].tolist()],
            "correct": correct,
            "recall_at_1": float(correct[0]),  # R@1 of one query: is its nearest image a hit
            "ap": ap,
            "margin": margin,
            "first_hit_rank": first_hit,
        }

    def refresh(self) -> None:
        """Recompute `results`, the summary and the image for the current widget values."""
        q, k = self.query.value, self.k.value
        self.results = {name: self.query_result(name, q, k) for name in self.shown_models}
        self.summary.value = self._summary_html()
        self.image.value = self.render_png()

    def select(
        self,
        query: int | None = None,
        query_class: int | None = None,
        model_a: str | None = None,
        model_b: str | None = None,
        k: int | None = None,
    ) -> None:
        """Set several controls at once (one refresh), with ValueErrors for bad values.

        query_class jumps to the first image of that class, like the dropdown; give query or
        query_class, not both.
        """
        if query is not None and query_class is not None:
            raise ValueError("give query or query_class, not both (query_class picks a query)")
        if query is not None:
            _check_int("query", query, 0, len(self.labels) - 1)
        if query_class is not None:
            _check_choice("query_class", query_class, list(self.first_of_class))
            query = self.first_of_class[query_class]
        if model_a is not None:
            _check_choice("model_a", model_a, list(self.model_a.options))
        if model_b is not None:
            _check_choice("model_b", model_b, list(self.model_b.options))
        if k is not None:
            _check_int("k", k, 1, self.max_k)
        self._syncing = True
        try:
            for w, v in [(self.query, query), (self.model_a, model_a), (self.model_b, model_b),
                         (self.k, k)]:
                if v is not None:
                    w.value = v
            self.query_class.value = int(self.labels[self.query.value])
        finally:
            self._syncing = False
        self.refresh()

    # ----------------------------------------------------------------------------------------
    # observers

    def _on_query(self, change: dict) -> None:
        if self._syncing:
            return
        self._syncing = True  # keep the class dropdown on the query's class without a jump
        try:
            self.query_class.value = int(self.labels[change["new"]])
        finally:
            self._syncing = False
        self.refresh()

    def _on_class(self, change: dict) -> None:
        if self._syncing:
            return
        self.query.value = self.first_of_class[change["new"]]  # _on_query refreshes

    def _on_change(self, change: dict) -> None:
        if not self._syncing:
            self.refresh()

    # ----------------------------------------------------------------------------------------
    # rendering

    def _summary_html(self) -> str:
        q, k = self.query.value, self.k.value
        y = int(self.labels[q])
        e = html.escape
        rows = []
        for name, r in self.results.items():
            hits = ", ".join(
                f"{e(self.class_names[lab])} {'✓' if ok else '✗'} {s:.3f}"
                for lab, ok, s in zip(r["labels"], r["correct"], r["scores"], strict=True)
            )
            labels = ",".join(map(str, r["labels"]))
            ap = "n/a" if math.isnan(r["ap"]) else f"{r['ap']:.3f}"
            margin = "n/a" if math.isnan(r["margin"]) else f"{r['margin']:+.3f}"
            rows.append(
                f'<tr class="csd-row" data-model="{e(name)}" data-labels="{labels}">'
                f"<td>{e(name)}</td><td>{hits}</td>"
                f'<td class="csd-labels">{labels}</td>'
                f"<td>{'hit' if r['recall_at_1'] else 'miss'}</td><td>{ap}</td>"
                f"<td>{margin}</td><td>{r['first_hit_rank'] or 'n/a'}</td></tr>"
            )
        return (
            "<style>.csd-summary-text td, .csd-summary-text th "
            "{padding: 2px 10px; text-align: left}</style>"
            f'<div class="csd-summary-text" data-query="{q}" data-class="{y}" data-k="{k}">'
            f'<p>Query <b class="csd-query-index">{q}</b>: label {y}, class '
            f"<b>{e(self.class_names[y])}</b>. Gallery: the other {len(self.labels) - 1} "
            f"test images, by cosine similarity; the top {k} are shown.</p>"
            "<table><tr><th>model</th><th>top-k: class ✓/✗ cosine</th><th>label ids</th>"
            "<th>R@1</th><th>AP</th><th>margin</th><th>first ✓ at rank</th></tr>"
            + "".join(rows) + "</table><p>All cosines are high because the features are "
            "non-negative (averaged after a ReLU); the margin tells right from wrong: the "
            "cosine of the nearest same-class image minus that of the nearest other-class "
            "image (> 0: the top hit is right).</p></div>"
        )

    def _thumbnail(self, i: int) -> np.ndarray:
        """Image i as [H', W', 3] uint8, upscaled by an integer factor (nearest neighbour) so
        that 16x16 glyphs stay crisp and legible."""
        x = self.images[i].permute(1, 2, 0).numpy()
        s = max(1, math.ceil(self.min_pixels / max(x.shape[:2])))
        return x.repeat(s, axis=0).repeat(s, axis=1)

    def figure(self) -> Figure:
        """The current grid as a matplotlib Figure: a row per shown model, the query first."""
        q, k = self.query.value, self.k.value
        rows = len(self.results)
        fig = Figure(figsize=(1.3 * (k + 1) + 0.4, 1.75 * rows), dpi=100, layout="constrained")
        axes = fig.subplots(rows, k + 1, squeeze=False)
        for row, (name, r) in zip(axes, self.results.items(), strict=True):
            ap = "AP n/a" if math.isnan(r["ap"]) else f"AP {r['ap']:.2f}"
            hit = "R@1 hit" if r["recall_at_1"] else "R@1 miss"
            hit += "" if math.isnan(r["margin"]) else f"\nmargin {r['margin']:+.3f}"
            _show(row[0], self._thumbnail(q), f"query {q}\n{self.class_names[int(self.labels[q])]}",
                  QUERY)
            row[0].set_ylabel(f"{name}\n{hit}, {ap}", fontsize=8)
            for ax, i, lab, ok, s in zip(row[1:], r["indices"], r["labels"], r["correct"],
                                         r["scores"], strict=True):
                mark = "✓" if ok else "✗"
                _show(ax, self._thumbnail(i), f"{mark} {self.class_names[lab]}\n{s:.2f}",
                      RIGHT if ok else WRONG)
        return fig

    def render_png(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """Display the explorer itself as its widget (`explorer` as a cell's last line)."""
        return self.widget._repr_mimebundle_(**kwargs)


# --------------------------------------------------------------------------------------------
# helpers


def _show(ax, image: np.ndarray, title: str, colour: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, color=colour)
    for spine in ax.spines.values():  # the coloured frame says right (green) or wrong (red)
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _check_data(images: Any, labels: Any, class_names: list[str]):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got {shape}")
    labels = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor)
                                        else labels)).long()
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be [N] with N = {len(images)} (one per image), got "
                         f"shape {tuple(labels.shape)}")
    if len(labels) < 2:
        raise ValueError("leave-one-out retrieval needs at least 2 images")
    class_names = list(class_names)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must index class_names (0..{len(class_names) - 1}), got "
                         f"range [{int(labels.min())}, {int(labels.max())}]")
    return images.cpu(), labels, class_names


def _features_of(models: Mapping, images: torch.Tensor, mean: Any, std: Any) -> dict:
    """name -> float32 CPU features [N, D]: extracted once for a model, checked for an array."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict: display name -> model or features")
    out = {}
    for name, m in models.items():
        if not isinstance(name, str) or name == NONE:
            raise ValueError(f"model names must be strings other than {NONE!r}, got {name!r}")
        if isinstance(m, nn.Module):
            if mean is None or std is None:
                raise ValueError(f"model {name!r} needs mean and std to normalise the images")
            f = extract(m, images, mean, std)[0].cpu()
        elif isinstance(m, torch.Tensor | np.ndarray):
            f = torch.as_tensor(m).detach().cpu().float()
        else:
            raise ValueError(f"models[{name!r}] must be a model or features [N, D], got "
                             f"{type(m).__name__}")
        if f.ndim != 2 or len(f) != len(images):
            raise ValueError(f"features of {name!r} have shape {tuple(f.shape)}; expected "
                             f"[{len(images)}, D], one row per image")
        out[name] = f
    return out


def _check_choice(what: str, value: Any, choices: list) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


def _check_int(what: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")

"""RetrievalExplorer without a browser: its state after the widgets change, against oracles.

Oracles: numpy cosine rankings written from the definitions (leave-one-out top-k, R@1 of one
query, AP as the mean precision at each positive's rank) and csdkit.metrics on the single query.
The synthetic features are continuous, so no two similarities tie and every ranking is unique.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import csdkit.widgets as widgets_module
from csdkit import metrics
from csdkit.models import resnet
from csdkit.train import extract
from csdkit.widgets import RetrievalExplorer

torch.set_num_threads(1)

N, C, D = 40, 4, 8
NAMES = ["apple", "bear", "cat", "dog"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_set(seed: int = 0):
    """40 random uint8 images, shuffled labels of 4 classes, two feature sets with some class
    structure (so that some queries hit and some miss)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (N, 3, 16, 16), dtype=np.uint8))
    labels = np.arange(N) % C
    rng.shuffle(labels)
    centres = rng.normal(size=(C, D))
    feats = {
        "model x": centres[labels] + rng.normal(scale=1.5, size=(N, D)),
        "model y": centres[labels] + rng.normal(scale=0.7, size=(N, D)),
    }
    return images, torch.from_numpy(labels), feats


@pytest.fixture(autouse=True)
def no_png(monkeypatch, request):
    """Drawing a PNG is most of an update's time; tests of state skip it (test_render draws)."""
    if "render" not in request.node.name:
        monkeypatch.setattr(RetrievalExplorer, "render_png", lambda self: b"")


@pytest.fixture
def data():
    return make_set()


@pytest.fixture
def explorer(data):
    images, labels, feats = data
    return RetrievalExplorer(feats, images, labels, None, None, NAMES, k=5)


# ------------------------------------------------------------------------------------------------
# oracles


def oracle_topk(f: np.ndarray, q: int, k: int) -> list[int]:
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f[q]
    sim[q] = -np.inf  # leave-one-out: the query is not in its own gallery
    return np.argsort(-sim)[:k].tolist()


def oracle_ap(f: np.ndarray, labels: np.ndarray, q: int) -> float:
    ranking = oracle_topk(f, q, len(f) - 1)
    rel = labels[ranking] == labels[q]
    precision_at_hits = [rel[: r + 1].mean() for r in np.flatnonzero(rel)]
    return float(np.mean(precision_at_hits))


# ------------------------------------------------------------------------------------------------
# state follows the widgets


def test_initial_state_shows_two_models(explorer):
    assert explorer.query.value == 0 and explorer.k.value == 5
    assert list(explorer.results) == ["model x", "model y"]
    assert explorer.model_b.value == "model y"


@pytest.mark.parametrize("q", [7, 0, N - 1])
def test_setting_the_query_gives_the_brute_force_top_k(explorer, data, q):
    _, labels, feats = data
    explorer.query.value = q
    for name, r in explorer.results.items():
        want = oracle_topk(feats[name], q, 5)
        assert r["indices"] == want
        assert r["labels"] == labels[want].tolist()
        assert q not in r["indices"]
        assert r["scores"] == sorted(r["scores"], reverse=True)
    assert explorer.query_class.value == int(labels[q])  # the dropdown follows the query


def test_k_changes_the_number_of_results(explorer, data):
    _, _, feats = data
    explorer.query.value = 3
    for k in (1, 10, 2):
        explorer.k.value = k
        for name, r in explorer.results.items():
            assert len(r["indices"]) == len(r["labels"]) == len(r["correct"]) == k
            assert r["indices"] == oracle_topk(feats[name], 3, k)
        assert f'data-k="{k}"' in explorer.summary.value


def test_class_dropdown_jumps_to_the_first_image_of_the_class(explorer, data):
    _, labels, feats = data
    for c in (2, 0, 3):
        explorer.query_class.value = c
        first = int(np.flatnonzero(labels.numpy() == c)[0])
        assert explorer.query.value == first
        assert explorer.results["model x"]["indices"] == oracle_topk(feats["model x"], first, 5)
    # moving the query to a later image of a class updates the dropdown but does not jump back
    later = int(np.flatnonzero(labels.numpy() == 1)[2])
    explorer.query.value = later
    assert explorer.query.value == later and explorer.query_class.value == 1


def test_model_b_none_shows_one_row(explorer):
    explorer.model_b.value = "none"
    assert list(explorer.results) == ["model x"]
    assert explorer.summary.value.count('class="csd-row"') == 1
    explorer.model_a.value = "model y"
    assert list(explorer.results) == ["model y"]
    explorer.model_b.value = "model x"
    assert list(explorer.results) == ["model y", "model x"]
    assert explorer.summary.value.count('class="csd-row"') == 2
    explorer.model_b.value = "model y"  # the same model twice is shown once
    assert list(explorer.results) == ["model y"]


@pytest.mark.parametrize("q", range(0, N, 3))
def test_correct_flags_recall_and_ap_match_the_metrics(explorer, data, q):
    _, labels, feats = data
    explorer.query.value = q
    y = labels.numpy()
    others = np.delete(np.arange(N), q)
    for name, r in explorer.results.items():
        f = feats[name]
        assert r["correct"] == [bool(y[i] == y[q]) for i in r["indices"]]
        r1 = metrics.recall_at_k(f[q : q + 1], y[q : q + 1], k=1, gallery=f[others],
                                 gallery_labels=y[others])
        assert r["recall_at_1"] == r1 == float(y[oracle_topk(f, q, 1)[0]] == y[q])
        ap = metrics.mean_average_precision(f[q : q + 1], y[q : q + 1], gallery=f[others],
                                            gallery_labels=y[others])
        assert r["ap"] == pytest.approx(ap, abs=1e-6)
        assert r["ap"] == pytest.approx(oracle_ap(f, y, q), abs=1e-6)


@pytest.mark.parametrize("q", [3, 11, 25])
def test_margin_and_first_hit_rank_follow_the_brute_force_ranking(explorer, data, q):
    _, labels, feats = data
    explorer.query.value = q
    y = labels.numpy()
    for name, r in explorer.results.items():
        f = feats[name] / np.linalg.norm(feats[name], axis=1, keepdims=True)
        sim = f @ f[q]
        same = (y == y[q]) & (np.arange(N) != q)
        other = y != y[q]
        assert r["margin"] == pytest.approx(sim[same].max() - sim[other].max(), abs=1e-5)
        assert (r["margin"] > 0) == bool(r["recall_at_1"])
        ranking = oracle_topk(feats[name], q, N - 1)
        assert r["first_hit_rank"] == 1 + next(i for i, j in enumerate(ranking) if y[j] == y[q])


def test_per_query_ap_averages_to_the_leave_one_out_map(explorer, data):
    _, labels, feats = data
    aps = []
    for q in range(N):
        explorer.query.value = q
        aps.append(explorer.results["model x"]["ap"])
    assert np.mean(aps) == pytest.approx(
        metrics.mean_average_precision(feats["model x"], labels), abs=1e-6)


def test_summary_states_query_and_retrieved_labels(explorer):
    explorer.select(query=11, k=3)
    html = explorer.summary.value
    assert 'class="csd-query-index">11<' in html and 'data-query="11"' in html
    for name, r in explorer.results.items():
        labels = ",".join(map(str, r["labels"]))
        assert f'data-model="{name}" data-labels="{labels}"' in html
        assert f'<td class="csd-labels">{labels}</td>' in html  # also as visible text
        names = [NAMES[y] for y in r["labels"]]
        assert all(n in html for n in names)


def test_select_sets_several_controls_at_once(explorer, data):
    _, labels, feats = data
    explorer.select(query_class=3, model_a="model y", model_b="none", k=2)
    first = int(np.flatnonzero(labels.numpy() == 3)[0])
    assert explorer.query.value == first and explorer.query_class.value == 3
    assert list(explorer.results) == ["model y"]
    assert explorer.results["model y"]["indices"] == oracle_topk(feats["model y"], first, 2)


def test_query_alone_in_its_class_has_undefined_ap(data):
    images, labels, feats = data
    labels = labels.clone()
    labels[5] = 4  # a fifth class with a single image
    e = RetrievalExplorer(feats, images, labels, None, None, [*NAMES, "eel"], query=5)
    for r in e.results.values():
        assert np.isnan(r["ap"]) and r["recall_at_1"] == 0.0 and not any(r["correct"])
    assert "n/a" in e.summary.value


# ------------------------------------------------------------------------------------------------
# models, caching, determinism, rendering


def test_models_are_embedded_once_and_cached(data, monkeypatch):
    images, labels, _ = data
    torch.manual_seed(0)
    a = resnet(8, C)
    torch.manual_seed(1)
    b = resnet(8, C)
    calls = []

    def counting_extract(model, *args, **kwargs):
        calls.append(model)
        return extract(model, *args, **kwargs)

    monkeypatch.setattr(widgets_module, "extract", counting_extract)
    e = RetrievalExplorer({"a": a, "b": b}, images, labels, MEAN, STD, NAMES)
    for q in (1, 2, 3):
        e.query.value = q
    e.k.value = 7
    assert calls == [a, b]
    fa = extract(a, images, MEAN, STD)[0]
    assert torch.equal(e.features["a"], fa)
    assert e.results["a"]["indices"] == oracle_topk(fa.numpy(), 3, 7)


def test_the_same_inputs_give_the_same_state(data):
    images, labels, feats = data
    e1 = RetrievalExplorer(feats, images, labels, None, None, NAMES, query=9)
    e2 = RetrievalExplorer(feats, images, labels, None, None, NAMES, query=9)
    assert e1.results == e2.results and e1.summary.value == e2.summary.value


def test_render_draws_a_png_without_warnings(data):
    images, labels, feats = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a glyph missing from the font
        e = RetrievalExplorer(feats, images, labels, None, None, NAMES, k=3)
        assert e.image.value[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(e.figure().axes) == 2 * (3 + 1)
        e.select(model_b="none", k=1)
        assert len(e.figure().axes) == 1 + 1
        assert e.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    thumb = e._thumbnail(0)
    assert thumb.shape == (64, 64, 3)  # 16x16 upscaled 4x, nearest neighbour
    assert (thumb[:4, :4] == images[0, :, 0, 0].numpy()).all()


def test_widgets_have_stable_descriptions_and_css_classes(explorer):
    expected = {
        explorer.query: ("query", "csd-query"),
        explorer.query_class: ("class", "csd-class"),
        explorer.model_a: ("model A", "csd-model-a"),
        explorer.model_b: ("model B", "csd-model-b"),
        explorer.k: ("k", "csd-k"),
    }
    for w, (description, css) in expected.items():
        assert w.description == description and css in w._dom_classes
    assert "csd-results" in explorer.image._dom_classes
    assert "csd-summary" in explorer.summary._dom_classes
    assert explorer.k.max == 10 and explorer.query.max == N - 1


# ------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_value_errors(data):
    images, labels, feats = data
    model = resnet(8, C)
    cases = [
        (dict(labels=labels[:-1]), "labels must be"),
        (dict(models={"x": feats["model x"][:-1]}), "one row per image"),
        (dict(models={}), "non-empty dict"),
        (dict(models={"none": feats["model x"]}), "other than 'none'"),
        (dict(models={"x": "features"}), "must be a model or features"),
        (dict(models={"m": model}), "needs mean and std"),
        (dict(images=images.float()), "uint8"),
        (dict(class_names=NAMES[:3]), "labels must index class_names"),
        (dict(model_a="nope"), "unknown model_a 'nope'"),
        (dict(model_b="nope"), "unknown model_b 'nope'"),
        (dict(k=11), r"k must be an integer in \[1, 10\]"),
        (dict(k=0), "k must be"),
        (dict(query=N), "query must be"),
    ]
    for change, message in cases:
        kwargs = dict(models=feats, images=images, labels=labels, mean=None, std=None,
                      class_names=NAMES)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            RetrievalExplorer(**kwargs)


def test_select_rejects_unknown_choices(explorer):
    with pytest.raises(ValueError, match="unknown model_a 'nope'"):
        explorer.select(model_a="nope")
    with pytest.raises(ValueError, match="unknown query_class 9"):
        explorer.select(query_class=9)
    with pytest.raises(ValueError, match="query must be"):
        explorer.select(query=-1)
    with pytest.raises(ValueError, match="not both"):
        explorer.select(query=1, query_class=1)
    assert explorer.query.value == 0 and explorer.model_a.value == "model x"  # untouched


def test_k_is_capped_by_the_gallery_size():
    images, labels, feats = make_set()
    small = {k: v[:4] for k, v in feats.items()}
    e = RetrievalExplorer(small, images[:4], labels[:4], None, None, NAMES, k=3)
    assert e.k.max == 3
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        e.select(k=4)


# ------------------------------------------------------------------------------------------------
# the gallery control: one model's queries in another model's gallery (compatibility)


def oracle_cross_topk(fq: np.ndarray, fg: np.ndarray, q: int, k: int) -> list[int]:
    """Query q embedded by one model against the other images embedded by another."""
    fq = fq / np.linalg.norm(fq, axis=1, keepdims=True)
    fg = fg / np.linalg.norm(fg, axis=1, keepdims=True)
    sim = fg @ fq[q]
    sim[q] = -np.inf
    return np.argsort(-sim)[:k].tolist()


def oracle_cross_recall(fq: np.ndarray, fg: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([labels[oracle_cross_topk(fq, fg, q, 1)[0]] == labels[q]
                          for q in range(len(labels))]))


def test_gallery_control_searches_the_chosen_models_gallery(data):
    images, labels, feats = data
    e = RetrievalExplorer(feats, images, labels, None, None, NAMES, k=4, gallery_control=True)
    assert e.gallery.options == ("own", "model x", "model y")
    e.select(query=7, model_a="model x", model_b="model y", gallery="model y")
    y = labels.numpy()
    for m in ("model x", "model y"):
        r = e.results[m]
        assert r["gallery"] == "model y"
        assert r["indices"] == oracle_cross_topk(feats[m], feats["model y"], 7, 4)
        assert r["recall_all"] == pytest.approx(oracle_cross_recall(feats[m], feats["model y"], y))
    # the matrix cell is metrics.compatibility_matrix's: row = query model, column = gallery
    M = metrics.compatibility_matrix([feats["model y"], feats["model x"]], labels)
    assert e.results["model x"]["recall_all"] == pytest.approx(M[1, 0].item())
    assert 'data-gallery="model y"' in e.summary.value
    # "own": each model in its own gallery, as without the control
    e.select(gallery="own")
    plain = RetrievalExplorer(feats, images, labels, None, None, NAMES, k=4)
    plain.select(query=7)
    for m in ("model x", "model y"):
        assert e.results[m]["gallery"] == m
        assert e.results[m]["indices"] == plain.results[m]["indices"] == oracle_topk(
            feats[m], 7, 4)
        assert e.results[m]["recall_all"] == pytest.approx(metrics.recall_at_k(feats[m], labels))


def test_gallery_control_follows_the_dropdown(data):
    images, labels, feats = data
    e = RetrievalExplorer(feats, images, labels, None, None, NAMES, k=3, gallery_control=True,
                          query=5, model_b="none")
    e.gallery.value = "model y"  # as a user would: the observer refreshes
    assert e.results["model x"]["indices"] == oracle_cross_topk(feats["model x"],
                                                                feats["model y"], 5, 3)


def test_gallery_control_refuses_bad_input(data):
    images, labels, feats = data
    with pytest.raises(ValueError, match="one width"):
        RetrievalExplorer({**feats, "wide": np.ones((N, D + 1))}, images, labels, None, None,
                          NAMES, gallery_control=True)
    e = RetrievalExplorer(feats, images, labels, None, None, NAMES)
    assert e.gallery is None
    with pytest.raises(ValueError, match="gallery_control=True"):
        e.select(gallery="model y")
    e = RetrievalExplorer(feats, images, labels, None, None, NAMES, gallery_control=True)
    with pytest.raises(ValueError, match="unknown gallery 'nope'"):
        e.select(gallery="nope")

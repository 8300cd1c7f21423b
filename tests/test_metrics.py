"""Tests for csdkit.metrics against independent oracles.

Oracles: brute-force per-query loops written from the definitions (cosines by explicit
numpy loops), scikit-learn's NearestNeighbors(metric="cosine") and
average_precision_score, and hand-worked tiny examples. Random data is continuous, so
there are no similarity ties and every ranking is unique.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

from csdkit.metrics import (
    chance_recall_at_1,
    forgetting,
    mean_average_precision,
    recall_at_k,
    retrieve,
)

torch.set_num_threads(1)

# -----------------------------------------------------------------------------
# data and brute-force oracles


def make_data(n: int = 60, d: int = 8, num_classes: int = 5, seed: int = 0):
    """Continuous random features [n, d] float64 and labels [n] (every class >= 2 items)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    return x, y


def cosine_loops(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[Na, Nb] cosine matrix, one pair at a time, straight from the definition."""
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            dot = sum(float(a[i, t]) * float(b[j, t]) for t in range(a.shape[1]))
            out[i, j] = dot / (math.sqrt(float(a[i] @ a[i])) * math.sqrt(float(b[j] @ b[j])))
    return out


def candidates(i: int, n_gallery: int, exclude_self: bool) -> list[int]:
    return [j for j in range(n_gallery) if not (exclude_self and j == i)]


def brute_recall(q, q_labels, g, g_labels, k, exclude_self) -> float:
    sim = cosine_loops(q, g)
    hits = 0
    for i in range(len(q)):
        cand = candidates(i, len(g), exclude_self)
        ranked = sorted(cand, key=lambda j: -sim[i, j])
        hits += any(g_labels[j] == q_labels[i] for j in ranked[:k])
    return hits / len(q)


def brute_map(q, q_labels, g, g_labels, exclude_self) -> float:
    """mAP from the definition: mean over positives of precision at each positive's rank."""
    sim = cosine_loops(q, g)
    aps = []
    for i in range(len(q)):
        ranked = sorted(candidates(i, len(g), exclude_self), key=lambda j: -sim[i, j])
        rel = [g_labels[j] == q_labels[i] for j in ranked]
        if not any(rel):
            continue  # no positive: AP undefined, skipped
        precisions = [sum(rel[: r + 1]) / (r + 1) for r in range(len(rel)) if rel[r]]
        aps.append(sum(precisions) / len(precisions))
    return sum(aps) / len(aps)


def sklearn_map_loo(x, y) -> float:
    """Leave-one-out mAP with sklearn's average_precision_score per query (self dropped)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    aps = []
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        y_true = y[others] == y[i]
        if y_true.any():
            aps.append(average_precision_score(y_true, sim[i, others]))
    return float(np.mean(aps))


def sklearn_recall_loo(x, y, k) -> float:
    """Leave-one-out R@k via NearestNeighbors; kneighbors() without X excludes self."""
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x)
    idx = nn.kneighbors(return_distance=False)  # [n, k]
    return float(np.mean((y[idx] == y[:, None]).any(axis=1)))


# -----------------------------------------------------------------------------
# hand-worked example


def tiny_example():
    """4 points in 2-D at angles 0, 20, 50, 90 degrees with deliberately different norms.

    labels [0, 0, 1, 1]. Cosine ranks by angle difference (norms do not matter):
      p0 (0 deg,  label 0): p1 (20) +, p2 (50) -, p3 (90) -   -> R@1 hit, AP = 1
      p1 (20 deg, label 0): p0 (20) +, p2 (30) -, p3 (70) -   -> R@1 hit, AP = 1
      p2 (50 deg, label 1): p1 (30) -, p3 (40) +, p0 (50) -   -> R@1 miss, AP = 1/2
      p3 (90 deg, label 1): p2 (40) +, p1 (70) -, p0 (90) -   -> R@1 hit, AP = 1
    R@1 = 3/4, R@2 = 4/4, mAP = (1 + 1 + 1/2 + 1) / 4 = 7/8.
    (Euclidean distance would differ: p0's nearest point would be the short p2, a miss.)
    """
    angles = np.deg2rad([0.0, 20.0, 50.0, 90.0])
    norms = np.array([1.0, 3.0, 0.5, 2.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * norms[:, None]
    y = np.array([0, 0, 1, 1])
    return x, y


def test_tiny_example_by_hand():
    x, y = tiny_example()
    assert recall_at_k(x, y, k=1) == pytest.approx(3 / 4)
    assert recall_at_k(x, y, k=2) == pytest.approx(1.0)
    assert mean_average_precision(x, y) == pytest.approx(7 / 8)
    # sanity-check the Euclidean remark, so the example really tests cosine
    d = np.linalg.norm(x[:, None] - x[None], axis=2) + np.eye(4) * 1e9
    assert y[d[0].argmin()] != y[0]


def test_tiny_query_gallery_by_hand():
    # gallery: two points; label 0 at 0 deg (length 5), label 1 at 90 deg (length 0.1)
    g = np.array([[5.0, 0.0], [0.0, 0.1]])
    g_labels = np.array([0, 1])
    # queries at 10 deg (label 0 -> nearest is g0: hit), 60 deg (label 0 -> g1: miss),
    # 80 deg (label 1 -> g1: hit)
    a = np.deg2rad([10.0, 60.0, 80.0])
    q = np.stack([np.cos(a), np.sin(a)], axis=1)
    q_labels = np.array([0, 0, 1])
    assert recall_at_k(q, q_labels, gallery=g, gallery_labels=g_labels) == pytest.approx(2 / 3)
    # APs: q0 positive g0 at rank 1 -> 1; q1 positive g0 at rank 2 -> 1/2; q2 g1 at 1 -> 1
    assert mean_average_precision(q, q_labels, gallery=g, gallery_labels=g_labels) == pytest.approx(
        5 / 6
    )


# -----------------------------------------------------------------------------
# recall@k


@pytest.mark.parametrize("k", [1, 2, 5])
def test_recall_leave_one_out_matches_oracles(k):
    x, y = make_data()
    got = recall_at_k(x, y, k=k)
    assert got == pytest.approx(brute_recall(x, y, x, y, k, exclude_self=True))
    assert got == pytest.approx(sklearn_recall_loo(x, y, k))
    # a non-trivial value, so the comparison can actually fail
    assert 0.0 < got < 1.0


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_size_does_not_change_results(chunk_size):
    x, y = make_data(n=47)  # 47 is not a multiple of 3: last chunk is ragged
    ref_r = brute_recall(x, y, x, y, 3, exclude_self=True)
    ref_m = brute_map(x, y, x, y, exclude_self=True)
    assert recall_at_k(x, y, k=3, chunk_size=chunk_size) == pytest.approx(ref_r)
    assert mean_average_precision(x, y, chunk_size=chunk_size) == pytest.approx(ref_m)
    g = x + 0.5 * np.random.default_rng(1).normal(size=x.shape)
    ref_qg = brute_recall(x, y, g, y, 1, exclude_self=True)
    assert recall_at_k(x, y, gallery=g, chunk_size=chunk_size) == pytest.approx(ref_qg)


def test_numpy_and_torch_inputs_agree():
    x, y = make_data()
    ref_r = recall_at_k(x, y, k=2)
    ref_m = mean_average_precision(x, y)
    for xt in (torch.from_numpy(x), torch.from_numpy(x).float()):
        for yt in (y, torch.from_numpy(y)):
            assert recall_at_k(xt, yt, k=2) == pytest.approx(ref_r)
            assert mean_average_precision(xt, yt) == pytest.approx(ref_m)


def test_cross_model_gallery_excludes_self_by_default():
    # queries: "new model"; gallery: the same images by an "old model" (aligned rows)
    x, y = make_data(n=50, seed=3)
    old = x + 0.8 * np.random.default_rng(4).normal(size=x.shape)
    got = recall_at_k(x, y, gallery=old)
    assert got == pytest.approx(brute_recall(x, y, old, y, 1, exclude_self=True))
    assert got != pytest.approx(brute_recall(x, y, old, y, 1, exclude_self=False))
    # explicit flag overrides the default
    got_incl = recall_at_k(x, y, gallery=old, exclude_self=False)
    assert got_incl == pytest.approx(brute_recall(x, y, old, y, 1, exclude_self=False))
    # the gallery being the same embeddings reduces to leave-one-out
    assert recall_at_k(x, y, k=3, gallery=x) == pytest.approx(recall_at_k(x, y, k=3))
    assert mean_average_precision(x, y, gallery=old) == pytest.approx(
        brute_map(x, y, old, y, exclude_self=True)
    )


@pytest.mark.parametrize("k", [1, 4])
def test_distinct_query_gallery_sets(k):
    q, q_labels = make_data(n=30, seed=5)
    g, g_labels = make_data(n=45, seed=6)
    got = recall_at_k(q, q_labels, k=k, gallery=g, gallery_labels=g_labels)
    assert got == pytest.approx(brute_recall(q, q_labels, g, g_labels, k, exclude_self=False))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(g)
    idx = nn.kneighbors(q, return_distance=False)
    assert got == pytest.approx(np.mean((g_labels[idx] == q_labels[:, None]).any(axis=1)))
    assert mean_average_precision(q, q_labels, gallery=g, gallery_labels=g_labels) == (
        pytest.approx(brute_map(q, q_labels, g, g_labels, exclude_self=False))
    )


def test_distinct_sets_with_exclude_self_against_brute_force():
    q, q_labels = make_data(n=40, seed=7)
    g, g_labels = make_data(n=40, seed=8)
    got = recall_at_k(q, q_labels, k=2, gallery=g, gallery_labels=g_labels, exclude_self=True)
    assert got == pytest.approx(brute_recall(q, q_labels, g, g_labels, 2, exclude_self=True))


# -----------------------------------------------------------------------------
# retrieve


def test_retrieve_matches_brute_force_ranking():
    x, _ = make_data(n=25)
    g, _ = make_data(n=31, seed=9)
    for exclude_self, gallery in ((False, g), (True, x)):
        s = cosine_loops(x, gallery)
        if exclude_self:
            np.fill_diagonal(s, -np.inf)
        scores, idx = retrieve(
            torch.from_numpy(x), gallery, k=4, exclude_self=exclude_self, chunk_size=7
        )
        assert scores.shape == idx.shape == (25, 4)
        assert scores.dtype == torch.float32 and idx.dtype == torch.int64
        expected = np.argsort(-s, axis=1)[:, :4]
        np.testing.assert_array_equal(idx.numpy(), expected)
        np.testing.assert_allclose(scores.numpy(), np.take_along_axis(s, expected, 1), atol=1e-5)
        if exclude_self:
            assert not (idx.numpy() == np.arange(25)[:, None]).any()


# -----------------------------------------------------------------------------
# mAP


def test_map_leave_one_out_matches_oracles():
    x, y = make_data(n=70, num_classes=7, seed=11)
    got = mean_average_precision(x, y)
    assert got == pytest.approx(sklearn_map_loo(x, y))
    assert got == pytest.approx(brute_map(x, y, x, y, exclude_self=True))
    assert 0.0 < got < 1.0


def test_map_skips_queries_without_positives():
    x, y = make_data(n=40, num_classes=4, seed=12)
    y = y.copy()
    y[:5] = [100, 101, 102, 103, 104]  # singleton classes: no positive once self is dropped
    got = mean_average_precision(x, y)
    assert got == pytest.approx(sklearn_map_loo(x, y))  # oracle skips the 5 singletons
    assert got == pytest.approx(brute_map(x, y, x, y, exclude_self=True))

    # hand check on 3 points a=[1,0], b=[0,1], c=[0.1,1]: cos(b,c)=0.995, cos(a,c)=0.0995,
    # cos(a,b)=0.
    pts = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    # labels [9,0,0]: a is skipped; b and c find each other at rank 1 -> AP 1, 1 -> mAP 1
    # (counting a as AP = 0 instead would give 2/3)
    assert mean_average_precision(pts, [9, 0, 0]) == pytest.approx(1.0)
    # labels [0,9,0]: b is skipped; a ranks c, b -> AP 1; c ranks b, a -> AP 1/2 -> mAP 3/4
    assert mean_average_precision(pts, [0, 9, 0]) == pytest.approx(3 / 4)


def test_map_without_any_positive_raises():
    x, _ = make_data(n=6)
    with pytest.raises(ValueError, match="no query has a positive"):
        mean_average_precision(x, np.arange(6))


# -----------------------------------------------------------------------------
# continual-learning summary


def test_forgetting_hand_computed():
    nan = np.nan
    R = np.array(
        [
            [0.90, nan, nan, nan],
            [0.70, 0.80, nan, nan],
            [0.75, 0.60, 0.85, nan],
            [0.50, 0.65, 0.90, 0.95],
        ]
    )
    # task 0: max(0.90, 0.70, 0.75) - 0.50 = 0.40
    # task 1: max(0.80, 0.60)       - 0.65 = 0.15
    # task 2: max(0.85)             - 0.90 = -0.05 (improved: negative forgetting)
    np.testing.assert_allclose(forgetting(R), [0.40, 0.15, -0.05])
    # upper-triangle entries are ignored, whatever they hold
    R_filled = np.where(np.isnan(R), 123.0, R)
    np.testing.assert_allclose(forgetting(R_filled), [0.40, 0.15, -0.05])


def test_forgetting_errors():
    with pytest.raises(ValueError, match="at least 2 trained steps"):
        forgetting(np.ones((1, 3)))
    with pytest.raises(ValueError, match="must be 2-D"):
        forgetting(np.ones(3))
    R = np.ones((3, 3))
    R[2, 0] = np.nan
    with pytest.raises(ValueError, match="is NaN"):
        forgetting(R)


# -----------------------------------------------------------------------------
# bad input


def test_value_errors():
    x, y = make_data(n=10)
    with pytest.raises(ValueError, match="labels has 9 entries but features has 10 rows"):
        recall_at_k(x, y[:9])
    with pytest.raises(ValueError, match="labels has 9 entries but features has 10 rows"):
        mean_average_precision(x, y[:9])
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        recall_at_k(x, y, k=0)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 1.5"):
        recall_at_k(x, y, k=1.5)
    # leave-one-out: 9 candidates per query
    assert recall_at_k(x, y, k=9) == 1.0
    with pytest.raises(ValueError, match="k=10 is larger than the 9 gallery items"):
        recall_at_k(x, y, k=10)
    with pytest.raises(ValueError, match="k=11 is larger than the 10 gallery items"):
        recall_at_k(x, y, k=11, gallery=x[:10], gallery_labels=y)
    with pytest.raises(ValueError, match="features must be 2-D"):
        recall_at_k(x[0], y[:1])
    with pytest.raises(ValueError, match="features must be 2-D"):
        mean_average_precision(x[:, 0], y)
    with pytest.raises(ValueError, match="gallery must be 2-D"):
        recall_at_k(x, y, gallery=x[:, 0], gallery_labels=y)
    with pytest.raises(ValueError, match="exclude_self=True needs as many queries"):
        recall_at_k(x, y, gallery=x[:7], gallery_labels=y[:7], exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=True needs as many queries"):
        mean_average_precision(x, y, gallery=x[:7], gallery_labels=y[:7], exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=True needs as many queries"):
        retrieve(x, x[:7], k=1, exclude_self=True)
    with pytest.raises(ValueError, match="without gallery_labels the gallery must be the same"):
        recall_at_k(x, y, gallery=x[:7])
    with pytest.raises(ValueError, match="gallery_labels has 6 entries but gallery has 7 rows"):
        recall_at_k(x, y, gallery=x[:7], gallery_labels=y[:6])
    with pytest.raises(ValueError, match="gallery_labels was given without gallery"):
        recall_at_k(x, y, gallery_labels=y)
    with pytest.raises(ValueError, match="exclude_self=False with gallery=None"):
        recall_at_k(x, y, exclude_self=False)
    with pytest.raises(ValueError, match="gallery has dim 3"):
        recall_at_k(x, y, gallery=x[:, :3], gallery_labels=y)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        recall_at_k(x, y, chunk_size=0)
    with pytest.raises(ValueError, match="larger than the 0 gallery items"):
        recall_at_k(x[:1], y[:1])
    with pytest.raises(ValueError, match="features is empty"):
        recall_at_k(x[:0], y[:0])
    with pytest.raises(ValueError, match="no query has a positive"):  # nothing else to rank
        mean_average_precision(x[:1], y[:1])


def test_chance_recall_matches_a_brute_force_average_over_random_rankings():
    y = np.array([0, 0, 0, 1, 1, 2])
    # by hand: (3*2 + 2*1 + 1*0) / (6*5) = 8/30
    assert chance_recall_at_1(y) == pytest.approx(8 / 30)
    # brute force: each query's nearest neighbour is one of the other items, each equally likely
    exact = np.mean([np.mean([y[j] == y[i] for j in range(len(y)) if j != i])
                     for i in range(len(y))])
    assert chance_recall_at_1(y) == pytest.approx(exact)
    # and what random features give, over many draws
    rng = np.random.default_rng(0)
    draws = [recall_at_k(rng.normal(size=(6, 4)), y) for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(8 / 30, abs=0.02)
    with pytest.raises(ValueError, match="at least 2 items"):
        chance_recall_at_1(y[:1])


def test_non_finite_features_are_refused():
    x, y = make_data(n=10)
    bad = torch.as_tensor(x).clone()
    bad[3, 1] = float("nan")
    bad[5, 0] = float("inf")
    for f in (recall_at_k, mean_average_precision):
        with pytest.raises(ValueError, match="features holds 2 NaN or inf values"):
            f(bad, y)
        with pytest.raises(ValueError, match="gallery holds 2 NaN or inf values"):
            f(x, y, gallery=bad, gallery_labels=y)
    with pytest.raises(ValueError, match="query_features holds 2 NaN"):
        retrieve(bad, x, k=1)


# -----------------------------------------------------------------------------
# device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_same_results():
    x, y = make_data()
    xc, yc = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    assert recall_at_k(xc, yc, k=2) == pytest.approx(recall_at_k(x, y, k=2))
    assert mean_average_precision(xc, yc) == pytest.approx(mean_average_precision(x, y))
    old = xc + 0.5 * torch.randn_like(xc)
    assert recall_at_k(xc, yc, gallery=old) == pytest.approx(
        recall_at_k(x, y, gallery=old.cpu().numpy())
    )
    scores, idx = retrieve(xc, xc, k=3, exclude_self=True)
    assert scores.device.type == "cuda" and idx.device.type == "cuda"


# ---------------------------------------------------------------------------
# compatibility: brute force over every (query model, gallery model) pair


def test_compatibility_matrix_against_a_loop_over_queries():
    from csdkit.metrics import compatibility_matrix

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(24) % 4
    feats = [torch.randn(24, 6, generator=g) + t * torch.randn(24, 6, generator=g)
             for t in range(3)]
    M = compatibility_matrix(feats, labels)
    for i in range(3):
        for j in range(3):
            if j > i:
                assert torch.isnan(M[i, j])
                continue
            q = torch.nn.functional.normalize(feats[i], dim=1)
            gal = torch.nn.functional.normalize(feats[j], dim=1)
            hits = 0
            for n in range(24):  # nearest other image of model j's gallery, by cosine
                sims = [float(q[n] @ gal[m]) if m != n else -9.0 for m in range(24)]
                hits += int(labels[int(np.argmax(sims))] == labels[n])
            assert M[i, j].item() == pytest.approx(hits / 24)


def test_average_compatibility_and_multimodel_accuracy_on_hand_made_matrices():
    from csdkit.metrics import average_compatibility, average_multimodel_accuracy

    nan = float("nan")
    M = [[0.8, nan, nan],
         [0.8, 0.9, nan],   # (1, 0): 0.8 >= 0.8, a tie: compatible
         [0.7, 0.95, 0.9]]  # (2, 0): 0.7 < 0.8 no; (2, 1): 0.95 >= 0.9 yes
    assert average_compatibility(M) == pytest.approx(2 / 3)
    assert average_multimodel_accuracy(M) == pytest.approx((0.8 + 0.8 + 0.9 + 0.7 + 0.95 + 0.9) / 6)
    with_gap = [[0.8, nan], [nan, 0.9]]  # the only pair is unknown
    assert np.isnan(average_compatibility(with_gap))
    assert average_multimodel_accuracy(with_gap) == pytest.approx(0.85)
    assert np.isnan(average_compatibility([[0.5]]))  # one model: no update to judge
    with pytest.raises(ValueError, match="square"):
        average_compatibility([[0.5, 0.4]])
    with pytest.raises(ValueError, match="same images"):
        from csdkit.metrics import compatibility_matrix

        compatibility_matrix([torch.randn(4, 2), torch.randn(5, 2)], torch.arange(4))

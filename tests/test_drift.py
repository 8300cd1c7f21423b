"""csdkit.drift: the map fitted on the old model, the drift numbers, the plot."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from csdkit.drift import (
    DriftMap,
    centroid_shift,
    drift_ratio,
    map_recall_at_1,
    plot_drift,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# centroid_shift


def test_centroid_shift_hand_worked():
    s = np.sqrt(0.5)
    old = np.array([
        [1.0, 0.0], [2.0, 0.0],  # class 0: direction (1, 0)
        [1.0, 0.0], [0.0, 1.0],  # class 1: mean direction (1, 1)/sqrt 2
        [1.0, 0.0], [1.0, 0.0],  # class 2
    ])
    new = np.array([
        [0.0, 3.0], [0.0, 1.0],  # class 0 turned by 90 degrees: shift 1
        [0.0, 5.0], [2.0, 0.0],  # swapped and rescaled: normalised mean unchanged: shift 0
        [0.5, 0.5 * np.sqrt(3)], [1.0, np.sqrt(3)],  # turned by 60 degrees: 1 - cos 60 = 0.5
    ])
    labels = np.array([0, 0, 1, 1, 2, 2])
    got = centroid_shift(old, new, labels)
    assert list(got) == [0, 1, 2] and all(type(k) is int for k in got)
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(0.0, abs=1e-12)
    assert got[2] == pytest.approx(0.5)
    # features are normalised before averaging: scaling one vector changes nothing
    assert centroid_shift(old * [[1], [9], [1], [1], [1], [1]], new, labels)[1] == \
        pytest.approx(0.0, abs=1e-12)
    # a subset of classes, from torch tensors
    sub = centroid_shift(torch.tensor(old), torch.tensor(new), torch.tensor(labels), [2])
    assert sub == pytest.approx({2: 0.5}) and s > 0


def test_centroid_shift_rejects_bad_inputs():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="same shape"):
        centroid_shift(x, np.ones((5, 3)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels must be"):
        centroid_shift(x, x, [0, 1])
    with pytest.raises(ValueError, match=r"classes \[7\]"):
        centroid_shift(x, x, [0, 0, 1, 1], classes=[7])


# ------------------------------------------------------------------------------------------------
# drift_ratio


def test_drift_ratio_hand_worked():
    old = np.array([
        [1.0, 0.0], [3.0, 0.0],  # class 0: direction e1, whatever the norms
        [0.0, 2.0], [0.0, 0.5],  # class 1: direction e2
    ])
    r = np.sqrt(3) / 2
    new = np.array([
        [1.0, 0.0], [3.0, 0.0],  # class 0 unchanged: shift 0
        [-r, 0.5], [-4 * r, 2.0],  # class 1: e2 turned by 60 degrees to (-sqrt3/2, 1/2)
    ])
    labels = np.array([0, 0, 1, 1])
    # shift(1) = |(-sqrt3/2, 1/2) - (0, 1)| = sqrt(3/4 + 1/4) = 1, so the mean shift is 1/2;
    # gap = |e1 - e2| = sqrt 2; ratio = (1/2) / sqrt 2 = sqrt(2) / 4 = 0.35355...
    got = drift_ratio(old, new, labels)
    assert type(got) is float and got == pytest.approx(np.sqrt(2) / 4)
    # from torch tensors, and class 1 turned by 90 degrees to -e1: shift sqrt 2, ratio 1/2
    new[2:] = [[-1.0, 0.0], [-5.0, 0.0]]
    got = drift_ratio(torch.tensor(old), torch.tensor(new), torch.tensor(labels))
    assert got == pytest.approx(0.5)


def brute_force_drift_ratio(old, new, labels, classes):
    """The definition, written out with loops: an independent check of `drift_ratio`."""
    def centroid(x, c):
        rows = [v / np.sqrt(sum(t * t for t in v))
                for v, y in zip(x, labels, strict=True) if y == c]
        return np.mean(rows, axis=0)

    shifts = [np.sqrt(np.sum((centroid(new, c) - centroid(old, c)) ** 2)) for c in classes]
    gaps = [np.sqrt(np.sum((centroid(old, a) - centroid(old, b)) ** 2))
            for k, a in enumerate(classes) for b in classes[k + 1:]]
    return np.mean(shifts) / np.mean(gaps)


def test_drift_ratio_matches_the_definition_and_ignores_row_scale():
    rng = np.random.default_rng(3)
    labels = np.arange(90) % 5
    old = rng.normal(size=(5, 8))[labels] + 0.5 * rng.normal(size=(90, 8))
    # each class moves by its own offset (plus noise per image, which centroids average out)
    new = old + 0.5 * rng.normal(size=(5, 8))[labels] + 0.3 * rng.normal(size=(90, 8))
    assert drift_ratio(old, new, labels) == pytest.approx(
        brute_force_drift_ratio(old, new, labels, [0, 1, 2, 3, 4]), rel=1e-9)
    # a subset of classes: both the shift and the gap run over those classes only
    assert drift_ratio(old, new, labels, classes=[3, 1, 4]) == pytest.approx(
        brute_force_drift_ratio(old, new, labels, [3, 1, 4]), rel=1e-9)
    # features are normalised first: rescaling each row (either model) changes nothing
    scale_old, scale_new = rng.uniform(0.1, 10, size=(90, 1)), rng.uniform(0.1, 10, size=(90, 1))
    assert drift_ratio(old * scale_old, new * scale_new, labels) == pytest.approx(
        drift_ratio(old, new, labels), rel=1e-9)
    assert drift_ratio(old, old.copy(), labels) == 0.0  # nothing moved
    assert drift_ratio(old, new, labels) > 0.1  # so the comparisons above are not about zeros


def test_drift_ratio_rejects_bad_inputs():
    x = np.eye(4)
    labels = [0, 0, 1, 1]
    with pytest.raises(ValueError, match="same shape"):
        drift_ratio(x, np.ones((5, 4)), labels)
    with pytest.raises(ValueError, match="labels must be"):
        drift_ratio(x, x, [0, 1])
    with pytest.raises(ValueError, match=r"classes \[7\]"):
        drift_ratio(x, x, labels, classes=[0, 7])
    with pytest.raises(ValueError, match="at least 2 classes"):
        drift_ratio(x, x, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="coincide"):  # no distance between classes to judge by
        drift_ratio(np.ones((4, 4)), x, labels)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        drift_ratio(x, bad, labels)


# ------------------------------------------------------------------------------------------------
# DriftMap


def old_model(n: int = 100, d: int = 16, classes: int = 4, seed: int = 0):
    """The old model's features of n images of 4 well-separated classes, their labels, the class
    centres and the generator (to draw a new model's noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d)) * 3
    old = centres[labels] + rng.normal(size=(n, d))
    return old.astype(np.float32), labels, centres, rng


def test_drift_map_shapes_determinism_and_silence(capfd):
    old, labels, centres, rng = old_model()
    new = old + 0.3 * rng.normal(size=old.shape).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = DriftMap(old, seed=0, n_epochs=50)
        a_new = a.place(new)
        b = DriftMap(torch.from_numpy(old), seed=0, n_epochs=50)
        b_new = b.place(torch.from_numpy(new))
        c = DriftMap(old, seed=1, n_epochs=50)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""  # nbval compares stderr: nothing from umap/numba/tqdm
    assert a.old_2d.shape == (100, 2) and a_new.shape == (100, 2)
    assert a.old_2d.dtype == a_new.dtype == np.float32
    assert np.isfinite(a.old_2d).all() and np.isfinite(a_new).all()
    np.testing.assert_array_equal(a.old_2d, b.old_2d)  # same seed: the same map ...
    np.testing.assert_array_equal(a_new, b_new)  # ... and the same placement
    np.testing.assert_array_equal(a.place(new), a_new)  # placing again: the same points
    assert a.place(new[:7]).shape == (7, 2)  # any number of images
    assert not np.allclose(a.old_2d, c.old_2d)  # another seed: another map


def test_drift_map_places_the_old_features_where_it_fitted_them():
    old, labels, _, rng = old_model()
    m = DriftMap(old, seed=0, n_epochs=50)
    # the very array it was fitted on: umap recognises it and answers with the fitted map
    np.testing.assert_array_equal(m.place(old), m.old_2d)
    # the same features up to float noise go through transform, which is approximate: with
    # n_epochs 50 the median offset is about a tenth of the spread (0.10-0.14 over 4 data seeds
    # x 3 map seeds); a map fitted anew instead of transform would be off by about the spread
    placed = m.place(old * (1 + 1e-4 * rng.normal(size=old.shape)))
    offset = np.linalg.norm(placed - m.old_2d, axis=1)
    spread = np.linalg.norm(m.old_2d - m.old_2d.mean(0), axis=1).mean()
    assert np.median(offset) < 0.25 * spread
    # and each placed point lands in its own class's island: its nearest fitted point shares
    # its label (brute force over all pairs)
    nearest = np.linalg.norm(placed[:, None] - m.old_2d[None], axis=2).argmin(1)
    assert (labels[nearest] == labels).mean() >= 0.95
    # the arrays handed out are copies, even umap's answer for the fitted array
    m.place(old)[:] = 0
    m.old_2d[:] = 0
    assert np.abs(m.place(old)).min(1).max() > 0


def swap_classes_2_and_3(old, labels, centres, rng):  # a new model: classes 2 and 3 swap places
    new = old.copy()
    for c, to in ((2, 3), (3, 2)):
        rows = labels == c
        new[rows] = centres[to] + rng.normal(size=(rows.sum(), old.shape[1]))
    return new


def test_drift_map_moves_shifted_classes_further_than_unchanged_ones():
    old, labels, centres, rng = old_model()
    m = DriftMap(old, seed=0, n_epochs=50)
    # classes 0 and 1 keep their features; classes 2 and 3 swap places in feature space
    new = swap_classes_2_and_3(old, labels, centres, rng)
    offset = np.linalg.norm(m.place(new) - m.old_2d, axis=1)
    moved = {c: np.median(offset[labels == c]) for c in range(4)}
    spread = np.linalg.norm(m.old_2d - m.old_2d.mean(0), axis=1).mean()
    # calibrated over 4 data seeds x 3 map seeds: shifted / unchanged 7-14, shifted / spread
    # 0.96-1.5 (a swapped class lands on the other one's island)
    assert min(moved[2], moved[3]) > 3 * max(moved[0], moved[1]), moved
    assert min(moved[2], moved[3]) > 0.5 * spread, (moved, spread)


def test_drift_map_rejects_bad_inputs():
    old, *_ = old_model(n=20)
    with pytest.raises(ValueError, match="2-D"):
        DriftMap(old[0])
    bad = old.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DriftMap(bad)
    with pytest.raises(ValueError, match="at least 4"):
        DriftMap(old[:3])
    with pytest.raises(ValueError, match="n_neighbors"):
        DriftMap(old, n_neighbors=1)
    m = DriftMap(old, n_epochs=30)
    with pytest.raises(ValueError, match=r"\[N', 16\]"):
        m.place(old[:, :8])  # features of another dimension
    with pytest.raises(ValueError, match=r"\[N', 16\]"):
        m.place(old[:0])  # no images
    with pytest.raises(ValueError, match="2-D"):
        m.place(old[0])
    with pytest.raises(ValueError, match="NaN"):
        m.place(bad)


# ------------------------------------------------------------------------------------------------
# plot_drift


def fake_map(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 6
    old_2d = rng.normal(size=(n, 2)) + labels[:, None]
    return old_2d, old_2d + 2.0, labels


@pytest.mark.parametrize("arrows", ["centroids", "samples", "both", None])
def test_plot_drift_draws_what_it_is_asked(arrows):
    old_2d, new_2d, labels = fake_map()
    fig, ax = plt.subplots()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = plot_drift(old_2d, new_2d, labels, [0, 1, 2], list("abcdef"), ax=ax,
                             arrows=arrows, max_sample_arrows=12)
        assert out is ax
        quivers = [c for c in ax.collections if type(c).__name__ == "Quiver"]
        arrowed = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
        names = [t.get_text() for t in ax.texts if t.get_text()]
        if arrows in ("samples", "both"):
            assert len(quivers) == 1 and quivers[0].N == 12  # a subsample of the 30 old images
        else:
            assert quivers == []
        if arrows in ("centroids", "both"):
            assert len(arrowed) == 2 * 3 and names == ["a", "b", "c"]  # stroke + colour
        else:
            assert arrowed == []
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["old model", "new model", "new-task classes", "a", "b", "c"]
    finally:
        plt.close(fig)


def test_plot_drift_rejects_bad_inputs():
    old_2d, new_2d, labels = fake_map()
    names = list("abcdef")
    with pytest.raises(ValueError, match="arrows must be"):
        plot_drift(old_2d, new_2d, labels, [0], names, arrows="everything")
    with pytest.raises(ValueError, match=r"old classes \[9\]"):
        plot_drift(old_2d, new_2d, labels, [9], names)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        plot_drift(np.ones((60, 3)), np.ones((60, 3)), labels, [0], names)
    with pytest.raises(ValueError, match="class_names"):
        plot_drift(old_2d, new_2d, labels, [0], names[:3])


def test_align_maps_a_model_onto_the_old_frame_keeping_its_own_classes(monkeypatch):
    from contextlib import contextmanager

    from csdkit import drift

    old, labels, centres, rng = old_model()
    m = DriftMap(old, seed=0, n_epochs=50)
    # a new model whose classes 2 and 3 swapped places: its own map keeps every class an island
    new = swap_classes_2_and_3(old, labels, centres, rng)
    xy = m.align(new, labels)
    assert xy.shape == (100, 2) and xy.dtype == np.float32
    assert map_recall_at_1(xy, labels) >= 0.95
    # the Procrustes step: a new map that is the old one turned by 90 degrees, scaled by 3 and
    # shifted is put back exactly (a stand-in UMAP returns that map for any input)
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    moved = 3 * m.old_2d @ turn + np.array([5.0, -2.0])

    class FixedUMAP:
        UMAP = lambda **_: FixedUMAP  # noqa: E731
        fit_transform = staticmethod(lambda x: moved)

    @contextmanager
    def fixed():
        yield FixedUMAP

    monkeypatch.setattr(drift, "_quiet_umap", fixed)
    np.testing.assert_allclose(m.align(new, labels), m.old_2d, atol=1e-4)


def test_map_recall_at_1_is_leave_one_out_nearest_neighbour_as_in_sklearn():
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    xy = rng.normal(size=(60, 2)) + labels[:, None] * 0.8
    expected = cross_val_score(KNeighborsClassifier(1), xy, labels, cv=LeaveOneOut()).mean()
    assert map_recall_at_1(xy, labels) == pytest.approx(expected)
    # by hand: three points on a line, a b b -> the middle b's neighbour is the other b (1 apart
    # vs 2), the last b's the middle b, the a's the middle b: 2 of 3
    assert map_recall_at_1(np.array([[0.0, 0], [2, 0], [3, 0]]), np.array([0, 1, 1])) == \
        pytest.approx(2 / 3)

"""csdkit.drift: the numba cache switch, the joint UMAP map, centroid shifts and the plot."""

from __future__ import annotations

import os
import sys
import types
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from csdkit.drift import centroid_shift, configure_numba_cache, drift_embedding, plot_drift

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# configure_numba_cache


@pytest.fixture
def clean_env(monkeypatch):
    """No NUMBA_CACHE_DIR; afterwards restore the environment and numba's view of it (so a
    later UMAP test does not write its cache into a deleted tmp folder)."""
    before = os.environ.get("NUMBA_CACHE_DIR")
    for name in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        # setenv first so that undo() also removes a variable that configure_numba_cache()
        # creates (delenv of an absent variable records nothing to undo)
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    yield monkeypatch
    monkeypatch.undo()
    assert os.environ.get("NUMBA_CACHE_DIR") == before
    if "numba" in sys.modules:
        from numba.core import config

        config.reload_config()


def test_configure_numba_cache_sets_the_variable_and_creates_the_folder(clean_env, tmp_path):
    target = tmp_path / "a" / "numba"
    got = configure_numba_cache(target)
    assert got == target.resolve() and target.is_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(target.resolve())
    if "numba" in sys.modules:  # numba, if already imported, sees the new folder too
        from numba.core import config

        assert config.CACHE_DIR == str(target.resolve())


def test_configure_numba_cache_defaults_to_the_user_cache(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    got = configure_numba_cache()
    assert got == (tmp_path / ".cache" / "csdkit" / "numba").resolve() and got.is_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(got)
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configure_numba_cache() == (tmp_path / "xdg" / "csdkit" / "numba").resolve()


def test_configure_numba_cache_warns_when_umap_is_already_imported(clean_env, tmp_path):
    clean_env.setitem(sys.modules, "umap", types.ModuleType("umap"))
    with pytest.warns(RuntimeWarning, match="before|after umap"):
        configure_numba_cache(tmp_path / "late")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folder again: nothing changes, no warning
        configure_numba_cache(tmp_path / "late")


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
# drift_embedding


def two_models(n: int = 100, d: int = 16, classes: int = 4, seed: int = 0):
    """Old and new features of the same n images: 4 classes, the new model moves class 0."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d)) * 3
    old = centres[labels] + rng.normal(size=(n, d))
    moved = centres.copy()
    moved[0] = rng.normal(size=d) * 3
    new = moved[labels] + rng.normal(size=(n, d))
    return old.astype(np.float32), new.astype(np.float32), labels


def test_drift_embedding_shapes_determinism_and_silence(capfd):
    old, new, _ = two_models()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a_old, a_new = drift_embedding(old, new, seed=0, n_epochs=30)
        b_old, b_new = drift_embedding(torch.from_numpy(old), torch.from_numpy(new), seed=0,
                                       n_epochs=30)
        c_old, _ = drift_embedding(old, new, seed=1, n_epochs=30)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""  # nbval compares stderr: nothing from umap/numba/tqdm
    assert a_old.shape == a_new.shape == (100, 2) and a_old.dtype == np.float32
    assert np.isfinite(a_old).all() and np.isfinite(a_new).all()
    np.testing.assert_array_equal(a_old, b_old)  # same seed: the same map
    np.testing.assert_array_equal(a_new, b_new)
    assert not np.allclose(a_old, c_old)  # another seed: another map


def test_drift_embedding_rejects_bad_inputs():
    old, new, _ = two_models(n=10)
    with pytest.raises(ValueError, match="same shape"):
        drift_embedding(old, new[:-1])
    with pytest.raises(ValueError, match="2-D"):
        drift_embedding(old[0], new[0])
    bad = old.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        drift_embedding(bad, new)
    with pytest.raises(ValueError, match="n_neighbors"):
        drift_embedding(old, new, n_neighbors=1)


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

from __future__ import annotations

import itertools

import numpy as np
import pytest

from csdkit import glyphs
from csdkit.glyphs import GLYPH_CLASSES, SPLITS, build_glyphs, load_glyphs

SMALL = {"size": 16, "samples_per_font": 2}  # ~0.3 s per build


@pytest.fixture(scope="module")
def small() -> dict:
    return build_glyphs(seed=0, **SMALL)


def test_classes_constant():
    assert len(GLYPH_CLASSES) == 40 == len(set(GLYPH_CLASSES))
    # the look-alikes the data card (README) promises to leave out
    for char in "lIoOcsuvwxz01":
        assert (char in GLYPH_CLASSES) == (char in "IO")


def test_kept_faces_are_letter_faces():
    faces = glyphs.usable_faces()
    assert len(faces) >= 20, list(faces)
    assert list(faces) == sorted(faces)
    # symbol and size-variant fonts fill the ASCII slots with non-letters or nothing at all
    for rejected in ("cmsy10", "cmex10", "STIXSizOneSymReg", "STIXNonUni", "LastResortHE-Regular"):
        assert rejected not in faces
    for kept in ("DejaVuSans", "DejaVuSerif-BoldItalic", "STIXGeneralItalic", "cmr10", "cmtt10"):
        assert kept in faces


def test_kept_faces_render_distinct_glyphs():
    for face in glyphs.usable_faces():
        clean = glyphs.render_clean_glyphs(face, size=32)
        assert clean.shape == (40, 32, 32) and clean.dtype == np.uint8
        assert (clean.max(axis=(1, 2)) > 200).all(), face  # every glyph has solid ink
        flat = clean.reshape(40, -1).astype(np.float32)
        dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(dist.argmin(), dist.shape)
        assert dist[i, j] > 0, f"{face}: {GLYPH_CLASSES[i]!r} == {GLYPH_CLASSES[j]!r}"


def test_shapes_dtypes_and_class_counts(small):
    assert small["class_names"] == list(GLYPH_CLASSES)
    spf = SMALL["samples_per_font"]
    for s in SPLITS:
        images, labels, ids = small[f"{s}_images"], small[f"{s}_labels"], small[f"{s}_font_ids"]
        n_fonts = len(small[f"{s}_fonts"])
        assert images.shape == (n_fonts * 40 * spf, 16, 16) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and ids.dtype == np.int64
        assert len(labels) == len(ids) == len(images)
        # every class in every split, once per font and variant
        np.testing.assert_array_equal(np.bincount(labels, minlength=40), n_fonts * spf)
        np.testing.assert_array_equal(np.bincount(ids, minlength=n_fonts), 40 * spf)
        assert images.max() > 200 and np.median(images) < 40  # white glyphs on black


def test_split_is_by_font_and_family(small):
    fonts = {s: set(small[f"{s}_fonts"]) for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not fonts[a] & fonts[b], (a, b)
    assert set().union(*fonts.values()) == set(glyphs.usable_faces())
    assert len(fonts["train"]) > len(fonts["test"]) >= 3 and len(fonts["val"]) >= 2
    families = {s: {glyphs.font_family(f) for f in fonts[s]} for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not families[a] & families[b], (a, b)
    assert glyphs.font_family("DejaVuSerif-BoldItalic") == "DejaVu Serif"
    assert glyphs.font_family("cmti10") == glyphs.font_family("cmr10")


def test_split_falls_back_to_faces_when_families_are_too_few():
    faces = [f for f in glyphs.usable_faces() if f.startswith("DejaVuSans")]  # 2 families
    split = glyphs.split_fonts(faces, np.random.default_rng(0))
    assert sorted(sum(split.values(), [])) == sorted(faces)
    assert len(split["val"]) >= 2 and len(split["test"]) >= 3


def test_deterministic_for_a_seed(small):
    again = build_glyphs(seed=0, **SMALL)
    assert again.keys() == small.keys()
    for key, value in small.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == again[key].dtype
            assert value.tobytes() == again[key].tobytes(), key
        else:
            assert value == again[key], key
    other = build_glyphs(seed=1, **SMALL)
    assert not np.array_equal(other["train_images"], small["train_images"])


def test_load_glyphs_caches(tmp_path, monkeypatch, small):
    data = load_glyphs(tmp_path, seed=0, **SMALL)
    path = tmp_path / "glyphs" / "glyphs-s0-16px-2.npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("load_glyphs rebuilt instead of reading its cache")

    monkeypatch.setattr(glyphs, "build_glyphs", no_build)
    cached = load_glyphs(tmp_path, seed=0, **SMALL)
    assert path.stat().st_mtime_ns == mtime
    for d in (data, cached):
        assert d.keys() == small.keys()
        for key, value in small.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(d[key], value)
                assert d[key].dtype == value.dtype
            else:
                assert d[key] == value and isinstance(d[key], list), key
    with pytest.raises(AssertionError, match="rebuilt"):  # a different key is a cache miss
        load_glyphs(tmp_path, seed=1, **SMALL)


def test_harder_than_sklearn_digits():
    # cosine 1-NN on raw pixels reaches 0.967 on sklearn's 8x8 digits; here the test fonts are
    # unseen designs, so it should do clearly worse, yet far better than chance (1/40)
    from sklearn.neighbors import KNeighborsClassifier

    data = build_glyphs(seed=0, size=32, samples_per_font=4)
    x = {s: data[f"{s}_images"].reshape(len(data[f"{s}_images"]), -1) / 255.0 for s in SPLITS}
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x["train"], data["train_labels"])
    accuracy = (knn.predict(x["test"]) == data["test_labels"]).mean()
    assert 0.3 < accuracy < 0.9, accuracy

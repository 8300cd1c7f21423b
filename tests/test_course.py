"""csdkit.course: the notebooks' setup, run cache and claim checks, on a tiny digits course."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csdkit import course
from csdkit.course import CLAIMS, Course, claim
from csdkit.metrics import recall_at_k
from csdkit.train import preset

TINY = preset("quick").replace(n_tasks=2, epochs=1)  # digits: 2 tasks of 5 classes, seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    c = Course(TINY, (0, 1), tmp_path_factory.mktemp("cache"), workers=1)
    c.runs(course.METHODS)
    return c


def test_claim_prints_a_fixed_line_or_fails_with_the_measured_values(capsys):
    claim("two is more than one", 2 > 1, measured=2.0)
    assert capsys.readouterr().out == "✔ two is more than one\n"
    with pytest.raises(AssertionError, match=r"✘ one is more than two: does not hold here "
                                             r"\(measured = 1, threshold = 2\)"):
        claim("one is more than two", 1 > 2, measured=1.0, threshold=2)


def test_runs_train_each_first_task_once_and_cache_everything(tiny):
    folders = sorted(p.name for p in tiny.cache.iterdir())
    # one shared first task per seed, one folder per (method, seed)
    assert sum(f.startswith("digits-first-") for f in folders) == 2
    assert len(folders) == 2 + 2 * len(course.METHODS)
    again = Course(TINY, (0, 1), tiny.cache, workers=1)  # a new kernel: loads, trains nothing
    first = again.runs(["lwf"])["lwf"]
    assert [r.recall for r in first] == [r.recall for r in tiny.runs(["lwf"])["lwf"]]
    assert len(folders) == len(list(tiny.cache.iterdir()))
    # every continual method of a seed starts from the same first model
    rows = [tiny.runs([m])[m][0].recall[0][0] for m in ("finetune", "lwf", "fd", "csd")]
    assert len(set(rows)) == 1


def test_facts_come_from_the_runs_and_the_models(tiny):
    r = tiny.runs(["fd"], (1,))["fd"][0]
    f = tiny.facts("fd", 1)
    R = np.array(r.recall, dtype=float)
    assert f["drop"] == pytest.approx(R[0, 0] - R[-1, 0])
    assert f["task_avg"] == pytest.approx(np.mean(R[-1]))
    first = tiny.parts(1)["first"]
    old = tiny.features(tiny.first_models((1,))[0], first.images, 1)
    new = tiny.features(tiny.model("fd", 1), first.images, 1)
    assert f["compat"] == pytest.approx(recall_at_k(new, first.labels, gallery=old,
                                                    gallery_labels=first.labels,
                                                    exclude_self=True))


def test_sign_test_counts_every_query(tiny):
    wins, losses, p = course.sign_test(tiny, "fd", "finetune", (0,))
    first = tiny.parts(0)["first"]
    hit = {}
    for m in ("fd", "finetune"):  # brute force: nearest other image by cosine, one query at a time
        f = torch.nn.functional.normalize(tiny.features(tiny.model(m, 0), first.images, 0), dim=1)
        sim = f @ f.T
        sim.fill_diagonal_(-2)
        hit[m] = first.labels[sim.argmax(1)] == first.labels
    assert wins == int((hit["fd"] & ~hit["finetune"]).sum())
    assert losses == int((hit["finetune"] & ~hit["fd"]).sum())
    assert 0 < p <= 1


@pytest.mark.parametrize("name", list(CLAIMS))
def test_every_claim_measures_a_number(tiny, name):
    # on tiny digits runs the claims need not hold; each must still measure a finite number
    value = CLAIMS[name].measure(tiny, tiny.seeds)
    assert isinstance(value, float) and math.isfinite(value), value
    assert CLAIMS[name].notebook in {"01", "02", "03", "04", "05", "06"}


def test_check_fails_with_the_measurement_when_a_claim_does_not_hold(tiny, monkeypatch):
    monkeypatch.setitem(CLAIMS, "impossible", course.Claim(
        "01", "raw pixels are perfect", lambda c, seeds: 0.5, 1.0))
    with pytest.raises(AssertionError, match="raw pixels are perfect.*measured = 0.5"):
        tiny.check("impossible")


def test_replace_keeps_the_cache_and_trains_under_its_own_identity(tiny):
    gentle = tiny.replace(lr_later=1e-4)
    assert gentle.cache == tiny.cache and gentle.cfg.lr_later == 1e-4
    r = gentle.runs(["finetune"], (0,))["finetune"][0]
    assert r.identity["lr_later"] == 1e-4
    # the first task is shared with the original course (lr_later acts on later tasks only)
    assert r.recall[0][0] == tiny.runs(["finetune"], (0,))["finetune"][0].recall[0][0]

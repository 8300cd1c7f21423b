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


def test_claim_prints_its_verdict_and_the_measured_values_and_never_stops_the_notebook(capsys):
    claim("two is more than one", 2 > 1)
    assert capsys.readouterr().out == "✔ two is more than one\n"
    claim("one is more than two", 1 > 2, measured=1.0, threshold=2)  # no exception
    assert capsys.readouterr().out == ("✘ one is more than two: does not hold here\n"
                                       "  ↳ measured: measured = 1, threshold = 2\n")


def test_the_notebook_tests_compare_the_verdict_and_ignore_the_measured_values():
    import configparser
    import re
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "notebooks" / "sanitize.cfg", encoding="utf-8")
    rules = [(s["regex"], s["replace"]) for s in cfg.values() if "regex" in s]

    def sanitize(text):
        for pattern, replacement in rules:
            text = re.sub(pattern, replacement, text)
        return text

    here = "✔ a claim\n  ↳ measured: measured = 0.191, at least = 0.08, margin = 0.111\n"
    there = "✔ a claim\n  ↳ measured: measured = 0.2034, at least = 0.08, margin = 0.1234\n"
    assert sanitize(here) == sanitize(there)
    assert sanitize("✘ a claim: does not hold here\n") != sanitize("✔ a claim\n")


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
    assert f["old_gallery_R1"] == pytest.approx(recall_at_k(new, first.labels, gallery=old,
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
    # one-sided: P(at least `wins` of the discordant queries go to fd | a fair coin), by hand
    n = wins + losses
    by_hand = sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0
    assert p == pytest.approx(by_hand)


def test_the_sign_test_has_a_direction_and_survives_no_discordant_query(monkeypatch):
    """A stand-in course whose "model" is its hit pattern: query i's nearest item is i itself
    (label i: a hit) where the pattern says 1, else item i + 1 (a miss)."""
    from types import SimpleNamespace

    class Stub:
        def parts(self, seed):
            return {"first": SimpleNamespace(images=None, labels=torch.arange(10))}

        def model(self, method, seed):
            return method

        def features(self, hits, images, seed):
            return torch.tensor(hits)

    def nearest(f, g, k, exclude_self):
        i = torch.arange(len(f))
        return None, torch.where(f.bool(), i, (i + 1) % len(f))[:, None]

    monkeypatch.setattr(course.metrics, "retrieve", nearest)
    a, b = (1,) * 9 + (0,), (0,) * 9 + (1,)
    assert course.sign_test(Stub(), a, b, (0,)) == (9, 1, pytest.approx(11 / 1024))
    wins, losses, p = course.sign_test(Stub(), b, a, (0,))  # b wins: no evidence for a
    assert (wins, losses) == (1, 9) and p > 0.99
    assert course.sign_test(Stub(), (1,) * 10, (1,) * 10, (0,)) == (0, 0, 1.0)


class HandMadeCourse:
    """A course whose numbers are set by hand, seed by seed, to check what each claim measures
    against the arithmetic done here."""

    def __init__(self, facts: dict, raw: dict | None = None, baselines: dict | None = None):
        self._facts, self._raw, self._baselines = facts, raw or {}, baselines or {}

    def facts(self, method, seed):
        return self._facts[method][seed]

    def raw(self, seed):
        return self._raw[seed]

    def baselines(self, seed):
        return self._baselines[seed]


def _facts(**columns):
    """{method: {seed: {key: value}}} from key=({method: [value per seed]})."""
    out = {}
    for key, per_method in columns.items():
        for m, values in per_method.items():
            for s, v in enumerate(values):
                out.setdefault(m, {}).setdefault(s, {})[key] = v
    return out


def test_claims_measure_what_they_say_on_hand_made_numbers():
    c = HandMadeCourse(_facts(
        drop={"finetune": [0.20, 0.10, 0.30], "fd": [0.05, 0.10, 0.00]},
        first_task_final={"fd": [0.90, 0.80, 0.85], "lwf": [0.85, 0.70, 0.84]},
        task_avg={m: v for m, v in [("finetune", [0.80, 0.82, 0.78]),
                                    ("fd", [0.90, 0.91, 0.89]), ("lwf", [0.81, 0.84, 0.80]),
                                    ("csd", [0.85, 0.84, 0.86]),
                                    ("csd_official", [0.92, 0.93, 0.90])]},
        old_gallery_R1={"finetune": [0.1, 0.2, 0.1], "fd": [0.3, 0.6, 0.2],
                        "lwf": [0.1, 0.1, 0.1], "csd": [0.2, 0.2, 0.2],
                        "csd_official": [0.3, 0.3, 0.3]}),
        raw={s: {"raw_all": 0.5, "chance_all": 0.025 * (s + 1)} for s in range(3)})
    seeds = (0, 1, 2)
    measure = {name: CLAIMS[name].measure(c, seeds) for name in
               ("ft_forgets", "ft_forgets_every_seed", "fd_keeps_half", "fd_beats_lwf_on_task_1",
                "official_level_with_fd", "old_gallery_lost", "raw_far_above_chance")}
    assert CLAIMS["official_level_with_fd"].at_most and CLAIMS["old_gallery_lost"].at_most
    assert measure["ft_forgets"] == pytest.approx(0.20)  # (0.2 + 0.1 + 0.3) / 3
    assert measure["ft_forgets_every_seed"] == pytest.approx(0.10)
    assert measure["fd_keeps_half"] == pytest.approx(1 - 0.05 / 0.20)
    assert measure["fd_beats_lwf_on_task_1"] == pytest.approx(0.01)  # seed 2: 0.85 - 0.84
    assert measure["official_level_with_fd"] == pytest.approx(0.05 / 3)  # |mean difference|
    assert measure["old_gallery_lost"] == pytest.approx(0.6)  # FD, seed 1: the best of all
    assert not CLAIMS["old_gallery_lost"].holds(0.6) and CLAIMS["old_gallery_lost"].holds(0.5)
    assert measure["raw_far_above_chance"] == pytest.approx(0.5 / 0.075)  # seed 2
    # the best interval is csd_official - finetune's: its 95% t-interval over 3 seeds (t = 4.303)
    d = np.array([0.12, 0.11, 0.12])
    low = d.mean() - 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
    assert CLAIMS["best_distiller_beats_ft"].measure(c, seeds) == pytest.approx(low)


def test_a_nan_in_any_seed_fails_the_claim():
    nan = float("nan")
    c = HandMadeCourse(_facts(drop={"finetune": [0.20, nan, 0.30]}))
    for seeds in [(0, 1, 2), (1, 0, 2), (0, 2, 1)]:  # wherever the NaN comes
        value = CLAIMS["ft_forgets_every_seed"].measure(c, seeds)
        assert not value >= CLAIMS["ft_forgets_every_seed"].threshold


def test_every_claim_names_its_notebook_and_measures_a_number(tiny):
    for name, spec in CLAIMS.items():
        value = spec.measure(tiny, tiny.seeds)
        assert isinstance(value, float) and math.isfinite(value), name
        assert spec.notebook in {"01", "02", "03", "04", "05", "06"}, name


def test_a_later_task_setting_keeps_every_first_task_view_working(tiny, monkeypatch):
    """A learner's exercise: the same course with another later-task rate. The first task is
    shared, so everything built on it must work (it used to refuse task0.pt)."""
    gentle = tiny.replace(lr_later=3e-3)
    first = gentle.first_models((0,))[0]
    assert all(a.equal(b) for a, b in zip(first.state_dict().values(),
                                          tiny.first_models((0,))[0].state_dict().values(),
                                          strict=True))
    assert gentle.baselines(0)["first_model_first"] == tiny.baselines(0)["first_model_first"]
    assert math.isfinite(gentle.facts("finetune", 0)["drop"])
    monkeypatch.setitem(CLAIMS, "first_model_measured", course.Claim(
        "02", "the first model is measured", lambda c, seeds: c.baselines(seeds[0])[
            "first_model_first"], 0.0))
    gentle.check("first_model_measured")


def test_check_shows_the_measurement_and_the_margin_in_the_claims_direction(tiny, monkeypatch,
                                                                             capsys):
    monkeypatch.setitem(CLAIMS, "impossible", course.Claim(
        "01", "raw pixels are perfect", lambda c, seeds: 0.5, 1.0))
    monkeypatch.setitem(CLAIMS, "low", course.Claim(
        "01", "chance is low", lambda c, seeds: 0.2, 0.25, at_most=True))
    tiny.check("impossible")
    tiny.check("low")
    assert capsys.readouterr().out.splitlines() == [
        "✘ raw pixels are perfect: does not hold here",
        "  ↳ measured: measured = 0.5, at least = 1, margin = -0.5, seeds = 0, 1",
        "✔ chance is low",
        "  ↳ measured: measured = 0.2, at most = 0.25, margin = 0.05, seeds = 0, 1"]
    assert not CLAIMS["low"].holds(float("nan")) and not CLAIMS["impossible"].holds(float("nan"))


def test_replace_keeps_the_cache_and_trains_under_its_own_identity(tiny):
    gentle = tiny.replace(lr_later=1e-4)
    assert gentle.cache == tiny.cache and gentle.cfg.lr_later == 1e-4
    r = gentle.runs(["finetune"], (0,))["finetune"][0]
    assert r.identity["lr_later"] == 1e-4
    # the first task is shared with the original course (lr_later acts on later tasks only)
    assert r.recall[0][0] == tiny.runs(["finetune"], (0,))["finetune"][0].recall[0][0]

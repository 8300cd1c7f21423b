"""csdkit.course: the notebooks' setup, run cache and claim checks, on a tiny digits course."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from csdkit import course
from csdkit.course import CLAIMS, DISTILLERS, Course, claim
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
        def _cached(self, key, compute):
            return compute()

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
        drift={"finetune": [1.0, 0.9, 1.2], "fd": [0.7, 0.8, 0.6]},
        old_tasks_final={"fd": [0.90, 0.80, 0.85], "lwf": [0.85, 0.70, 0.84]},
        first_task_final={m: [0.9, 0.9, 0.9] for m in DISTILLERS + ["finetune"]},
        pooled={m: v for m, v in [("finetune", [0.70, 0.72, 0.68]), ("fd", [0.90, 0.91, 0.89]),
                                  ("lwf", [0.81, 0.84, 0.80]), ("csd", [0.85, 0.84, 0.86]),
                                  ("csd_official", [0.92, 0.93, 0.90])]},
        task_avg={"fd": [0.90, 0.91, 0.89], "csd_official": [0.92, 0.93, 0.90]},
        old_gallery_R1={"finetune": [0.1, 0.2, 0.1], "fd": [0.3, 0.6, 0.2],
                        "lwf": [0.1, 0.1, 0.1], "csd": [0.2, 0.2, 0.2],
                        "csd_official": [0.3, 0.3, 0.3]}),
        raw={s: {"raw_all": 0.5 + 0.01 * s, "chance_all": 0.025 * (s + 1)} for s in range(3)})
    seeds = (0, 1, 2)
    measure = {name: CLAIMS[name].measure(c, seeds) for name in
               ("ft_forgets", "fd_keeps_half", "fd_keeps_old_tasks_better_than_lwf",
                "fd_moves_less", "official_level_with_fd", "old_gallery_lost",
                "raw_far_above_chance", "best_distiller_beats_raw", "best_distiller_beats_ft",
                "fd_compat_beats_ft")}
    assert CLAIMS["official_level_with_fd"].at_most and not CLAIMS["old_gallery_lost"].at_most
    assert measure["ft_forgets"] == pytest.approx(0.20)  # (0.2 + 0.1 + 0.3) / 3
    assert measure["fd_keeps_half"] == pytest.approx(1 - 0.05 / 0.20)
    assert measure["fd_keeps_old_tasks_better_than_lwf"] == pytest.approx(0.16 / 3)
    assert measure["fd_moves_less"] == pytest.approx(0.1)  # seed 1: 0.9 - 0.8
    assert measure["official_level_with_fd"] == pytest.approx(0.05 / 3)  # |mean difference|
    # the smallest mean own-minus-old-gallery gap over the methods: FD's, 0.9 - (0.3 + 0.6 +
    # 0.2) / 3, below csd_official's 0.9 - 0.3
    assert measure["old_gallery_lost"] == pytest.approx(0.9 - 1.1 / 3)
    assert measure["raw_far_above_chance"] == pytest.approx(0.52 / 0.075)  # seed 2
    # best distiller by mean pooled R@1: csd_official, 0.9167; raw's mean 0.51, ft's 0.70
    assert measure["best_distiller_beats_raw"] == pytest.approx(2.75 / 3 - 0.51)
    assert measure["best_distiller_beats_ft"] == pytest.approx(2.75 / 3 - 0.70)
    assert measure["fd_compat_beats_ft"] == pytest.approx(0.7 / 3)  # (0.2 + 0.4 + 0.1) / 3
    # notebook 04's exercise, FD's old-gallery R@1 minus LwF's: (0.2 + 0.5 + 0.1) / 3
    assert CLAIMS["ex04_kd_or_features"].measure(c, seeds) == pytest.approx(0.8 / 3)
    c = HandMadeCourse(_facts(old_agnostic_R1={"finetune": [0.6, 0.5, 0.7]},
                              old_class_accuracy={"finetune": [0.0, 0.1, 0.2]},
                              old_tasks_final={"finetune": [0.8, 0.9, 0.7]},
                              old_aware_accuracy={"finetune": [0.9, 0.6, 0.4]}))
    assert CLAIMS["retrieval_beats_classification_agnostic"].measure(c, seeds) == \
        pytest.approx(0.5)  # (0.6 + 0.4 + 0.5) / 3
    assert CLAIMS["retrieval_beats_classification_aware"].measure(c, seeds) == \
        pytest.approx(0.5 / 3)  # (-0.1 + 0.3 + 0.3) / 3


def test_a_nan_in_any_seed_fails_the_claim():
    nan = float("nan")
    c = HandMadeCourse(_facts(drift={"finetune": [1.20, nan, 1.30]}))
    for seeds in [(0, 1, 2), (1, 0, 2), (0, 2, 1)]:  # wherever the NaN comes
        assert not CLAIMS["ft_drifts"].holds(CLAIMS["ft_drifts"].measure(c, seeds))


def test_every_claim_names_its_notebook_and_measures_a_number(tiny):
    for name, spec in CLAIMS.items():
        value = spec.measure(tiny, tiny.seeds)
        assert isinstance(value, float) and math.isfinite(value), name
        assert spec.notebook in {"01", "02", "03", "04", "05", "06", "08", "09"}, name


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
        "  ↳ measured: measured = 0.5, at least = 1, margin = -0.5, per seed = 0: 0.5, 1: 0.5",
        "✔ chance is low",
        "  ↳ measured: measured = 0.2, at most = 0.25, margin = 0.05, per seed = 0: 0.2, 1: 0.2"]
    assert not CLAIMS["low"].holds(float("nan")) and not CLAIMS["impossible"].holds(float("nan"))


def test_replace_keeps_the_cache_and_trains_under_its_own_identity(tiny):
    gentle = tiny.replace(lr_later=1e-4)
    assert gentle.cache == tiny.cache and gentle.cfg.lr_later == 1e-4
    r = gentle.runs(["finetune"], (0,))["finetune"][0]
    assert r.identity["lr_later"] == 1e-4
    # the first task is shared with the original course (lr_later acts on later tasks only)
    assert r.recall[0][0] == tiny.runs(["finetune"], (0,))["finetune"][0].recall[0][0]


def test_old_class_facts_match_a_loop_over_the_queries(tiny):
    """Task-agnostic and task-aware, retrieval and classification, on the old tasks' test
    images, against a plain loop: nearest other image by cosine; argmax over the allowed
    logits."""
    from csdkit.models import extract

    seed = 0
    data, split = tiny.data(seed)
    feats, logits = extract(tiny.model("finetune", seed), data.test.images, data.mean, data.std)
    f = (feats / feats.norm(dim=1, keepdim=True)).numpy()
    task_of = split.task_of_label()
    labels = data.test.labels.numpy()
    search, aware, n = 0, 0, 0
    for i in range(len(labels)):
        t = task_of[labels[i]]
        if t == split.n_tasks - 1:
            continue  # the last task is not old
        sims = f @ f[i]
        sims[i] = -np.inf
        search += labels[int(np.argmax(sims))] == labels[i]
        own = np.flatnonzero(task_of == t)
        aware += own[int(np.argmax(logits[i].numpy()[own]))] == labels[i]
        n += 1
    facts = tiny.facts("finetune", seed)
    assert facts["old_agnostic_R1"] == pytest.approx(search / n)
    assert facts["old_aware_accuracy"] == pytest.approx(aware / n)
    R = np.asarray(tiny.runs(["finetune"], (seed,))["finetune"][0].recall)
    assert facts["new_task"] == pytest.approx(np.mean([R[t, t] for t in range(1, len(R))]))


def test_predict_then_test_judges_by_the_calibrated_finding_and_shows_the_interval(
        monkeypatch, capsys):
    from csdkit.course import Exercise, predict_then_test

    effects = {}
    trained = []
    monkeypatch.setitem(course.EXERCISES, "toy", Exercise(
        "03", "the drop", ("smaller", "larger"), "smaller", 0.05,
        lambda c, s: effects[s], lambda c: trained.append(True)))
    toy = SimpleNamespace(seeds=(0, 1, 2))
    predict_then_test(None, toy, "toy")
    assert "not answered yet" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'smaller' or 'larger', got 'Smaller'"):
        predict_then_test("Smaller", toy, "toy")
    with pytest.raises(ValueError, match="got True"):
        predict_then_test(True, toy, "toy")
    assert not trained  # nothing trained before the prediction was valid
    # effects -0.10, -0.12, -0.08: mean -0.10, sd 0.02, t(0.975, 2) = 4.3027 -> [-0.150, -0.050]
    effects.update({0: -0.10, 1: -0.12, 2: -0.08})
    predict_then_test("smaller", toy, "toy")
    out = capsys.readouterr().out
    assert "[-0.150, -0.050]" in out and out.endswith("smaller: your prediction holds\n")
    predict_then_test("larger", toy, "toy")
    assert "smaller: your prediction does not hold" in capsys.readouterr().out
    # mean -0.06, toward the answer by more than 0.05, but the interval includes 0
    effects.update({0: -0.20, 1: 0.05, 2: -0.03})
    predict_then_test("smaller", toy, "toy")
    out = capsys.readouterr().out
    assert "prediction holds (these seeds alone are too close to call" in out
    # mean -0.02: not as far toward the answer as the held-out seeds put it
    effects.update({0: -0.02, 1: -0.03, 2: -0.01})
    predict_then_test("smaller", toy, "toy")
    assert "too close to call on these seeds" in capsys.readouterr().out
    assert course.CLAIMS["ex03_fewer_epochs"].notebook == "03"  # every exercise is a claim too


def test_compatibility_facts_match_loops_over_the_stored_matrix(tiny):
    """AC (ties compatible), AM, mean diagonal and mean below it, by hand from the matrix."""
    M = np.array(tiny.runs(["fd"], (0,))["fd"][0].compatibility, dtype=float)
    T = len(M)
    below = [M[i, j] for i in range(T) for j in range(i)]
    facts = tiny.facts("fd", 0)
    assert facts["below_diagonal"] == pytest.approx(sum(below) / len(below))
    assert facts["diagonal"] == pytest.approx(sum(M[i, i] for i in range(T)) / T)
    assert facts["AM"] == pytest.approx((sum(below) + sum(M[i, i] for i in range(T)))
                                        / (len(below) + T))
    assert facts["AC"] == pytest.approx(np.mean([M[i, j] >= M[j, j] for i in range(T)
                                                 for j in range(i)]))


def test_agreement_is_the_mean_cosine_of_teacher_and_student_features_per_part(tiny):
    seed = 0
    data, split = tiny.data(seed)
    teacher, student = tiny.model("fd", seed, 0), tiny.model("fd", seed, 1)  # 2 tasks: one pair
    expected = {}
    for part, classes in (("new", split.classes(1)), ("old", range(split.seen(0)))):
        images = data.test.of_classes(classes).images
        a = tiny.features(teacher, images, seed).double().numpy()
        b = tiny.features(student, images, seed).double().numpy()
        cos = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
        expected[part] = float(np.mean(cos))
    got = tiny.agreement("fd", seed)
    assert got["new"] == pytest.approx(expected["new"], abs=1e-5)
    assert got["old"] == pytest.approx(expected["old"], abs=1e-5)
    assert got["new"] != pytest.approx(got["old"], abs=1e-6)  # the two parts are not one set


def test_a_course_stopped_after_two_tasks_is_the_whole_courses_beginning(tmp_path):
    """first_tasks(2) (notebook 09's sweep) trains tasks 1-2 only; its facts equal numbers worked
    out from the whole course's run: its task matrix's first two rows, its pooled R@1 after task
    2, and drift and the old-gallery R@1 from its task-1 and task-2 checkpoints."""
    from csdkit.drift import drift_ratio

    whole = Course(TINY.replace(n_tasks=5), (0,), tmp_path, workers=1)
    two = whole.first_tasks(2)
    f = two.facts("fd", 0)  # trained first, so the whole run below resumes from it
    r = whole.runs(["fd"])["fd"][0]
    assert len(two.runs(["fd"])["fd"][0].recall) == 2 and len(r.recall) == 5
    assert f["drop"] == pytest.approx(r.recall[0][0] - r.recall[1][0])
    assert f["new_task"] == pytest.approx(r.recall[1][1])
    assert f["pooled"] == pytest.approx(r.seen_recall[1])
    first = whole.parts(0)["first"]
    old, new = (whole.features(whole.model("fd", 0, t), first.images) for t in (0, 1))
    assert f["drift"] == pytest.approx(drift_ratio(old, new, first.labels))
    assert f["old_gallery_R1"] == pytest.approx(recall_at_k(new, first.labels, gallery=old,
                                                    gallery_labels=first.labels,
                                                    exclude_self=True))
    seen = whole.data(0)[0].test.of_classes(range(4))  # tasks 1-2: the first 4 digits
    feats = whole.features(whole.model("fd", 0, 1), seen.images)
    old_half = seen.labels < 2
    hit = seen.labels[[int(np.argmax(np.where(np.arange(len(seen.labels)) == i, -np.inf,
                                              (feats @ feats[i]).numpy() /
                                              np.linalg.norm(feats.numpy(), axis=1))))
                       for i in range(len(seen.labels))]]
    assert f["old_agnostic_R1"] == pytest.approx((hit == seen.labels)[old_half].float().mean())
    assert course.at_rate(whole, 1e-3).cfg.lr_later == 1e-3
    assert course.at_rate(whole, 1e-3).last_task == 1


def test_training_courses_together_gives_each_course_its_own_runs(tmp_path, monkeypatch):
    """train_together (notebook 09: every run in one pass) trains every course's runs in one
    pass of the workers and memoises them: the same numbers as each course trained alone."""
    from csdkit import runs

    passes = []  # the number of runs each pass of the workers trains
    parallel = runs._run_parallel
    monkeypatch.setattr(runs, "_run_parallel", lambda jobs, w: passes.append(len(jobs)) or
                        parallel(jobs, w))
    together = Course(TINY, (0,), tmp_path / "together", workers=1).first_tasks(2)
    alone = Course(TINY, (0,), tmp_path / "alone", workers=1).first_tasks(2)
    plan = [(together.replace(lr_later=3e-4), ["finetune", "fd"]),
            (together.replace(w_fd=10.0), ["fd"])]
    course.train_together(plan)
    assert [n for n in passes if n] == [1, 3]  # the shared first task, then all three runs
    assert all(("run", m, 0) in c._memo for c, methods in plan for m in methods)
    for (c, methods), changes in zip(plan, [{"lr_later": 3e-4}, {"w_fd": 10.0}], strict=True):
        mine = alone.replace(**changes).runs(methods)
        assert {m: [r.recall for r in rs] for m, rs in c.runs(methods).items()} == \
               {m: [r.recall for r in rs] for m, rs in mine.items()}
    assert len(list((tmp_path / "together").iterdir())) == 1 + 3  # one first task, three runs
    with pytest.raises(ValueError, match="share their cache"):
        course.train_together([(together, ["fd"]), (alone, ["fd"])])


def test_notebook_09_trains_only_what_the_course_has_not(tmp_path, monkeypatch):
    """Once the course's fine-tuning and FD runs exist, notebook 09's plan trains four one-task
    runs: both methods at 1e-2, FD at w_fd 0.1 and 10 (the course's rate and weight are read)."""
    from csdkit import runs

    passes = []
    parallel = runs._run_parallel
    monkeypatch.setattr(runs, "_run_parallel", lambda jobs, w: passes.append(len(jobs)) or
                        parallel(jobs, w))
    c = Course(TINY.replace(lr_later=course.SWEEP_RATES[0]), (0,), tmp_path, workers=1)
    c.runs(course.SWEEP_METHODS)
    passes.clear()
    course.train_together(course.sweep_plan(c))
    assert [n for n in passes if n] == [4]
    assert len(list(tmp_path.iterdir())) == 1 + 2 + 4  # one first task, the course's two, four


def test_every_claim_is_checked_in_its_own_notebook_and_every_check_is_a_claim():
    """The claims table and the notebooks agree: a claim no notebook checks (or a check of a
    claim that is gone) is a finding nobody sees, or a cell that fails."""
    import json
    import re
    from pathlib import Path

    checked = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                         if cell["cell_type"] == "code")
        checked[path.name[:2]] = set(re.findall(r'c\.check\("(\w+)"\)', code)) | set(
            re.findall(r'predict_then_test\(PREDICTION, c, "(\w+)"\)', code))
    assert {n for n, spec in CLAIMS.items() if n not in checked.get(spec.notebook, ())} == set()
    assert {n for names in checked.values() for n in names} - set(CLAIMS) == set()

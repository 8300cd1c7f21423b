"""What every notebook of the course does first, in one call, and the claim checks.

    from csdkit import course
    c = course.setup()                       # seeds, the course data, a run cache
    runs = c.runs(["finetune", "fd"])        # {method: [RunResult per seed]}, cached
    course.claim("fine-tuning forgets", drop >= 0.10, drop=drop)
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from csdkit import metrics, require
from csdkit.data import Dataset, ImageSet, TaskSplit
from csdkit.drift import DriftMap, drift_ratio, map_recall_at_1
from csdkit.models import ResNet, extract, resnet
from csdkit.report import t_interval
from csdkit.runs import cache_folder, first_name, load_checkpoint, machine, run_grid, run_name
from csdkit.train import Config, RunResult, prepare, preset, resolve_device

#: The seeds every notebook trains: three, so that no finding rests on one run.
SEEDS = (0, 1, 2)


def claim(statement: str, holds: bool, **measured) -> None:
    """A notebook's claim check: print `✔ statement`, or `✘ statement: does not hold here`, and
    under it the measured values. nbval compares the first line (a ✘ fails it) and ignores the
    second (notebooks/sanitize.cfg). Nothing is raised, so "Run All" still reaches the rest."""
    print(f"✔ {statement}" if holds else f"✘ {statement}: does not hold here")
    if measured:
        print("  ↳ measured: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else
                                           f"{k} = {v}" for k, v in measured.items()))


def repository_root() -> Path:
    """The checkout holding csdkit/ (where data/ and runs/ go), or the working directory."""
    here = Path.cwd()
    return next((p for p in [here, *here.parents] if (p / "csdkit").is_dir()), here)


@dataclass
class Course:
    cfg: Config  # the course preset with the notebook's parameters; seed = the first seed
    seeds: tuple[int, ...]
    cache: Path
    workers: int
    last_task: int | None = None  # stop every run after this task (0-based): see first_tasks
    _memo: dict = field(default_factory=dict, repr=False)

    def _cached(self, key: tuple, compute):  # the memo's value, computed on the first call
        return self._memo[key] if key in self._memo else self._memo.setdefault(key, compute())

    def data(self, seed: int | None = None) -> tuple[Dataset, TaskSplit]:
        """The dataset, relabelled in the class order of `seed` (default: the first seed)."""
        seed = self.seeds[0] if seed is None else seed
        return self._cached(("data", seed), lambda: prepare(self.cfg.replace(seed=seed)))

    def runs(self, methods: list[str], seeds: tuple[int, ...] | None = None
             ) -> dict[str, list[RunResult]]:
        """Train (or load) every method for every seed: {method: [result per seed]}."""
        seeds = self.seeds if seeds is None else tuple(seeds)
        todo = [(m, s) for m in methods for s in seeds if ("run", m, s) not in self._memo]
        if todo:
            results = run_grid([(self.cfg.replace(seed=s), m) for m, s in todo], self.cache,
                               self.workers, last_task=self.last_task)
            self._memo.update({("run", m, s): r for (m, s), r in zip(todo, results, strict=True)})
        return {m: [self._memo["run", m, s] for s in seeds] for m in methods}

    def first_models(self, seeds: tuple[int, ...] | None = None) -> list[ResNet]:
        """The model after the first task, one per seed (trains only that task if need be)."""
        seeds = self.seeds if seeds is None else tuple(seeds)
        todo = [s for s in seeds if ("first", s) not in self._memo]
        if todo:
            run_grid([(self.cfg.replace(seed=s), "finetune") for s in todo], self.cache,
                     self.workers, first_only=True)
        for s in todo:
            folder = self.cache / first_name(self.cfg.replace(seed=s), self.data(s)[0])
            self._memo["first", s] = load_checkpoint(folder / "task0.pt")[0].eval()
        return [self._memo["first", s] for s in seeds]

    def model(self, method: str, seed: int | None = None, task: int = -1) -> ResNet:
        """The model of `method` after `task` (0-based; -1: the last), in eval mode."""
        seed = self.seeds[0] if seed is None else seed
        result = self.runs([method], (seed,))[method][0]  # trains it if need be
        folder = self.cache / run_name(self.cfg.replace(seed=seed), method, self.data(seed)[0])
        last = len(result.recall) - 1
        return load_checkpoint(folder / f"task{last if task == -1 else task}.pt")[0].eval()

    def features(self, model: ResNet, images: torch.Tensor, seed: int | None = None
                 ) -> torch.Tensor:
        """Features [N, D] of uint8 images [N, 3, H, W] (eval mode)."""
        data = self.data(seed)[0]
        return extract(model, images, data.mean, data.std)[0]

    # ----------------------------------------------------------------------------------------
    # the numbers the claims use, per seed (memoised)

    def parts(self, seed: int) -> dict[str, ImageSet]:
        """The test images scored on: "first" (task 1's classes), "unseen" (2..T's), "all"."""
        data, split = self.data(seed)
        return {"first": data.test.of_classes(split.classes(0)),
                "unseen": data.test.of_classes(range(split.seen(0), data.n_classes)),
                "all": data.test}

    def raw(self, seed: int) -> dict[str, float]:
        """R@1 of raw pixels on each part, and each part's chance level (nothing trained)."""
        def compute() -> dict[str, float]:
            out = {}
            for part, s in self.parts(seed).items():
                out[f"chance_{part}"] = metrics.chance_recall_at_1(s.labels)
                out[f"raw_{part}"] = metrics.recall_at_k(s.images.flatten(1).float(), s.labels)
            return out
        return self._cached(("raw", seed), compute)

    def baselines(self, seed: int) -> dict[str, float]:
        """`raw`, plus R@1 on each part of the seed's untrained network and first model."""
        def compute() -> dict[str, float]:
            torch.manual_seed(seed)  # the initial weights of every run of this seed
            untrained = resnet(self.cfg.depth, self.data(seed)[1].increments[0]).eval()
            first = self.first_models((seed,))[0]
            out = dict(self.raw(seed))
            for part, s in self.parts(seed).items():
                for name, net in (("untrained", untrained), ("first_model", first)):
                    out[f"{name}_{part}"] = metrics.recall_at_k(
                        self.features(net, s.images, seed), s.labels)
            return out
        return self._cached(("baselines", seed), compute)

    def facts(self, method: str, seed: int) -> dict[str, float]:
        """A run's numbers: from its task matrix (new_task: its diagonal over tasks 2..T;
        old_tasks_final: tasks 1..T-1 at the end), task 1's drift (drift_ratio), the final
        model's R@1 in the first model's gallery, its compatibility matrix's AC, AM, mean
        diagonal and mean below the diagonal (task 1's test images), and `_old_classes`."""
        def compute() -> dict[str, float]:
            r = self.runs([method], (seed,))[method][0]
            R = np.asarray(r.recall, dtype=float)[:, : len(r.recall)]  # the tasks trained
            out = {"task_avg": r.task_average_recall, "pooled": r.final_recall,
                   "first_task_final": R[-1, 0], "old_class_accuracy": r.old_accuracy[-1]}
            if method == "joint":
                return out
            first = self.parts(seed)["first"]  # `old`: the first model this run started from
            old = self.features(self.model(method, seed, 0), first.images, seed)
            new = self.features(self.model(method, seed), first.images, seed)
            M = np.asarray(r.compatibility, dtype=float)
            out.update(AC=metrics.average_compatibility(M),
                       AM=metrics.average_multimodel_accuracy(M), diagonal=float(np.diag(M).mean()),
                       below_diagonal=float(M[np.tril_indices(len(M), -1)].mean()))
            out.update(first_task_after_1=R[0, 0], drop=R[0, 0] - R[-1, 0],
                       new_task=float(np.mean(np.diag(R)[1:])),
                       old_tasks_final=float(np.mean(R[-1, :-1])),
                       drift=drift_ratio(old, new, first.labels),
                       old_gallery_R1=metrics.recall_at_k(new, first.labels, gallery=old),
                       **self._old_classes(method, seed, len(R)))
            return out
        return self._cached(("facts", method, seed), compute)

    def agreement(self, method: str, seed: int) -> dict[str, float]:
        """How closely each later model (student) reproduces the model before it (teacher):
        the mean cosine between their features of the same test image, on the new task's
        classes (what a distiller is trained on) and on the classes seen before it, averaged
        over tasks 2..T."""
        def compute() -> dict[str, float]:
            data, split = self.data(seed)
            out = {"new": [], "old": []}
            for t in range(1, split.n_tasks):
                teacher, student = (self.model(method, seed, i) for i in (t - 1, t))
                for part, images in (("new", data.test.of_classes(split.classes(t))),
                                     ("old", data.test.of_classes(range(split.seen(t - 1))))):
                    f_t, f_s = (self.features(m, images.images, seed) for m in (teacher, student))
                    out[part].append(torch.cosine_similarity(f_t, f_s, dim=1).mean().item())
            return {part: float(np.mean(v)) for part, v in out.items()}
        return self._cached(("agreement", method, seed), compute)

    def _old_classes(self, method: str, seed: int, tasks: int) -> dict[str, float]:
        """The final model (after `tasks` tasks) on the old tasks' test images, classification
        beside retrieval: task-agnostic (argmax over every seen class; R@1 among every seen
        class's images) and task-aware (argmax within the query's task; R@1 within it is
        old_tasks_final)."""
        data, split = self.data(seed)
        task_of_label = torch.as_tensor(split.task_of_label())[: split.seen(tasks - 1)]
        test = data.test.of_classes(range(len(task_of_label)))
        task_of = task_of_label[test.labels]
        feats, logits = extract(self.model(method, seed), test.images, data.mean, data.std)
        hit = test.labels[metrics.retrieve(feats, feats, 1, exclude_self=True)[1][:, 0]]
        old = task_of < tasks - 1
        own_task = task_of[:, None] == task_of_label[None, :]
        aware = logits.masked_fill(~own_task, -torch.inf).argmax(1)
        return {"old_agnostic_R1": (hit == test.labels)[old].float().mean().item(),
                "old_aware_accuracy": (aware == test.labels)[old].float().mean().item()}

    def drift_map(self, seed: int) -> DriftMap:
        """The first model's UMAP map of task 1's test images (seed `seed`)."""
        first = self.parts(seed)["first"]
        return self._cached(("drift map", seed), lambda: DriftMap(
            self.features(self.first_models((seed,))[0], first.images, seed), seed=seed))

    def aligned_map(self, method: str, seed: int) -> np.ndarray:
        """[N, 2]: the final model's own map of task 1's test images, aligned to the first
        model's (DriftMap.align)."""
        first = self.parts(seed)["first"]
        return self._cached(("aligned map", method, seed), lambda: self.drift_map(seed).align(
            self.features(self.model(method, seed), first.images, seed), first.labels))

    def map_recall(self, method: str, seed: int) -> float:
        """R@1 measured in the 2-D map (map_recall_at_1) of task 1's test images: the first
        model's map for method "first", else the final model's aligned map."""
        xy = self.drift_map(seed).old_2d if method == "first" else self.aligned_map(method, seed)
        return map_recall_at_1(xy, self.parts(seed)["first"].labels)

    def replace(self, **changes) -> Course:
        """The same course with other settings (e.g. lr_later=1e-3), sharing the run cache."""
        key = ("replace", tuple(sorted(changes.items())))  # one memo per changed course
        return self._cached(key, lambda: Course(self.cfg.replace(**changes), self.seeds,
                                                self.cache, self.workers, self.last_task))

    def first_tasks(self, n: int) -> Course:
        """The same course stopped after its first `n` tasks, sharing the run cache (the whole
        course resumes from there): what a sweep of one later task's settings needs."""
        return self._cached(("first tasks", n), lambda: Course(self.cfg, self.seeds, self.cache,
                                                                 self.workers, n - 1))

    def check(self, name: str) -> None:
        """Measure claim `name` of CLAIMS over this course's seeds and check it (see `claim`).
        Beside the statistic it shows the same measurement on each seed alone."""
        spec = CLAIMS[name]
        value = spec.measure(self, self.seeds)
        margin = spec.threshold - value if spec.at_most else value - spec.threshold
        per_seed = ", ".join(f"{s}: {spec.measure(self, (s,)):.4g}" for s in self.seeds)
        claim(spec.statement, spec.holds(value), measured=value,
              **{"at most" if spec.at_most else "at least": spec.threshold}, margin=margin,
              **{"per seed": per_seed})


# --------------------------------------------------------------------------------------------
# The course's claims: a statement, a measurement over the notebook's seeds and the threshold
# it must reach (benchmarks/calibrate_claims.py measures them over many seeds and CPUs).

#: What the course trains (notebooks 03-06).
METHODS = ["finetune", "lwf", "fd", "csd", "csd_official", "joint"]
DISTILLERS = ["lwf", "fd", "csd", "csd_official"]
#: What notebook 08 compares: two distillers and the two methods built for compatibility.
COMPATIBILITY = ["finetune", "fd", "csd_official", "bct", "simplex"]


@dataclass(frozen=True)
class Claim:
    notebook: str
    statement: str
    measure: Callable[[Course, tuple[int, ...]], float]  # (course, seeds) -> the statistic
    threshold: float
    at_most: bool = False  # the claim says "at most threshold"; otherwise "at least"

    def holds(self, value: float) -> bool:
        """Whether a measured value makes the statement true (a NaN never does)."""
        return bool(value <= self.threshold if self.at_most else value >= self.threshold)


def seed_min(seeds, f) -> float:
    """The smallest f(seed): "at least ... in every seed". A NaN gives NaN, failing the claim."""
    return float(np.min([f(s) for s in seeds]))


def seed_max(seeds, f) -> float:  # the largest f(seed), for "at most ... in every seed"
    return float(np.max([f(s) for s in seeds]))


def seed_mean(seeds, f) -> float:  # the mean of f(seed): a claim about the seeds together
    return float(np.mean([f(s) for s in seeds]))


def share_of_drop_avoided(c: Course, seeds, method: str) -> float:
    """The share of fine-tuning's first-task drop that `method` avoids, over the seeds (0 when
    fine-tuning dropped nothing: then there was nothing to keep)."""
    ft = seed_mean(seeds, lambda s: c.facts("finetune", s)["drop"])
    kept = seed_mean(seeds, lambda s: c.facts(method, s)["drop"])
    return 1 - kept / ft if ft > 0 else 0.0


def sign_test(c: Course, a: str, b: str, seeds) -> tuple[int, int, float]:
    """Over task 1's test queries (seeds pooled): how many the final model of `a` gets right
    (R@1 within task 1) and `b` wrong, the reverse, and the one-sided sign-test p of "a wins
    more often" (1 if none differ). Queries as independent trials: about these models on these
    test fonts, not the method (the paired interval over seeds is that)."""
    def hits(m: str, s: int) -> torch.Tensor:  # [N] bool: query right at R@1 within task 1
        first = c.parts(s)["first"]
        f = c.features(c.model(m, s), first.images, s)
        return first.labels[metrics.retrieve(f, f, 1, exclude_self=True)[1][:, 0]] == first.labels

    wins = losses_ = 0
    for s in seeds:
        hit_a, hit_b = (c._cached(("hits", m, s), lambda m=m, s=s: hits(m, s))
                        for m in (a, b))
        wins += int((hit_a & ~hit_b).sum())
        losses_ += int((hit_b & ~hit_a).sum())
    if wins + losses_ == 0:
        return 0, 0, 1.0
    return wins, losses_, float(binomtest(wins, wins + losses_, alternative="greater").pvalue)


def difference(c: Course, a: str, b: str, key: str):  # seed -> facts(a)[key] - facts(b)[key]
    return lambda s: c.facts(a, s)[key] - c.facts(b, s)[key]


def map_difference(c: Course, a: str, b: str):  # seed -> map_recall(a) - map_recall(b)
    return lambda s: c.map_recall(a, s) - c.map_recall(b, s)


def smallest_old_gallery_loss(c: Course, seeds, methods: list[str]) -> float:
    """Over `methods`, the smallest mean (over the seeds) of the final model's task-1 R@1 in
    its own gallery minus in the first model's gallery."""
    return min(seed_mean(seeds, lambda s, m=m: c.facts(m, s)["first_task_final"] -
                         c.facts(m, s)["old_gallery_R1"]) for m in methods)


def best_distiller(c: Course, seeds, baseline) -> float:
    """The best distiller's mean pooled R@1 over the seeds minus the mean of baseline(seed)."""
    best = max(seed_mean(seeds, lambda s, m=m: c.facts(m, s)["pooled"]) for m in DISTILLERS)
    return best - seed_mean(seeds, baseline)


CLAIMS: dict[str, Claim] = {
    # 01: raw pixels (nothing trained; the seed draws which letters form task 1)
    "raw_far_above_chance": Claim(
        "01", "raw pixels retrieve at least 10 times above chance over all 40 classes",
        lambda c, seeds: seed_min(seeds, lambda s: c.raw(s)["raw_all"] / c.raw(s)["chance_all"]),
        10.0),
    "raw_harder_with_more_classes": Claim(
        "01", "raw-pixel R@1 falls by at least 0.10 from task 1's classes to all 40 classes, "
              "on average over the seeds",
        lambda c, seeds: seed_mean(seeds, lambda s: c.raw(s)["raw_first"] - c.raw(s)["raw_all"]),
        0.10),
    # 02: the first task
    "first_model_good_on_its_classes": Claim(
        "02", "after task 1 the network retrieves task 1's letters with R@1 of at least 0.9 on "
              "average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.baselines(s)["first_model_first"]), 0.9),
    "first_model_beats_untrained_on_its_classes": Claim(
        "02", "on task 1's letters it beats the untrained network by at least 0.10 on average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.baselines(s)["first_model_first"] -
                                   c.baselines(s)["untrained_first"]), 0.10),
    "first_model_below_raw_on_unseen": Claim(
        "02", "on the 32 letters it never saw, it falls at least 0.10 below raw pixels on "
              "average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.baselines(s)["raw_unseen"] -
                                   c.baselines(s)["first_model_unseen"]), 0.10),
    "first_model_beats_untrained_on_unseen": Claim(
        "02", "yet on those unseen letters it beats the untrained network, on average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.baselines(s)["first_model_unseen"] -
                                   c.baselines(s)["untrained_unseen"]), 0.0),
    # 03: fine-tuning forgets
    "ft_forgets": Claim(
        "03", "fine-tuning forgets: its first-task R@1 falls by at least 0.04 from task 1 to "
              "task 5, on average over the seeds",
        lambda c, seeds: seed_mean(seeds, lambda s: c.facts("finetune", s)["drop"]), 0.04),
    "retrieval_beats_classification_agnostic": Claim(
        "03", "told nothing of the task, fine-tuning's final model finds an old letter's class "
              "by search (R@1 among all 40 letters) more often than its classifier names it, by "
              "at least 0.55 on average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.facts("finetune", s)["old_agnostic_R1"] -
                                   c.facts("finetune", s)["old_class_accuracy"]), 0.55),
    "retrieval_beats_classification_aware": Claim(
        "03", "told the task, search still wins: within-task R@1 on old letters beats "
              "within-task accuracy by at least 0.55 on average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.facts("finetune", s)["old_tasks_final"] -
                                   c.facts("finetune", s)["old_aware_accuracy"]), 0.55),
    "ft_map_mixes": Claim(
        "03", "the maps agree with the numbers: fine-tuning's final map separates task 1's "
              "letters less well than the first model's (R@1 in 2-D at least 0.05 lower on "
              "average)",
        lambda c, seeds: seed_mean(seeds, map_difference(c, "first", "finetune")), 0.05),
    "ft_drifts": Claim(
        "03", "fine-tuning moves task 1's classes by at least 0.85 of the distance between two "
              "of them, in every seed",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("finetune", s)["drift"]), 0.85),
    # 04: LwF and feature distillation
    "fd_keeps_half": Claim(
        "04", "feature distillation keeps at least half of fine-tuning's first-task drop",
        lambda c, seeds: share_of_drop_avoided(c, seeds, "fd"), 0.5),
    "fd_keeps_old_tasks_better_than_lwf": Claim(
        "04", "KD alone keeps less: after the last task FD's within-task R@1 on the old tasks "
              "beats LwF's by at least 0.02 on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "fd", "lwf", "old_tasks_final")), 0.02),
    "fd_still_learns": Claim(
        "04", "FD learns new tasks about as well as fine-tuning: its new-task R@1 (the task "
              "matrix's diagonal, tasks 2-5, averaged) is at most 0.01 lower, in every seed",
        lambda c, seeds: seed_max(seeds, difference(c, "finetune", "fd", "new_task")), 0.01,
        at_most=True),
    "fd_moves_less": Claim(
        "04", "FD moves task 1's classes less than fine-tuning, by at least 0.15 class "
              "distances in every seed",
        lambda c, seeds: seed_min(seeds, difference(c, "finetune", "fd", "drift")), 0.15),
    "fd_map_beats_ft": Claim(
        "04", "the maps agree with the numbers: FD's final map separates task 1's letters "
              "better than fine-tuning's (R@1 in 2-D at least 0.05 higher on average)",
        lambda c, seeds: seed_mean(seeds, map_difference(c, "fd", "finetune")), 0.05),
    "fd_holds_old_letters": Claim(
        "04", "on the letters seen before, FD's student agrees with its teacher far more than "
              "fine-tuning's: mean cosine of the two models' features at least 0.45 higher, on "
              "average",
        lambda c, seeds: seed_mean(seeds, lambda s: c.agreement("fd", s)["old"] -
                                   c.agreement("finetune", s)["old"]), 0.45),
    # 05: CSD
    "csd_beats_ft": Claim(
        "05", "CSD as Eq. 8 raises the paper's Average over fine-tuning's by at least 0.02, on "
              "average",
        lambda c, seeds: seed_mean(seeds, difference(c, "csd", "finetune", "task_avg")), 0.02),
    "official_beats_eq8": Claim(
        "05", "the authors' form beats Eq. 8 on the paper's Average by at least 0.01 on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "csd_official", "csd", "task_avg")), 0.01),
    "official_level_with_fd": Claim(
        "05", "and ends level with FD: their Averages differ by at most 0.02 on average",
        lambda c, seeds: abs(seed_mean(seeds, difference(c, "csd_official", "fd", "task_avg"))),
        0.02, at_most=True),
    "official_moves_less": Claim(
        "05", "the authors' form moves task 1's classes less than fine-tuning, by at least 0.15 "
              "class distances in every seed",
        lambda c, seeds: seed_min(seeds, difference(c, "finetune", "csd_official", "drift")),
        0.15),
    "official_map_beats_ft": Claim(
        "05", "the maps agree with the numbers: the authors' form's final map separates task "
              "1's letters better than fine-tuning's (R@1 in 2-D at least 0.05 higher on "
              "average)",
        lambda c, seeds: seed_mean(seeds, map_difference(c, "csd_official", "finetune")), 0.05),
    # 06: the whole comparison
    "joint_beats_raw": Claim(
        "06", "learning matters: joint training's pooled R@1 beats raw pixels' by at least 0.15 "
              "in every seed",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("joint", s)["pooled"] -
                                c.raw(s)["raw_all"]), 0.15),
    "best_distiller_beats_raw": Claim(
        "06", "the best distillation method ends above raw pixels: pooled R@1 at least 0.05 "
              "higher on average",
        lambda c, seeds: best_distiller(c, seeds, lambda s: c.raw(s)["raw_all"]), 0.05),
    "best_distiller_beats_ft": Claim(
        "06", "and above fine-tuning: pooled R@1 at least 0.10 higher on average",
        lambda c, seeds: best_distiller(c, seeds, lambda s: c.facts("finetune", s)["pooled"]),
        0.10),
    "old_gallery_lost": Claim(
        "06", "no method keeps the old gallery as good as a re-embedded one: in the first "
              "model's gallery each final model's task-1 R@1 is at least 0.25 below its R@1 in "
              "its own gallery, on average",
        lambda c, seeds: smallest_old_gallery_loss(c, seeds, ["finetune", *DISTILLERS]), 0.25),
    "fd_compat_beats_ft": Claim(
        "06", "but FD's new model finds it better than fine-tuning's, by at least 0.03 on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "fd", "finetune", "old_gallery_R1")), 0.03),
    "fd_wins_the_sign_test": Claim(
        "06", "over every task-1 query, FD's final models get right more of fine-tuning's "
              "misses than the reverse (one-sided sign test p < 0.1; about these models on "
              "these test fonts, not about the method)",
        lambda c, seeds: float(-np.log10(sign_test(c, "fd", "finetune", seeds)[2])), 1.0),
    # 08: compatibility (calibrated on benchmarks/results/compatibility-heldout.json's seeds)
    "no_update_compatible": Claim(
        "08", "no method makes an update compatible by BCT's criterion: AC is at most 0.05 for "
              "every method, on average",
        lambda c, seeds: max(seed_mean(seeds, lambda s, m=m: c.facts(m, s)["AC"])
                             for m in COMPATIBILITY), 0.05, at_most=True),
    "old_gallery_lost_all": Claim(
        "08", "the methods built for compatibility do not keep the old gallery either: every "
              "final model's task-1 R@1 in the first model's gallery is at least 0.25 below "
              "its R@1 in its own gallery, on average",
        lambda c, seeds: smallest_old_gallery_loss(c, seeds, COMPATIBILITY), 0.25),
    "bct_below_beats_ft": Claim(
        "08", "BCT makes new models search old galleries better than fine-tuning does: its mean "
              "below the diagonal is at least 0.1 higher, on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "bct", "finetune", "below_diagonal")),
        0.1),
    "bct_pays_little": Claim(
        "08", "and pays almost nothing for it in its own retrieval: its mean diagonal is at most "
              "0.01 below fine-tuning's, on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "finetune", "bct", "diagonal")), 0.01,
        at_most=True),
    "simplex_no_gain": Claim(
        "08", "the fixed simplex classifier does not raise compatibility much here: its mean "
              "below the diagonal is at most 0.05 above fine-tuning's, on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "simplex", "finetune", "below_diagonal")),
        0.05, at_most=True),
    "fd_no_tradeoff": Claim(
        "08", "no trade-off for FD: its own retrieval (mean diagonal) is at least 0.05 above "
              "fine-tuning's too, on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "fd", "finetune", "diagonal")), 0.05),
}


# 09: the learning rate. The sweep trains the first update only (the course stopped after task
# 2, task 1 shared), for fine-tuning and FD: the course's rate and ten times it, the rate an
# earlier version of the course used; and FD's weight a tenth of, equal to and ten times the
# course's 1 (the course's own runs give the rate 1e-3 and the weight 1: nothing to train).
# (A finer grid, 3e-4 too and both CSD forms, put the course over its 10-minute budget; the
# five-task sweep over four rates is benchmarks/sweep_rates.py.)
SWEEP_RATES = (1e-3, 1e-2)
SWEEP_METHODS = ["finetune", "fd"]
SWEEP_W_FD = (0.1, 1.0, 10.0)


def at_rate(c: Course, rate: float) -> Course:
    """The course stopped after task 2, with task 2 trained at `rate` (notebook 09's sweep)."""
    return c.first_tasks(2).replace(lr_later=rate)


def sweep_plan(c: Course) -> list[tuple[Course, list[str]]]:
    """Every run notebook 09 needs, as (course, methods) for train_together: the first update at
    each of SWEEP_RATES, and FD's weight at each of SWEEP_W_FD (the course's rate)."""
    return [(at_rate(c, rate), SWEEP_METHODS) for rate in SWEEP_RATES] + [
        (c.first_tasks(2).replace(w_fd=w), ["fd"]) for w in SWEEP_W_FD]


def train_together(plan: list[tuple[Course, list[str]]]) -> None:
    """Train the runs of every (course, methods) in one pass of the workers, then memoise them
    in each course. One call per course would leave a core idle while each call's last run
    finishes; one pass keeps both busy. The courses share a cache, workers and `last_task`."""
    c0 = plan[0][0]
    require(all((c.cache, c.workers, c.last_task) == (c0.cache, c0.workers, c0.last_task)
                for c, _ in plan), "train_together: the courses must share their cache, "
            "workers and last task (make them with replace() from one course)")
    run_grid([(c.cfg.replace(seed=s), m) for c, methods in plan for m in methods for s in c.seeds],
             c0.cache, c0.workers, last_task=c0.last_task)
    for c, methods in plan:
        c.runs(methods)  # all trained now: this only loads


def rate_change(c: Course, method: str, key: str, low: float, high: float):
    """seed -> facts(method)[key] with task 2 at rate `high` minus at rate `low`."""
    return lambda s: at_rate(c, high).facts(method, s)[key] - at_rate(c, low).facts(method, s)[key]


def smallest_gap(c: Course, seeds, a: str, b: str, key: str, rates) -> float:
    """Over `rates`, the smallest mean (over the seeds) of facts(a)[key] - facts(b)[key], the
    first update trained at that rate: "at every one of these rates"."""
    return min(seed_mean(seeds, difference(at_rate(c, r), a, b, key)) for r in rates)


def tie_change(c: Course, key: str):  # seed -> FD's facts[key] at w_fd 10 minus at 0.1
    two = c.first_tasks(2)
    return lambda s: (two.replace(w_fd=SWEEP_W_FD[-1]).facts("fd", s)[key] -
                      two.replace(w_fd=SWEEP_W_FD[0]).facts("fd", s)[key])


CLAIMS.update({
    "sweep_ft_forgets_at_course_rate": Claim(
        "09", "at the course's rate, chosen for learning, fine-tuning already loses part of task "
              "1 in the first update: its first-task drop after task 2 is at least 0.05, on "
              "average",
        lambda c, seeds: seed_mean(seeds, lambda s: at_rate(c, 1e-3).facts("finetune", s)["drop"]),
        0.05),
    "sweep_ft_moves_more_at_high_rate": Claim(
        "09", "the higher the rate, the further task 2 moves task 1's classes: fine-tuning's "
              "drift at 1e-2 is at least 0.04 class distances above its drift at the course's "
              "1e-3, on average",
        lambda c, seeds: seed_mean(seeds, rate_change(c, "finetune", "drift", 1e-3, 1e-2)),
        0.04),
    "sweep_ft_forgets_more_at_high_rate": Claim(
        "09", "and the more it forgets: its first-task drop is larger at 1e-2 than at 1e-3, on "
              "average",
        lambda c, seeds: seed_mean(seeds, rate_change(c, "finetune", "drop", 1e-3, 1e-2)), 0.0),
    "sweep_high_rate_buys_little_learning": Claim(
        "09", "the tenfold rate buys fine-tuning little learning: its new-task R@1 at 1e-2 is at "
              "most 0.06 above its R@1 at the course's 1e-3, on average",
        lambda c, seeds: seed_mean(seeds, rate_change(c, "finetune", "new_task", 1e-3, 1e-2)),
        0.06, at_most=True),
    "sweep_fd_moves_less_at_both_rates": Claim(
        "09", "at both rates FD moves task 1's classes less than fine-tuning, by at least 0.4 "
              "class distances on average",
        lambda c, seeds: smallest_gap(c, seeds, "finetune", "fd", "drift", SWEEP_RATES), 0.4),
    "sweep_fd_drops_less_at_both_rates": Claim(
        "09", "and at both rates its first-task drop is at least 0.04 below fine-tuning's, on "
              "average",
        lambda c, seeds: smallest_gap(c, seeds, "finetune", "fd", "drop", SWEEP_RATES), 0.04),
    "sweep_fd_fits_tasks_at_both_rates": Claim(
        "09", "at both rates FD fits the two tasks together better than fine-tuning: its pooled "
              "R@1 is at least 0.05 higher, on average",
        lambda c, seeds: smallest_gap(c, seeds, "fd", "finetune", "pooled", SWEEP_RATES), 0.05),
    "sweep_tighter_tie_keeps_more": Claim(
        "09", "a tighter tie keeps more: FD's first-task R@1 after task 2 is at least 0.02 higher "
              "at w_fd 10 than at w_fd 0.1, on average",
        lambda c, seeds: seed_mean(seeds, tie_change(c, "first_task_final")), 0.02),
    "sweep_tighter_tie_learns_less": Claim(
        "09", "and learns the new task less well: its new-task R@1 is lower at w_fd 10 than at "
              "w_fd 0.1, on average",
        lambda c, seeds: -seed_mean(seeds, tie_change(c, "new_task")), 0.0),
})


@dataclass(frozen=True)
class Exercise:
    """A predict-then-test question whose answer is a finding calibrated like a claim: over
    held-out seeds, the mean effect of the change lies toward `answer` by at least `threshold`
    with a 3-sd margin, so every machine gives the same verdict."""
    notebook: str
    what: str                 # what changes, e.g. "fine-tuning's first-task drop"
    choices: tuple[str, str]  # (effect < 0, effect > 0), e.g. ("smaller", "larger")
    answer: str
    threshold: float
    effect: Callable[[Course, int], float]  # (course, seed) -> the change's effect on `what`
    train: Callable[[Course], object]       # trains what `effect` needs, every seed at once

    def toward_answer(self, c: Course, seeds) -> float:
        mean = seed_mean(seeds, lambda s: self.effect(c, s))
        return mean if self.answer == self.choices[1] else -mean

    def claim(self) -> Claim:
        return Claim(self.notebook, f"{self.what}: {self.answer}, by at least "
                     f"{self.threshold:g} on average", self.toward_answer, self.threshold)


def predict_then_test(prediction: str | None, c: Course, name: str) -> None:
    """Judge a learner's prediction for exercise `name` of EXERCISES on this course's seeds:
    print the effect per seed with its paired 95% interval, then the verdict (trains what it
    needs only once the prediction is valid)."""
    ex = EXERCISES[name]
    if prediction is None:
        return print("not answered yet: set PREDICTION and run this cell again")
    if prediction not in ex.choices:
        raise ValueError(f"PREDICTION must be {ex.choices[0]!r} or {ex.choices[1]!r}, got "
                         f"{prediction!r}")
    ex.train(c)
    effects = np.array([ex.effect(c, s) for s in c.seeds])
    low, high = t_interval(effects, 0.95)
    print(f"{ex.what}, the change's effect per seed: " + ", ".join(f"{e:+.3f}" for e in effects)
          + f"; mean {effects.mean():+.3f}, paired 95% interval [{low:+.3f}, {high:+.3f}]")
    if not ex.claim().holds(ex.toward_answer(c, c.seeds)):
        return print(f"too close to call on these seeds: held-out seeds put the mean at least "
                     f"{ex.threshold:g} toward {ex.answer!r}, these do not")
    alone = " (these seeds alone are too close to call: the interval includes 0)" \
        if not (high < 0 or low > 0) else ""
    print(f"{ex.answer}: your prediction {'holds' if prediction == ex.answer else 'does not hold'}"
          f"{alone}")


def _change(method: str, key: str, **change):  # (course, seed) -> changed minus course facts
    return lambda c, s: c.replace(**change).facts(method, s)[key] - c.facts(method, s)[key]


EXERCISES: dict[str, Exercise] = {
    "ex03_fewer_epochs": Exercise(
        "03", "fine-tuning's first-task drop with later tasks trained 12 epochs, not 36",
        ("smaller", "larger"), "smaller", 0.01, _change("finetune", "drop", epochs=12),
        lambda c: c.replace(epochs=12).runs(["finetune"])),
    "ex04_looser_tie": Exercise(
        "04", "FD's drift of task 1's classes (class distances) at w_fd = 0.1, not 1",
        ("less", "more"), "more", 0.25, _change("fd", "drift", w_fd=0.1),
        lambda c: c.replace(w_fd=0.1).runs(["fd"])),
    "ex04_where_fd_agrees": Exercise(
        "04", "FD's teacher-student agreement (mean cosine) on the old letters minus on the new "
              "task's letters", ("lower", "higher"), "higher", 0.01,
        lambda c, s: c.agreement("fd", s)["old"] - c.agreement("fd", s)["new"],
        lambda c: c.runs(["fd"])),
    "ex04_kd_or_features": Exercise(
        "04", "the final model's R@1 in the first model's gallery, FD's minus LwF's",
        ("lower", "higher"), "higher", 0.05,
        lambda c, s: c.facts("fd", s)["old_gallery_R1"] - c.facts("lwf", s)["old_gallery_R1"],
        lambda c: c.runs(["lwf", "fd"])),
    "ex05_no_student_terms": Exercise(
        "05", "the paper's Average of the authors' form without its student-student terms",
        ("lower", "higher"), "lower", 0.01,
        lambda c, s: c.facts("csd_transposed", s)["task_avg"] -
        c.facts("csd_official", s)["task_avg"], lambda c: c.runs(["csd_transposed"])),
    "ex06_compat_after_one_update": Exercise(
        "06", "FD's R@1 in the first model's gallery after task 2, minus after task 5",
        ("worse", "better"), "better", 0.15,
        lambda c, s: c.runs(["fd"], (s,))["fd"][0].compatibility[1][0] -
        c.runs(["fd"], (s,))["fd"][0].compatibility[-1][0], lambda c: c.runs(["fd"])),
    "ex08_fd_or_bct": Exercise(
        "08", "FD's mean below the diagonal (old galleries searched) minus BCT's",
        ("lower", "higher"), "higher", 0.1,
        lambda c, s: c.facts("fd", s)["below_diagonal"] - c.facts("bct", s)["below_diagonal"],
        lambda c: c.runs(["fd", "bct"])),
    "ex09_fd_at_high_rate": Exercise(
        "09", "FD's drift of task 1's classes (class distances) with task 2 at 1e-2, not the "
              "course's 1e-3", ("less", "more"), "more", 0.05,
        lambda c, s: rate_change(c, "fd", "drift", 1e-3, 1e-2)(s),
        lambda c: train_together([(at_rate(c, r), ["fd"]) for r in SWEEP_RATES])),
}
CLAIMS.update({name: ex.claim() for name, ex in EXERCISES.items()})


def setup(dataset: str | None = None, epochs: int | None = None, seeds: tuple[int, ...] = SEEDS,
          device: str = "cpu", quiet: bool = False, preset_name: str = "course") -> Course:
    """What a notebook needs first: checks the install, seeds Python, NumPy and torch, opens the
    run cache and prints the machine. `dataset`/`epochs` override the preset's (e.g. "digits",
    the fastest; preset_name="paper" for CIFAR-100)."""
    missing = [m for m in ("sklearn", "seaborn", "umap", "ipywidgets")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"missing: {', '.join(missing)}. From the repository root run `pip install -e .` "
            "(in Colab: `%pip install -e /content/csdkit`), then restart the kernel.")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cores = os.cpu_count() or 1
    torch.set_num_threads(min(2, cores))  # the notebook's own work; training runs in workers
    random.seed(seeds[0])
    np.random.seed(seeds[0])
    torch.manual_seed(seeds[0])
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 80, "axes.titlesize": 11})

    root = repository_root()
    cfg = preset(preset_name, dataset).replace(seed=seeds[0], device=device,
                                               data_root=str(root / "data"))
    cfg = cfg if epochs is None else cfg.replace(epochs=epochs)
    # Runs are cached per machine: another CPU (or the same one emulating another, as the
    # notebook tests do), another torch or another GPU computes other last digits.
    target = resolve_device(device)
    c = Course(cfg, tuple(seeds), cache_folder(root / "runs" / "cache", target),
               workers=min(2, cores) if target.type == "cpu" else 1)
    if not quiet:
        print(f"torch {torch.__version__} on {machine(target)}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}; {cores} cores: {c.workers} run(s) "
              f"trained at a time, one thread each; runs cached in {c.cache}")
    return c

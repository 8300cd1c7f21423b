"""What every notebook of the course does first, in one call, and the claim checks.

    from csdkit import course
    c = course.setup()                       # seeds, the course data, a run cache
    runs = c.runs(["finetune", "fd"])        # {method: [RunResult per seed]}, cached
    course.claim("fine-tuning forgets", drop >= 0.10, drop=drop)

Runs train in worker processes, one torch thread each (so their last digits never depend on
how many run at once), and are cached under runs/cache/ (csdkit.runs).
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

from csdkit import metrics
from csdkit.data import Dataset, ImageSet, TaskSplit
from csdkit.drift import drift_ratio
from csdkit.models import ResNet, extract, resnet
from csdkit.report import t_interval
from csdkit.runs import cache_folder, first_name, load_checkpoint, machine, run_grid, run_name
from csdkit.train import Config, RunResult, prepare, preset, resolve_device

#: The seeds every notebook trains: three, so that no finding rests on one run.
SEEDS = (0, 1, 2)


def claim(statement: str, holds: bool, **measured) -> None:
    """A notebook's claim check: print `✔ statement`, or `✘ statement: does not hold here`, and
    under it the measured values. The notebook tests compare the first line (so a ✘ fails
    them) and ignore the second (notebooks/sanitize.cfg: the numbers move with the machine).
    Nothing is raised, so "Run All" still reaches the exercises."""
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
    _memo: dict = field(default_factory=dict, repr=False)

    def _cached(self, key: tuple, compute):
        return self._memo[key] if key in self._memo else self._memo.setdefault(key, compute())

    def data(self, seed: int | None = None) -> tuple[Dataset, TaskSplit]:
        """The dataset, relabelled in the class order of `seed` (default: the first seed)."""
        seed = self.seeds[0] if seed is None else seed
        return self._cached(("data", seed), lambda: prepare(self.cfg.replace(seed=seed)))

    def runs(self, methods: list[str], seeds: tuple[int, ...] | None = None
             ) -> dict[str, list[RunResult]]:
        """Train (or load) every method for every seed: {method: [result per seed]}. Every
        method but joint starts from the same first task of a seed, trained once."""
        seeds = self.seeds if seeds is None else tuple(seeds)
        todo = [(m, s) for m in methods for s in seeds if ("run", m, s) not in self._memo]
        if todo:
            results = run_grid([(self.cfg.replace(seed=s), m) for m, s in todo], self.cache,
                               self.workers)
            self._memo.update({("run", m, s): r for (m, s), r in zip(todo, results, strict=True)})
        return {m: [self._memo["run", m, s] for s in seeds] for m in methods}

    def first_models(self, seeds: tuple[int, ...] | None = None) -> list[ResNet]:
        """The model after the first task, one per seed (shared by every method but joint;
        trains only that task when it is not cached yet)."""
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
        """Features [N, 64] of uint8 images [N, 3, H, W] (eval mode)."""
        data = self.data(seed)[0]
        return extract(model, images, data.mean, data.std)[0]

    # ----------------------------------------------------------------------------------------
    # the numbers the claims use, per seed (memoised)

    def parts(self, seed: int) -> dict[str, ImageSet]:
        """The test images scored on: "first" (task 1's classes), "unseen" (tasks 2..T's)
        and "all"."""
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
        """`raw`, plus R@1 on each part of an untrained network (the initial weights of every
        run of this seed) and of the model after the first task."""
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
        """A run's numbers: from its task matrix (first_task_* after task 1 / the last, new_task
        its diagonal's mean, old_tasks_final tasks 1..T-1 at the end), the drift of task 1's
        classes (drift_ratio) and the final model's R@1 in the first model's gallery."""
        def compute() -> dict[str, float]:
            r = self.runs([method], (seed,))[method][0]
            R = np.asarray(r.recall, dtype=float)
            out = {"task_avg": r.task_average_recall, "pooled": r.final_recall,
                   "first_task_final": R[-1, 0], "old_class_accuracy": r.old_accuracy[-1]}
            if method == "joint":
                return out
            first = self.parts(seed)["first"]
            old = self.features(self.first_models((seed,))[0], first.images, seed)
            new = self.features(self.model(method, seed), first.images, seed)
            out.update(first_task_after_1=R[0, 0], drop=R[0, 0] - R[-1, 0],
                       new_task=float(np.mean(np.diag(R))),
                       old_tasks_final=float(np.mean(R[-1, :-1])),
                       drift=drift_ratio(old, new, first.labels),
                       old_gallery_R1=metrics.recall_at_k(new, first.labels, gallery=old))
            return out
        return self._cached(("facts", method, seed), compute)

    def replace(self, **changes) -> Course:
        """The same course with other settings (e.g. lr_later=1e-3), sharing the run cache."""
        return Course(self.cfg.replace(**changes), self.seeds, self.cache, self.workers)

    def check(self, name: str) -> None:
        """Measure claim `name` of CLAIMS over this course's seeds and check it (see `claim`)."""
        spec = CLAIMS[name]
        value = spec.measure(self, self.seeds)
        margin = spec.threshold - value if spec.at_most else value - spec.threshold
        claim(spec.statement, spec.holds(value), measured=value,
              **{"at most" if spec.at_most else "at least": spec.threshold}, margin=margin,
              seeds=", ".join(map(str, self.seeds)))


# --------------------------------------------------------------------------------------------
# The course's claims: a statement, a measurement over the notebook's seeds and the threshold
# it must reach (benchmarks/calibrate_claims.py measures them over many seeds and CPUs).

#: What the course trains (notebooks 03-06).
METHODS = ["finetune", "lwf", "fd", "csd", "csd_official", "joint"]
DISTILLERS = ["lwf", "fd", "csd", "csd_official"]


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


def interval_low(values) -> float:  # the lower end of the 95% t-interval of the mean
    return float(t_interval(np.asarray(values, dtype=float), 0.95)[0])


def sign_test(c: Course, a: str, b: str, seeds) -> tuple[int, int, float]:
    """Over task 1's test queries (seeds pooled): how many the final model of `a` gets right
    (R@1 within task 1) and `b` wrong, the reverse, and the one-sided sign-test p of "a wins
    more often" (1 if none differ). Queries as independent trials: about these models on these
    test fonts, not the method (the paired interval over seeds is that)."""
    wins = losses_ = 0
    for s in seeds:
        first = c.parts(s)["first"]
        hit = {}
        for m in (a, b):
            f = c.features(c.model(m, s), first.images, s)
            _, idx = metrics.retrieve(f, f, 1, exclude_self=True)
            hit[m] = first.labels[idx[:, 0]] == first.labels
        wins += int((hit[a] & ~hit[b]).sum())
        losses_ += int((hit[b] & ~hit[a]).sum())
    if wins + losses_ == 0:
        return 0, 0, 1.0
    return wins, losses_, float(binomtest(wins, wins + losses_, alternative="greater").pvalue)


def difference(c: Course, a: str, b: str, key: str):  # seed -> facts(a)[key] - facts(b)[key]
    return lambda s: c.facts(a, s)[key] - c.facts(b, s)[key]


def _raw_minus_best_distiller(c: Course, seeds) -> float:
    best = max(seed_mean(seeds, lambda s, m=m: c.facts(m, s)["pooled"]) for m in DISTILLERS)
    return seed_mean(seeds, lambda s: c.raw(s)["raw_all"]) - best


CLAIMS: dict[str, Claim] = {
    # 01: the data and the protocol (nothing trained)
    "raw_far_above_chance": Claim(
        "01", "raw pixels retrieve at least 10 times above chance over all 40 classes",
        lambda c, seeds: seed_min(seeds, lambda s: c.raw(s)["raw_all"] / c.raw(s)["chance_all"]),
        10.0),
    "raw_harder_with_more_classes": Claim(
        "01", "raw-pixel R@1 falls by at least 0.10 from task 1's classes to all 40 classes",
        lambda c, seeds: seed_min(seeds, lambda s: c.raw(s)["raw_first"] - c.raw(s)["raw_all"]),
        0.10),
    # 02: the first task
    "first_model_good_on_its_classes": Claim(
        "02", "after task 1 the network retrieves task 1's letters with R@1 of at least 0.9",
        lambda c, seeds: seed_min(seeds, lambda s: c.baselines(s)["first_model_first"]), 0.9),
    "first_model_beats_untrained_on_its_classes": Claim(
        "02", "on task 1's letters it beats the untrained network by at least 0.08",
        lambda c, seeds: seed_min(seeds, lambda s: c.baselines(s)["first_model_first"] -
                                c.baselines(s)["untrained_first"]), 0.08),
    "first_model_below_raw_on_unseen": Claim(
        "02", "on the 32 letters it never saw, it falls at least 0.05 below raw pixels",
        lambda c, seeds: seed_min(seeds, lambda s: c.baselines(s)["raw_unseen"] -
                                c.baselines(s)["first_model_unseen"]), 0.05),
    "first_model_beats_untrained_on_unseen": Claim(
        "02", "on those unseen letters it still beats the untrained network by at least 0.03",
        lambda c, seeds: seed_min(seeds, lambda s: c.baselines(s)["first_model_unseen"] -
                                c.baselines(s)["untrained_unseen"]), 0.03),
    # 03: fine-tuning forgets
    "ft_forgets": Claim(
        "03", "fine-tuning forgets: its first-task R@1 falls by at least 0.08 from task 1 to "
              "task 5, on average over the seeds",
        lambda c, seeds: seed_mean(seeds, lambda s: c.facts("finetune", s)["drop"]), 0.08),
    "ft_forgets_every_seed": Claim(
        "03", "and it falls in every seed, by at least 0.05",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("finetune", s)["drop"]), 0.05),
    "classification_collapses": Claim(
        "03", "classification forgets completely: old-class accuracy after task 5 is at most "
              "0.05 in every seed",
        lambda c, seeds: seed_max(seeds, lambda s: c.facts("finetune", s)["old_class_accuracy"]),
        0.05, at_most=True),
    "retrieval_survives": Claim(
        "03", "retrieval does not: the old tasks' within-task R@1 stays at least 0.6 (5 times "
              "chance) in every seed",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("finetune", s)["old_tasks_final"]),
        0.6),
    "ft_drifts": Claim(
        "03", "fine-tuning moves task 1's classes by at least 0.8 of the distance between two of "
              "them, in every seed",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("finetune", s)["drift"]), 0.8),
    # 04: LwF and feature distillation
    "fd_keeps_half": Claim(
        "04", "feature distillation keeps at least half of fine-tuning's first-task drop",
        lambda c, seeds: share_of_drop_avoided(c, seeds, "fd"), 0.5),
    "fd_beats_lwf_on_task_1": Claim(
        "04", "KD alone keeps less of task 1: FD's first-task R@1 beats LwF's by at least 0.04 "
              "in every seed",
        lambda c, seeds: seed_min(seeds, difference(c, "fd", "lwf", "first_task_final")), 0.04),
    "fd_still_learns": Claim(
        "04", "FD learns each new task about as well as fine-tuning (task-matrix diagonal at "
              "most 0.03 lower, every seed)",
        lambda c, seeds: seed_max(seeds, difference(c, "finetune", "fd", "new_task")), 0.03,
        at_most=True),
    "fd_moves_less": Claim(
        "04", "FD moves task 1's classes less than fine-tuning, by at least 0.05 class "
              "distances in every seed",
        lambda c, seeds: seed_min(seeds, difference(c, "finetune", "fd", "drift")), 0.05),
    # 05: CSD
    "csd_beats_ft": Claim(
        "05", "CSD as Eq. 8 raises the paper's Average over fine-tuning's by at least 0.02, on "
              "average",
        lambda c, seeds: seed_mean(seeds, difference(c, "csd", "finetune", "task_avg")), 0.02),
    "official_beats_eq8": Claim(
        "05", "the authors' form beats Eq. 8 on the paper's Average by at least 0.02 on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "csd_official", "csd", "task_avg")), 0.02),
    "official_level_with_fd": Claim(
        "05", "and ends level with FD: their Averages differ by at most 0.04 on average",
        lambda c, seeds: abs(seed_mean(seeds, difference(c, "csd_official", "fd", "task_avg"))),
        0.04, at_most=True),
    "official_moves_less": Claim(
        "05", "the authors' form moves task 1's classes less than fine-tuning, by at least 0.1 "
              "class distances in every seed",
        lambda c, seeds: seed_min(seeds, difference(c, "finetune", "csd_official", "drift")),
        0.1),
    # 06: the whole comparison
    "joint_beats_raw": Claim(
        "06", "learning matters: joint training's pooled R@1 beats raw pixels' by at least 0.10",
        lambda c, seeds: seed_min(seeds, lambda s: c.facts("joint", s)["pooled"] -
                                c.raw(s)["raw_all"]), 0.10),
    "ft_below_raw": Claim(
        "06", "fine-tuning ends below raw pixels: pooled R@1 at least 0.08 lower in every seed",
        lambda c, seeds: seed_min(seeds, lambda s: c.raw(s)["raw_all"] -
                                c.facts("finetune", s)["pooled"]), 0.08),
    "best_distiller_level_with_raw": Claim(
        "06", "the best distillation method ends at least level with raw pixels (pooled R@1 at "
              "most 0.02 below)",
        _raw_minus_best_distiller, 0.02, at_most=True),
    "best_distiller_beats_ft": Claim(
        "06", "the best distillation method beats fine-tuning on the paper's Average, with a "
              "paired 95% interval above 0",
        lambda c, seeds: max(interval_low([difference(c, m, "finetune", "task_avg")(s)
                                           for s in seeds]) for m in DISTILLERS), 0.0),
    "old_gallery_lost": Claim(
        "06", "no method keeps the old gallery usable: new queries against the first model's "
              "gallery stay below R@1 0.5",
        lambda c, seeds: max(seed_max(seeds, lambda s, m=m: c.facts(m, s)["old_gallery_R1"])
                             for m in ["finetune", *DISTILLERS]), 0.5, at_most=True),
    "fd_compat_beats_ft": Claim(
        "06", "but FD's new model finds it better than fine-tuning's, by at least 0.05 on average",
        lambda c, seeds: seed_mean(seeds, difference(c, "fd", "finetune", "old_gallery_R1")), 0.05),
    "fd_wins_the_sign_test": Claim(
        "06", "over every task-1 query, FD's final models get right far more of fine-tuning's "
              "misses than the reverse (one-sided sign test p < 0.001; about these models on "
              "these test fonts, not about the method)",
        lambda c, seeds: float(-np.log10(sign_test(c, "fd", "finetune", seeds)[2])), 3.0),
}


def setup(dataset: str | None = None, epochs: int | None = None, seeds: tuple[int, ...] = SEEDS,
          device: str = "cpu", quiet: bool = False, preset_name: str = "course") -> Course:
    """Everything a notebook needs before it teaches: checks the install, seeds Python, NumPy
    and torch, and opens the run cache. `dataset`/`epochs` override the preset's (e.g.
    dataset="digits", the fastest; preset_name="paper" for CIFAR-100). Prints the machine in
    one line."""
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

"""Choose the `quick` and `course` protocols on VALIDATION data only (never test).

Every setting of a grid trains the methods on tuning seeds (100, 101) that no reported result
uses, and is scored on the validation split: digits' is carved from the training images (the
test split is fixed for every seed), glyphs' is held-out fonts that are neither trained nor
tested on.

    python benchmarks/tune.py quick    # digits: lr_later x epochs; the best mean validation R@1
                                       # over FT, LwF, FD and CSD after the last task
    python benchmarks/tune.py course   # glyphs: the CHEAPEST setting (fewest epochs) at which,
                                       # on every tuning seed, the course's teaching thresholds
                                       # hold on the validation fonts (see COURSE_THRESHOLDS)
    python benchmarks/tune.py plasticity   # glyphs: the later-task training that serves
                                           # learning (PLASTICITY_RULE), then each method's own
                                           # best rate at those epochs
    python benchmarks/tune.py compatibility   # glyphs: BCT's weight and the most compatible
                                              # combination (COMPAT_RULE)

PLASTICITY_RULE (stated before any run of it): on the course data (glyphs, 12 px, 5 tasks of 8
letters, first task 12 epochs at 1e-3), fine-tuning trains every later task at each rate in
{3e-4, 1e-3, 3e-3, 1e-2} for 12, 24 and 36 epochs on tuning seeds 100-102. A setting's score is
fine-tuning's validation new-task R@1: R@1 within task t's validation fonts right after
training task t, averaged over tasks 2-5 and the seeds. The chosen setting is the best score;
settings within 0.005 of it are ties, broken by the least training (fewest epochs), then the
lowest rate. Forgetting plays no part in the choice: it is measured afterwards. Then, at the
chosen epochs, every distilling method trains at every rate, and each method's own best rate is
the one with the best validation pooled R@1 after the last task (ties within 0.005: the lower
rate), fine-tuning's included.

COMPAT_RULE (stated before any run of it): the course protocol, tuning seeds 100-102, task 1's
letters in the validation fonts. A run's score is the mean below the diagonal of its
compatibility matrix on those images (new models searching old galleries); the mean diagonal
(each model in its own gallery) is reported beside it and plays no part in the choice. BCT's
weight w_bct is chosen from {0.3, 1, 3, 10}: the best mean score over the seeds, ties within
0.005 going to the smaller weight. The simplex has no weight of its own. Then the most compatible
method: the best mean score among fd, csd_official, bct (at its chosen weight), simplex, bct+fd
(at that weight) and simplex+fd, FD's weight at its default; ties within 0.005 go to the method
listed first.

Writes benchmarks/results/tune-<preset>.json (refused if it exists: pass --out). Runs are
cached in runs/cache/ and resumed if the script is interrupted. The course preset was chosen
from two grids: `course --image-size 16` (tune-course.json, lr_later x epochs 6-12) and `course
--image-size 12 --epochs 8 10 12 16 --out benchmarks/results/tune-course-12px.json`: of the
settings that pass, the one with the least training time (12 px, 12 epochs, lr_later 1e-2).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from csdkit.metrics import recall_at_k  # noqa: E402
from csdkit.runs import cache_folder, machine, refuse_existing, run_grid, write_json  # noqa: E402
from csdkit.train import RunResult, prepare, preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DISTILLERS = ["lwf", "fd", "csd", "csd_official"]
COURSE_THRESHOLDS = {
    "ft_drop": ("fine-tuning's first-task R@1 falls by at least", 0.10),
    "kept": ("the best distillation method keeps at least this share of that drop", 0.5),
    "joint_over_raw": ("joint training's pooled R@1 exceeds raw pixels' by at least", 0.10),
    "best_over_raw": ("the best continual method's pooled R@1 exceeds raw pixels' by", 0.0),
}


def grid_runs(base, grid: list[dict], seeds: list[int], methods: list[str], runs: Path,
              workers: int) -> dict:
    """Train every (setting, seed, method) (first tasks shared, see run_grid).
    Returns {(setting index, seed, method): RunResult}."""
    keys = [(i, s, m) for i in range(len(grid)) for s in seeds for m in methods]
    results = run_grid([(base.replace(**grid[i], seed=s), m) for i, s, m in keys], runs,
                       workers)
    return dict(zip(keys, results, strict=True))


def raw_pixels_val(base, seed: int) -> float:
    """Cosine R@1 of raw pixels pooled over all validation images (no training)."""
    val = prepare(base.replace(seed=seed))[0].val
    return recall_at_k(val.images.flatten(1).float(), val.labels)


def course_scores(r: dict[str, RunResult], raw: float) -> dict:
    """The teaching thresholds' quantities, on validation, for one setting and seed."""
    first = {m: res.val_recall[-1][0] for m, res in r.items() if m != "joint"}
    drop = r["finetune"].val_recall[0][0] - first["finetune"]
    best = max(DISTILLERS, key=lambda m: first[m])
    pooled = {m: res.val_seen_recall[-1] for m, res in r.items()}
    return {
        "ft_drop": drop,
        "kept": (first[best] - first["finetune"]) / drop if drop > 0 else float("nan"),
        "best_distiller": best,
        "joint_over_raw": pooled["joint"] - raw,
        "best_over_raw": max(v for m, v in pooled.items() if m != "joint") - raw,
        "first_task_val": first, "pooled_val": pooled, "raw_val": raw,
    }


RATES, LATER_EPOCHS, TIE = [3e-4, 1e-3, 3e-3, 1e-2], [12, 24, 36], 0.005


def val_scores(r: RunResult) -> dict:
    """Validation numbers of one run: new-task R@1 (tasks 2..T, right after each), the first
    task's drop, pooled R@1 and the paper's Average after the last task."""
    R = np.asarray(r.val_recall, dtype=float)
    return {"new_task": float(np.mean(np.diag(R)[1:])), "first_drop": R[0, 0] - R[-1, 0],
            "pooled": r.val_seen_recall[-1], "task_avg": float(np.nanmean(R[-1]))}


def best(lines: list[dict], key: str) -> dict:
    """PLASTICITY_RULE's choice: the best mean `key`; ties within TIE go to the least training,
    then the lowest rate."""
    top = max(s[key] for s in lines)
    return min((s for s in lines if s[key] >= top - TIE),
               key=lambda s: (s["epochs"], s["lr_later"]))


def plasticity(a: argparse.Namespace, out: Path) -> None:
    base = preset("course").replace(epochs_first=12)
    runs, start = cache_folder(a.cache, torch.device("cpu")), time.perf_counter()

    def sweep(methods: list[str], grid: list[dict]) -> list[dict]:
        res = grid_runs(base, grid, a.seeds, methods, runs, a.workers)
        lines = []
        for i, g in enumerate(grid):
            for m in methods:
                per_seed = {s: val_scores(res[i, s, m]) for s in a.seeds}
                lines.append({**g, "method": m, "seeds": per_seed,
                              "seconds": sum(sum(res[i, s, m].seconds) for s in a.seeds),
                              **{k: float(np.mean([v[k] for v in per_seed.values()]))
                                 for k in ("new_task", "first_drop", "pooled", "task_avg")}})
        return lines

    stage1 = sweep(["finetune"], [{"lr_later": lr, "epochs": ep} for ep in LATER_EPOCHS
                                  for lr in RATES])
    chosen = best(stage1, "new_task")
    stage2 = sweep(DISTILLERS, [{"lr_later": lr, "epochs": chosen["epochs"]} for lr in RATES])
    at_chosen = [s for s in stage1 if s["epochs"] == chosen["epochs"]] + stage2
    own_best = {m: best([s for s in at_chosen if s["method"] == m], "pooled")["lr_later"]
                for m in ["finetune", *DISTILLERS]}
    for s in stage1 + stage2:
        mark = "   <- chosen" if s is chosen else ""
        print(f"{s['method']:>12} lr_later={s['lr_later']:<6g} epochs={s['epochs']}: new-task "
              f"{s['new_task']:.3f}  first-task drop {s['first_drop']:+.3f}  pooled "
              f"{s['pooled']:.3f}  Average {s['task_avg']:.3f}{mark}")
    print(f"chosen: lr_later={chosen['lr_later']:g}, later-task epochs {chosen['epochs']}; "
          f"each method's own best rate there: {own_best}")
    write_json(out, {"rule": __doc__[__doc__.index("PLASTICITY_RULE"):],
                     "base": {k: str(v) for k, v in vars(base).items()},
                     "tuning_seeds": a.seeds, "stage1": stage1, "stage2": stage2,
                     "chosen": {"lr_later": chosen["lr_later"], "epochs": chosen["epochs"]},
                     "own_best_rate": own_best, "wall_seconds": time.perf_counter() - start,
                     "torch": torch.__version__, "machine": machine(torch.device("cpu")),
                     "workers": a.workers})
    print(f"wrote {out}")


W_BCT = [0.3, 1.0, 3.0, 10.0]


def val_compatibility(c, method: str, seed: int) -> dict:
    """Mean below the diagonal and mean diagonal of a run's compatibility matrix on task 1's
    letters in the validation fonts (every task's checkpoint of the run)."""
    from csdkit import metrics

    data, split = c.data(seed)
    val = data.val.of_classes(split.classes(0))
    feats = [c.features(c.model(method, seed, t), val.images, seed) for t in range(split.n_tasks)]
    M = metrics.compatibility_matrix(feats, val.labels).numpy()
    return {"below": float(M[np.tril_indices(len(M), -1)].mean()),
            "diagonal": float(np.diag(M).mean())}


def compatibility(a: argparse.Namespace, out: Path) -> None:
    from csdkit import course

    c, start = course.setup(seeds=tuple(a.seeds), quiet=True), time.perf_counter()

    def score(method: str, **change) -> dict:
        changed = c.replace(**change)
        changed.runs([method])
        per_seed = {s: val_compatibility(changed, method, s) for s in a.seeds}
        return {"method": method, **change, "seeds": per_seed,
                **{k: float(np.mean([v[k] for v in per_seed.values()]))
                   for k in ("below", "diagonal")}}

    weights = [score("bct", w_bct=w) for w in W_BCT]
    top = max(s["below"] for s in weights)
    w = min(s["w_bct"] for s in weights if s["below"] >= top - TIE)
    chosen_bct = next(s for s in weights if s["w_bct"] == w)
    candidates = [score("fd"), score("csd_official"), chosen_bct, score("simplex"),
                  score("bct+fd", w_bct=w), score("simplex+fd")]
    top = max(s["below"] for s in candidates)
    most = next(s for s in candidates if s["below"] >= top - TIE)
    for s in weights + candidates:
        print(f"{s['method']:>12} {'w_bct=' + str(s['w_bct']) if 'w_bct' in s else '':<10} "
              f"validation below the diagonal {s['below']:.3f}, diagonal {s['diagonal']:.3f}")
    print(f"chosen: w_bct={w:g}; most compatible: {most['method']}")
    write_json(out, {"rule": __doc__[__doc__.index("COMPAT_RULE"):__doc__.index("Writes")],
                     "tuning_seeds": a.seeds, "bct_weights": weights, "candidates": candidates,
                     "chosen_w_bct": w, "most_compatible": most["method"],
                     "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
                     "machine": machine(torch.device("cpu")), "workers": a.workers})
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["quick", "course", "plasticity", "compatibility"])
    p.add_argument("--lr-later", type=float, nargs="+")
    p.add_argument("--epochs", type=int, nargs="+")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--seeds", type=int, nargs="+", help="tuning seeds (default 100 101; "
                   "plasticity: 100 101 102)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="the run cache")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/"
                   "tune-<preset>.json; an existing file is never overwritten)")
    a = p.parse_args()
    out = refuse_existing(a.out or RESULTS / f"tune-{a.preset}.json")
    torch.set_num_threads(1)
    if a.preset in ("plasticity", "compatibility"):
        a.seeds = a.seeds or [100, 101, 102]
        return plasticity(a, out) if a.preset == "plasticity" else compatibility(a, out)
    a.seeds = a.seeds or [100, 101]
    base = preset(a.preset)
    if a.image_size:
        base = base.replace(image_size=a.image_size)
    if a.preset == "quick":
        lrs, epochs, methods = a.lr_later or [1e-3, 3e-4, 1e-4], a.epochs or [10, 20], \
            ["finetune", *DISTILLERS[:3]]
    else:
        lrs, epochs, methods = a.lr_later or [3e-3, 1e-2], a.epochs or [6, 8, 10, 12], \
            ["finetune", *DISTILLERS, "joint"]
    grid = [{"lr_later": lr, "epochs": ep} for ep, lr in itertools.product(epochs, lrs)]
    start = time.perf_counter()
    res = grid_runs(base, grid, a.seeds, methods, cache_folder(a.cache, torch.device("cpu")),
                    a.workers)
    settings = []
    for i, g in enumerate(grid):
        per_seed = {s: {m: res[i, s, m] for m in methods} for s in a.seeds}
        line = {**g, "seconds": sum(sum(r.seconds) for r in (res[k] for k in res if k[0] == i))}
        if a.preset == "quick":
            line["val_R@1"] = float(np.mean([r.val_seen_recall[-1] for rs in per_seed.values()
                                             for r in rs.values()]))
        else:
            line["seeds"] = {s: course_scores(rs, raw_pixels_val(base, s))
                             for s, rs in per_seed.items()}
            line["passes"] = all(sc[k] >= t for sc in line["seeds"].values()
                                 for k, (_, t) in COURSE_THRESHOLDS.items())
        settings.append(line)
    if a.preset == "quick":
        chosen = max(settings, key=lambda s: s["val_R@1"])
    else:
        passing = [s for s in settings if s["passes"]]
        chosen = min(passing, key=lambda s: (s["epochs"], -min(
            sc["ft_drop"] for sc in s["seeds"].values()))) if passing else None
    for s in settings:
        mark = "   <- chosen" if s is chosen else ""
        if a.preset == "quick":
            print(f"lr_later={s['lr_later']:g} epochs={s['epochs']}: validation R@1 "
                  f"{s['val_R@1']:.4f}{mark}")
        else:
            q = {k: [round(sc[k], 3) for sc in s["seeds"].values()] for k in COURSE_THRESHOLDS}
            print(f"lr_later={s['lr_later']:g} epochs={s['epochs']}: "
                  + ", ".join(f"{k} {v}" for k, v in q.items())
                  + f" -> {'passes' if s['passes'] else 'fails'}{mark}")
    write_json(out, {"preset": a.preset, "base": {k: str(v) for k, v in vars(base).items()},
                     "tuning_seeds": a.seeds, "methods": methods,
                     "thresholds": COURSE_THRESHOLDS if a.preset == "course" else None,
                     "settings": settings,
                     "chosen": chosen and {"lr_later": chosen["lr_later"],
                                           "epochs": chosen["epochs"]},
                     "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
                     "machine": machine(torch.device("cpu")), "workers": a.workers})
    if chosen is None:
        raise SystemExit(f"no setting meets every threshold on validation (all written to "
                         f"{out}); widen the grid")
    print(f"chosen: lr_later={chosen['lr_later']:g} epochs={chosen['epochs']}; wrote {out}")


if __name__ == "__main__":
    main()

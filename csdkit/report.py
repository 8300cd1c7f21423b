"""Tables and figures over many runs: mean ± std over seeds, paired differences, seaborn plots."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from csdkit import metrics
from csdkit.metrics import forgetting, recall_at_k
from csdkit.models import extract, resnet
from csdkit.runs import run_grid
from csdkit.train import Config, RunResult, prepare

METRICS = {
    "task_avg_R@1": "the paper's Average: mean over tasks of R@1 within each task's classes, "
                    "after the last task",
    "pooled_R@1": "R@1 pooled over all classes' test images after the last task",
    "first_task_R@1": "R@1 within the first task's classes after the last task",
    "first_task_drop": "first-task R@1 after task 1 minus after the last task",
    "forgetting": "mean over old tasks of (best R@1 on it) - (final R@1 on it)",
    "old_acc": "classification accuracy on the old classes after the last task",
    "final_mAP": "mAP on all classes after the last task",
    "AC": "average compatibility: share of model updates whose new queries find an old model's "
          "gallery of task 1's test images at least as well as the old model does",
    "AM": "average multi-model accuracy: mean R@1 of the compatibility matrix's lower triangle",
}


def run_row(r: RunResult) -> dict:
    """The scalar numbers of one run (METRICS, plus method, seed and training seconds)."""
    R = np.asarray(r.recall, dtype=float)
    continual = len(R) > 1  # joint has one row: nothing to forget
    nan = float("nan")
    return {"method": r.method, "seed": r.identity["seed"], "task_avg_R@1": r.task_average_recall,
            "pooled_R@1": r.final_recall, "first_task_R@1": r.first_task_recall,
            "first_task_drop": R[0, 0] - R[-1, 0] if continual else nan,
            "forgetting": float(np.mean(forgetting(R))) if continual else nan,
            "old_acc": r.old_accuracy[-1], "final_mAP": r.seen_map[-1],
            "AC": metrics.average_compatibility(r.compatibility),
            "AM": metrics.average_multimodel_accuracy(r.compatibility),
            "seconds": float(sum(r.seconds))}


def compare(base: Config, arms: dict[str, tuple[str, dict]], seeds: list[int],
            runs_folder: str | Path, workers: int = 2) -> tuple[list[RunResult], list[dict]]:
    """Train every arm for every seed (cached in `runs_folder`, see csdkit.runs.run_grid) and
    return the results and one row per run (run_row, its "method" being the arm's label).

    arms: label -> (method, config changes), e.g. {"csd tau=1": ("csd", {"csd_temperature":
    1.0})}. Seed s runs base.replace(seed=s, **changes): same seed, same data split, class
    order and first task for every arm, which is what makes paired differences paired."""
    jobs = [(base.replace(seed=s, **changes), method) for method, changes in arms.values()
            for s in seeds]
    results = run_grid(jobs, runs_folder, workers)
    labels = [label for label in arms for _ in seeds]
    return results, [{**run_row(r), "method": label}
                     for label, r in zip(labels, results, strict=True)]


def reference_rows(cfg: Config, seeds: list[int]) -> list[dict]:
    """Two rows a reader should see beside trained models: raw pixels (cosine R@1 on the
    pixels) and an untrained network (random ResNet features), on each seed's test images,
    task split and class order. "seen_recall" [T]: R@1 on the test images of the classes seen
    after each task, as the pooled curve measures it; "seen_chance" [T]: chance R@1 there."""
    rows = []
    for seed in seeds:
        data, split = prepare(cfg.replace(seed=seed))
        torch.manual_seed(seed)
        net = resnet(cfg.depth, data.n_classes)
        y = data.test.labels
        task = torch.as_tensor(split.task_of_label())[y]
        seen = [y < split.seen(t) for t in range(split.n_tasks)]
        for name, feats in [("raw pixels", data.test.images.flatten(1).float()),
                            ("untrained net", extract(net, data.test.images, data.mean,
                                                      data.std)[0])]:
            per_task = [recall_at_k(feats[task == j], y[task == j]) for j in range(split.n_tasks)]
            rows.append({"method": name, "seed": seed, "task_avg_R@1": float(np.mean(per_task)),
                         "pooled_R@1": recall_at_k(feats, y), "first_task_R@1": per_task[0],
                         "seen_recall": [recall_at_k(feats[m], y[m]) for m in seen],
                         "seen_chance": [metrics.chance_recall_at_1(y[m]) for m in seen]})
    return rows


def summary(rows: list[dict], order: list[str] | None = None):
    """pandas DataFrame: one line per method, 'mean ± std' over seeds for each metric."""
    df = pd.DataFrame(rows)
    order = order or list(dict.fromkeys(df["method"]))
    out = []
    for m in order:
        d = df[df["method"] == m]
        line = {"method": m, "seeds": len(d)}
        for k in [*METRICS, "seconds"]:
            v = d[k].astype(float) if k in d else pd.Series([np.nan])
            line[k] = "n/a" if v.isna().all() else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if \
                len(v) > 1 else f"{v.mean():.3f}"
        out.append(line)
    return pd.DataFrame(out).set_index("method")


def t_interval(d: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean of d (NaN with fewer than 2 values)."""
    if len(d) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean() - half, d.mean() + half


def paired_differences(rows: list[dict], pairs: list[tuple[str, str]], metric: str = "pooled_R@1",
                       confidence: float = 0.95, family: int = 1):
    """Per-seed differences a - b of `metric` with a t-interval over seeds (same seed = same
    data split, class order and first task, so the pairs share their noise), one line per pair.

    `beyond_noise`: the `confidence` interval excludes 0. Among many intervals some exclude 0 by
    chance alone (1 in 20 at 95% when nothing differs), so `beyond_noise_all` applies the
    Bonferroni correction for a `family` of that many intervals (confidence 1 - 0.05/family)."""
    df = pd.DataFrame(rows)
    out = []
    for a, b in pairs:
        da = df[df.method == a].set_index("seed")[metric]
        db = df[df.method == b].set_index("seed")[metric]
        d = (da - db).dropna()
        lo, hi = t_interval(d.to_numpy(), confidence)
        lo_all, hi_all = t_interval(d.to_numpy(), 1 - (1 - confidence) / family)
        out.append({"difference": f"{a} - {b}", "metric": metric, "seeds": len(d),
                    "mean": round(d.mean(), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                    "beyond_noise": bool(lo > 0 or hi < 0),
                    "beyond_noise_all": bool(lo_all > 0 or hi_all < 0)})
    columns = ["difference", "metric", "seeds", "mean", "ci_low", "ci_high", "beyond_noise",
               "beyond_noise_all"]  # named, so that no pairs gives an empty table, not an error
    return pd.DataFrame(out, columns=columns).set_index("difference")


#: The colour scales of every task-matrix heatmap in the kit, so pictures compare across runs:
#: R@1 itself, and its change since the task was learned (diverging: red lost, blue gained).
RECALL_SCALE = (0.0, 1.0)
CHANGE_SCALE = (-0.2, 0.2)


def task_changes(R: np.ndarray) -> np.ndarray:
    """R[t][j] - R[j][j] for t > j: how far task j moved since it was learned (NaN elsewhere).
    R: a task matrix [T, T] (rows: after training task t; columns: evaluated on task j)."""
    R = np.asarray(R, float)
    below = np.tril(np.ones_like(R, dtype=bool), k=-1)
    return np.where(below, R - np.diag(R)[None, :], np.nan)


def plot_task_matrices(results: list[RunResult], path: str | Path | None = None):
    """Per method (columns), the mean over seeds of R[t][j] (R@1 within task j's classes after
    training task t) on the fixed RECALL_SCALE, and below it the change since each task was
    learned (`task_changes`) on the fixed, diverging CHANGE_SCALE, where the differences live."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    methods = list(dict.fromkeys(r.method for r in results if r.method != "joint"))
    fig, axes = plt.subplots(2, len(methods), figsize=(2.9 * len(methods) + 0.8, 5.8),
                             squeeze=False, layout="constrained")
    rows = [("R@1 within the task", RECALL_SCALE, "viridis", lambda R: R),
            ("change since learned", CHANGE_SCALE, "RdBu", task_changes)]
    for i, m in enumerate(methods):
        runs = [np.asarray(r.recall, float) for r in results if r.method == m]
        with warnings.catch_warnings():  # the upper triangle (unseen tasks) is all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            R = np.nanmean(runs, 0)
        T, last = R.shape[0], i == len(methods) - 1
        for ax, (label, (lo, hi), cmap, view) in zip(axes[:, i], rows, strict=True):
            V = view(R)
            sns.heatmap(V, ax=ax, vmin=lo, vmax=hi, cmap=cmap, annot=T <= 6, fmt=".2f",
                        annot_kws={"size": 8}, mask=np.isnan(V), square=True, cbar=last,
                        cbar_kws={"label": label} if last else None,
                        xticklabels=range(1, T + 1), yticklabels=range(1, T + 1))
            ax.set(xlabel="evaluated on task", ylabel="after training task")
            ax.grid(False)  # the theme's grid would cross the cells
        seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"
        axes[0, i].set_title(f"{m} ({seeds})")
        axes[1, i].set_title(f"{m}: change since learned")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_recall_curves(results: list[RunResult], path: str | Path | None = None,
                       references: list[dict] = ()):
    """R@1 pooled over all seen classes after each task: the mean over seeds, and a band that is
    seaborn's 95% bootstrap interval of that mean (not the paired t-interval of the tables).
    references: `reference_rows`, drawn as grey lines (their mean over seeds), chance too."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = []
    for r in results:  # joint: one point, after all classes
        tasks = [len(r.increments)] if r.method == "joint" else range(1, len(r.seen_recall) + 1)
        long += [{"method": r.method, "task": t, "R@1": v}
                 for t, v in zip(tasks, r.seen_recall, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.lineplot(pd.DataFrame(long), x="task", y="R@1", hue="method", marker="o",
                 errorbar=("ci", 95), ax=ax)
    grey = {"raw pixels": ("raw pixels", "seen_recall", "--"),  # label: (row, key, line style)
            "untrained net": ("untrained net", "seen_recall", "-."),
            "chance": ("raw pixels", "seen_chance", ":")}
    for label, (method, key, dash) in grey.items():
        curves = [r[key] for r in references if r["method"] == method]
        if curves:
            ax.plot(range(1, len(curves[0]) + 1), np.mean(curves, 0), dash, color="0.35",
                    label=label)
    ax.set(xlabel="after training task", ylabel="R@1 on all seen classes",
           title="mean over seeds; band: 95% bootstrap interval")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside, not over
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig

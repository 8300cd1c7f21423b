"""Tables and figures over many runs: mean ± std over seeds, paired differences, seaborn plots."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from csdkit.train import RunResult

METRICS = {
    "final_R@1": "R@1 on all classes after the last task",
    "first_task_R@1": "R@1 on the first task's classes after the last task",
    "forgetting": "mean over old tasks of (best R@1 on it) - (final R@1 on it)",
    "old_acc": "classification accuracy on the old classes after the last task",
    "final_mAP": "mAP on all classes after the last task",
}


def run_row(r: RunResult) -> dict:
    """The scalar numbers of one run."""
    from csdkit.metrics import forgetting

    R = np.asarray(r.recall, dtype=float)
    return {
        "method": r.method,
        "seed": r.config["seed"],
        "final_R@1": r.seen_recall[-1],
        "first_task_R@1": R[-1, 0],
        "forgetting": float(np.mean(forgetting(R))) if len(R) > 1 else float("nan"),
        "old_acc": r.old_accuracy[-1],
        "final_mAP": r.seen_map[-1],
        "seconds": float(sum(r.seconds)),
    }


def summary(rows: list[dict], order: list[str] | None = None):
    """pandas DataFrame: one line per method, 'mean ± std' over seeds for each metric."""
    import pandas as pd

    df = pd.DataFrame(rows)
    order = order or list(dict.fromkeys(df["method"]))
    out = []
    for m in order:
        d = df[df["method"] == m]
        line = {"method": m, "seeds": len(d)}
        for k in [*METRICS, "seconds"]:
            v = d[k].astype(float)
            line[k] = "n/a" if v.isna().all() else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if \
                len(v) > 1 else f"{v.mean():.3f}"
        out.append(line)
    return pd.DataFrame(out).set_index("method")


def paired_differences(rows: list[dict], pairs: list[tuple[str, str]], metric: str = "final_R@1",
                       confidence: float = 0.95):
    """Per-seed differences a - b of `metric` with a t-interval. A difference is beyond seed
    noise when the interval excludes 0. Returns a DataFrame (one line per pair)."""
    import pandas as pd
    from scipy import stats

    df = pd.DataFrame(rows)
    out = []
    for a, b in pairs:
        da = df[df.method == a].set_index("seed")[metric]
        db = df[df.method == b].set_index("seed")[metric]
        d = (da - db).dropna()
        n = len(d)
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 \
            else float("nan")
        lo, hi = d.mean() - half, d.mean() + half
        out.append({"difference": f"{a} - {b}", "metric": metric, "seeds": n,
                    "mean": round(d.mean(), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                    "beyond_noise": bool(n > 1 and (lo > 0 or hi < 0))})
    return pd.DataFrame(out).set_index("difference")


def plot_task_matrices(results: list[RunResult], path: str | Path | None = None):
    """One heatmap per method: R[t][j] averaged over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    methods = list(dict.fromkeys(r.method for r in results if r.method != "joint"))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3), squeeze=False)
    with warnings.catch_warnings():  # the upper triangle (unseen tasks) is all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mats = {m: np.nanmean([np.asarray(r.recall, float) for r in results if r.method == m], 0)
                for m in methods}
    # one colour scale for all panels, stretched over the values present so differences show
    vmin = np.floor(min(np.nanmin(R) for R in mats.values()) * 20) / 20
    for ax, m in zip(axes[0], methods, strict=True):
        R = mats[m]
        T = R.shape[0]
        sns.heatmap(R, ax=ax, vmin=vmin, vmax=1, cmap="viridis", annot=T <= 6, fmt=".2f",
                    cbar=False, mask=np.isnan(R), square=True,
                    xticklabels=range(1, T + 1), yticklabels=range(1, T + 1))
        ax.set(title=m, xlabel="evaluated on task", ylabel="after training task")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_recall_curves(results: list[RunResult], path: str | Path | None = None):
    """R@1 over all seen classes after each task, mean and 95% band over seeds."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    long = []
    for r in results:
        steps = r.seen_recall
        if r.method == "joint":  # one point: after all classes
            long.append({"method": r.method, "task": len(r.increments), "R@1": steps[-1]})
            continue
        for t, v in enumerate(steps):
            long.append({"method": r.method, "task": t + 1, "R@1": v})
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    sns.lineplot(pd.DataFrame(long), x="task", y="R@1", hue="method", marker="o",
                 errorbar=("ci", 95), ax=ax)
    ax.set(xlabel="after training task", ylabel="R@1 on all seen classes")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig

"""Retrieval, continual-learning and compatibility metrics, each a small pure function.

Retrieval ranks by cosine similarity (rows L2-normalised). Shapes: N queries, M gallery items,
D embedding dimension, k neighbours, T trained steps, J tasks. Two settings:
* leave-one-out (``gallery=None``): every item queries all the *other* items of the set;
* query/gallery. With ``gallery_labels=None`` the gallery is the *same images* as the queries
  (row i of both is image i) embedded by another model, e.g. new queries against an old
  gallery, so ``exclude_self`` defaults to True; with ``gallery_labels`` the sets are distinct
  and it defaults to False. Similarities are computed ``chunk_size`` queries at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from csdkit import require

ArrayLike = np.ndarray | torch.Tensor

# where user input enters: conversion and the checks the math needs --------------------------------


def _features(x: ArrayLike, name: str, queries: torch.Tensor | None = None) -> torch.Tensor:
    """numpy array or tensor [N, D] -> float32 tensor [N, D] with unit-norm rows, on its own
    device (CUDA inputs are scored on the GPU); a gallery is moved next to its `queries`."""
    x = torch.as_tensor(x)
    require(x.ndim == 2, f"{name} must be 2-D [num_items, dim], got shape {tuple(x.shape)}; for "
            "a single embedding use x[None, :], for a flat batch x.reshape(len(x), -1)")
    if queries is not None:
        x = x.to(queries.device)
        require(x.shape[1] == queries.shape[1], f"{name} has dim {x.shape[1]} but the queries "
                f"have dim {queries.shape[1]}; both must live in the same embedding space")
    # NaN features rank arbitrarily and would score near chance, looking like a bad model
    require(bool(torch.isfinite(x).all()), f"{name} holds {int((~torch.isfinite(x)).sum())} "
            "NaN or inf values; retrieval needs finite features (a diverged model makes such)")
    # float32 whatever came in: half precision is too coarse to order close cosines (and
    # slow on CPU), float64 doubles the memory of every [chunk, M] similarity block
    return F.normalize(x.float(), dim=1)


def _labels(y: Any, rows: torch.Tensor, name: str, rows_name: str) -> torch.Tensor:
    """numpy array, tensor or sequence [N] -> tensor [N] on the device of `rows` [N, D]."""
    y = torch.as_tensor(y if isinstance(y, torch.Tensor) else np.asarray(y), device=rows.device)
    require(y.ndim == 1, f"{name} must be 1-D [num_items], got shape {tuple(y.shape)}")
    require(len(y) == len(rows), f"{name} has {len(y)} entries but {rows_name} has {len(rows)} "
            f"rows; pass one label per row of {rows_name}")
    return y


def _check_search(n_queries: int, n_gallery: int, exclude_self: bool, k: int | None,
                  chunk_size: int) -> None:
    """What every search needs: aligned rows to exclude self, and k, chunk_size in range."""
    require(not exclude_self or n_queries == n_gallery, "exclude_self=True needs as many queries "
            f"as gallery rows (row i is image i), got {n_queries} queries and {n_gallery} "
            "gallery rows; pass exclude_self=False")
    for name, v in (("k", k), ("chunk_size", chunk_size)):
        require(v is None or (isinstance(v, int | np.integer) and not isinstance(v, bool)
                              and v >= 1), f"{name} must be an integer >= 1, got {v!r}")
    reachable = n_gallery - int(exclude_self)
    require(k is None or k <= reachable, f"k={k} is larger than the {reachable} gallery items a "
            f"query can retrieve{' after excluding its own row' if exclude_self else ''}; use "
            f"{f'k <= {reachable} or ' if reachable >= 1 else ''}a larger gallery")


def _sets(features: ArrayLike, labels: Any, gallery: ArrayLike | None, gallery_labels: Any,
          exclude_self: bool | None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Apply the leave-one-out / query-gallery conventions (see the module docstring). Returns
    (queries [N, D], query labels [N], gallery [M, D], gallery labels [M], exclude_self), all on
    the queries' device, features normalised."""
    q = _features(features, "features")
    q_labels = _labels(labels, q, "labels", "features")
    require(len(q) > 0, "features is empty; pass at least one query row")
    if gallery is None:
        require(gallery_labels is None, "gallery_labels was given without gallery; pass "
                "gallery=<features [M, D]> too, or drop gallery_labels for leave-one-out")
        require(exclude_self is not False, "exclude_self=False with gallery=None would let "
                "every query retrieve itself; leave it unset for leave-one-out, or pass a gallery")
        return q, q_labels, q, q_labels, True
    g = _features(gallery, "gallery", queries=q)
    if gallery_labels is not None:
        g_labels = _labels(gallery_labels, g, "gallery_labels", "gallery")
        return q, q_labels, g, g_labels, False if exclude_self is None else exclude_self
    # same images embedded by another model: row i of the gallery is query i's image
    require(len(g) == len(q), f"gallery has {len(g)} rows but features has {len(q)}; without "
            "gallery_labels the gallery must be the same images as the queries (aligned rows), "
            "otherwise pass gallery_labels")
    return q, q_labels, g, q_labels, True if exclude_self is None else exclude_self


def _set_diagonal(x: torch.Tensor, start: int, value: float | bool) -> None:
    """In place: x[i, start + i] = value for each row i of a chunk x [c, M] of the queries
    start..start+c-1, i.e. at each query's own gallery row (exclude_self)."""
    rows = torch.arange(x.shape[0], device=x.device)
    x[rows, rows + start] = value


# retrieval ----------------------------------------------------------------------------------------


def retrieve(query_features: ArrayLike, gallery_features: ArrayLike, k: int,
             exclude_self: bool = False, *, chunk_size: int = 1024
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of each query in the gallery. query_features [N, D],
    gallery_features [M, D] (numpy or torch, any float dtype). exclude_self: query i may not
    retrieve gallery row i (needs N == M). Returns (scores [N, k] float32, indices [N, k] int64),
    most similar first, on the queries' device."""
    q = _features(query_features, "query_features")
    g = _features(gallery_features, "gallery_features", queries=q)
    _check_search(len(q), len(g), exclude_self, k, chunk_size)
    return _topk(q, g, int(k), exclude_self, int(chunk_size))


def _topk(q: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool, chunk_size: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """retrieve() on already normalised, checked tensors q [N, D], g [M, D]."""
    scores, indices = [], []
    for start in range(0, len(q), chunk_size):
        sim = q[start : start + chunk_size] @ g.T  # [c, M] cosines
        if exclude_self:
            # -inf is below every cosine, so topk never picks the query's own row
            _set_diagonal(sim, start, float("-inf"))
        s, i = torch.topk(sim, k, dim=1)  # [c, k] each, sorted descending
        scores.append(s)
        indices.append(i)
    if not scores:  # no queries: torch.cat needs at least one chunk
        return q.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=q.device)
    return torch.cat(scores), torch.cat(indices)


def recall_at_k(features: ArrayLike, labels: Any, k: int = 1, *, gallery: ArrayLike | None = None,
                gallery_labels: Any = None, exclude_self: bool | None = None,
                chunk_size: int = 1024) -> float:
    """Recall@k: fraction of queries with at least one same-label item among their k nearest
    (cosine) gallery items. features [N, D], labels [N]; gallery [M, D], gallery_labels [M]
    optional (see the module docstring for leave-one-out vs query/gallery and the exclude_self
    defaults)."""
    q, q_labels, g, g_labels, exclude_self = _sets(features, labels, gallery, gallery_labels,
                                                   exclude_self)
    _check_search(len(q), len(g), exclude_self, k, chunk_size)
    _, idx = _topk(q, g, int(k), exclude_self, int(chunk_size))  # [N, k]
    hits = (g_labels[idx] == q_labels[:, None]).any(dim=1)  # [N]
    return hits.float().mean().item()


def mean_average_precision(features: ArrayLike, labels: Any, *, gallery: ArrayLike | None = None,
                           gallery_labels: Any = None, exclude_self: bool | None = None,
                           chunk_size: int = 1024) -> float:
    """mAP over the full cosine ranking of the gallery. features [N, D], labels [N]; gallery
    [M, D], gallery_labels [M] optional (the conventions of `recall_at_k`).

    AP of a query = mean, over its positives (same-label gallery items, own row excluded), of
    the precision at that positive's rank. Queries with no positive have no AP and are skipped.
    Exactly tied similarities are ordered arbitrarily (sklearn's average_precision_score instead
    pools ties)."""
    q, q_labels, g, g_labels, exclude_self = _sets(features, labels, gallery, gallery_labels,
                                                   exclude_self)
    _check_search(len(q), len(g), exclude_self, None, chunk_size)

    ap_sum, num_valid = 0.0, 0
    ranks = torch.arange(1, len(g) + 1, device=q.device, dtype=torch.float32)  # [M]
    for start in range(0, len(q), chunk_size):
        sim = q[start : start + chunk_size] @ g.T  # [c, M]
        rel = g_labels[None, :] == q_labels[start : start + chunk_size, None]  # [c, M]
        if exclude_self:
            # the own row is a same-label item: it must not count as a positive, and the
            # -inf sorts it last so it cannot push a real positive down the ranking
            _set_diagonal(sim, start, float("-inf"))
            _set_diagonal(rel, start, False)
        order = torch.argsort(sim, dim=1, descending=True)  # [c, M]
        rel_sorted = torch.gather(rel, 1, order).float()  # [c, M], 1 at each positive's rank
        # precision at rank r = (# positives in the top r) / r
        precision = torch.cumsum(rel_sorted, dim=1) / ranks  # [c, M]
        num_pos = rel_sorted.sum(dim=1)  # [c]
        valid = num_pos > 0
        ap = (precision * rel_sorted).sum(dim=1)[valid] / num_pos[valid]  # [c_valid]
        ap_sum += ap.double().sum().item()
        num_valid += int(valid.sum().item())

    # also a leave-one-out set of one item: no other item to rank
    require(num_valid > 0, "no query has a positive (a gallery item with the same label, self "
            "excluded), so mAP is undefined; check the labels, or that each class has >= 2 items")
    return ap_sum / num_valid


def chance_recall_at_1(labels: Any) -> float:
    """R@1 of a random ranking, leave-one-out: the nearest neighbour of a query is then a
    uniformly random other item, so chance = sum_c n_c (n_c - 1) / (N (N - 1)) for n_c items of
    class c among N. Print it beside every R@1 a reader must judge (1/C for C balanced classes,
    a little less). Also the chance level of cross-model retrieval on the same images."""
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    require(y.ndim == 1 and len(y) >= 2, f"labels must be 1-D with at least 2 items, got shape "
            f"{y.shape}")
    n_c = np.unique(y, return_counts=True)[1].astype(np.float64)
    return float((n_c * (n_c - 1)).sum() / (len(y) * (len(y) - 1)))


# continual-learning summary -----------------------------------------------------------------------


def forgetting(R: np.ndarray) -> np.ndarray:
    """Per-task forgetting (Chaudhry et al., 2018, "Riemannian Walk").
    R [T, J]: R[t, j] = metric (e.g. R@1) on task j after step t; entries j > t (not seen yet)
    are ignored and may be NaN. Returns f [T-1], f[j] = max_{t in [j, T-2]} R[t, j] - R[T-1, j]:
    how far task j fell from its best before the final step. Positive = forgotten, negative =
    improved (backward transfer); the last task has no "before" and is left out."""
    R = np.asarray(R, dtype=np.float64)
    require(R.ndim == 2, f"R must be 2-D [num_steps, num_tasks], got shape {R.shape}")
    T, J = R.shape
    require(T >= 2, f"forgetting needs at least 2 trained steps (rows of R), got {T}")
    require(J >= T - 1, f"R has {T} steps but only {J} tasks; every task trained before the "
            "last step needs a column")
    f = np.empty(T - 1)
    for j in range(T - 1):
        col = R[j:, j]  # steps at which task j had been seen: j..T-1
        require(not np.isnan(col).any(), f"R[t, {j}] is NaN for some t >= {j}; task {j} must "
                "be evaluated at every step from the one that trained it on")
        f[j] = col[:-1].max() - col[-1]
    return f


# compatibility: new queries against an old model's gallery of the same images ---------------------


def compatibility_matrix(features: list[ArrayLike], labels: Any) -> torch.Tensor:
    """M [T, T]: M[i, j] (i >= j) is R@1 of model i's queries against model j's gallery of the
    same N images, a query never finding its own image; NaN above the diagonal.
    features: T arrays [N, D], the same images (row n is image n) embedded by the model after
    task 1..T; labels [N]. The diagonal is each model's own leave-one-out R@1; the lower
    triangle is "new queries, old gallery" (Shen et al. 2020, BCT)."""
    require(len(features) > 0 and len({len(f) for f in features}) == 1, "compatibility_matrix "
            "needs T >= 1 feature arrays of the same images (one row per image), got "
            f"{[len(f) for f in features]} rows")
    T = len(features)
    M = torch.full((T, T), float("nan"))
    for i in range(T):
        for j in range(i + 1):
            M[i, j] = recall_at_k(features[i], labels, gallery=features[j])
    return M


def _lower_pairs(M: ArrayLike) -> tuple[np.ndarray, int]:
    M = np.asarray(torch.as_tensor(M).cpu(), dtype=np.float64)
    require(M.ndim == 2 and M.shape[0] == M.shape[1],
            f"a compatibility matrix is square [T, T], got shape {M.shape}")
    return M, M.shape[0]


def average_compatibility(M: ArrayLike) -> float:
    """AC (Biondi et al., CoReS): the share of pairs i > j whose update is compatible, i.e.
    M[i, j] >= M[j, j]: model i's queries find model j's gallery at least as well as model j's
    own queries do. A tie counts as compatible, as in the CoReS code; BCT's criterion is strict
    (M[i, j] > M[j, j]). Pairs with a NaN are left out; NaN when no pair is left."""
    M, T = _lower_pairs(M)
    ok = [M[i, j] >= M[j, j] for i in range(T) for j in range(i)
          if not (np.isnan(M[i, j]) or np.isnan(M[j, j]))]
    return float(np.mean(ok)) if ok else float("nan")


def average_multimodel_accuracy(M: ArrayLike) -> float:
    """AM (CoReS): the mean of the lower triangle of M, diagonal included (NaNs left out)."""
    M, T = _lower_pairs(M)
    values = M[np.tril_indices(T)]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")

"""Loss functions of Contrastive Supervised Distillation (CSD) and its baselines.

Barletti, Biondi, Pernici, Bruni, Del Bimbo, "Contrastive Supervised Distillation for Continual
Representation Learning", ICIAP 2021 (arXiv 2205.05476).

Each loss is a small pure function of tensors, as HobbitLong's SupConLoss and
pytorch-metric-learning. B batch size, D feature dimension, C (old) classes; s_i, t_i the
L2-normalised student and teacher (the frozen previous model) features of sample i, y_i its
label, tau a temperature. The paper: CE + triplet on task 1, + KD + CSD on every later task.
Teacher tensors are detached here too: a forgotten ``no_grad`` in the caller (which saves the
teacher graph's memory) can never push gradients into the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from csdkit import require

__all__ = ["CSD_VARIANTS", "csd_loss", "feature_distillation_loss", "kd_loss", "triplet_loss"]

#: Valid values of ``csd_loss(..., variant=...)``: the paper's Eq. 8, the authors' code, and two
#: ablations (see `csd_loss`).
CSD_VARIANTS: tuple[str, ...] = ("paper", "official", "transposed", "student")


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else f"{type(x).__name__}, not a Tensor"


def _check(tensors: dict[str, Tensor], labels: Tensor | None = None,
           tau: tuple[str, float] | None = None) -> None:
    """Reject, with the fix, what the losses cannot be computed on: `tensors` that are not
    non-empty [B, D] batches of one shape (one teacher row per student row), labels that are not
    [B] (one class index per row), a temperature `tau` = (name, value) that is not > 0."""
    for name, x in tensors.items():
        dim = x.dim() if isinstance(x, Tensor) else 0
        hint = (" For a single sample add the batch dimension: x.unsqueeze(0)." if dim == 1 else
                " Flatten the trailing dimensions first: x.flatten(1)." if dim > 2 else "")
        require(dim == 2, f"{name} must be a 2-D tensor of shape [B, D] (batch, feature dim); "
                f"got {_shape(x)}.{hint}")
        require(len(x) > 0, f"{name} is an empty batch (shape {_shape(x)}); pass B >= 1 rows.")
    (first, x), *others = tensors.items()
    for name, other in others:
        require(other.shape == x.shape, f"{first} and {name} must have the same shape [B, D] "
                f"(one teacher row per student row); got {_shape(x)} and {_shape(other)}. Run "
                "the teacher on the same batch as the student.")
    if labels is not None:
        require(isinstance(labels, Tensor) and labels.dim() == 1, "labels must be a 1-D tensor "
                f"of shape [B], one class index per sample; got {_shape(labels)}. If one-hot, "
                "use labels.argmax(dim=1); if [B, 1], labels.view(-1).")
        require(len(labels) == len(x), f"labels has {len(labels)} entries but {first} has "
                f"{len(x)} rows; pass exactly one label per feature row.")
    if tau is not None:
        require(tau[1] > 0, f"{tau[0]} must be > 0 (it divides the logits); got {tau[1]}.")


def csd_loss(student_features: Tensor, teacher_features: Tensor, labels: Tensor,
             temperature: float = 0.07, variant: str = "paper") -> Tensor:
    r"""Contrastive Supervised Distillation: align the student's features of a class with the
    frozen teacher's features of that class, and push them away from the other classes'.

    Shapes:
        student_features: [B, D] (any scale; normalised here)
        teacher_features: [B, D] (any scale; normalised here; treated as a constant)
        labels:           [B]    integer class indices
        returns:          []     scalar, mean over the B anchors

    ``variant="paper"``: Eq. 8 of the paper, read literally. The **teacher** features are the
    anchors and the batch's **student** features the contrast set; P(i) = {p : y_p = y_i}
    includes p = i (the student's view of the anchor's own image), the denominator leaves a = i
    out::

        L_CSD = -1/B \sum_i 1/|P(i)| \sum_{p \in P(i)}
                    log( exp(t_i . s_p / tau) / \sum_{a \ne i} exp(t_i . s_a / tau) )

    Because the p = i term is not in its own denominator it is not a probability and can exceed
    1 (its log is then positive); the paper's Fig. 2 walk-through reads it the same way. Two
    things the paper leaves open, and what is done here:

    - **No temperature is printed** (tau = 1 literally). tau is an argument, by default the
      authors' code's 0.07: on unit vectors tau = 1 confines every logit to [-1, 1], so the loss
      could barely tell classes apart. Which tau serves Eq. 8 best is measured, not assumed.
    - **Normalisation is not stated.** Both feature sets are L2-normalised here: without it the
      loss is unbounded below (grow t_i . s_i) and retrieval ranks by cosine anyway.

    ``variant="official"``: what the authors' code computes, SupCon (Khosla et al. 2020,
    HobbitLong's SupConLoss) over the two views [student, teacher] with ``contrast_mode="one"``.
    Anchors are the student features; the contrast set is all 2B features c = [s_1..s_B,
    t_1..t_B] minus the anchor itself; the positives P'(i) are its same-label members (t_i, the
    other same-label students and teachers)::

        L = -1/B \sum_i 1/|P'(i)| \sum_{j \in P'(i)}
                log( exp(s_i . c_j / tau) / \sum_{k \ne i} exp(s_i . c_k / tau) )

    SupConLoss also multiplies by ``temperature / base_temperature`` (base 0.07); omitted here,
    it is 1 at the default tau. This has student-student terms that Eq. 8 does not have.

    Ablations:

    - ``"transposed"``: student anchors against the teacher contrast set (Eq. 8 with the roles
      swapped, the denominator over every a). It is also exactly ``"official"`` with its
      student-student terms removed::

        L = -1/B \sum_i 1/|P(i)| \sum_{p \in P(i)}
                log( exp(s_i . t_p / tau) / \sum_a exp(s_i . t_a / tau) )

    - ``"student"``: SupCon on the student features alone, no teacher at all: the
      student-student terms of ``"official"`` by themselves (anchors with no other same-label
      student in the batch contribute 0; ``teacher_features`` is checked but not used)::

        L = -1/B \sum_{i: |P''(i)| > 0} 1/|P''(i)| \sum_{p \in P''(i)}
                log( exp(s_i . s_p / tau) / \sum_{a \ne i} exp(s_i . s_a / tau) )

    with P''(i) = P(i) minus i itself.
    """
    require(variant in CSD_VARIANTS, f"unknown CSD variant {variant!r}; valid: "
            f"{list(CSD_VARIANTS)}.")
    features = {"student_features": student_features, "teacher_features": teacher_features}
    _check(features, labels, ("temperature", temperature))
    batch = student_features.shape[0]
    require(batch >= 2, "csd_loss needs a batch of at least 2 samples: with one sample there is "
            "nothing to contrast the anchor with (the denominator sums over the other samples).")

    # Cosine geometry: only directions matter, and unit vectors bound the logits to [-1/tau, 1/tau].
    s = F.normalize(student_features, dim=1)
    # The teacher is frozen: its features are targets, never optimised.
    t = F.normalize(teacher_features.detach(), dim=1)
    same_label = labels.view(-1, 1) == labels.view(1, -1)  # [B, B], diagonal True
    eye = torch.eye(batch, dtype=torch.bool, device=s.device)

    if variant == "paper":
        logits = t @ s.T / temperature  # [B, B]: row i = anchor t_i against every student s_a
        # logsumexp over a != i (-inf drops a = i; it subtracts the row max, so no overflow).
        log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
        pos = same_label  # P(i) includes p = i, as Eq. 8 is printed
    elif variant == "transposed":
        logits = s @ t.T / temperature  # [B, B]: row i = anchor s_i against every teacher t_a
        log_denominator = torch.logsumexp(logits, dim=1)
        pos = same_label
    elif variant == "student":
        logits = s @ s.T / temperature  # [B, B]: anchor s_i against the other students
        log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
        pos = same_label & ~eye
    else:  # "official": contrast set = [students; teachers], the anchor itself excluded.
        logits = s @ torch.cat([s, t]).T / temperature  # [B, 2B]
        self_mask = torch.cat([eye, torch.zeros_like(eye)], dim=1)
        log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
        pos = same_label.repeat(1, 2) & ~self_mask  # always contains t_i

    log_prob = logits - log_denominator.unsqueeze(1)
    pos = pos.to(log_prob.dtype)
    n_pos = pos.sum(dim=1)
    # log_prob comes from the unmasked logits, so it is finite everywhere, also at the entries
    # left out of the denominator (a = i); masked_fill zeroes every entry outside the positives.
    per_anchor = -log_prob.masked_fill(pos == 0, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    return per_anchor.mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0) -> Tensor:
    r"""Learning-without-Forgetting knowledge distillation on the old classes.

    Shapes:
        student_logits: [B, C_old] (the caller slices the student's old-class logits)
        teacher_logits: [B, C_old] (treated as a constant)
        returns:        []         scalar

    With q = softmax(teacher / T) and p = softmax(student / T)::

        L_KD = 1/B \sum_i KL(q_i || p_i) = 1/B \sum_i \sum_c q_ic (log q_ic - log p_ic)

    i.e. ``F.kl_div(log_softmax(student/T), softmax(teacher/T), reduction="batchmean")``.
    There is deliberately NO T^2 factor (Hinton et al. add one to keep gradient magnitudes
    independent of T; the authors' code does not), so the value matches their objective.
    """
    _check({"student_logits": student_logits, "teacher_logits": teacher_logits}, tau=("T", T))
    log_p = F.log_softmax(student_logits / T, dim=1)
    log_q = F.log_softmax(teacher_logits.detach() / T, dim=1)
    # Working with log q (not log of softmax) keeps 0 * log 0 terms finite.
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


def triplet_loss(features: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    r"""Batch-hard triplet loss (Hermans et al. 2017) with cosine distance.

    Shapes:
        features: [B, D] (any scale; normalised here)
        labels:   [B]    integer class indices
        returns:  []     scalar

    With d(a, b) = 1 - cos(f_a, f_b) in [0, 2], for every anchor a that has at least one
    positive p != a (same label) and one negative n (other label)::

        L_a = max(0, max_p d(a, p) - min_n d(a, n) + margin)
        L   = mean of L_a over those valid anchors

    If no anchor is valid (e.g. all labels distinct, or a single class) the result is 0 but still
    attached to the graph, so ``loss.backward()`` works in every batch.

    Note: the authors used pytorch-metric-learning's ``TripletMarginLoss(distance=
    CosineSimilarity())`` with a ``BatchHardMiner``. Its default reducer (AvgNonZeroReducer)
    averages only over the triplets with non-zero loss, so easy anchors do not dilute the mean;
    here we average over all valid anchors, the textbook form (PML with ``MeanReducer()``).
    """
    _check({"features": features}, labels)

    f = F.normalize(features, dim=1)
    dist = 1.0 - f @ f.T  # [B, B] cosine distance
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    pos_mask = same & ~eye  # an anchor is not its own positive
    neg_mask = ~same
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)

    # Masked entries are set to -inf / +inf so max/min (and their gradients) ignore them; an
    # invalid anchor gets relu(-inf) = 0. No data-dependent branch: no GPU sync, one graph.
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    per_anchor = F.relu(hardest_pos - hardest_neg + margin)
    return torch.where(valid, per_anchor, 0.0).sum() / valid.sum().clamp_min(1)


def feature_distillation_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""L2 feature distillation between the student's and the teacher's normalised features.

    Shapes:
        student_features: [B, D] (any scale; normalised here)
        teacher_features: [B, D] (any scale; normalised here; treated as a constant)
        returns:          []     scalar

    ::

        L_FD = 1/B \sum_i || s_i / |s_i| - t_i / |t_i| ||_2^2   (= 1/B \sum_i 2 - 2 cos(s_i, t_i))

    The features are L2-normalised first: retrieval ranks by cosine similarity, so only
    directions matter, and on unit vectors each term is bounded in [0, 4] whatever the scale of
    the raw features (which grows freely during training).
    """
    _check({"student_features": student_features, "teacher_features": teacher_features})
    s = F.normalize(student_features, dim=1)
    t = F.normalize(teacher_features.detach(), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()

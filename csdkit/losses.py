"""Loss functions of Contrastive Supervised Distillation (CSD) and its baselines.

Barletti, Biondi, Pernici, Bruni, Del Bimbo, "Contrastive Supervised Distillation for Continual
Representation Learning", ICIAP 2021 (arXiv 2205.05476).

Each loss is a small pure function of tensors, in the spirit of HobbitLong's SupConLoss and
pytorch-metric-learning. Notation used in the docstrings:

    B  batch size          D  feature dimension        C  number of (old) classes
    s_i  student feature of sample i, L2-normalised
    t_i  teacher feature of sample i, L2-normalised (the teacher is the frozen previous model)
    y_i  label of sample i           tau  temperature

Objective of the paper: task 1 uses CE + triplet; task t > 1 uses CE + triplet + KD + CSD.

The teacher is frozen, so every loss here treats teacher tensors as constants: they are detached
inside the function. The caller should still compute them under ``torch.no_grad()`` (that saves
the memory of the teacher's graph); detaching here only guarantees that a forgotten ``no_grad``
can never push gradients into the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CSD_VARIANTS",
    "csd_loss",
    "feature_distillation_loss",
    "kd_loss",
    "triplet_loss",
]

#: Valid values of ``csd_loss(..., variant=...)``.
CSD_VARIANTS: tuple[str, ...] = ("paper", "official")


# --------------------------------------------------------------------------- input checks


def _check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, D]; got {type(x).__name__}.")
    if x.dim() != 2:
        hint = (
            " For a single sample add the batch dimension: x.unsqueeze(0)."
            if x.dim() == 1
            else " Flatten the trailing dimensions first: x.flatten(1)."
            if x.dim() > 2
            else ""
        )
        raise ValueError(
            f"{name} must be a 2-D tensor of shape [B, D] (batch, feature dim); "
            f"got {x.dim()}-D with shape {tuple(x.shape)}.{hint}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass B >= 1 rows.")


def _check_pair(student_name: str, student: Tensor, teacher_name: str, teacher: Tensor) -> None:
    _check_features(student_name, student)
    _check_features(teacher_name, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same shape [B, D] (one teacher row "
            f"per student row, same dimension); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}. Run the teacher on the same batch as the student."
        )


def _check_labels(labels: Tensor, batch_size: int, features_name: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"labels must be a torch.Tensor of shape [B]; got {type(labels).__name__}."
        )
    if labels.dim() != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of shape [B] with one class index per sample; got shape "
            f"{tuple(labels.shape)}. If they are one-hot, use labels.argmax(dim=1); if [B, 1], "
            f"use labels.view(-1)."
        )
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but {features_name} has {batch_size} rows; "
            f"pass exactly one label per feature row."
        )


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (it divides the logits); got {value}.")


# --------------------------------------------------------------------------- CSD


def csd_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    variant: str = "paper",
) -> Tensor:
    r"""Contrastive Supervised Distillation: pull each student feature towards the teacher's
    features of its class and away from the teacher's features of the other classes.

    Shapes:
        student_features: [B, D] (any scale; normalised here)
        teacher_features: [B, D] (any scale; normalised here; treated as a constant)
        labels:           [B]    integer class indices
        returns:          []     scalar, mean over the B student anchors

    ``variant="paper"`` (the equation of the paper): anchors are the student features, the
    contrast set is the batch's B teacher features, the positives of anchor i are
    P(i) = {p : y_p = y_i}, which always contains p = i (the teacher's view of the same image)::

        L_CSD = 1/B \sum_i  -1/|P(i)| \sum_{p \in P(i)}
                  log( exp(s_i . t_p / tau) / \sum_{a=1..B} exp(s_i . t_a / tau) )

    ``variant="official"`` (what the authors' code computes): SupCon (Khosla et al. 2020,
    HobbitLong's SupConLoss) on the two views [student, teacher] with ``contrast_mode="one"``.
    Anchors are the student features; the contrast set is all 2B features c = [s_1..s_B,
    t_1..t_B] minus the anchor itself; the positives P'(i) are the same-label members of that
    set (t_i, plus the other same-label students and teachers)::

        L = 1/B \sum_i  -1/|P'(i)| \sum_{j \in P'(i)}
              log( exp(s_i . c_j / tau) / \sum_{k \ne i} exp(s_i . c_k / tau) )

    This adds student-student terms that the paper's equation does not have. SupConLoss also
    multiplies by ``temperature / base_temperature`` (base_temperature = 0.07); that factor is
    omitted here. It equals 1 at the default tau = 0.07, so the values then coincide.

    Raises:
        ValueError: features not 2-D, student/teacher shapes differ, labels not [B], temperature
            not positive, or an unknown ``variant`` (valid: ``CSD_VARIANTS``).
    """
    if variant not in CSD_VARIANTS:
        raise ValueError(
            f"unknown CSD variant {variant!r}; valid variants are {list(CSD_VARIANTS)}."
        )
    _check_pair("student_features", student_features, "teacher_features", teacher_features)
    _check_labels(labels, student_features.shape[0], "student_features")
    _check_positive("temperature", temperature)

    # Cosine geometry: only directions matter, and unit vectors bound the logits to [-1/tau, 1/tau].
    s = F.normalize(student_features, dim=1)
    # The teacher is frozen: its features are targets, never optimised.
    t = F.normalize(teacher_features.detach(), dim=1)
    same_label = labels.view(-1, 1) == labels.view(1, -1)  # [B, B], diagonal True

    if variant == "paper":
        logits = s @ t.T / temperature  # [B, B]: anchor i (student) vs teacher a
        # logsumexp subtracts the row max internally, so exp never overflows at small tau.
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = same_label.to(log_prob.dtype)  # |P(i)| >= 1: the same image's teacher feature
        per_anchor = -(pos * log_prob).sum(dim=1) / pos.sum(dim=1)
        return per_anchor.mean()

    # variant == "official": contrast set = [students; teachers], anchor excluded.
    batch = s.shape[0]
    contrast = torch.cat([s, t], dim=0)  # [2B, D]
    logits = s @ contrast.T / temperature  # [B, 2B]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, :batch] = torch.eye(batch, dtype=torch.bool, device=logits.device)
    # -inf (not a multiply-by-zero) removes the anchor from the denominator without nan grads.
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
    log_prob = logits - log_denominator.unsqueeze(1)
    pos = (same_label.repeat(1, 2) & ~self_mask).to(log_prob.dtype)  # always contains t_i
    per_anchor = -(pos * log_prob).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


# --------------------------------------------------------------------------- KD (LwF)


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

    Raises:
        ValueError: logits not 2-D, shapes differ, or T not positive.
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_positive("T", T)
    log_p = F.log_softmax(student_logits / T, dim=1)
    log_q = F.log_softmax(teacher_logits.detach() / T, dim=1)
    # Working with log q (not log of softmax) keeps 0 * log 0 terms finite.
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


# --------------------------------------------------------------------------- triplet


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

    Raises:
        ValueError: features not 2-D or labels not [B].
    """
    _check_features("features", features)
    _check_labels(labels, features.shape[0], "features")

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


# --------------------------------------------------------------------------- feature distillation


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

    Raises:
        ValueError: features not 2-D or shapes differ.
    """
    _check_pair("student_features", student_features, "teacher_features", teacher_features)
    s = F.normalize(student_features, dim=1)
    t = F.normalize(teacher_features.detach(), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()

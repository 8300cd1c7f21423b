"""Tests of csdkit.losses against independent oracles.

Oracles used:
- brute-force Python loops written from each paper's formula (math.exp / math.log on floats);
- tiny cases worked by hand;
- a vendored copy of HobbitLong's reference SupConLoss (the code the CSD authors call);
- pytorch-metric-learning (PML) SupConLoss / TripletMarginLoss + BatchHardMiner.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from csdkit.losses import (
    CSD_VARIANTS,
    csd_loss,
    feature_distillation_loss,
    kd_loss,
    triplet_loss,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

torch.set_num_threads(1)

DTYPE = torch.float64  # oracles in double precision so tolerances can be tight


def _batch(seed: int, b: int = 10, d: int = 6, n_classes: int = 3):
    """Random student/teacher features (deliberately not unit norm) and labels."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g, dtype=DTYPE) * 3.0
    t = torch.randn(b, d, generator=g, dtype=DTYPE) * 0.5
    y = torch.randint(0, n_classes, (b,), generator=g)
    return s, t, y


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = []
    for r in x.tolist():
        n = math.sqrt(sum(v * v for v in r))
        rows.append([v / n for v in r])
    return rows


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- brute-force oracles


def csd_eq8_brute(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Eq. 8 of the paper, term by term: anchors are the TEACHER features f'_i, the contrast set
    the student features f_a with a != i, P(i) = {p : y_p = y_i} including p = i.

        L = -1/|B| sum_i 1/|P(i)| sum_{p in P(i)}
                log( exp(f'_i.f_p/tau) / sum_{a != i} exp(f'_i.f_a/tau) )
    """
    f, f_teacher, yl = _unit_rows(s), _unit_rows(t), y.tolist()
    n = len(f)
    total = 0.0
    for i in range(n):
        denominator = 0.0
        for a in range(n):
            if a != i:
                denominator += math.exp(_dot(f_teacher[i], f[a]) / tau)
        positives = [p for p in range(n) if yl[p] == yl[i]]  # p = i is one of them
        acc = 0.0
        for p in positives:
            acc += math.log(math.exp(_dot(f_teacher[i], f[p]) / tau) / denominator)
        total += acc / len(positives)
    return -total / n


def csd_transposed_brute(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Student anchors:
    mean_i -1/|P(i)| sum_{p in P(i)} log(exp(s_i.t_p/tau) / sum_a exp(s_i.t_a/tau))."""
    su, tu, yl = _unit_rows(s), _unit_rows(t), y.tolist()
    total = 0.0
    for i in range(len(su)):
        denom = sum(math.exp(_dot(su[i], tu[a]) / tau) for a in range(len(tu)))
        positives = [p for p in range(len(tu)) if yl[p] == yl[i]]
        acc = 0.0
        for p in positives:
            acc += math.log(math.exp(_dot(su[i], tu[p]) / tau) / denom)
        total += -acc / len(positives)
    return total / len(su)


def supcon_two_views_brute(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float, student_terms: bool = True,
    teacher_terms: bool = True,
) -> float:
    """SupCon with student anchors over the contrast set [other students] + [teachers]; either
    part can be left out (the ablations). Anchors with no positive add 0 (mean over all B)."""
    su, tu, yl = _unit_rows(s), _unit_rows(t), y.tolist()
    b = len(su)
    total = 0.0
    for i in range(b):
        contrast = []  # (feature, label) pairs
        if student_terms:
            contrast += [(su[k], yl[k]) for k in range(b) if k != i]
        if teacher_terms:
            contrast += [(tu[k], yl[k]) for k in range(b)]
        denom = sum(math.exp(_dot(su[i], c) / tau) for c, _ in contrast)
        pos = [c for c, label in contrast if label == yl[i]]
        if pos:
            total += -sum(math.log(math.exp(_dot(su[i], c) / tau) / denom) for c in pos) / len(pos)
    return total / b


def csd_official_brute(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """SupCon, contrast_mode='one': student anchors vs all 2B features minus the anchor."""
    su, tu, yl = _unit_rows(s), _unit_rows(t), y.tolist()
    b = len(su)
    contrast = su + tu  # list concat: [s_1..s_B, t_1..t_B]
    contrast_labels = yl + yl
    total = 0.0
    for i in range(b):
        others = [k for k in range(2 * b) if k != i]  # index i is the anchor itself
        denom = sum(math.exp(_dot(su[i], contrast[k]) / tau) for k in others)
        positives = [j for j in others if contrast_labels[j] == yl[i]]
        acc = sum(math.log(math.exp(_dot(su[i], contrast[j]) / tau) / denom) for j in positives)
        total += -acc / len(positives)
    return total / b


def triplet_brute(x: torch.Tensor, y: torch.Tensor, margin: float) -> float:
    """Batch-hard = for each anchor, the worst hinge over ALL its (p, n) pairs.

    max_{p,n} relu(d_ap - d_an + m) == relu(max_p d_ap - min_n d_an + m) since relu is monotone,
    so enumerating every triplet is an independent route to the same number.
    """
    u, yl = _unit_rows(x), y.tolist()
    b = len(u)
    per_anchor = []
    for a in range(b):
        worst = None
        for p in range(b):
            if p == a or yl[p] != yl[a]:
                continue
            for n in range(b):
                if yl[n] == yl[a]:
                    continue
                d_ap = 1.0 - _dot(u[a], u[p])
                d_an = 1.0 - _dot(u[a], u[n])
                hinge = max(0.0, d_ap - d_an + margin)
                worst = hinge if worst is None else max(worst, hinge)
        if worst is not None:  # anchor had at least one positive and one negative
            per_anchor.append(worst)
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


# --------------------------------------------------------------------------- vendored SupCon


class HobbitLongSupConLoss(nn.Module):
    """Vendored reference: SupConLoss of github.com/HobbitLong/SupContrast (losses.py), forward
    reproduced as in that repo (what the CSD authors call). Only used as a test oracle."""

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07):
        super().__init__()
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features, labels=None, mask=None):
        device = features.device
        if len(features.shape) < 3:
            raise ValueError("`features` needs to be [bsz, n_views, ...]")
        if len(features.shape) > 3:
            features = features.view(features.shape[0], features.shape[1], -1)

        batch_size = features.shape[0]
        if labels is not None and mask is not None:
            raise ValueError("Cannot define both `labels` and `mask`")
        elif labels is None and mask is None:
            mask = torch.eye(batch_size, dtype=torch.float32).to(device)
        elif labels is not None:
            labels = labels.contiguous().view(-1, 1)
            if labels.shape[0] != batch_size:
                raise ValueError("Num of labels does not match num of features")
            mask = torch.eq(labels, labels.T).float().to(device)
        else:
            mask = mask.float().to(device)

        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        if self.contrast_mode == "one":
            anchor_feature = features[:, 0]
            anchor_count = 1
        elif self.contrast_mode == "all":
            anchor_feature = contrast_feature
            anchor_count = contrast_count
        else:
            raise ValueError(f"Unknown mode: {self.contrast_mode}")

        # compute logits
        anchor_dot_contrast = torch.div(
            torch.matmul(anchor_feature, contrast_feature.T), self.temperature
        )
        # for numerical stability
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()

        # tile mask
        mask = mask.repeat(anchor_count, contrast_count)
        # mask-out self-contrast cases
        logits_mask = torch.scatter(
            torch.ones_like(mask),
            1,
            torch.arange(batch_size * anchor_count).view(-1, 1).to(device),
            0,
        )
        mask = mask * logits_mask

        # compute log_prob
        exp_logits = torch.exp(logits) * logits_mask
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))

        # compute mean of log-likelihood over positive (guarded against anchors without one)
        mask_pos_pairs = mask.sum(1)
        mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs

        # loss
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        loss = loss.view(anchor_count, batch_size).mean()
        return loss


# ------------------------------------------------------------------------- CSD, paper form (Eq. 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_csd_paper_is_eq8_by_brute_force(seed: int, tau: float) -> None:
    s, t, y = _batch(seed)
    got = csd_loss(s, t, y, temperature=tau, variant="paper")
    assert got.dim() == 0
    assert got.item() == pytest.approx(csd_eq8_brute(s, t, y, tau), rel=1e-10)


def test_csd_paper_hand_worked_three_samples() -> None:
    # tau = 1, labels [0, 0, 1]; students e1, e2, e3; teachers e2, e1, e3 (the first two swapped).
    # Anchor t_0 = e2: dots with the students [0, 1, 0]; denominator over a != 0: e + 1;
    #   P(0) = {0, 1}: -(log(1/(e+1)) + log(e/(e+1))) / 2 = log(e+1) - 1/2. Anchor t_1: the same.
    # Anchor t_2 = e3: dots [0, 0, 1]; denominator over a != 2: 1 + 1 = 2; P(2) = {2}:
    #   -log(e/2) = log 2 - 1 (negative: e/2 > 1, the p = i term is not a probability).
    s = torch.eye(3, dtype=DTYPE)
    t = s[[1, 0, 2]]
    y = torch.tensor([0, 0, 1])
    expected = (2 * (math.log(math.e + 1) - 0.5) + math.log(2) - 1) / 3
    assert csd_loss(s, t, y, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)
    # The transpose (student anchors, denominator over all teachers) is another number:
    # anchors s_0, s_1: log(e+2) - 1/2 each; s_2: log(e+2) - 1.
    transposed = math.log(math.e + 2) - 2 / 3
    got = csd_loss(s, t, y, temperature=1.0, variant="transposed").item()
    assert got == pytest.approx(transposed, rel=1e-12)
    assert abs(expected - transposed) > 0.1


def test_csd_paper_hand_worked_identical_views() -> None:
    # s = t = e1, e2, e3, labels [0, 0, 1], tau = 1: anchors 0 and 1 give log 2 - 1/2, anchor 2
    # gives log 2 - 1, so L = log 2 - 2/3 (small but positive here).
    e = torch.eye(3, dtype=DTYPE)
    y = torch.tensor([0, 0, 1])
    assert csd_loss(e, e, y, temperature=1.0).item() == pytest.approx(
        math.log(2) - 2 / 3, rel=1e-12)


def test_csd_paper_anchors_are_the_teacher() -> None:
    # Swapping the roles of student and teacher changes Eq. 8 (it is not symmetric), and the
    # swapped call is NOT the transposed variant either (that one keeps a = i in the denominator).
    s, t, y = _batch(9)
    paper = csd_loss(s, t, y, variant="paper").item()
    assert abs(paper - csd_loss(t, s, y, variant="paper").item()) > 1e-3
    assert csd_loss(t, s, y, variant="paper").item() == pytest.approx(
        csd_eq8_brute(t, s, y, 0.07), rel=1e-10)


# --------------------------------------------------------------------------- CSD, transposed form


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_csd_transposed_matches_brute_force(seed: int, tau: float) -> None:
    s, t, y = _batch(seed)
    got = csd_loss(s, t, y, temperature=tau, variant="transposed")
    assert got.item() == pytest.approx(csd_transposed_brute(s, t, y, tau), rel=1e-10)


def test_csd_transposed_hand_worked_distinct_labels() -> None:
    # s = t = orthonormal e1, e2; labels differ; tau = 1. Anchor 0: positive t_0 (dot 1),
    # denominator e^1 + e^0, so -log(e / (e + 1)) = log(1 + e) - 1; anchor 1 is symmetric.
    e = torch.eye(2, dtype=DTYPE)
    y = torch.tensor([0, 1])
    expected = math.log(1 + math.e) - 1
    got = csd_loss(e, e, y, temperature=1.0, variant="transposed")
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Swapped teacher: the positive t_i is orthogonal (dot 0) -> -log(1 / (1 + e)).
    swapped = csd_loss(e, e.flip(0), y, temperature=1.0, variant="transposed")
    assert swapped.item() == pytest.approx(math.log(1 + math.e), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_csd_transposed_matches_pml_supcon_with_ref_emb(seed: int) -> None:
    s, t, y = _batch(seed)
    tau = 0.1
    # PML keeps the (i, i) student-teacher pair as a positive ONLY if ref_labels is a different
    # tensor OBJECT from labels: lmu.get_matches_and_diffs drops the diagonal when
    # `ref_labels is labels` (an identity test, not a value test). Hence labels.clone().
    pml = pml_losses.SupConLoss(temperature=tau, reducer=pml_reducers.MeanReducer())
    expected = pml(s, y, ref_emb=t, ref_labels=y.clone())
    got = csd_loss(s, t, y, temperature=tau, variant="transposed")
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_pml_identity_quirk_drops_own_teacher_when_labels_object_is_shared() -> None:
    # Documents the PML pitfall above: passing the SAME labels object as ref_labels silently
    # removes the own-image teacher feature from positives and denominator, a different loss.
    s, t, y = _batch(0)
    tau = 0.1
    pml = pml_losses.SupConLoss(temperature=tau, reducer=pml_reducers.MeanReducer())
    shared = pml(s, y, ref_emb=t, ref_labels=y)
    ours = csd_loss(s, t, y, temperature=tau, variant="transposed")
    assert abs(shared.item() - ours.item()) > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transposed_is_official_without_student_student_terms(seed: int) -> None:
    s, t, y = _batch(seed)
    got = csd_loss(s, t, y, temperature=0.2, variant="transposed")
    brute = supcon_two_views_brute(s, t, y, 0.2, student_terms=False)
    assert got.item() == pytest.approx(brute, rel=1e-10)


# --------------------------------------------------------------------------- CSD, student only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_csd_student_is_supcon_without_teacher(seed: int) -> None:
    s, t, y = _batch(seed, n_classes=5)  # some anchors have no positive: they add 0
    tau = 0.1
    got = csd_loss(s, t, y, temperature=tau, variant="student")
    assert got.item() == pytest.approx(
        supcon_two_views_brute(s, t, y, tau, teacher_terms=False), rel=1e-10)
    pml = pml_losses.SupConLoss(temperature=tau, reducer=pml_reducers.MeanReducer())
    assert got.item() == pytest.approx(pml(s, y).item(), rel=1e-10)
    # the teacher features are not used
    assert csd_loss(s, torch.randn_like(t), y, temperature=tau, variant="student").item() == \
        pytest.approx(got.item(), rel=1e-12)


def test_csd_student_is_zero_without_positives_and_still_differentiable() -> None:
    s, t, _ = _batch(1, b=4)
    x = s.clone().requires_grad_(True)
    loss = csd_loss(x, t, torch.arange(4), variant="student")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- CSD, official form


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_csd_official_matches_brute_force(seed: int, tau: float) -> None:
    s, t, y = _batch(seed)
    got = csd_loss(s, t, y, temperature=tau, variant="official")
    assert got.item() == pytest.approx(csd_official_brute(s, t, y, tau), rel=1e-10)
    assert got.item() == pytest.approx(supcon_two_views_brute(s, t, y, tau), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_csd_official_matches_hobbitlong_supcon_at_default_temperature(seed: int) -> None:
    s, t, y = _batch(seed)
    feats = torch.stack([F.normalize(s, dim=1), F.normalize(t, dim=1)], dim=1)  # [B, 2, D]
    ref = HobbitLongSupConLoss(temperature=0.07, contrast_mode="one", base_temperature=0.07)
    got = csd_loss(s, t, y, temperature=0.07, variant="official")
    assert got.item() == pytest.approx(ref(feats, labels=y).item(), rel=1e-10)


def test_csd_official_omits_supcon_temperature_factor() -> None:
    # Away from 0.07, SupCon scales by tau / base_temperature; csd_loss does not.
    s, t, y = _batch(3)
    tau = 0.2
    feats = torch.stack([F.normalize(s, dim=1), F.normalize(t, dim=1)], dim=1)
    ref = HobbitLongSupConLoss(temperature=tau, contrast_mode="one", base_temperature=0.07)
    got = csd_loss(s, t, y, temperature=tau, variant="official")
    assert got.item() == pytest.approx(ref(feats, labels=y).item() * 0.07 / tau, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_csd_official_matches_pml_supcon_on_concatenated_views(seed: int) -> None:
    s, t, y = _batch(seed)
    b, tau = s.shape[0], 0.1
    pml = pml_losses.SupConLoss(temperature=tau, reducer=pml_reducers.DoNothingReducer())
    # No ref_emb: PML contrasts every embedding with all 2B - 1 others (diagonal removed).
    out = pml(torch.cat([s, t]), torch.cat([y, y]))
    per_anchor = out["loss"]["losses"]
    assert per_anchor.shape == (2 * b,)
    expected = per_anchor[:b].mean()  # the first B rows are the student anchors
    got = csd_loss(s, t, y, temperature=tau, variant="official")
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_csd_official_hand_worked() -> None:
    # s = t = e1, e2 with different labels, tau = 1. Anchor s_0 sees {s_1, t_0, t_1} with dots
    # 0, 1, 0; its only positive is t_0: loss = -log(e / (e + 2)) = log(e + 2) - 1.
    e = torch.eye(2, dtype=DTYPE)
    y = torch.tensor([0, 1])
    got = csd_loss(e, e, y, temperature=1.0, variant="official")
    assert got.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-12)


def test_csd_variants_differ_when_classes_repeat() -> None:
    s, t, y = _batch(4)
    values = [csd_loss(s, t, y, variant=v).item() for v in CSD_VARIANTS]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 1e-3


# --------------------------------------------------------------------------- CSD, properties


@pytest.mark.parametrize("variant", CSD_VARIANTS)
def test_csd_gradient_reaches_only_the_student(variant: str) -> None:
    s, t, y = _batch(5)
    student = s.clone().requires_grad_(True)
    with torch.no_grad():  # how the caller produces teacher features
        teacher_nograd = t * 1.0
    csd_loss(student, teacher_nograd, y, variant=variant).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0

    # Even a teacher tensor that requires grad must not receive any (the teacher is frozen).
    student.grad = None
    teacher_leaf = t.clone().requires_grad_(True)
    csd_loss(student, teacher_leaf, y, variant=variant).backward()
    assert teacher_leaf.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", CSD_VARIANTS)
def test_csd_is_invariant_to_feature_scale(variant: str) -> None:
    s, t, y = _batch(6)
    base = csd_loss(s, t, y, variant=variant)
    scaled = csd_loss(s * 7.5, t * 0.01, y, variant=variant)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-10)


def test_csd_matching_teacher_beats_shuffled_teacher() -> None:
    # 4 well-separated classes, 2 samples each, labels in blocks [0,0,1,1,2,2,3,3].
    g = torch.Generator().manual_seed(7)
    n_classes, per_class, d = 4, 2, 8
    protos = torch.eye(d, dtype=DTYPE)[:n_classes] * 5.0
    y = torch.arange(n_classes).repeat_interleave(per_class)
    feats = protos[y] + 0.1 * torch.randn(len(y), d, generator=g, dtype=DTYPE)
    # Rolling by one block maps every row to a teacher feature of ANOTHER class.
    shuffled = feats.roll(per_class, dims=0)
    matched = csd_loss(feats, feats, y, temperature=0.07)
    mismatched = csd_loss(feats, shuffled, y, temperature=0.07)
    assert matched.item() < 0.1 * mismatched.item()
    assert matched.item() < math.log(per_class) + 0.05  # near its floor log|P(i)|


def test_csd_is_finite_at_tiny_temperature() -> None:
    s, t, y = _batch(8)
    for variant in CSD_VARIANTS:
        x = s.float().clone().requires_grad_(True)
        loss = csd_loss(x, t.float(), y, temperature=1e-3, variant=variant)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- KD


def kd_brute(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        zs = sum(math.exp(v / temp) for v in srow)
        zt = sum(math.exp(v / temp) for v in trow)
        for sv, tv in zip(srow, trow, strict=True):
            p = math.exp(sv / temp) / zs
            q = math.exp(tv / temp) / zt
            total += q * math.log(q / p)
    return total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_matches_torch_kl_div_and_brute_force(temp: float) -> None:
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 5, generator=g, dtype=DTYPE) * 2
    t = torch.randn(6, 5, generator=g, dtype=DTYPE) * 2
    got = kd_loss(s, t, T=temp)
    ref = F.kl_div(
        F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="batchmean"
    )
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    assert got.item() == pytest.approx(kd_brute(s, t, temp), rel=1e-10)


def test_kd_hand_value_has_no_t_squared_factor() -> None:
    # One sample, T = 2: teacher [2, 0] -> q = softmax([1, 0]); student [0, 0] -> p = [1/2, 1/2].
    q0 = math.e / (math.e + 1)
    q1 = 1 / (math.e + 1)
    hand = q0 * math.log(q0 / 0.5) + q1 * math.log(q1 / 0.5)
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), T=2.0).item()
    assert got == pytest.approx(hand, rel=1e-6)
    assert got != pytest.approx(4.0 * hand, rel=1e-3)  # i.e. not Hinton's T^2-scaled form


def test_kd_is_zero_when_student_equals_teacher_and_grad_only_to_student() -> None:
    g = torch.Generator().manual_seed(12)
    z = torch.randn(4, 7, generator=g)
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # A per-row constant shift leaves the softmax unchanged, so the loss is still zero.
    assert kd_loss(z + 3.0, z).item() == pytest.approx(0.0, abs=1e-6)
    student = (z * 2).requires_grad_(True)
    teacher = z.clone().requires_grad_(True)
    loss = kd_loss(student, teacher)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# --------------------------------------------------------------------------- triplet


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_triplet_matches_brute_force_and_pml_mean_reducer(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(12, 5, generator=g, dtype=DTYPE) * 2
    # label 9 appears once: that anchor has no positive and must be skipped by both.
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 9])
    got = triplet_loss(x, y, margin=1.0)
    assert got.item() == pytest.approx(triplet_brute(x, y, 1.0), rel=1e-10)

    cos = pml_distances.CosineSimilarity()
    miner = pml_miners.BatchHardMiner(distance=cos)
    pml = pml_losses.TripletMarginLoss(
        margin=1.0, distance=cos, reducer=pml_reducers.MeanReducer()
    )
    indices = miner(x, y)
    assert len(indices[0]) == 11  # one triplet per valid anchor: exactly our averaging set
    assert got.item() == pytest.approx(pml(x, y, indices).item(), rel=1e-10)


def test_triplet_differs_from_pml_default_avg_nonzero_reducer() -> None:
    # Margin 0.5. Classes 0 and 1 are tight clusters >= ~80 degrees from every negative
    # (zero loss); classes 2 and 3 sit 0.1 rad apart (positive loss). AvgNonZeroReducer
    # averages only the 4 non-zero anchors, we average all 8 valid anchors.
    h = math.pi / 2
    ang = [0.0, 0.05, math.pi, math.pi + 0.05, h, h + 0.05, h + 0.1, h + 0.15]
    ang_t = torch.tensor(ang, dtype=DTYPE)
    x = torch.stack([ang_t.cos(), ang_t.sin()], dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    got = triplet_loss(x, y, margin=0.5)
    assert got.item() == pytest.approx(triplet_brute(x, y, 0.5), rel=1e-10)
    cos = pml_distances.CosineSimilarity()
    pml_default = pml_losses.TripletMarginLoss(margin=0.5, distance=cos)
    nonzero_mean = pml_default(x, y, pml_miners.BatchHardMiner(distance=cos)(x, y))
    assert 0 < got.item() < nonzero_mean.item()
    assert nonzero_mean.item() == pytest.approx(got.item() * 8 / 4, rel=1e-10)  # 4 of 8 non-zero


def test_triplet_hand_worked() -> None:
    # Unit vectors at 0 and 90 degrees (class 0) and 180 degrees (class 1), margin 1.
    # Anchor 0: d_ap = 1 - cos 90 = 1, d_an = 1 - cos 180 = 2 -> relu(1 - 2 + 1) = 0.
    # Anchor 1: d_ap = 1, d_an = 1 - cos 90 = 1 -> relu(1) = 1.  Anchor 2: no positive.
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert triplet_loss(x, y).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]])
def test_triplet_zero_with_grad_when_no_valid_anchor(labels: list[int]) -> None:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(31)).requires_grad_(True)
    loss = triplet_loss(x, torch.tensor(labels))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_triplet_gradient_is_finite_with_duplicate_features() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]).requires_grad_(True)
    loss = triplet_loss(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- feature distillation


def test_feature_distillation_hand_value() -> None:
    # Row 0: directions e1 vs e2 -> ||e1 - e2||^2 = 2.
    # Row 1: e1 vs (e1 + e2)/sqrt 2 -> (1 - 1/sqrt2)^2 + 1/2 = 2 - sqrt 2.
    s = torch.tensor([[3.0, 0.0], [1.0, 0.0]], dtype=DTYPE)
    t = torch.tensor([[0.0, 2.0], [4.0, 4.0]], dtype=DTYPE)
    expected = (2.0 + (2.0 - math.sqrt(2.0))) / 2
    assert feature_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_feature_distillation_zero_for_same_directions_and_grad_only_to_student() -> None:
    g = torch.Generator().manual_seed(21)
    t = torch.randn(5, 4, generator=g)
    scales = torch.tensor([[0.1], [2.0], [7.0], [1.0], [30.0]])
    assert feature_distillation_loss(t * scales, t).item() == pytest.approx(0.0, abs=1e-6)
    # Opposite directions reach the upper bound 4.
    assert feature_distillation_loss(-t, t).item() == pytest.approx(4.0, rel=1e-6)

    student = torch.randn(5, 4, generator=g).requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    feature_distillation_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# --------------------------------------------------------------------------- bad input


def test_csd_rejects_unknown_variant() -> None:
    s, t, y = _batch(0)
    with pytest.raises(ValueError,
                       match=r"unknown CSD variant 'supcon'.*'paper', 'official', 'transposed'"):
        csd_loss(s, t, y, variant="supcon")


def test_csd_rejects_mismatched_batches() -> None:
    s, t, y = _batch(0)
    with pytest.raises(ValueError, match=r"same shape.*\(10, 6\) and \(9, 6\)"):
        csd_loss(s, t[:9], y)
    with pytest.raises(ValueError, match=r"same shape"):
        csd_loss(s, t[:, :5], y)
    with pytest.raises(ValueError, match=r"labels has 9 entries but student_features has 10"):
        csd_loss(s, t, y[:9])


def test_csd_rejects_bad_dimensions_and_temperature() -> None:
    s, t, y = _batch(0)
    with pytest.raises(ValueError, match=r"student_features must be a 2-D.*unsqueeze\(0\)"):
        csd_loss(s[0], t[0], y[:1])
    with pytest.raises(ValueError, match=r"teacher_features must be a 2-D.*flatten\(1\)"):
        csd_loss(s, t.view(10, 2, 3), y)
    with pytest.raises(ValueError, match=r"labels must be a 1-D"):
        csd_loss(s, t, y.view(-1, 1))
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        csd_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"empty batch"):
        csd_loss(s[:0], t[:0], y[:0])


@pytest.mark.parametrize("variant", CSD_VARIANTS)
def test_csd_rejects_a_batch_of_one(variant: str) -> None:
    s, t, y = _batch(0)
    with pytest.raises(ValueError, match=r"at least 2 samples.*nothing to contrast"):
        csd_loss(s[:1], t[:1], y[:1], variant=variant)


def test_kd_rejects_bad_shapes_and_temperature() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(4, 10\) and \(4, 5\)"):
        kd_loss(torch.zeros(4, 10), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"same shape"):
        kd_loss(torch.zeros(4, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"student_logits must be a 2-D"):
        kd_loss(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match=r"T must be > 0"):
        kd_loss(torch.zeros(4, 5), torch.zeros(4, 5), T=-1.0)


def test_triplet_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"labels has 3 entries but features has 4"):
        triplet_loss(torch.randn(4, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"features must be a 2-D"):
        triplet_loss(torch.randn(4), torch.tensor([0, 0, 1, 1]))


def test_feature_distillation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"same shape"):
        feature_distillation_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"student_features must be a 2-D"):
        feature_distillation_loss(torch.randn(3), torch.randn(3))

"""Tests of csdkit.models against independent oracles.

Oracles used:
- He et al. 2016 (Deep Residual Learning, section 4.2 and Table 6): ResNet-(6n+2) has 6n+2
  weighted layers, 0.27M parameters at depth 20 and 0.46M at depth 32; and the exact count
  worked out by hand from the architecture (3x3 convs without bias, BatchNorm affine);
- option-A shortcuts written out with explicit index loops;
- cosine logits computed with explicit row norms (sqrt of sums of squares) and loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csdkit.models import BasicBlock, CosineClassifier, ResNet, count_parameters, resnet

torch.set_num_threads(1)


def _params_by_hand(depth: int, n_classes: int) -> int:
    """conv3x3(cin, cout) has 9*cin*cout weights (no bias), BatchNorm(c) has 2c; option-A
    shortcuts have none; the cosine classifier has 64 * n_classes (no bias)."""
    n = (depth - 2) // 6
    total = 9 * 3 * 16 + 2 * 16  # stem conv + bn
    cin = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * c + 9 * c * c + 2 * (2 * c)
            cin = c
    return total + 64 * n_classes


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56])
def test_resnet_depths_build_with_6n_plus_2_layers(depth):
    model = resnet(depth, n_classes=10)
    assert isinstance(model, ResNet) and model.depth == depth
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+1 convs + the classifier = 6n+2 weighted layers
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert len(model.blocks) == 3 * ((depth - 2) // 6)
    assert count_parameters(model) == _params_by_hand(depth, 10)


def test_parameter_counts_match_he_et_al_table_6():
    n20 = count_parameters(resnet(20, 10))
    n32 = count_parameters(resnet(32, 10))
    assert n20 == 269_712 and n32 == 464_144  # by hand, see _params_by_hand
    assert count_parameters(resnet(8, 10)) == 75_280  # 464+4672+13952+55552+640
    assert abs(n20 - 0.27e6) / 0.27e6 < 0.02
    assert abs(n32 - 0.46e6) / 0.46e6 < 0.02
    # the classifier grows the count by exactly 64 per class
    assert count_parameters(resnet(20, 100)) - n20 == 64 * 90


@pytest.mark.parametrize("depth", [10, 4, 2, 0, -4, 9, 15, 33])
def test_invalid_depth_raises(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(depth=depth)


@pytest.mark.parametrize("size", [16, 32])
def test_forward_returns_logits_and_features(size):
    torch.manual_seed(0)
    model = resnet(8, n_classes=7).eval()
    last = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: last.update(out=o))
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        logits, features = model(x)
    assert logits.shape == (3, 7) and features.shape == (3, 64)
    assert model.feature_dim == 64 and model.n_classes == 7
    # two stride-2 stages: the last map is size/4; the feature is its global average
    assert last["out"].shape == (3, 64, size // 4, size // 4)
    assert torch.allclose(features, last["out"].mean((2, 3)), atol=1e-6)
    assert (features >= 0).all()  # after a ReLU
    with torch.no_grad():
        assert torch.allclose(logits, model.classifier(features))
        assert torch.allclose(features, model.embed(x))
    # the rows are independent in eval mode: a single image gives the same result
    with torch.no_grad():
        one_logits, one_features = model(x[1:2])
    assert torch.allclose(one_features, features[1:2], atol=1e-5)
    assert torch.allclose(one_logits, logits[1:2], atol=1e-5)


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = resnet(8, n_classes=4).train()
    logits, _ = model(torch.randn(4, 3, 16, 16))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# option-A shortcut


def _option_a_by_hand(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Subsample every other pixel, place the channels in the middle, zeros on both sides."""
    b, c, h, w = x.shape
    front = (out_channels - c) // 2
    out = torch.zeros(b, out_channels, (h + 1) // 2, (w + 1) // 2)
    for i in range((h + 1) // 2):
        for j in range((w + 1) // 2):
            out[:, front : front + c, i, j] = x[:, :, 2 * i, 2 * j]
    return out


@pytest.mark.parametrize("cin, cout, size", [(16, 32, 8), (32, 64, 6), (16, 32, 5)])
def test_option_a_shortcut_by_hand(cin, cout, size):
    block = BasicBlock(cin, cout, stride=2)
    # parameter-free: the block holds only its two convs and two batch norms
    assert count_parameters(block) == 9 * cin * cout + 9 * cout * cout + 4 * cout
    names = {n.split(".")[0] for n, _ in block.named_parameters()}
    assert names == {"conv1", "bn1", "conv2", "bn2"}
    x = torch.randn(2, cin, size, size)
    s = block.shortcut(x)
    expected = _option_a_by_hand(x, cout)
    assert torch.equal(s, expected)
    assert s.shape == (2, cout, (size + 1) // 2, (size + 1) // 2)
    assert torch.equal(s[:, : (cout - cin) // 2], torch.zeros_like(s[:, : (cout - cin) // 2]))
    # the block output adds the shortcut to the residual branch, then a ReLU
    block.eval()
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), (branch + expected).clamp_min(0), atol=1e-6)
        assert block(x).shape == s.shape


def test_identity_shortcut_when_shapes_match():
    block = BasicBlock(16, 16, stride=1)
    x = torch.randn(2, 16, 5, 5)
    assert block.shortcut(x) is x


def test_resnet_uses_option_a_at_stage_transitions():
    model = resnet(20)
    strides = [b.stride for b in model.blocks]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(model.blocks[3].shortcut(x), _option_a_by_hand(x, 32))
    x = torch.randn(1, 32, 4, 4)
    assert torch.equal(model.blocks[6].shortcut(x), _option_a_by_hand(x, 64))


# --------------------------------------------------------------------------------------------
# CosineClassifier


def _cosine_logits_by_hand(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, c = features.shape[0], weight.shape[0]
    out = torch.empty(b, c, dtype=torch.float64)
    for k in range(c):
        row = weight[k].double()
        norm = math.sqrt(sum(v * v for v in row.tolist()))
        for i in range(b):
            out[i, k] = sum(f * w / norm for f, w in zip(features[i].double().tolist(),
                                                        row.tolist(), strict=True))
    return out


def test_cosine_logits_by_hand_and_bias_free():
    torch.manual_seed(0)
    clf = CosineClassifier(8, 5)
    assert [n for n, _ in clf.named_parameters()] == ["weight"]
    assert clf.weight.shape == (5, 8) and clf.n_classes == 5
    f = torch.randn(4, 8) * 3
    logits = clf(f)
    assert logits.shape == (4, 5)
    assert torch.allclose(logits.double(), _cosine_logits_by_hand(f, clf.weight.detach()),
                          atol=1e-5)
    assert torch.equal(clf(torch.zeros(3, 8)), torch.zeros(3, 5))  # no bias
    # logit = |f| cos(f, w_c): a feature along a weight row scores exactly |f| on it
    w0 = clf.weight.detach()[0]
    along = (2.5 * w0 / w0.norm())[None]
    assert clf(along)[0, 0].item() == pytest.approx(2.5, abs=1e-5)
    assert (clf(along)[0] <= 2.5 + 1e-5).all()  # Cauchy-Schwarz


def test_scaling_a_weight_row_does_not_change_logits():
    torch.manual_seed(1)
    clf = CosineClassifier(6, 4)
    f = torch.randn(5, 6)
    before = clf(f).detach()
    with torch.no_grad():
        clf.weight[2] *= 37.0
        clf.weight[0] *= 0.01
    assert torch.allclose(clf(f), before, atol=1e-5)
    with torch.no_grad():
        clf.weight[1] *= -1.0  # a sign flip is not a scaling: that logit flips
    assert torch.allclose(clf(f)[:, 1], -before[:, 1], atol=1e-6)


def test_grow_keeps_old_rows_and_logits():
    torch.manual_seed(2)
    clf = CosineClassifier(64, 10)
    old = clf.weight.detach().clone()
    f = torch.randn(6, 64)
    old_logits = clf(f).detach()
    clf.grow(5)
    assert clf.n_classes == 15 and clf.weight.shape == (15, 64)
    assert torch.equal(clf.weight[:10].detach(), old)  # bit for bit
    new = clf.weight[10:].detach()
    bound = 1 / math.sqrt(64)  # nn.Linear's initialisation range
    assert new.abs().max() <= bound and new.abs().min() > 0
    assert not any(torch.equal(new[i], old[j]) for i in range(5) for j in range(10))
    logits = clf(f)
    assert logits.shape == (6, 15)
    assert torch.allclose(logits[:, :10], old_logits, atol=1e-6)
    assert torch.allclose(logits.double(), _cosine_logits_by_hand(f, clf.weight.detach()),
                          atol=1e-4)
    clf.grow(1)
    assert clf.n_classes == 16 and torch.equal(clf.weight[:10].detach(), old)


def test_grown_weight_is_a_trainable_registered_parameter():
    clf = CosineClassifier(8, 2).double()
    clf.grow(3)
    params = list(clf.parameters())
    assert len(params) == 1 and params[0] is clf.weight
    assert clf.weight.requires_grad and clf.weight.dtype == torch.float64
    assert isinstance(clf.weight, nn.Parameter)
    clf(torch.randn(4, 8, dtype=torch.float64))[:, 4].sum().backward()
    grad = clf.weight.grad
    assert grad[4].abs().sum() > 0 and torch.equal(grad[:4], torch.zeros_like(grad[:4]))


def test_resnet_classifier_grows():
    torch.manual_seed(3)
    model = resnet(8, n_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before, feats = model(x)
        model.classifier.grow(2)
        after, feats2 = model(x)
    assert model.n_classes == 5 and after.shape == (2, 5)
    assert torch.equal(feats, feats2)
    assert torch.allclose(after[:, :3], before, atol=1e-6)


@pytest.mark.parametrize("n", [0, -1])
def test_grow_rejects_non_positive(n):
    clf = CosineClassifier(4, 2)
    w = clf.weight.detach().clone()
    with pytest.raises(ValueError, match="n_new"):
        clf.grow(n)
    assert torch.equal(clf.weight.detach(), w)

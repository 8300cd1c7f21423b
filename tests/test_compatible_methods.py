"""The two methods that aim at compatibility: BCT's influence loss and a fixed simplex classifier.

Each is checked against what its paper defines, worked independently: the simplex's Gram matrix
by its formula, BCT's synthesised rows by a loop over classes, and both trained end to end on
tiny digits runs (seconds on a CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csdkit.models import influence_classifier, resnet, simplex_vertices
from csdkit.runs import load_checkpoint, run_grid
from csdkit.train import Config, loss_terms, method_terms, prepare, run

TINY = Config(n_tasks=2, epochs=2, batch_size=64, depth=8, seed=0)


@pytest.mark.parametrize("k", [2, 3, 10, 40, 65])
def test_simplex_gram_matrix_is_k_over_k_minus_1_identity_minus_a_constant(k):
    w = simplex_vertices(k).double()
    assert w.shape == (k, k - 1)
    want = k / (k - 1) * torch.eye(k, dtype=torch.float64) - torch.ones(k, k) / (k - 1)
    assert torch.allclose(w @ w.t(), want, atol=1e-6)
    assert torch.allclose(w.sum(0), torch.zeros(k - 1, dtype=torch.float64), atol=1e-6)


def test_three_classes_are_unit_vectors_120_degrees_apart():
    w = simplex_vertices(3)
    angles = torch.rad2deg(torch.acos((w @ w.t()).clamp(-1, 1)))
    assert torch.allclose(angles[~torch.eye(3, dtype=torch.bool)], torch.tensor(120.0), atol=1e-3)


def test_too_many_classes_for_the_feature_width_is_a_clear_error():
    resnet(8, 65, simplex=True)  # 64 dimensions: the most a 64-d feature can span
    with pytest.raises(ValueError, match="needs 65-d features, but the ResNet gives 64"):
        resnet(8, 66, simplex=True)
    with pytest.raises(ValueError, match="at least 2 classes"):
        simplex_vertices(1)


def test_simplex_model_outputs_every_class_and_never_trains_its_rows():
    torch.manual_seed(0)
    model = resnet(8, 10, simplex=True)
    logits, features = model(torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 10) and features.shape == (4, 9) and model.feature_dim == 9
    assert torch.allclose(logits, features @ simplex_vertices(10).t())
    rows = model.classifier.weight
    assert all(p is not rows for p in model.parameters())  # no optimiser, no weight decay
    assert "classifier.weight" in model.state_dict()  # but saved with the checkpoint


def test_bct_rows_are_the_teachers_class_means_of_the_new_task(tmp_path):
    data, split = prepare(TINY)
    torch.manual_seed(0)
    teacher = resnet(8, 5).eval()
    images = data.train.of_classes(split.classes(1))
    head = influence_classifier(teacher, images, data.mean, data.std)
    assert head.weight.shape == (10, 64) and not head.weight.requires_grad
    assert torch.equal(head.weight[:5], teacher.classifier.weight)  # the old rows, unchanged
    x = (images.images.float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / \
        torch.tensor(data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = teacher.embed(x)
    for c in range(5, 10):  # one row per new class: its mean teacher feature
        assert torch.allclose(head.weight[c], feats[images.labels == c].mean(0), atol=1e-5)


def test_bct_term_is_cross_entropy_of_the_old_classifier_on_new_features():
    torch.manual_seed(0)
    rows, feats, labels = torch.randn(6, 16), torch.randn(8, 16), torch.randint(3, 6, (8,))
    influence = feats @ F.normalize(rows, dim=1).t()  # cosine logits, as the classifier computes
    want = -torch.log_softmax(influence, 1)[torch.arange(8), labels].mean()
    # as train_task calls it for bct alone: no teacher forward, so no teacher outputs
    terms = loss_terms("bct", TINY, torch.randn(8, 6), feats, labels, None, None, influence)
    assert set(terms) == {"ce", "triplet", "bct"} and torch.allclose(terms["bct"], want)


def test_bct_trains_otherwise_than_finetune(tmp_path):
    """Same seed, same first task: without its influence term bct would be fine-tuning, bit for
    bit (a bug once made it so: the term needed a teacher that bct alone never builds)."""
    ft, bct = run_grid([(TINY, "finetune"), (TINY, "bct")], tmp_path, workers=1)
    assert ft.recall[0] == bct.recall[0]  # the shared first task
    nets = {m: load_checkpoint(next(tmp_path.glob(f"*-{m}-seed*")) / "task1.pt")[0]
            for m in ("finetune", "bct")}
    params = [dict(n.named_parameters()) for n in nets.values()]
    assert any(not torch.equal(params[0][k], params[1][k]) for k in params[0])


@pytest.mark.parametrize("method, terms", [
    ("simplex+fd", ("ce", "triplet", "kd", "fd")),
    ("bct+csd_official", ("ce", "triplet", "bct", "kd", "csd")),
    ("simplex+bct", ("ce", "triplet", "bct")),
])
def test_methods_combine_with_plus(method, terms):
    assert set(method_terms(method)) == set(terms)


@pytest.mark.parametrize("method", ["fd+csd", "joint+simplex", "simplex+simplex", "bct+nope", ""])
def test_a_bad_combination_is_a_clear_error(method):
    with pytest.raises(ValueError, match="join simplex and/or bct"):
        method_terms(method)


@pytest.mark.parametrize("method", ["bct", "simplex", "simplex+fd", "bct+fd"])
def test_compatible_methods_train_end_to_end(method, tmp_path):
    result = run(TINY, method, out_dir=tmp_path, quiet=True)
    first, last = (load_checkpoint(tmp_path / f"task{t}.pt")[0] for t in (0, 1))
    simplex = "simplex" in method
    assert (first.n_classes, last.n_classes) == ((10, 10) if simplex else (5, 10))
    assert first.simplex == last.simplex == simplex
    if simplex:  # the fixed rows survive training and the checkpoint bit for bit
        assert torch.equal(last.classifier.weight, simplex_vertices(10))
    assert result.recall[-1][1] > 0.5  # it learned the second task (chance: 0.2)
    assert len(result.compatibility) == 2


def test_a_simplex_run_never_starts_from_a_cosine_first_task(tmp_path):
    cosine, simplex = run_grid([(TINY, "finetune"), (TINY, "simplex")], tmp_path, workers=1)
    firsts = [p / "task0.pt" for p in tmp_path.iterdir() if "-first-" in p.name]
    assert len(firsts) == 2  # one shared first task per classifier
    assert cosine.recall[0] != simplex.recall[0]
    cosine_first = next(p for p in firsts if not load_checkpoint(p)[0].simplex)
    with pytest.raises(ValueError, match="cosine classifier, but simplex trains a simplex one"):
        run(TINY, "simplex", out_dir=tmp_path / "mixed", quiet=True, first_task=cosine_first)


def test_the_cli_refuses_a_bad_method_before_loading_any_data(tmp_path):
    from csdkit.cli import main

    with pytest.raises(SystemExit, match="join simplex and/or bct"):
        main(["run", "--method", "fd+csd", "--data-root", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()

"""Training, teachers, checkpoints and resume on tiny digits runs (seconds on a CPU)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from csdkit import losses
from csdkit.data import ImageSet
from csdkit.models import resnet
from csdkit.train import (
    METHODS,
    PRESETS,
    Config,
    load_checkpoint,
    loss_terms,
    prepare,
    run,
    train_task,
)

TINY = Config(n_tasks=2, epochs=2, batch_size=64, depth=8, seed=0)


@pytest.fixture(scope="module")
def tiny_data():
    return prepare(TINY)


def test_presets_follow_the_reference_protocol():
    p = PRESETS["paper"]
    assert (p.dataset, p.depth, p.epochs, p.batch_size) == ("cifar100", 32, 800, 128)
    assert (p.lr_first, p.lr_later, p.weight_decay) == (1e-3, 1e-5, 5e-4)
    assert p.milestones == (200, 400, 600) and p.gamma == 0.1
    assert p.crop_pad == 4 and p.flip
    assert PRESETS["quick"].dataset == "digits"


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_terms_per_method(method):
    torch.manual_seed(0)
    b, c_old, c = 8, 3, 5
    logits, feats = torch.randn(b, c), torch.randn(b, 16)
    labels = torch.randint(c_old, c, (b,))
    t_logits, t_feats = torch.randn(b, c_old), torch.randn(b, 16)
    first = loss_terms(method, TINY, logits, feats, labels, None, None)
    assert set(first) == {"ce", "triplet"}  # task 1: no teacher, no distillation
    later = loss_terms(method, TINY, logits, feats, labels, t_logits, t_feats)
    assert set(later) == set(METHODS[method])
    # each term is the csdkit loss on the right inputs (KD on the old-class slice only)
    assert torch.allclose(later["ce"], torch.nn.functional.cross_entropy(logits, labels))
    if "kd" in later:
        assert torch.allclose(later["kd"], losses.kd_loss(logits[:, :c_old], t_logits, T=2.0))
    if "csd" in later:
        variant = "official" if method == "csd_official" else "paper"
        want = losses.csd_loss(feats, t_feats, labels, 0.07, variant)
        assert torch.allclose(later["csd"], want)


def test_teacher_is_frozen_and_student_learns(tiny_data):
    data, split = tiny_data
    torch.manual_seed(0)
    model = resnet(8, 5)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.classifier.grow(5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = copy.deepcopy(model.state_dict())
    train_task(model, teacher, data.train.of_classes(split.classes(1)), TINY, "csd",
               data.mean, data.std, lr=1e-3, epochs=1, seed=0, quiet=True)
    # eval mode + no_grad: BatchNorm running stats and weights of the teacher did not move
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any("running_mean" in k for k in moved) and any("conv" in k for k in moved)


def test_run_is_deterministic_and_evaluates_every_seen_task(tiny_data):
    a = run(TINY, "lwf", quiet=True, data=tiny_data)
    b = run(TINY, "lwf", quiet=True, data=tiny_data)
    np.testing.assert_array_equal(np.asarray(a.recall), np.asarray(b.recall))
    assert a.seen_recall == b.seen_recall and a.accuracy == b.accuracy
    R = np.asarray(a.recall)
    assert R.shape == (2, 2) and np.isnan(R[0, 1]) and not np.isnan(R[1]).any()
    assert np.isnan(a.old_accuracy[0]) and 0 <= a.old_accuracy[1] <= 1


def test_joint_is_one_step_over_all_classes(tiny_data):
    r = run(TINY, "joint", quiet=True, data=tiny_data)
    assert len(r.recall) == 1 and len(r.recall[0]) == 2
    assert not np.isnan(r.recall[0]).any()


def test_resume_gives_identical_numbers(tmp_path, tiny_data):
    full = run(TINY, "csd", out_dir=tmp_path / "a", quiet=True, data=tiny_data)
    # Simulate an interruption after task 1: keep only its checkpoint, then rerun.
    (tmp_path / "a" / "task1.pt").unlink()
    (tmp_path / "a" / "result.json").unlink()
    resumed = run(TINY, "csd", out_dir=tmp_path / "a", quiet=True, data=tiny_data)
    np.testing.assert_array_equal(np.asarray(resumed.recall), np.asarray(full.recall))
    assert resumed.seen_recall == full.seen_recall
    assert resumed.old_accuracy[1] == full.old_accuracy[1]
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["seen_recall"] == full.seen_recall
    # and the final checkpoint loads into the same weights
    m1, meta = load_checkpoint(tmp_path / "a" / "task1.pt")
    assert meta["task"] == 1 and meta["n_classes"] == 10 and meta["depth"] == 8
    assert meta["class_order"] == full.class_order


def test_checkpoints_of_another_run_are_refused_not_overwritten(tmp_path, tiny_data):
    run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    stamp = (tmp_path / "task0.pt").read_bytes()
    with pytest.raises(ValueError, match="another run.*Nothing was overwritten"):
        run(TINY.replace(lr_later=1e-4), "finetune", out_dir=tmp_path, quiet=True,
            data=tiny_data)
    with pytest.raises(ValueError, match="method"):
        run(TINY, "csd", out_dir=tmp_path, quiet=True, data=tiny_data)
    assert (tmp_path / "task0.pt").read_bytes() == stamp


def test_load_checkpoint_refuses_another_architecture(tmp_path, tiny_data):
    run(TINY.replace(n_tasks=1), "finetune", out_dir=tmp_path, quiet=True,
        data=prepare(TINY.replace(n_tasks=1)))
    with pytest.raises(ValueError, match="ResNet-8 with 10 classes.*ResNet-20 with 10"):
        load_checkpoint(tmp_path / "task0.pt", resnet(20, 10))
    with pytest.raises(ValueError, match="ResNet-8 with 10 classes.*ResNet-8 with 5"):
        load_checkpoint(tmp_path / "task0.pt", resnet(8, 5))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a csdkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_method_and_cuda_without_gpu(tiny_data):
    with pytest.raises(ValueError, match="unknown method 'ewc'.*csd"):
        run(TINY, "ewc", quiet=True, data=tiny_data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            run(TINY.replace(device="cuda"), "csd", quiet=True, data=tiny_data)


def test_cuda_switches_are_inert_on_cpu(tiny_data):
    # bf16 / channels_last / compile only act on CUDA: on a CPU the numbers are identical.
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    a = run(TINY.replace(bf16=False, channels_last=False), "csd", quiet=True, data=tiny_data)
    b = run(TINY.replace(bf16=True, channels_last=True, compile=True), "csd", quiet=True,
            data=tiny_data)
    assert a.seen_recall == b.seen_recall


def test_tiny_task_smaller_than_a_batch_still_trains():
    torch.manual_seed(0)
    model = resnet(8, 2)
    imgs = ImageSet(torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8),
                    torch.tensor([0, 0, 0, 1, 1, 1]))
    hist = train_task(model, None, imgs, TINY, "finetune", (0.5,) * 3, (0.25,) * 3,
                      lr=1e-3, epochs=2, seed=0, quiet=True)
    assert len(hist) == 2 and set(hist[0]) == {"ce", "triplet"}


def test_progress_bars_show_in_a_terminal_and_stay_silent_on_ci_or_quiet(monkeypatch, capsys):
    from csdkit.train import progress_bar

    monkeypatch.delenv("CI", raising=False)
    list(progress_bar(range(3), quiet=False, desc="epochs"))
    assert "epochs" in capsys.readouterr().err  # tqdm writes its bar to stderr
    list(progress_bar(range(3), quiet=True, desc="epochs"))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CI", "true")
    list(progress_bar(range(3), quiet=False, desc="epochs"))
    assert capsys.readouterr().err == ""

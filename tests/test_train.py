"""Training, teachers, checkpoints and resume on tiny digits runs (seconds on a CPU)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from csdkit import losses
from csdkit.data import ImageSet
from csdkit.models import resnet
from csdkit.runs import load_checkpoint
from csdkit.train import (
    CSD_VARIANT,
    METHODS,
    PRESETS,
    Config,
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
    assert p.class_order == "natural"  # the authors' order (Avalanche sorts the class ids)
    assert PRESETS["quick"].dataset == "digits"
    short = PRESETS["paper-short"]  # the paper's schedule / 16, nothing else changed
    assert (short.epochs, short.milestones) == (50, (12, 25, 38))
    assert short.replace(epochs=800, milestones=(200, 400, 600)) == p


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_terms_per_method(method):
    torch.manual_seed(0)
    b, c_old, c = 8, 3, 5
    logits, feats = torch.randn(b, c), torch.randn(b, 16)
    labels = torch.randint(c_old, c, (b,))
    t_logits, t_feats = torch.randn(b, c_old), torch.randn(b, 16)
    first = loss_terms(method, TINY, logits, feats, labels, None, None)
    assert set(first) == {"ce", "triplet"}  # task 1: no teacher, no distillation
    influence = torch.randn(b, c)  # BCT's old classifier's logits (bct only)
    later = loss_terms(method, TINY, logits, feats, labels, t_logits, t_feats, influence)
    assert set(later) == set(METHODS[method])
    if "bct" in later:
        assert torch.allclose(later["bct"], torch.nn.functional.cross_entropy(influence, labels))
    # each term is the csdkit loss on the right inputs (KD on the old-class slice only)
    assert torch.allclose(later["ce"], torch.nn.functional.cross_entropy(logits, labels))
    if "kd" in later:
        assert torch.allclose(later["kd"], losses.kd_loss(logits[:, :c_old], t_logits, T=2.0))
    if "csd" in later:
        want = losses.csd_loss(feats, t_feats, labels, 0.07, CSD_VARIANT[method])
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
    with pytest.raises(ValueError, match="another run.*lr_later.*Nothing was overwritten"):
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
        with pytest.raises(ValueError, match="CUDA is not available"):
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
    from csdkit.models import progress_bar

    monkeypatch.delenv("CI", raising=False)
    list(progress_bar(range(3), quiet=False, desc="epochs"))
    assert "epochs" in capsys.readouterr().err  # tqdm writes its bar to stderr
    list(progress_bar(range(3), quiet=True, desc="epochs"))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CI", "true")
    list(progress_bar(range(3), quiet=False, desc="epochs"))
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------
# A run's identity, resume and the order of saving and evaluating


def test_identity_holds_the_data_and_resume_refuses_other_data(tmp_path, tiny_data):
    from csdkit.runs import run_identity

    data, split = tiny_data
    ident = run_identity(TINY, "finetune", data)
    assert ident["data"] == data.digest() and ident["method"] == "finetune"
    # same config, other data (one test image changed): another identity, and the folder of
    # the first run refuses it
    other = copy.deepcopy(data)
    other.info.pop("digest", None)
    other.test.images[0] = 255 - other.test.images[0]
    assert run_identity(TINY, "finetune", other)["data"] != ident["data"]
    run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    with pytest.raises(ValueError, match=r"another run \(differs in: data;"):
        run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=(other, split))
    # another class order changes both the config and the data
    with pytest.raises(ValueError, match=r"class_order, data"):
        run(TINY.replace(class_order="natural"), "finetune", out_dir=tmp_path, quiet=True)


def test_resume_on_another_machine_is_refused_unless_asked(tmp_path, tiny_data, monkeypatch):
    from csdkit import train

    run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    monkeypatch.setattr(train, "machine", lambda device: "cpu (another one)")
    with pytest.raises(ValueError, match=r"trained on cpu \(.*\) in fp32.*cpu \(another one\)"
                                         r".*resume_anywhere"):
        run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    again = run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data,
                resume_anywhere=True)
    assert again.machine == "cpu (another one)"


def test_task_is_saved_before_it_is_evaluated(tmp_path, tiny_data, monkeypatch):
    from csdkit import train

    real_evaluate = train.evaluate

    def crash_on_task_1(model, data, split, task):
        if task == 1:
            raise RuntimeError("evaluation crashed")
        return real_evaluate(model, data, split, task)

    monkeypatch.setattr(train, "evaluate", crash_on_task_1)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run(TINY, "lwf", out_dir=tmp_path, quiet=True, data=tiny_data)
    _, meta = load_checkpoint(tmp_path / "task1.pt")
    assert meta["metrics"] == "null"  # the trained weights are there, not yet evaluated
    # the rerun trains nothing: it only evaluates the saved task
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    monkeypatch.setattr(train, "train_task", lambda *a, **k: pytest.fail("retrained a task"))
    resumed = run(TINY, "lwf", out_dir=tmp_path, quiet=True, data=tiny_data)
    monkeypatch.undo()
    full = run(TINY, "lwf", quiet=True, data=tiny_data)
    np.testing.assert_array_equal(resumed.recall, full.recall)  # NaN (unseen tasks) too
    assert resumed.seen_map == full.seen_map
    np.testing.assert_array_equal(
        json.loads(load_checkpoint(tmp_path / "task1.pt")[1]["metrics"])["row"], full.recall[1])


def test_a_first_task_serves_every_continual_method(tmp_path, tiny_data, monkeypatch):
    from csdkit import train

    run(TINY, "finetune", out_dir=tmp_path / "ft", quiet=True, data=tiny_data)
    trained = []
    real = train.train_task
    monkeypatch.setattr(train, "train_task", lambda *a, **k: trained.append(k["desc"]) or
                        real(*a, **k))
    shared = run(TINY, "lwf", out_dir=tmp_path / "lwf", quiet=True, data=tiny_data,
                 first_task=tmp_path / "ft" / "task0.pt")
    assert trained == ["lwf task 2"]  # task 1 came from finetune's checkpoint
    assert load_checkpoint(tmp_path / "lwf" / "task0.pt")[1]["method"] == "lwf"
    monkeypatch.undo()
    alone = run(TINY, "lwf", quiet=True, data=tiny_data)
    np.testing.assert_array_equal(shared.recall, alone.recall)
    assert shared.seen_recall == alone.seen_recall
    with pytest.raises(ValueError, match="another run.*epochs"):
        run(TINY.replace(epochs=1), "lwf", out_dir=tmp_path / "x", quiet=True, data=tiny_data,
            first_task=tmp_path / "ft" / "task0.pt")
    with pytest.raises(ValueError, match="not a first-task checkpoint"):
        run(TINY, "lwf", out_dir=tmp_path / "y", quiet=True, data=tiny_data,
            first_task=tmp_path / "ft" / "task1.pt")


def test_only_methods_that_distil_build_a_teacher(tiny_data, monkeypatch):
    from csdkit import train

    teachers = {}
    real = train.train_task
    monkeypatch.setattr(train, "train_task", lambda model, teacher, *a, **k: teachers.setdefault(
        k["desc"], teacher) or real(model, teacher, *a, **k))
    for method in ("finetune", "lwf"):
        run(TINY.replace(epochs=1), method, quiet=True, data=tiny_data)
    assert teachers["finetune task 2"] is None and teachers["lwf task 1"] is None
    assert isinstance(teachers["lwf task 2"], torch.nn.Module)


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(tmp_path, tiny_data):
    with pytest.raises(FloatingPointError, match=r"lwf task 2: the loss became non-finite in "
                                                 r"epoch 1 .*kd nan.*Lower the learning rate"):
        run(TINY.replace(w_kd=float("nan")), "lwf", out_dir=tmp_path, quiet=True,
            data=tiny_data)
    assert (tmp_path / "task0.pt").exists() and not (tmp_path / "task1.pt").exists()


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 2"),
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"lr_later": 0.0}, "lr_later must be > 0"),
])
def test_config_check_refuses_settings_that_cannot_train(change, message, tiny_data):
    with pytest.raises(ValueError, match=message):
        run(TINY.replace(**change), "finetune", quiet=True, data=tiny_data)


def test_load_checkpoint_of_a_file_without_class_count(tmp_path):
    torch.save({"model": {}, "depth": 8}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a csdkit checkpoint \\(no 'n_classes' entries\\)"):
        load_checkpoint(tmp_path / "old.pt")


def test_training_normalises_with_tensors_built_once_per_task(tiny_data, monkeypatch):
    # On CUDA a mean/std built from a tuple per batch is a blocking copy per step: train_task
    # must hand normalize() ready tensors on the device.
    from csdkit import train

    seen = []
    real = train.normalize
    monkeypatch.setattr(train, "normalize", lambda x, m, s: seen.append((m, s)) or real(x, m, s))
    data, split = tiny_data
    train_task(resnet(8, 5), None, data.train.of_classes(split.classes(0)), TINY, "finetune",
               data.mean, data.std, lr=1e-3, epochs=1, seed=0, quiet=True)
    assert len(seen) > 1 and all(isinstance(m, torch.Tensor) for m, _ in seen)
    assert len({id(m) for m, _ in seen}) == 1  # one tensor for the whole task


def test_machine_names_the_cpu_and_its_arithmetic():
    import platform
    import subprocess
    import sys

    from csdkit.runs import arithmetic_fingerprint as arithmetic
    from csdkit.runs import cpu_name, machine

    here = machine(torch.device("cpu"))
    assert cpu_name() in here and torch.backends.cpu.get_cpu_capability() in here
    assert arithmetic() in here and len(arithmetic()) == 8
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the instruction-set caps below are x86 ones")
    # a learner's oldest CPU, emulated: another arithmetic, hence another machine (and cache)
    code = "import torch; from csdkit.runs import machine; print(machine(torch.device('cpu')))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert other != here and cpu_name() in other


def test_bf16_stays_off_on_a_gpu_without_native_bf16(monkeypatch):
    from csdkit import train

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert train.speed_options(TINY, cuda)[0] is False
    assert train.precision(TINY, cuda) == "fp32 (this GPU has no native bf16)"
    assert train.speed_options(TINY.replace(bf16="always"), cuda)[0] is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert train.speed_options(TINY, cuda)[0] is True
    assert train.precision(TINY, cuda) == "bf16 autocast"
    assert train.precision(TINY, torch.device("cpu")) == "fp32"


# ------------------------------------------------------------------------------------------
# Settings reach the losses, checks where a user's input enters, the frozen teacher in run()


def test_loss_terms_use_the_configs_margin_and_temperatures():
    """Non-default settings, against the formulas worked out here (not csdkit's losses)."""
    torch.manual_seed(1)
    cfg = TINY.replace(kd_temperature=4.0, csd_temperature=0.5, triplet_margin=0.3)
    b, c_old = 8, 3
    logits, feats = torch.randn(b, 5), torch.randn(b, 16)
    labels = torch.tensor([3, 3, 4, 4, 3, 4, 3, 4])
    t_logits, t_feats = torch.randn(b, c_old), torch.randn(b, 16)
    got = loss_terms("csd", cfg, logits, feats, labels, t_logits, t_feats)
    # KD: 1/B sum_i KL(softmax(t_i / T) || softmax(s_i / T)) over the old classes, no T^2
    q = torch.softmax(t_logits / 4.0, 1)
    p = torch.softmax(logits[:, :c_old] / 4.0, 1)
    assert got["kd"].item() == pytest.approx((q * (q.log() - p.log())).sum(1).mean().item(),
                                             rel=1e-5)
    # batch-hard triplet with cosine distance, one anchor at a time
    f = torch.nn.functional.normalize(feats, dim=1)
    per_anchor = []
    for a in range(b):
        pos = [1 - f[a] @ f[j] for j in range(b) if j != a and labels[j] == labels[a]]
        neg = [1 - f[a] @ f[j] for j in range(b) if labels[j] != labels[a]]
        per_anchor.append(max(0.0, float(max(pos) - min(neg)) + 0.3))
    assert got["triplet"].item() == pytest.approx(np.mean(per_anchor), rel=1e-5)
    # Eq. 8 at tau = 0.5: teacher anchors, student contrast set, positives include p = i
    s, t = f, torch.nn.functional.normalize(t_feats, dim=1)
    total = 0.0
    for i in range(b):
        others = [a for a in range(b) if a != i]
        log_den = torch.logsumexp(torch.stack([t[i] @ s[a] / 0.5 for a in others]), 0)
        positives = [j for j in range(b) if labels[j] == labels[i]]
        total += -sum(float(t[i] @ s[j] / 0.5 - log_den) for j in positives) / len(positives)
    assert got["csd"].item() == pytest.approx(total / b, rel=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"compile": "always"}, "compile must be True, False or one of"),
    ({"image_size": 0}, "image_size must be an integer >= 4"),
    ({"epochs_first": 2.5}, "epochs_first must be an integer >= 1"),
    ({"epochs": 2.0}, "epochs must be an integer >= 1"),
])
def test_config_check_refuses_values_that_used_to_slip_through(change, message, tiny_data):
    with pytest.raises(ValueError, match=message):
        run(TINY.replace(**change), "finetune", quiet=True, data=tiny_data)


@pytest.mark.parametrize("last", [-1, 2, 0.5])
def test_last_task_outside_the_run_is_refused(last, tiny_data):
    with pytest.raises(ValueError, match=r"last_task must be a task index 0\.\.1"):
        run(TINY, "finetune", quiet=True, data=tiny_data, last_task=last)


def test_compile_on_a_cpu_says_it_is_ignored():
    from csdkit.train import speed_options

    with pytest.warns(UserWarning, match="acts on CUDA only"):
        assert speed_options(TINY.replace(compile="reduce-overhead"), torch.device("cpu"))[2] \
            is None


def test_cuda_runs_are_made_deterministic_and_fp32_means_fp32(monkeypatch):
    from csdkit import train

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        train.make_cuda_deterministic()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def test_run_distils_from_a_frozen_teacher_in_eval_mode(tiny_data, monkeypatch):
    from csdkit import train

    seen = []
    real = train.train_task

    def spy(model, teacher, *a, **k):
        if teacher is not None:
            seen.append((teacher.training, any(p.requires_grad for p in teacher.parameters()),
                         teacher is model, model.training))
        return real(model, teacher, *a, **k)

    monkeypatch.setattr(train, "train_task", spy)
    run(TINY.replace(epochs=1), "fd", quiet=True, data=tiny_data)
    assert seen == [(False, False, False, True)]  # eval mode, no grad, a copy; student trains


def test_run_reports_the_compatibility_matrix_of_its_models(tmp_path, tiny_data):
    from csdkit import metrics
    from csdkit.models import extract

    data, split = tiny_data
    r = run(TINY.replace(n_tasks=2), "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    M = np.asarray(r.compatibility, dtype=float)
    assert M.shape == (2, 2) and np.isnan(M[0, 1])
    # the diagonal is each model's own R@1 on task 1's test images: the task matrix's column 0
    np.testing.assert_array_equal(np.diag(M), np.asarray(r.recall)[:, 0])
    # the lower triangle: the final model's queries in the first model's gallery, rebuilt from
    # the checkpoints
    first = data.test.of_classes(split.classes(0))
    f0, f1 = (extract(load_checkpoint(tmp_path / f"task{t}.pt")[0], first.images, data.mean,
                      data.std)[0] for t in (0, 1))
    assert M[1, 0] == pytest.approx(metrics.recall_at_k(f1, first.labels, gallery=f0))
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["AC"] == float(M[1, 0] >= M[0, 0])
    assert saved["AM"] == pytest.approx((M[0, 0] + M[1, 0] + M[1, 1]) / 3)


def test_prepare_is_memoised_on_what_it_reads_only():
    """The same data object for configs that differ in training settings only; other data
    wherever the seed's class order or an explicit order (a list) differs."""
    seeded = TINY.replace(class_order="seed")
    a = prepare(seeded)
    assert prepare(seeded.replace(lr_later=0.5, epochs=7, w_fd=3.0)) is a
    b = prepare(seeded.replace(seed=1))
    assert b is not a and b[1].class_order != a[1].class_order
    order = list(reversed(range(10)))
    c = prepare(TINY.replace(class_order=order))
    assert c[1].class_order == order and prepare(TINY.replace(class_order=order)) is c
    assert prepare(TINY.replace(class_order=list(range(10))))[1].class_order == list(range(10))

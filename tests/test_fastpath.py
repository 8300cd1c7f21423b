"""The fast training path (bf16 autocast + channels_last) computes what the plain path computes.

On CUDA these switches are on by default; here they are forced on the CPU with "always", so the
same code is checked without a GPU. Also a smoke test of the benchmark scripts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from csdkit.data import normalize
from csdkit.models import resnet
from csdkit.train import Config, batch_loss, prepare, run, speed_options

SMALL = Config(n_tasks=2, epochs=4, batch_size=64, depth=8, seed=0)
PLAIN = SMALL.replace(bf16=False, channels_last=False, compile=False)
FAST = SMALL.replace(bf16="always", channels_last="always")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def small_data():
    return prepare(SMALL)


def test_speed_options_resolve_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no GPU needed to build a device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert speed_options(Config(), cpu) == (False, False, None)  # defaults: plain fp32 on CPU
    assert speed_options(Config(compile=True), cpu) == (False, False, None)
    assert speed_options(Config(), cuda) == (True, True, None)
    assert speed_options(Config(compile=True), cuda)[2] == "max-autotune-no-cudagraphs"
    assert speed_options(Config(compile="reduce-overhead"), cuda)[2] == "reduce-overhead"
    assert speed_options(FAST, cpu) == (True, True, None)
    assert speed_options(PLAIN, cuda) == (False, False, None)
    with pytest.raises(ValueError, match="bf16 must be"):
        speed_options(Config(bf16="yes"), cpu)


@pytest.mark.parametrize("method", ["csd", "csd_official", "fd"])
def test_fast_batch_loss_matches_plain(small_data, method):
    data, split = small_data
    torch.manual_seed(0)
    model = resnet(8, 5)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.classifier.grow(5)
    task = data.train.of_classes(split.classes(1))
    x, y = normalize(task.images[:64], data.mean, data.std), task.labels[:64]

    loss, terms = batch_loss(model, teacher, x, y, method, PLAIN, bf16=False)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fast_teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x_cl)[1].dtype == torch.bfloat16  # autocast really runs the convs in bf16
    f_loss, f_terms = batch_loss(fast, fast_teacher, x_cl, y, method, FAST, bf16=True)
    f_grads = torch.autograd.grad(f_loss, list(fast.parameters()))

    assert f_loss.dtype == torch.float32 and set(f_terms) == set(terms)
    assert not torch.equal(f_loss, loss)  # a different computation...
    torch.testing.assert_close(f_loss, loss, rtol=1e-2, atol=1e-2)  # ...the same loss
    for k in terms:
        torch.testing.assert_close(f_terms[k], terms[k], rtol=2e-2, atol=2e-3, msg=k)
    flat = torch.cat([g.flatten() for g in grads])
    f_flat = torch.cat([g.flatten() for g in f_grads])
    assert torch.nn.functional.cosine_similarity(flat, f_flat, dim=0) > 0.99


def test_fast_training_reaches_the_same_recall(small_data):
    plain = run(PLAIN, "csd", quiet=True, data=small_data)
    fast = run(FAST, "csd", quiet=True, data=small_data)
    assert plain.seen_recall[-1] > 0.8  # both actually learned
    assert abs(fast.seen_recall[-1] - plain.seen_recall[-1]) < 0.03
    assert abs(fast.seen_recall[0] - plain.seen_recall[0]) < 0.03


@pytest.mark.parametrize("method", ["bct", "simplex+fd"])
def test_compatible_methods_take_the_fast_path_too(small_data, method):
    plain = run(PLAIN, method, quiet=True, data=small_data)
    fast = run(FAST, method, quiet=True, data=small_data)
    assert plain.seen_recall[-1] > 0.8
    assert abs(fast.seen_recall[-1] - plain.seen_recall[-1]) < 0.03


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    result = _load("bench_train").main(["--quick", "--workers", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("device", "torch", "rows", "speedup_at_128", "cpu_count", "torch_threads"):
        assert key in saved
    assert {r["pipeline"] for r in saved["rows"]} == {"baseline", "csdkit"}
    assert all(r["images_per_s"] > 0 and r["batch_size"] in (8, 16) for r in saved["rows"])
    assert saved["speedup_at_128"] is None  # --quick runs batches 8 and 16 only
    with pytest.raises(SystemExit, match="exists; pass --out another path"):
        _load("bench_train").main(["--quick", "--workers", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == saved  # the first results are still there


def test_bench_retrieval_quick(tmp_path):
    out = tmp_path / "retrieval.json"
    _load("bench_retrieval").main(["--quick", "--in-process", "--devices", "cpu", "--out",
                                   str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["metric"], r["n"]) for r in rows] == [("recall@1", 500), ("recall@1", 1000),
                                                     ("mAP", 500)]
    assert all(0 < r["value"] <= 1 and r["seconds"] >= 0 for r in rows)
    with pytest.raises(SystemExit, match="exists; pass --out another path"):
        _load("bench_retrieval").main(["--quick", "--in-process", "--devices", "cpu", "--out",
                                       str(out)])

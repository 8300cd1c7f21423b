"""csdkit.runs: what names a run, atomic files, and the shared first task."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from csdkit import runs
from csdkit.runs import run_grid
from csdkit.train import Config, prepare, run

TINY = Config(n_tasks=2, epochs=1, batch_size=64, depth=8, seed=0)


@pytest.fixture(scope="module")
def tiny_data():
    return prepare(TINY)


@pytest.mark.parametrize("change", [{"channels_last": False}, {"channels_last": "always"},
                                    {"compile": True}, {"compile": "reduce-overhead"}])
def test_knobs_that_change_gpu_kernels_are_part_of_the_identity(change, tiny_data, tmp_path):
    data = tiny_data[0]
    assert runs.run_identity(TINY.replace(**change), "finetune", data) != \
        runs.run_identity(TINY, "finetune", data)
    run(TINY, "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)
    knob = next(iter(change))
    with pytest.raises(ValueError, match=f"another run \\(differs in: {knob};"):
        run(TINY.replace(**change), "finetune", out_dir=tmp_path, quiet=True, data=tiny_data)


def test_the_device_and_where_the_data_live_are_not(tiny_data):
    data = tiny_data[0]
    same = TINY.replace(device="cpu", data_root="elsewhere", bf16=False)
    assert runs.run_identity(same, "finetune", data) == runs.run_identity(TINY, "finetune", data)


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(runs.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(runs.os, "replace", lambda a, b: calls.append("replace") or
                        real_replace(a, b))
    runs.write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert calls == ["fsync", "replace"]
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 1}
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_a_shared_first_task_is_saved_under_the_later_task_defaults():
    cfg = TINY.replace(lr_later=1e-2, w_fd=3.0, csd_temperature=1.0, epochs=7)
    first = runs.first_task_config(cfg)
    assert (first.lr_later, first.w_fd, first.csd_temperature) == (1e-3, 1.0, 0.07)
    assert first.epochs == 7  # a setting of the first task itself stays


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "x.json"
    runs.write_json(target, {"v": 1})

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_written_files_get_the_users_usual_permissions(tmp_path):
    umask = os.umask(0o22)
    os.umask(umask)
    runs.write_json(tmp_path / "r.json", {})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_grid_stopped_after_a_task_is_the_full_runs_beginning(tmp_path):
    """last_task=1 trains tasks 1-2 of each run; the whole run then resumes from them (tasks
    3-5 trained once, tasks 1-2 not again) and its rows equal those of a separate, uninterrupted
    run of the same config and seed in another folder; the stopped run's rows are its first."""
    cfg = TINY.replace(n_tasks=5)
    whole = run_grid([(cfg, "fd")], tmp_path / "whole", workers=1)[0]
    stopped = run_grid([(cfg, "fd")], tmp_path / "split", workers=1, last_task=1)[0]
    (folder,) = [p for p in (tmp_path / "split").iterdir() if "-fd-" in p.name]
    assert len(stopped.recall) == 2 and not (folder / "result.json").exists()
    assert sorted(p.name for p in folder.glob("task*.pt")) == ["task0.pt", "task1.pt"]
    stamp = (folder / "task1.pt").stat().st_mtime_ns
    resumed = run_grid([(cfg, "fd")], tmp_path / "split", workers=1)[0]
    assert (folder / "task1.pt").stat().st_mtime_ns == stamp  # loaded, not trained again
    assert resumed.seconds[:2] == stopped.seconds
    np.testing.assert_array_equal(resumed.recall, whole.recall)  # NaN above the diagonal
    np.testing.assert_array_equal(stopped.recall, whole.recall[:2])


def test_two_workers_compute_what_one_does_and_keep_their_pool(tmp_path):
    """Runs trained two at a time in spawned workers equal the same runs trained in this
    process; a second grid reuses the workers (a new pool costs seconds of imports)."""
    grid = [(TINY, "finetune"), (TINY, "fd"), (TINY.replace(seed=1), "fd")]
    alone = run_grid(grid, tmp_path / "one", workers=1)
    two = run_grid(grid, tmp_path / "two", workers=2)
    pool = runs._POOLS[2]
    again = run_grid([(TINY.replace(seed=2), m) for m in ("finetune", "fd")], tmp_path / "two",
                     workers=2)
    assert runs._POOLS[2] is pool and len(again) == 2
    for a, b in zip(alone, two, strict=True):
        np.testing.assert_array_equal(a.recall, b.recall)
        np.testing.assert_array_equal(a.compatibility, b.compatibility)

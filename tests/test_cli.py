"""The command line: demo and run, end to end on tiny settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from csdkit.cli import main


def test_demo_writes_tables_and_figures(tmp_path, capsys):
    main(["demo", "--seeds", "2", "--methods", "finetune", "csd", "--epochs", "1",
          "--tasks", "2", "--workers", "1", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert "raw pixels" in out and "untrained net" in out and "csd - finetune" in out
    folder = tmp_path / "digits"
    for name in ("results.json", "summary.csv", "paired.csv", "task_matrices.png",
                 "recall_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    res = json.loads((folder / "results.json").read_text())
    assert len(res["runs"]) == 4  # 2 methods x 2 seeds
    table = pd.read_csv(folder / "summary.csv", index_col=0)
    # the table's mean is the mean over the stored per-seed runs
    finals = [r["seen_recall"][-1] for r in res["runs"] if r["method"] == "csd"]
    mean = float(table.loc["csd", "final_R@1"].split(" ± ")[0])
    assert mean == pytest.approx(sum(finals) / 2, abs=6e-4)


def test_demo_refuses_a_single_seed(tmp_path):
    with pytest.raises(SystemExit, match="seeds >= 2"):
        main(["demo", "--seeds", "1", "--out", str(tmp_path)])


def test_run_trains_resumes_and_refuses_bad_input(tmp_path, capsys):
    args = ["run", "--method", "lwf", "--tasks", "2", "--epochs", "1", "--out",
            str(tmp_path / "r"), "--quiet"]
    main(args)
    first = json.loads((tmp_path / "r" / "result.json").read_text())
    assert [p.name for p in sorted((tmp_path / "r").glob("task*.pt"))] == ["task0.pt", "task1.pt"]
    main(args)  # everything is already trained: resumes, retrains nothing, same numbers
    assert json.loads((tmp_path / "r" / "result.json").read_text())["recall"] == first["recall"]
    assert "final R@1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="csdkit: error: 3 tasks do not divide 10 classes"):
        main(["run", "--tasks", "3", "--out", str(tmp_path / "x"), "--quiet"])
    with pytest.raises(SystemExit, match="imagefolder.*--data-path"):
        main(["run", "--dataset", "imagefolder", "--out", str(tmp_path / "y"), "--quiet"])
    with pytest.raises(SystemExit, match="another run.*Nothing was overwritten"):
        main(["run", "--method", "lwf", "--tasks", "2", "--epochs", "2", "--out",
              str(tmp_path / "r"), "--quiet"])
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "mnist"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for opt in ("--preset", "--method", "--dataset", "--tasks", "--first-task", "--increment",
                "--class-order", "--epochs", "--device", "--out", "--data-root"):
        assert opt in text


def test_reference_rows_use_each_seeds_own_test_split():
    from csdkit.cli import demo_config, reference_rows
    from csdkit.metrics import recall_at_k
    from csdkit.train import prepare

    cfg = demo_config("digits")
    rows = reference_rows(cfg, [0, 1])
    raw = {r["seed"]: r["final_R@1"] for r in rows if r["method"] == "raw pixels"}
    for seed in (0, 1):
        test = prepare(cfg.replace(seed=seed))[0].test  # the seed draws digits' test split
        assert raw[seed] == recall_at_k(test.images.flatten(1).float(), test.labels)
    assert raw[0] != raw[1]

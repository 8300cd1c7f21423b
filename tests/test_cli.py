"""The command line: demo and run, end to end on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from csdkit.cli import main


def test_demo_writes_tables_and_figures_and_never_overwrites_another_demo(tmp_path, capsys):
    args = ["demo", "--preset", "quick", "--seeds", "2", "--methods", "finetune", "csd",
            "--epochs", "1", "--tasks", "2", "--workers", "1", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "demo")]
    main(args)
    out = capsys.readouterr().out
    assert "raw pixels" in out and "untrained net" in out and "csd - finetune" in out
    assert "Bonferroni" in out and "beyond_noise_all" in out
    (folder,) = (tmp_path / "demo").iterdir()
    assert folder.name.startswith("quick-digits-")
    for name in ("results.json", "summary.csv", "paired.csv", "task_matrices.png",
                 "recall_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    res = json.loads((folder / "results.json").read_text())
    assert len(res["runs"]) == 4  # 2 methods x 2 seeds
    table = pd.read_csv(folder / "summary.csv", index_col=0)
    # the table's means are the means over the stored per-seed runs
    csd = [r for r in res["runs"] if r["method"] == "csd"]
    pooled = float(table.loc["csd", "pooled_R@1"].split(" ± ")[0])
    assert pooled == pytest.approx(np.mean([r["seen_recall"][-1] for r in csd]), abs=6e-4)
    avg = float(table.loc["csd", "task_avg_R@1"].split(" ± ")[0])
    assert avg == pytest.approx(np.mean([np.mean(r["recall"][-1]) for r in csd]), abs=6e-4)
    # another configuration (one epoch more) writes beside it, never over it
    stamp = (folder / "results.json").read_bytes()
    main([*args, "--epochs", "2"])  # argparse: the last --epochs wins
    assert len(list((tmp_path / "demo").iterdir())) == 2
    assert (folder / "results.json").read_bytes() == stamp


def test_a_demo_on_another_machine_writes_its_own_folder(tmp_path, monkeypatch):
    from csdkit import runs

    args = ["demo", "--preset", "quick", "--seeds", "2", "--methods", "finetune", "--epochs",
            "1", "--tasks", "2", "--workers", "1", "--cache", str(tmp_path / "cache"), "--out",
            str(tmp_path / "demo")]
    main(args)
    (here,) = (tmp_path / "demo").iterdir()
    stamp = (here / "results.json").read_bytes()
    monkeypatch.setattr(runs, "machine", lambda device: "cpu (another CPU, AVX512)")
    main(args)  # same configuration, another machine: other numbers, so another folder
    assert len(list((tmp_path / "demo").iterdir())) == 2
    assert (here / "results.json").read_bytes() == stamp


def test_demo_refuses_a_single_seed(tmp_path):
    with pytest.raises(SystemExit, match="seeds >= 2"):
        main(["demo", "--seeds", "1", "--out", str(tmp_path)])


def test_run_trains_resumes_and_refuses_bad_input(tmp_path, capsys):
    args = ["run", "--method", "lwf", "--tasks", "2", "--epochs", "1", "--out",
            str(tmp_path / "r"), "--quiet"]
    main(args)
    first = json.loads((tmp_path / "r" / "result.json").read_text())
    # both summaries, under names that say what they are
    assert first["task_avg_R@1"] == pytest.approx(np.mean(first["recall"][-1]))
    assert first["pooled_R@1"] == first["seen_recall"][-1]
    assert [p.name for p in sorted((tmp_path / "r").glob("task*.pt"))] == ["task0.pt", "task1.pt"]
    main(args)  # everything is already trained: resumes, retrains nothing, same numbers
    assert json.loads((tmp_path / "r" / "result.json").read_text())["recall"] == first["recall"]
    out = capsys.readouterr().out
    assert "the paper's Average" in out and "R@1 pooled over all seen classes" in out
    assert "compatibility matrix on task 1's test images" in out and "AC (share" in out
    assert {"AC", "AM", "compatibility"} <= set(first)
    assert f"{first['recall'][-1][0] / 2 + first['recall'][-1][1] / 2:.4f}" in out
    with pytest.raises(SystemExit, match="csdkit: error: 3 tasks do not divide 10 classes"):
        main(["run", "--tasks", "3", "--out", str(tmp_path / "x"), "--quiet"])
    with pytest.raises(SystemExit, match="imagefolder.*--data-path"):
        main(["run", "--dataset", "imagefolder", "--out", str(tmp_path / "y"), "--quiet"])
    with pytest.raises(SystemExit, match="another run.*epochs.*Nothing was overwritten"):
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


def test_reference_rows_are_raw_pixels_and_an_untrained_net_on_each_seeds_split():
    from csdkit.metrics import recall_at_k
    from csdkit.report import reference_rows
    from csdkit.train import prepare, preset

    cfg = preset("quick").replace(class_order="seed")  # the seed draws the class order
    rows = reference_rows(cfg, [0, 1])
    raw = {r["seed"]: r for r in rows if r["method"] == "raw pixels"}
    for seed in (0, 1):
        data, split = prepare(cfg.replace(seed=seed))
        test = data.test
        assert raw[seed]["pooled_R@1"] == recall_at_k(test.images.flatten(1).float(), test.labels)
        first = test.of_classes(split.classes(0))
        assert raw[seed]["first_task_R@1"] == recall_at_k(first.images.flatten(1).float(),
                                                          first.labels)
    # the test split is the same for both seeds (pooled equal), the first task is not
    assert raw[0]["pooled_R@1"] == raw[1]["pooled_R@1"]
    assert raw[0]["first_task_R@1"] != raw[1]["first_task_R@1"]


def test_reference_curves_against_sklearn_neighbours_and_a_counted_chance():
    """Raw-pixel R@1 after each task on the seen classes' test images, by scikit-learn's
    brute-force cosine neighbours; chance by counting same-class pairs; both on the plot."""
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.neighbors import NearestNeighbors

    from csdkit.report import plot_recall_curves, reference_rows
    from csdkit.train import prepare, preset, run

    cfg = preset("quick").replace(class_order="seed", n_tasks=2, epochs=1)
    raw = [r for r in reference_rows(cfg, [3]) if r["method"] == "raw pixels"][0]
    data, _ = prepare(cfg.replace(seed=3))
    for t in range(2):
        seen = data.test.labels < 5 * (t + 1)  # 5 classes a task, labels in class order
        labels, x = data.test.labels[seen].numpy(), data.test.images[seen].flatten(1).numpy()
        nn = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(x)
        hit = labels[nn.kneighbors(x)[1][:, 1]] == labels
        same = sum((labels == c).sum() * ((labels == c).sum() - 1) for c in set(labels))
        assert raw["seen_recall"][t] == pytest.approx(hit.mean(), abs=2 / len(labels))  # ties
        assert raw["seen_chance"][t] == pytest.approx(same / (len(labels) * (len(labels) - 1)))
    assert raw["seen_recall"][-1] == raw["pooled_R@1"]  # after the last task: every class
    fig = plot_recall_curves([run(cfg.replace(seed=3), "finetune", quiet=True)],
                             references=reference_rows(cfg, [3]))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"finetune", "raw pixels", "untrained net", "chance"} <= set(labels)


def test_task_changes_by_hand_and_both_views_on_their_fixed_scales():
    """The change view: R[t][j] - R[j][j] below the diagonal, worked by hand; the figure draws
    R@1 on RECALL_SCALE and the change on the diverging CHANGE_SCALE, whatever the values."""
    import matplotlib

    matplotlib.use("Agg")
    from csdkit.report import CHANGE_SCALE, RECALL_SCALE, plot_task_matrices, task_changes
    from csdkit.train import RunResult

    nan = float("nan")
    R = [[0.9, nan, nan], [0.7, 0.8, nan], [0.6, 0.85, 1.0]]
    expected = [[nan, nan, nan], [0.7 - 0.9, nan, nan], [0.6 - 0.9, 0.85 - 0.8, nan]]
    np.testing.assert_allclose(task_changes(R), expected)  # NaN where expected is NaN
    runs = [RunResult("finetune", {}, [], [], recall=R),
            RunResult("finetune", {}, [], [], recall=np.add(R, 0.05).tolist())]
    fig = plot_task_matrices(runs)
    top, bottom = (ax.collections[0] for ax in fig.axes[:2])
    assert top.get_clim() == RECALL_SCALE and bottom.get_clim() == CHANGE_SCALE
    # the unmasked cells, row by row, of the mean over the two seeds
    np.testing.assert_allclose(top.get_array().compressed(),
                               [0.925, 0.725, 0.825, 0.625, 0.875, 1.025])
    np.testing.assert_allclose(bottom.get_array().compressed(), [-0.2, -0.3, 0.05])


def test_run_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    from csdkit import cli

    with pytest.raises(SystemExit, match="csdkit: error: batch_size must be an integer >= 2"):
        main(["run", "--batch-size", "0", "--out", str(tmp_path / "a"), "--quiet"])
    # --increment alone: the task count follows from it (first task = increment = 5 of the
    # 10 digits: 2 tasks), not from the preset's 5 tasks
    main(["run", "--increment", "5", "--epochs", "1", "--method", "finetune", "--out",
          str(tmp_path / "b"), "--quiet"])
    assert json.loads((tmp_path / "b" / "result.json").read_text())["increments"] == [5, 5]
    main(["run", "--first-task", "6", "--increment", "2", "--epochs", "1", "--method",
          "finetune", "--out", str(tmp_path / "c"), "--quiet"])
    assert json.loads((tmp_path / "c" / "result.json").read_text())["increments"] == [6, 2, 2]

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "run", out_of_memory)
    with pytest.raises(SystemExit, match="ran out of memory. Use a smaller --batch-size"):
        main(["run", "--epochs", "1", "--out", str(tmp_path / "d"), "--quiet"])

    def internal_bug(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "run", internal_bug)
    with pytest.raises(RuntimeError, match="an internal bug"):  # not a SystemExit
        main(["run", "--epochs", "1", "--out", str(tmp_path / "e"), "--quiet"])


def test_run_default_folder_names_the_data(tmp_path, monkeypatch):
    """Two image folders, same options: two output folders, and an explicit folder of one
    refuses the other's data."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("A", "B"):
        for c in range(4):
            (tmp_path / name / f"class{c}").mkdir(parents=True)
            for i in range(12):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / name / f"class{c}" / f"{i}.png")
    args = ["run", "--dataset", "imagefolder", "--tasks", "2", "--epochs", "1", "--batch-size",
            "8", "--method", "finetune", "--quiet"]
    main([*args, "--data-path", "A"])
    main([*args, "--data-path", "B"])
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("imagefolder-finetune-seed0-")
                                     for f in folders)
    main([*args, "--data-path", "A", "--out", "mine"])
    with pytest.raises(SystemExit, match="another run \\(differs in: data"):
        main([*args, "--data-path", "B", "--out", "mine"])

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metapearl import train
from metapearl.cli import main
from metapearl.logging import read_progress
from metapearl.plots import PlotError, _aligned, adaptation_rollouts, group_runs


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory):
    """Three seeds of a tiny sparse-point-robot run and one run with another kl_lambda."""
    from conftest import TINY

    from metapearl.config import make_config

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed, kl in [(0, 0.05), (1, 0.05), (2, 0.05), (0, 0.5)]:
        cfg = make_config("sparse-point-robot", "default",
                          {**TINY, "seed": seed, "kl_lambda": kl, "num_iterations": 3,
                           "num_exp_traj_eval": 2})
        run = root / f"kl{kl}-s{seed}"
        train(cfg, run, progress=False)
        runs.append(run)
    return runs


def test_runs_are_grouped_by_config_without_seed_by_key_and_by_label(sparse_runs, tmp_path):
    groups = group_runs([str(r) for r in sparse_runs])
    assert groups == {"kl_lambda=0.05": sparse_runs[:3], "kl_lambda=0.5": sparse_runs[3:]}
    # a run written before fields existed groups with runs holding their default values
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((sparse_runs[1] / "config.json").read_text())
    del config["encoder"], config["tensorboard"]
    (old / "config.json").write_text(json.dumps(config))
    assert group_runs([str(sparse_runs[0]), str(old)]) == {
        "sparse-point-robot": [sparse_runs[0], old]}
    assert group_runs([str(r) for r in sparse_runs], by="seed") == {
        "seed=0": [sparse_runs[0], sparse_runs[3]], "seed=1": [sparse_runs[1]],
        "seed=2": [sparse_runs[2]]}
    labelled = group_runs([f"a={sparse_runs[0]}", f"a={sparse_runs[3]}", f"b={sparse_runs[1]}"])
    assert labelled == {"a": [sparse_runs[0], sparse_runs[3]], "b": [sparse_runs[1]]}
    assert group_runs([str(sparse_runs[0])]) == {"sparse-point-robot": [sparse_runs[0]]}
    with pytest.raises(PlotError, match="config key 'nope'"):
        group_runs([str(sparse_runs[0])], by="nope")
    with pytest.raises(PlotError, match="is given twice"):
        group_runs([str(sparse_runs[0]), f"x={sparse_runs[0]}/"])
    # runs of another family differ in many keys: the family names the groups where it is enough
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(
        {**config, "family": "point-robot", "discount": 0.99, "reward_scale": 5.0}))
    assert group_runs([str(sparse_runs[0]), str(sparse_runs[1]), str(other)]) == {
        "family=sparse-point-robot": sparse_runs[:2], "family=point-robot": [other]}
    assert set(group_runs([str(sparse_runs[0]), str(sparse_runs[3]), str(other)])) == {
        f"discount={d}, family={f}, kl_lambda={k}, reward_scale={r}" for d, f, k, r in
        [(0.9, "sparse-point-robot", 0.05, 20.0), (0.9, "sparse-point-robot", 0.5, 20.0),
         (0.99, "point-robot", 0.05, 5.0)]}


def test_group_curve_is_the_mean_over_seeds_at_shared_evaluations(sparse_runs):
    steps, values = _aligned(sparse_runs[:3], "AverageReturn_all_test_tasks")
    rows = [read_progress(r / "progress.csv") for r in sparse_runs[:3]]
    expected = np.array([[float(x["AverageReturn_all_test_tasks"]) for x in r] for r in rows])
    np.testing.assert_allclose(values, expected)
    np.testing.assert_allclose(steps, np.mean([[float(x["Number of env steps total"]) for x in r]
                                               for r in rows], axis=0))


def test_plot_command_writes_every_figure(sparse_runs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", *map(str, sparse_runs), "--out", str(out), "--tasks", "2"]) == 0
    names = ["learning_curves", "success_curves", "adaptation_curves",
             "posterior_kl_lambda_0.05", "exploration_kl_lambda_0.05", "posterior_kl_lambda_0.5",
             "exploration_kl_lambda_0.5"]
    for name in names:
        for suffix in (".png", ".svg"):
            assert (out / (name + suffix)).stat().st_size > 5_000, name + suffix
    assert len(capsys.readouterr().out.splitlines()) == 2 * len(names)
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a metapearl run directory" in capsys.readouterr().err


def test_plot_command_skips_success_curves_of_a_family_without_success(sparse_runs, tmp_path):
    # as a MuJoCo family's progress.csv: the success columns are in the header but empty
    runs = []
    for i, src in enumerate(sparse_runs[:2]):
        run = tmp_path / f"run{i}"
        shutil.copytree(src, run)
        rows = read_progress(run / "progress.csv")
        for row in rows:
            row["SuccessRate_test_tasks"] = row["SuccessRate_train_tasks"] = ""
        with (run / "progress.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        runs.append(run)
    out = tmp_path / "figs"
    assert main(["plot", *map(str, runs), "--out", str(out), "--tasks", "0"]) == 0
    assert (out / "learning_curves.png").exists() and (out / "adaptation_curves.png").exists()
    assert not (out / "success_curves.png").exists()


def test_adaptation_rollouts_follow_the_meta_test_protocol(sparse_runs):
    rollouts = adaptation_rollouts(sparse_runs[0], num_tasks=2)
    assert len(rollouts) == 2
    for r in rollouts:
        assert len(r["trajectories"]) == 4  # num_steps_per_eval 40 / max_path_length 10
        assert all(len(obs) == 10 for obs, _ in r["trajectories"])
        n0, mu0, var0 = r["posterior"][0]
        assert n0 == 0 and np.all(mu0 == 0) and np.all(var0 == 1)  # the prior
        sizes = [p[0] for p in r["posterior"]]
        assert sizes == sorted(sizes) and sizes[-1] == 40


def test_posterior_picture_reads_marginal_variances_of_lowrank_factors(tmp_path):
    from conftest import TINY

    from metapearl.config import make_config

    cfg = make_config("point-robot", "default", {**TINY, "num_iterations": 1, "factor_rank": 1})
    train(cfg, tmp_path / "run", progress=False)
    r = adaptation_rollouts(tmp_path / "run", num_tasks=1)[0]
    n0, mu0, var0 = r["posterior"][0]
    assert var0.shape == (cfg.latent_size,) and np.all(var0 == 1)  # the prior's diagonal
    _, mu, var = r["posterior"][-1]
    assert var.shape == mu.shape == (cfg.latent_size,) and np.all(var > 0)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figs"),
                 "--tasks", "1"]) == 0
    assert (tmp_path / "figs" / "posterior.png").exists()


@pytest.fixture(scope="module")
def cheetah_run(tmp_path_factory):
    pytest.importorskip("mujoco")
    run = tmp_path_factory.mktemp("video") / "cv"
    sets = dict(num_iterations=1, num_train_tasks=2, num_test_tasks=2, num_initial_steps=30,
                num_tasks_sample=1, num_steps_prior=30, num_extra_rl_steps_posterior=0,
                num_train_steps_per_itr=2, num_steps_per_eval=30, max_path_length=15,
                net_size=16, encoder_size=16, meta_batch=2, batch_size=8,
                embedding_batch_size=8, num_exp_traj_eval=1)  # 2 trajectories: adapt the 2nd
    argv = ["train", "cheetah-vel", "--out", str(run), "--no-progress"]
    assert main(argv + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    return run


def test_video_renders_the_adaptation_episodes(cheetah_run, tmp_path, capsys):
    import imageio.v2 as imageio

    gif = tmp_path / "task1.gif"
    args = ["video", str(cheetah_run), "--task", "1", "--out", str(gif), "--every", "4",
            "--width", "96", "--height", "64"]
    assert main(args) == 0
    assert "returns of the trajectories" in capsys.readouterr().out
    frames = imageio.mimread(gif)
    assert len(frames) == 2 * 4  # 2 trajectories of 15 steps, one frame in 4 steps
    assert frames[0].shape[:2] == (64, 96) and frames[0].std() > 5  # a picture, not a blank
    # wider than the model's 640-pixel offscreen buffer: the buffer grows to fit
    assert main(args[:-6] + ["--out", str(tmp_path / "a.mp4"), "--trajectories", "1",
                             "--width", "704", "--height", "496"]) == 0
    assert (tmp_path / "a.mp4").stat().st_size > 1_000
    assert main(["video", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "missing").exists()  # nothing created for a run that is not there


def test_video_errors_are_one_clear_line(cheetah_run, tmp_path):
    def video(*extra, env=None):
        return subprocess.run([sys.executable, "-m", "metapearl", "video", str(cheetah_run),
                               *extra], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})

    bad_gl = video("--out", str(tmp_path / "x.gif"), env={"MUJOCO_GL": "nonsense"})
    assert bad_gl.returncode == 2
    assert bad_gl.stderr.startswith("metapearl: error: MuJoCo cannot render with MUJOCO_GL=")
    assert "libosmesa6" in bad_gl.stderr and "Traceback" not in bad_gl.stderr
    for extra, message in [(["--task", "7"], "--task must be in 0..1"),
                           (["--out", "x.avi"], "must end in .mp4 or .gif")]:
        result = video(*extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_plot_of_runs_without_checkpoint_or_evaluation(sparse_runs, tmp_path, capsys):
    run = tmp_path / "kept"  # as the git-kept ablation records: logs, no checkpoint
    shutil.copytree(sparse_runs[0], run, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    captured = capsys.readouterr()
    assert "keeps no checkpoint" in captured.err
    assert (tmp_path / "figs" / "learning_curves.png").exists()
    assert not (tmp_path / "figs" / "posterior.png").exists()
    with (run / "eval" / "adaptation.csv").open() as f:
        header = f.readline()
    (run / "eval" / "adaptation.csv").write_text(header)  # evaluated nothing yet
    assert main(["plot", str(run), "--out", str(tmp_path / "figs"), "--tasks", "0"]) == 2
    err = capsys.readouterr().err
    assert "has no test-task evaluation in eval/adaptation.csv yet" in err and "Traceback" not in err


def test_learning_curve_title_says_what_the_band_is(sparse_runs, tmp_path, monkeypatch):
    from metapearl import plots

    titles = []
    monkeypatch.setattr(plots, "_save", lambda fig, stem, **kw: titles.append(
        fig.axes[0].get_title()) or [])
    for groups in ({"one": sparse_runs[:1]}, {"a": sparse_runs[:1], "b": sparse_runs[3:]},
                   {"seeds": sparse_runs[:3]}):
        plots.learning_curves(groups, tmp_path / "lc")
    assert titles == ["Learning curve", "Learning curves",
                      "Learning curves: mean and +-1 std over seeds"]

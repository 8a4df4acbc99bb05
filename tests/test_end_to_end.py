import csv
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY

from metapearl import PEARLAgent, Trainer, register_family, train
from metapearl.checkpoint import CheckpointError, load_agent, load_checkpoint, load_run_config
from metapearl.cli import main
from metapearl.config import ConfigError
from metapearl.logging import read_progress
from metapearl.tasks.point import PointRobot

ROOT = Path(__file__).resolve().parents[1]


def _numbers(run_dir):
    """progress.csv without the wall-clock columns."""
    return [{k: v for k, v in r.items() if not k.startswith("Time/")}
            for r in read_progress(run_dir / "progress.csv")]


@pytest.mark.parametrize("family", ["point-robot", "sparse-point-robot"])
def test_short_run_writes_the_run_directory(family, tiny_config, tmp_path):
    cfg = tiny_config(family, num_exp_traj_eval=2)  # sparse's 5 would leave no adapted trajectory
    summary = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for path in ["config.json", "progress.csv", "checkpoints/latest.pt", "eval/adaptation.csv",
                 "plots/learning_curve.png", "plots/adaptation_curve.png"]:
        assert (run / path).exists(), path
    rows = read_progress(run / "progress.csv")
    assert [int(r["Iteration"]) for r in rows] == [0, 1]
    for col in ["AverageReturn_all_test_tasks", "AverageReturn_all_train_tasks",
                "Number of env steps total", "SuccessRate_test_tasks", "Loss/qf", "Loss/kl",
                "Z/mean_abs", "Z/variance", "Time/train_s"]:
        assert rows[-1][col] != "", col
    assert summary.iterations == 2 and np.isfinite(summary.final_test_return)
    assert int(rows[-1]["Number of env steps total"]) == summary.env_steps
    # training steps only (evaluation steps are not counted): the initial collection in every
    # training task, then per iteration the drawn tasks' prior, posterior and extra-RL steps
    per_iteration = cfg.num_tasks_sample * (cfg.num_steps_prior + cfg.num_steps_posterior
                                            + cfg.num_extra_rl_steps_posterior)
    initial = cfg.num_train_tasks * cfg.num_initial_steps
    assert [int(r["Number of env steps total"]) for r in rows] == [
        initial + per_iteration, initial + 2 * per_iteration]


def test_same_seed_gives_identical_progress(tiny_config, tmp_path):
    train(tiny_config(seed=7), tmp_path / "a", progress=False)
    train(tiny_config(seed=7), tmp_path / "b", progress=False)
    train(tiny_config(seed=8), tmp_path / "c", progress=False)
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")
    assert _numbers(tmp_path / "a") != _numbers(tmp_path / "c")


def _train_until_third_checkpoint(cfg, run_dir, monkeypatch):
    """Train until the 3rd checkpoint write, which never happens: the crash falls between
    iteration 2's logs and its checkpoint, so resuming must drop what those logs hold."""
    import metapearl.trainer as trainer_mod

    real_save, saved = trainer_mod.save_checkpoint, []

    def save_then_die(run_dir, state):
        saved.append(1)
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(run_dir, state)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir, progress=False)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)


@pytest.mark.parametrize("model", [{"encoder": "pog", "factor_rank": 0},
                                   {"encoder": "pog", "factor_rank": 1,
                                    "context_trajectories": True, "factor_u_bound": 10.0,
                                    "posterior_mean_bound": 12.0},
                                   {"encoder": "rnn-tran"}, {"encoder": "rnn-traj"},
                                   {"encoder": "pog", "agent_average_iterations": 2}],
                         ids=["pog", "point-robot-default-model", "rnn-tran", "rnn-traj",
                              "averaged-agent"])
def test_interrupted_run_resumes_to_the_same_numbers(model, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(num_iterations=4, **model)
    train(cfg, tmp_path / "whole", progress=False)

    _train_until_third_checkpoint(cfg, tmp_path / "cut", monkeypatch)
    assert len(read_progress(tmp_path / "cut" / "progress.csv")) == 3
    with pytest.raises(Exception, match="already holds a run"):
        Trainer(cfg, tmp_path / "cut", progress=False)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert _numbers(tmp_path / "cut") == _numbers(tmp_path / "whole")
    adaptation = [(run / "eval" / "adaptation.csv").read_text() for run in
                  (tmp_path / "cut", tmp_path / "whole")]
    assert adaptation[0] == adaptation[1]


def test_the_averaged_agent_is_evaluated_and_deployed_and_training_is_untouched(tiny_config,
                                                                                tmp_path):
    # agent_average_iterations=2: after iterations 0, 1, 2 with last iterates p0, p1, p2 the
    # average is p0, then (p0 + p1) / 2, then ((p0 + p1) / 2 + p2) / 2
    cfg = tiny_config(num_iterations=3, agent_average_iterations=2)
    trainer = Trainer(cfg, tmp_path / "avg", progress=False)
    iterates = []
    trainer.train(on_iteration=lambda row: iterates.append(
        [p.detach().clone() for p in trainer.agent.parameters()]))
    expected = iterates[0]
    for p in iterates[1:]:
        expected = [(a + b) / 2 for a, b in zip(expected, p, strict=True)]
    assert not torch.equal(expected[0], iterates[-1][0])
    for got in (trainer.averaged, trainer.evaluated_agent, load_agent(tmp_path / "avg")):
        for g, want in zip(got.parameters(), expected, strict=True):
            torch.testing.assert_close(g, want)
    # the same run without averaging trains identically (losses, statistics, env steps: the
    # evaluations draw as many numbers either way); only the evaluations after iteration 0 differ
    train(tiny_config(num_iterations=3), tmp_path / "last", progress=False)
    averaged, last = _numbers(tmp_path / "avg"), _numbers(tmp_path / "last")
    evaluated = [k for k in averaged[0] if k.startswith(("AverageReturn", "AverageTrainReturn",
                                                         "SuccessRate"))]
    assert evaluated
    assert ([{k: v for k, v in r.items() if k not in evaluated} for r in averaged]
            == [{k: v for k, v in r.items() if k not in evaluated} for r in last])
    returns = [[r["AverageReturn_all_test_tasks"] for r in rows] for rows in (averaged, last)]
    assert returns[0][0] == returns[1][0] and returns[0][1:] != returns[1][1:]
    for got, want in zip(load_agent(tmp_path / "last").parameters(), iterates[-1], strict=True):
        torch.testing.assert_close(got, want)


def test_resume_with_more_iterations_extends_a_finished_run(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(num_iterations=2), run, progress=False)
    before = _numbers(run)
    argv = ["train", "point-robot", "--resume", "--out", str(run), "--no-progress"]
    assert main(argv + ["--set", "num_iterations=4", "--set", "torch_threads=1"]) == 0
    after = _numbers(run)
    assert len(after) == 4 and after[:2] == before
    stored = json.loads((run / "config.json").read_text())
    assert (stored["num_iterations"], stored["torch_threads"]) == (4, 1)
    assert main(argv) == 0  # nothing left to do: the run stays as it is
    assert _numbers(run) == after
    # the first command line plus --resume: the run's own seed, preset and values may be repeated
    same = ["--seed", str(stored["seed"]), "--preset", stored["preset"], "--set", f"lr={stored['lr']}"]
    assert main(argv + same) == 0 and _numbers(run) == after
    assert main(argv + ["--set", "num_iterations=3"]) == 2  # fewer than it has run: refused
    assert "has run 4 iterations; num_iterations=3 would undo them" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["num_iterations"] == 4


def test_cli_train_eval_and_deployment(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["num_train_tasks=6", "num_test_tasks=3", "net_size=16", "encoder_size=16",
            "meta_batch=4", "batch_size=8", "num_iterations=2", "num_initial_steps=20",
            "num_tasks_sample=2", "num_steps_prior=20", "num_extra_rl_steps_posterior=20",
            "num_train_steps_per_itr=3", "num_evals=1"]
    argv = ["train", "point-robot", "--seed", "1", "--out", str(run), "--no-progress"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "learning_curve.png" in out and "AverageReturn_all_test_tasks" in out
    assert (run / "plots" / "learning_curve.png").stat().st_size > 10_000
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "adaptation curve" in out and (run / "eval" / "meta_test_itr2.csv").exists()
    with (run / "eval" / "meta_test_itr2.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3  # 60 eval steps of 20-step trajectories
    # another protocol for this evaluation only: 5 trajectories, the first 2 under the prior
    assert main(["eval", str(run), "--num-steps-per-eval", "100", "--num-exp-traj-eval", "2"]) == 0
    with (run / "eval" / "meta_test_itr2_num_steps_per_eval100_num_exp_traj_eval2.csv").open() as f:
        assert [row["trajectory"] for row in csv.DictReader(f)] == ["1", "2", "3", "4", "5"]
    assert json.loads((run / "config.json").read_text())["num_steps_per_eval"] == 60
    assert main(["eval", str(run), "--num-steps-per-eval", "0"]) == 2
    assert "num_steps_per_eval must be >= 1" in capsys.readouterr().err
    # posteriors from drawn context rows, for this evaluation only (point-robot's preset: all)
    assert main(["eval", str(run), "--online-context", "sampled"]) == 0
    assert (run / "eval" / "meta_test_itr2_sample_online_contextTrue.csv").exists()
    # more runs per task and another seed: files of their own, the default protocol's kept
    default_rows = (run / "eval" / "meta_test_itr2.csv").read_text()
    assert main(["eval", str(run), "--num-evals", "2", "--seed", "3"]) == 0
    assert (run / "eval" / "meta_test_itr2_num_evals2_seed3.csv").exists()
    assert (run / "eval" / "meta_test_itr2.csv").read_text() == default_rows
    cfg = load_run_config(run)
    assert load_agent(run).online_context_rows == 0
    cfg.sample_online_context = True
    assert load_agent(run, cfg=cfg).online_context_rows == cfg.embedding_batch_size == 40
    cfg.posterior_mean_bound = 3.0  # not the meta-test protocol: refused, not silently applied
    with pytest.raises(CheckpointError, match="cannot be loaded with another posterior_mean_bound"):
        load_agent(run, cfg=cfg)
    cfg = load_run_config(run)
    cfg.num_evals = 0  # an evaluation field, but invalid
    with pytest.raises(ConfigError, match="num_evals"):
        load_agent(run, cfg=cfg)
    agent = PEARLAgent.load(run)
    agent.reset()
    agent.sample_z()
    action = agent.act(np.zeros(2, np.float32))
    assert action.shape == (2,) and np.all(np.abs(action) <= 0.1)
    assert main(["train", "point-robot", "--out", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_user_defined_family_from_the_readme_trains(tiny_config, tmp_path):
    spec = importlib.util.spec_from_file_location("pendulum_gravity",
                                                  ROOT / "examples" / "pendulum_gravity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    source = inspect.getsource(module.PendulumGravity)
    assert source in (ROOT / "README.md").read_text()  # the README shows exactly this code
    assert len(source.strip().splitlines()) <= 20
    register_family(module.PendulumGravity())
    summary = train(tiny_config("pendulum-gravity"), tmp_path / "pend", progress=False)
    assert summary.iterations == 2 and np.isfinite(summary.final_test_return)
    assert (tmp_path / "pend" / "plots" / "learning_curve.png").exists()


def test_tensorboard_events_hold_the_progress_scalars_and_resume_purges(tiny_config, tmp_path,
                                                                       monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(num_iterations=3, tensorboard=True)
    whole = tmp_path / "whole"
    train(cfg, whole, progress=False)
    events = EventAccumulator(str(whole)).Reload()
    rows = read_progress(whole / "progress.csv")
    for name in ("AverageReturn_all_test_tasks", "Loss/qf", "Z/variance", "Time/train_s"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [int(r["Number of env steps total"]) for r in rows]
        np.testing.assert_allclose([s.value for s in scalars], [float(r[name]) for r in rows],
                                   rtol=1e-6)
    # the 3rd checkpoint is never written: iteration 2's events are purged and written again
    cut = tmp_path / "cut"
    _train_until_third_checkpoint(cfg, cut, monkeypatch)
    train(cfg, cut, resume=True, progress=False)
    resumed = EventAccumulator(str(cut)).Reload().Scalars("Loss/qf")
    assert [s.step for s in resumed] == [s.step for s in events.Scalars("Loss/qf")]
    np.testing.assert_allclose([s.value for s in resumed],
                               [s.value for s in events.Scalars("Loss/qf")], rtol=1e-6)


def test_kl_lambda_schedule_changes_training_from_its_iteration_on(tiny_config, tmp_path):
    cfg = dict(seed=4, num_iterations=3, kl_lambda=0.1)
    train(tiny_config(**cfg), tmp_path / "a", progress=False)
    train(tiny_config(**cfg, kl_lambda_schedule="2:50"), tmp_path / "b", progress=False)
    a, b = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert a[:2] == b[:2]  # iterations 0 and 1: both at kl_lambda
    # iteration 2's steps weigh the KL 500x more: the KL's gradient swamps the encoder's
    grad = [float(r[2]["Grad/encoder"]) for r in (a, b)]
    assert grad[1] > 10 * grad[0]


def test_the_readmes_library_use_code_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Library use\n\n```python\n") + len("## Library use\n\n```python\n")
    code = readme[start:readme.index("```", start)]
    assert "agent.infer_posterior()" in code
    assert code.count('{"seed": 1}') == 1  # (else this would run the whole default preset)
    code = code.replace('{"seed": 1}', f"{{'seed': 1, **{TINY!r}}}")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    agent = scope["agent"]
    assert scope["summary"].iterations == TINY["num_iterations"]
    assert agent.context.shape == (1, 3 * TINY["max_path_length"], agent.context_dim)
    assert not torch.equal(agent.belief_var, torch.ones_like(agent.belief_var))  # inferred


class _Reach(PointRobot):
    """point-robot as a user might write it, with the mistakes the tests below make."""

    name = "reach-test"
    max_path_length = 10

    def __init__(self, task_value=lambda goal: goal, count=lambda n: n, action_space=None,
                 reward=lambda r: r):
        self.task_value, self.count, self.space, self.reward_of = (task_value, count,
                                                                    action_space, reward)

    def make_env(self):
        env = super().make_env()
        if self.space is not None:
            env.action_space = self.space
        step, reward_of = env.step, self.reward_of

        def stepped(action):
            obs, r, term, trunc, info = step(action)
            return obs, reward_of(r), term, trunc, info

        env.step = stepped
        return env

    def sample_tasks(self, num_train, num_test, rng):
        tasks = [{"goal": self.task_value(rng.uniform(-1.0, 1.0, 2))}
                 for _ in range(self.count(num_train + num_test))]
        return tasks[:self.count(num_train)], tasks[self.count(num_train):]


def test_a_family_whose_tasks_hold_numpy_values_trains_and_loads(tiny_config, tmp_path):
    register_family(_Reach())  # goals as numpy arrays, as rng.uniform gives them
    cfg = tiny_config("point-robot")
    cfg.family = "reach-test"
    train(cfg, tmp_path / "run", progress=False)
    agent = PEARLAgent.load(tmp_path / "run")  # the checkpoint holds plain lists, not arrays
    assert agent.obs_dim == 2
    tasks = load_checkpoint(tmp_path / "run")["test_tasks"]
    assert all(type(t["goal"]) is list and type(t["goal"][0]) is float for t in tasks)


@pytest.mark.parametrize("family, message", [
    (_Reach(count=lambda n: n - 1), "sample_tasks gave 5 training tasks, 6 were asked for"),
    (_Reach(task_value=lambda goal: object()), "training task 0['goal'] is a object"),
    (_Reach(action_space=gym.spaces.Box(-1.0, np.array([1.0, np.inf], np.float32))),
     "PEARL needs a bounded action space"),
    (_Reach(action_space=gym.spaces.Discrete(3)), "PEARL needs a 1-D Box action space"),
    (_Reach(reward=lambda r: np.array([r, r])), "a reward is a number"),
])
def test_mistakes_in_a_family_of_ones_own_get_one_clear_error(family, message, tmp_path, capsys):
    register_family(family)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "reach-test", "--out", str(tmp_path / "run"), "--no-progress",
                 *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_deployment_api_refuses_transitions_of_the_wrong_size(tiny_config, tmp_path):
    train(tiny_config(), tmp_path / "run", progress=False)
    agent = PEARLAgent.load(tmp_path / "run")
    agent.reset()
    with pytest.raises(ValueError, match=r"of \(3, 2, 3\) values; this agent's have \(2, 2, 2\)"):
        agent.observe(np.zeros(3), np.zeros(2), 0.0, np.zeros(3))
    with pytest.raises(ValueError, match="an observation of 3 values; this agent's have 2"):
        agent.act(np.zeros(3))
    agent.observe(np.zeros(2), np.zeros(2), 0.0, np.zeros(2))
    agent.infer_posterior()


def test_import_makes_a_family_of_ones_own_known_to_the_command_line(tmp_path):
    import subprocess

    (tmp_path / "mytasks.py").write_text(
        "from metapearl import register_family\n"
        "from metapearl.tasks.point import PointRobot\n"
        "class Mine(PointRobot):\n    name = 'mine'\n"
        "register_family(Mine())\n")

    def tasks(*extra):  # the installed command, whose sys.path lacks the current directory
        return subprocess.run([Path(sys.executable).parent / "metapearl", "tasks", *extra],
                              cwd=tmp_path, capture_output=True, text=True)

    assert "mine" not in tasks().stdout
    assert "\nmine " in tasks("--import", "mytasks").stdout
    example = tasks("--import", str(ROOT / "examples" / "pendulum_gravity.py"))
    assert "pendulum-gravity" in example.stdout, example.stderr
    missing = tasks("--import", "nosuchmodule")
    assert missing.returncode == 2
    assert "--import nosuchmodule: no module 'nosuchmodule'" in missing.stderr

"""The diagnostic scripts in benchmarks/ run on a trained run and print what they promise."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metapearl import train

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import TINY

    from metapearl.config import make_config

    root = tmp_path_factory.mktemp("bench")
    out = {}
    for family, extra in [("point-robot", {}), ("sparse-point-robot", {"num_exp_traj_eval": 2})]:
        out[family] = root / family
        train(make_config(family, "default", {**TINY, **extra}), out[family], progress=False)
    return out


def test_point_robot_context_scores_every_way(runs):
    out = _script("point_robot_context.py", runs["point-robot"], "--runs", "1")
    scores = re.findall(r"^  (.+?)\s+(-?\d+\.\d\d)$", out, re.M)
    assert len(scores) == 6 and scores[0][0].startswith("meta-test")
    # 20 steps from [-1,1]^2, at most 0.1 per coordinate each, goal in [-1,1]^2: every distance
    # is below 4 sqrt(2)
    assert all(-20 * 4 * 2**0.5 < float(value) <= 0.0 for _, value in scores)
    # the goal-aware oracle on the run's 3 test tasks: about -5.2 over all goals, and no agent
    # beats it (here a barely trained one)
    oracle = float(re.search(r"goal-aware oracle on these tasks (-\d+\.\d\d)", out).group(1))
    assert -9.0 < oracle < -2.0 and all(oracle > float(value) for _, value in scores)


def test_sparse_exploration_splits_success_by_prior_phase_hits(runs):
    out = _script("sparse_exploration.py", runs["sparse-point-robot"], "--runs", "2", "--trace")
    assert "6 meta-tests (3 test tasks x 2), 2 prior trajectories of 4" in out
    # the preset's sample_online_context, with TINY's embedding_batch_size 8, or SPEC's all rows
    assert "posteriors from 8 rows drawn from the context" in out
    assert "posteriors from all the context" in _script(
        "sparse_exploration.py", runs["sparse-point-robot"], "--runs", "1", "--online-context", "all")
    rates = {name.strip(): float(v) for name, v in
             re.findall(r"^  (success of the last trajectory|a prior trajectory reached the goal|"
                        r"any trajectory reached the goal)\s+(\d+\.\d)%", out, re.M)}
    assert len(rates) == 3 and rates["a prior trajectory reached the goal"] <= rates[
        "any trajectory reached the goal"]
    # --trace: one line per fruitless prior phase, its 2 prior and 2 posterior trajectories
    lines = re.findall(r"^  goal +(-?\d+) \|((?: +-?\d+[.H]){2}) \|((?: +-?\d+[.H]){2})$",
                       out, re.M)
    hit = rates["a prior trajectory reached the goal"]
    assert len(lines) == round(6 * (1 - hit / 100))
    assert all(0 <= int(goal) <= 180 and "H" not in prior for goal, prior, _ in lines)
    # and one line per meta-test that reached the goal radius but not in its last trajectory
    lost = re.findall(r"^  lost +(-?\d+) \|((?: +-?\d+[.H]){2}) \|((?: +-?\d+[.H]){2})$",
                      out, re.M)
    ever, success = rates["any trajectory reached the goal"], rates["success of the last trajectory"]
    assert len(lost) == round(6 * (ever - success) / 100)
    assert all("H" in prior + post and post.endswith(".") for _, prior, post in lost)
    found = re.search(r"^  a hit before the last trajectory +(\d+\.\d)%, then the last missed in "
                      r"(\d+\.\d)%", out, re.M)
    assert found is not None or not lost
    if found:
        early = round(6 * float(found.group(1)) / 100)
        assert len(lost) <= early and round(early * float(found.group(2)) / 100) == len(lost)
    wrong = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_exploration.py"),
                            str(runs["point-robot"])], capture_output=True, text=True)
    assert wrong.returncode == 2 and "is not a sparse-point-robot run" in wrong.stderr


def _benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (its functions, without running main)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_new_ablation_run_meta_tests_the_last_iterate_from_all_the_context(tmp_path,
                                                                            monkeypatch):
    """ablations.py trains each variant on the default preset but meta-tests as SPEC section 5
    does (and as its record was trained), whatever the preset's own evaluation settings."""
    import argparse

    from metapearl.config import make_config, parse_overrides

    module = _benchmark_module("ablations")
    commands = []
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **kw: commands.append(cmd)
                        or subprocess.CompletedProcess(cmd, 0))
    args = argparse.Namespace(family="sparse-point-robot", out=tmp_path, iterations=300,
                              threads=1, eval_interval=10)
    module.train_one(args, "rnn-tran", 1)
    (cmd,) = commands
    sets = [cmd[i + 1] for i, flag in enumerate(cmd) if flag == "--set"]
    cfg = make_config("sparse-point-robot", "default",
                      {**parse_overrides(sets), "seed": int(cmd[cmd.index("--seed") + 1])})
    assert make_config("sparse-point-robot", "default").agent_average_iterations > 0
    assert (cfg.agent_average_iterations, cfg.sample_online_context) == (0, False)
    assert (cfg.encoder, cfg.seed, cfg.num_iterations, cfg.eval_interval) == ("rnn-tran", 1, 300, 10)


def test_found_then_lost_statistics():
    module = _benchmark_module("sparse_exploration")
    rad = np.radians
    slots = [  # goal 90 degrees; angles are where each trajectory ended
        {"reached": [False, True, True], "angles": rad([0, 80, 95]), "success": True, "goal": 90},
        {"reached": [True, False, False], "angles": rad([100, 50, -170]), "success": False,
         "goal": 90.0},
        {"reached": [False, False, True], "angles": rad([0, 0, 90]), "success": True, "goal": 90},
        {"reached": [False] * 3, "angles": rad([0, 0, 0]), "success": False, "goal": 90},
    ]
    # two hit before their last trajectory, one of them then missed; first hits 10 and 10 degrees
    # off, last trajectories 5 and 100 (-170 is 100 degrees from 90 the short way round)
    assert module.found_then(slots) == pytest.approx((0.5, 0.5, 10.0, 52.5))
    assert module.found_then(slots[2:]) is None
    assert module.degrees_off(rad(179.0), -179.0) == pytest.approx(2.0)


def _ant_run(tmp_path_factory, family: str, **extra):
    pytest.importorskip("mujoco")
    from conftest import TINY

    from metapearl.config import make_config

    out = tmp_path_factory.mktemp("bench") / family
    train(make_config(family, "default", {**TINY, **extra}), out, progress=False)
    return out


TRAJECTORY = (r"^  trajectory (\d): z \[[^]]*\]\s+dx\s+([-+]\d+\.\d\d) dy\s+([-+]\d+\.\d\d)"
              r"(?:  to goal (\d+\.\d\d) -> (\d+\.\d\d))?\s+return\s+(-?\d+\.\d)\s+steps (\d+)$")


def test_ant_gaits_reports_every_trajectory_of_both_ant_dir_tasks(tmp_path_factory, runs):
    run = _ant_run(tmp_path_factory, "ant-dir", num_train_tasks=2, num_test_tasks=2)
    out = _script("ant_gaits.py", run, "--runs", "2")
    assert re.findall(r"^task (\d) \(angle (\S+)\), run (\d)$", out, re.M) == [
        ("0", "0.00", "0"), ("0", "0.00", "1"), ("1", "3.14", "0"), ("1", "3.14", "1")]
    rows = re.findall(TRAJECTORY, out, re.M)
    # TINY: 40 evaluation steps in 10-step trajectories -> 4 per meta-test, 4 meta-tests
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] * 4
    assert all(1 <= int(r[6]) <= 10 and r[3] == r[4] == "" for r in rows)
    wrong = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ant_gaits.py"),
                            str(runs["point-robot"])], capture_output=True, text=True)
    assert wrong.returncode == 2 and "is not an ant-dir or ant-goal run" in wrong.stderr


def test_ant_gaits_measures_the_distance_to_each_ant_goal_test_goal(tmp_path_factory):
    from metapearl.checkpoint import load_checkpoint

    run = _ant_run(tmp_path_factory, "ant-goal")
    out = _script("ant_gaits.py", run, "--tasks", "2", "--runs", "1")
    goals = [t["goal"] for t in load_checkpoint(run)["test_tasks"][:2]]
    heads = re.findall(r"^task (\d) \(goal (\S+), (\S+)\), run 0$", out, re.M)
    assert [(int(k), float(x), float(y)) for k, x, y in heads] == [
        (k, pytest.approx(g[0], abs=0.005), pytest.approx(g[1], abs=0.005))
        for k, g in enumerate(goals)]
    blocks = out.split("task ")[1:]
    assert len(blocks) == 2
    for block, g in zip(blocks, goals, strict=True):
        rows = re.findall(TRAJECTORY, block, re.M)
        assert [r[0] for r in rows] == ["1", "2", "3", "4"]
        for _, dx, dy, start, end, _, _ in rows:
            # the ant starts within Ant-v5's reset noise (0.1 per coordinate) of the origin, and
            # its distance at the end is the start's moved by (dx, dy)
            assert abs(float(start) - abs(g[0]) - abs(g[1])) <= 0.21
            assert abs(float(end) - float(start)) <= abs(float(dx)) + abs(float(dy)) + 0.01


def test_single_task_trains_one_task_of_a_family_alone(tmp_path):
    pytest.importorskip("mujoco")
    from conftest import TINY

    from metapearl.checkpoint import load_checkpoint

    sets = [a for k, v in {**TINY, "num_iterations": 1}.items() for a in ("--set", f"{k}={v}")]
    out = _script("single_task.py", "ant-goal", "--task", '{"goal": [2.0, 1.0]}',
                  "--out", tmp_path / "run", *sets)
    assert out.startswith("# ant-goal-one preset=default seed=0")
    assert "# untrained agent: AverageReturn_all_test_tasks" in out
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["family"] == "ant-goal-one"
    state = load_checkpoint(run, mmap=True)
    every = state["train_tasks"] + state["test_tasks"]
    assert len(every) == TINY["num_train_tasks"] + TINY["num_test_tasks"]
    assert all(t == {"goal": [2.0, 1.0]} for t in every)
    # ant_gaits.py registers the run's one-task family again, from the checkpoint
    gaits = _script("ant_gaits.py", run, "--tasks", "1", "--runs", "1")
    assert gaits.startswith("task 0 (goal +2.00, +1.00), run 0\n  trajectory 1:")


def test_single_task_refuses_a_task_of_another_family():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "single_task.py"),
                             "point-robot", "--task", '{"angle": 0.0}'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "point-robot task's keys" in result.stderr


# per row, by hand (MACs; layer widths in -> 4 -> 4 -> 4 -> out, the encoder's 3 wide): each
# network's forward, and its input gradient from the second layer on plus the first layer's rows
# of the inputs that learn (Q: z; the min Q: the actions)
FLOP_CASES = [
    # obs 2, act 1, latent 1. Encoder 4-3-3-3-3 (mean, variance and a rank-1 u): 12+9+9+9 = 39,
    # input gradient 27; Q 4-...-1: 16+16+16+4 = 52, input gradient 36 + z 4 = 40; V 3-...-1: 48,
    # 36; policy 3-...-2: 52, 40; min Q: 36 + the action 4 = 40
    ({"factor_rank": 1}, 2, 1, dict(enc=39, enc_in=27, q=52, q_in=40, v=48, v_in=36, pi=52,
                                    pi_in=40, min_q_in=40)),
    ({}, 2, 1, dict(enc=36, enc_in=24, q=52, q_in=40, v=48, v_in=36, pi=52, pi_in=40,
                    min_q_in=40)),  # encoder 4-3-3-3-2: 12+9+9+6
    ({"use_information_bottleneck": False}, 2, 1, dict(  # encoder 4-3-3-3-1: 12+9+9+3
        enc=33, enc_in=21, q=52, q_in=40, v=48, v_in=36, pi=52, pi_in=40, min_q_in=40)),
    # obs 2, act 2, latent 3, next obs in context: encoder 7-3-3-3-6: 21+9+9+18 = 57, input
    # gradient 36; Q 7-...-1: 28+16+16+4 = 64, input gradient 36 + z 12 = 48; V 5-...-1: 56, 36;
    # policy 5-...-4: 20+16+16+16 = 68, 48; min Q: 36 + the actions 8 = 44
    ({"latent_size": 3, "use_next_obs_in_context": True}, 2, 2, dict(
        enc=57, enc_in=36, q=64, q_in=48, v=56, v_in=36, pi=68, pi_in=48, min_q_in=44)),
]


@pytest.mark.parametrize("overrides, obs, act, m", FLOP_CASES)
def test_update_flops_counts_the_matmuls_a_step_needs(overrides, obs, act, m):
    from metapearl.config import make_config

    cfg = make_config("point-robot", "paper", {
        "latent_size": 1, "net_size": 4, "encoder_size": 3, "meta_batch": 2, "batch_size": 3,
        "embedding_batch_size": 5, "use_next_obs_in_context": False, **overrides})
    # 6 RL rows, 10 context rows; rows: Q1, Q2, V, policy, target V, the min Q's two members
    forward = m["enc"] * 10 + (2 * m["q"] + m["v"] + m["pi"] + m["v"] + 2 * m["q"]) * 6
    weight_grads = m["enc"] * 10 + (2 * m["q"] + m["v"] + m["pi"]) * 6
    input_grads = m["enc_in"] * 10 + (2 * m["q_in"] + m["v_in"] + m["pi_in"]) * 6
    flops = _benchmark_module("throughput").update_flops
    assert flops(cfg, obs, act, routed_min_q=True) == 2 * (
        forward + weight_grads + input_grads + m["min_q_in"] * 6)
    assert flops(cfg, obs, act, routed_min_q=False) == 2 * (
        forward + weight_grads + input_grads + 2 * m["min_q_in"] * 6)


TINY_PAPER = ["--set", "num_train_tasks=4", "--set", "num_tasks_sample=2", "--set", "max_path_length=5",
              "--set", "net_size=128", "--set", "encoder_size=32", "--set", "meta_batch=4",
              "--set", "batch_size=64", "--set", "embedding_batch_size=16"]  # ~0.3 GFLOP a step


def test_throughput_prints_every_figure_as_json():
    from metapearl.config import make_config, parse_overrides

    out = _script("throughput.py", "--family", "point-robot", "--preset", "paper", "--rounds", "1",
                  "--steps", "1", "--skip-rss", "--json", *TINY_PAPER)
    figures = json.loads(out)
    assert set(figures) == {
        "matmul_peak_gflops", "update_ms", "update_gflops", "fraction_of_peak", "reference_update_ms",
        "speedup_vs_reference", "collect_steps_per_s", "raw_env_steps_per_s",
        "collect_fraction_of_raw", "peak_rss_mb", "device"}
    assert figures["peak_rss_mb"] is None and figures["device"].startswith("cpu (")
    for key in ("matmul_peak_gflops", "update_ms", "update_gflops", "reference_update_ms",
                "collect_steps_per_s", "raw_env_steps_per_s"):
        assert figures[key] > 0, key

    def ratio(a, b, rounding):  # a / b, within what rounding a and b, and it to 3 places, allows
        return pytest.approx(a / b, rel=0, abs=a / b * rounding / 2 * (1 / a + 1 / b) + 5e-4 + 1e-9)

    assert figures["fraction_of_peak"] == ratio(figures["update_gflops"],
                                                figures["matmul_peak_gflops"], 0.1)
    assert figures["speedup_vs_reference"] == ratio(figures["reference_update_ms"],
                                                    figures["update_ms"], 0.1)
    assert figures["collect_fraction_of_raw"] == ratio(figures["collect_steps_per_s"],
                                                       figures["raw_env_steps_per_s"], 0.1)
    # the step's GFLOP/s are the count's (point-robot: obs 2, act 2), within update_ms's rounding
    cfg = make_config("point-robot", "paper", parse_overrides(TINY_PAPER[1::2]))
    flops = _benchmark_module("throughput").update_flops(cfg, 2, 2, routed_min_q=True)
    ms = figures["update_ms"]
    assert flops / ((ms + 0.05) * 1e6) - 0.05 <= figures["update_gflops"] <= flops / (
        (ms - 0.05) * 1e6) + 0.05


def test_throughput_refuses_a_model_that_its_reference_step_does_not_mirror():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--family",
                             "point-robot", "--preset", "default", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "set factor_rank=0" in result.stderr

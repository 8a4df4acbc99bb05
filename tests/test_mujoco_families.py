"""The MuJoCo task families (SPEC section 6): rewards, terminations, task sets, rand-params."""

import sys

import numpy as np
import pytest
from conftest import TINY

from metapearl import train
from metapearl.cli import main
from metapearl.config import make_config
from metapearl.tasks import MissingExtraError, get_family

pytest.importorskip("mujoco")

MUJOCO = ["cheetah-vel", "cheetah-dir", "ant-dir", "ant-goal", "humanoid-dir",
          "walker-rand-params", "hopper-rand-params"]


def _env(name, task):
    fam = get_family(name)
    env = fam.make_env()
    fam.set_task(env, task)
    env.reset(seed=0)
    return fam, env, env.unwrapped


def _step(env, sim, action):
    """Step and return (obs, reward, terminated, qpos before, qpos after, xpos before, after)."""
    qpos0, xpos0 = sim.data.qpos.copy(), sim.data.xpos.copy()
    mass = sim.model.body_mass.copy()
    com0 = (mass[:, None] * sim.data.xipos).sum(0) / mass.sum()
    obs, r, term, trunc, info = env.step(action)
    com1 = (mass[:, None] * sim.data.xipos).sum(0) / mass.sum()
    assert not trunc and "unstable" not in info
    return obs, r, term, qpos0, sim.data.qpos.copy(), xpos0, sim.data.xpos.copy(), com0, com1


# --- rewards of known transitions, recomputed here from the state (SPEC section 6) ---------------
def test_cheetah_vel_reward():
    _, env, sim = _env("cheetah-vel", {"velocity": 1.7})
    a = np.linspace(-1, 1, 6)
    _, r, term, q0, q1, *_ = _step(env, sim, a)
    v_x = (q1[0] - q0[0]) / (5 * 0.01)  # frame_skip 5 x timestep 0.01
    assert r == pytest.approx(-abs(v_x - 1.7) - 0.05 * np.sum(a ** 2), rel=1e-9)
    assert not term


def test_cheetah_dir_reward_changes_sign_with_the_direction():
    a = np.full(6, 0.3)
    rewards = []
    for direction in (-1.0, 1.0):
        _, env, sim = _env("cheetah-dir", {"direction": direction})
        _, r, _, q0, q1, *_ = _step(env, sim, a)
        v_x = (q1[0] - q0[0]) / 0.05
        assert r == pytest.approx(direction * v_x - 0.05 * 6 * 0.09, rel=1e-9)
        rewards.append(r + 0.05 * 6 * 0.09)
    assert rewards[0] == pytest.approx(-rewards[1], rel=1e-9)


def _contact(sim):
    return 0.5e-3 * np.sum(np.clip(sim.data.cfrc_ext, -1, 1) ** 2)


def test_ant_dir_reward_and_termination():
    _, env, sim = _env("ant-dir", {"angle": np.pi})
    a = np.full(8, 0.5)
    _, r, term, _, _, x0, x1, *_ = _step(env, sim, a)
    torso = 1  # body 0 is the world
    v = (x1[torso, :2] - x0[torso, :2]) / 0.05
    assert r == pytest.approx(-v[0] - 0.5 * 8 * 0.25 - _contact(sim) + 1.0, rel=1e-9)
    assert not term
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    qpos[2] = 1.5  # torso above 1: unhealthy
    sim.set_state(qpos, qvel)
    assert env.step(np.zeros(8))[2]


def test_ant_goal_reward_sees_xy_and_never_terminates():
    goal = [1.0, -2.0]
    _, env, sim = _env("ant-goal", {"goal": goal})
    a = np.linspace(-1, 1, 8)
    obs, r, term, *_ = _step(env, sim, a)
    xy = sim.data.xpos[1, :2]
    expected = -(abs(xy[0] - 1.0) + abs(xy[1] + 2.0)) - 0.1 * np.sum(a ** 2) - _contact(sim)
    assert r == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(obs[:2], sim.data.qpos[:2])  # the observation holds x, y
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    qpos[2] = 0.1
    sim.set_state(qpos, qvel)
    assert not env.step(np.zeros(8))[2]


def test_humanoid_dir_reward_and_termination():
    angle = 2.0
    _, env, sim = _env("humanoid-dir", {"angle": angle})
    a = np.full(17, 0.2)
    _, r, term, *_, com0, com1 = _step(env, sim, a)
    velocity = (com1[:2] - com0[:2]) / 0.003  # the reference divides by the physics timestep
    impact = min(0.5e-6 * np.sum(sim.data.cfrc_ext ** 2), 10)
    expected = (0.25 * (velocity[0] * np.cos(angle) + velocity[1] * np.sin(angle))
                - 0.1 * 17 * 0.04 - impact + 5.0)
    assert r == pytest.approx(expected, rel=1e-9)
    assert not term
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    qpos[2] = 0.8
    sim.set_state(qpos, qvel)
    assert env.step(np.zeros(17))[2]


@pytest.mark.parametrize("name, actions, unhealthy", [
    ("walker-rand-params", 6, {1: 0.5}),  # height below 0.8
    ("hopper-rand-params", 3, {2: 0.5}),  # |angle| above 0.2
])
def test_rand_params_reward_and_termination(name, actions, unhealthy):
    fam = get_family(name)
    task = fam.sample_task(np.random.default_rng(0))
    _, env, sim = _env(name, task)
    a = np.full(actions, -0.4)
    _, r, term, q0, q1, *_ = _step(env, sim, a)
    assert r == pytest.approx((q1[0] - q0[0]) / 0.008 + 1.0 - 1e-3 * actions * 0.16, rel=1e-9)
    assert not term
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    for i, value in unhealthy.items():
        qpos[i] = value
    sim.set_state(qpos, qvel)
    assert env.step(np.zeros(actions))[2]


# --- task sets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MUJOCO)
def test_task_sets_are_seeded_and_disjoint(name):
    fam = get_family(name)
    a = fam.sample_tasks(5, 3, np.random.default_rng(4))
    b = fam.sample_tasks(5, 3, np.random.default_rng(4))
    c = fam.sample_tasks(5, 3, np.random.default_rng(5))
    assert a == b
    train_tasks, test_tasks = a
    assert len(train_tasks) == 5 and len(test_tasks) == 3
    if name in ("cheetah-dir", "ant-dir"):  # two fixed tasks, trained and tested on
        assert {str(t) for t in train_tasks} == {str(t) for t in test_tasks}
        assert len({str(t) for t in train_tasks}) == 2
    else:
        assert a != c
        assert not {str(t) for t in train_tasks} & {str(t) for t in test_tasks}


def test_task_distributions_are_the_specs():
    rng = np.random.default_rng(0)
    vel = [get_family("cheetah-vel").sample_task(rng)["velocity"] for _ in range(4000)]
    assert 0 <= min(vel) and max(vel) <= 3 and np.mean(vel) == pytest.approx(1.5, abs=0.05)
    goals = np.array([get_family("ant-goal").sample_task(rng)["goal"] for _ in range(4000)])
    radius = np.linalg.norm(goals, axis=1)
    # uniform in the disc of radius 3: P(r <= 1.5) = 1/4, E[r] = 2
    assert radius.max() <= 3 and np.mean(radius <= 1.5) == pytest.approx(0.25, abs=0.03)
    assert radius.mean() == pytest.approx(2.0, abs=0.05)
    angles = [get_family("humanoid-dir").sample_task(rng)["angle"] for _ in range(4000)]
    assert 0 <= min(angles) and max(angles) < 2 * np.pi
    assert np.mean(angles) == pytest.approx(np.pi, abs=0.1)
    assert get_family("cheetah-dir").sample_tasks(2, 2, rng)[0] == [{"direction": -1.0},
                                                                    {"direction": 1.0}]
    assert get_family("ant-dir").sample_tasks(2, 2, rng)[0] == [{"angle": 0.0},
                                                                {"angle": float(np.pi)}]


@pytest.mark.parametrize("name", ["walker-rand-params", "hopper-rand-params"])
def test_rand_params_scale_the_defaults_and_restore_them_exactly(name):
    fam = get_family(name)
    env = fam.make_env()
    model = env.unwrapped.model
    keys = ("body_mass", "body_inertia", "geom_friction", "dof_damping")
    defaults = {k: getattr(model, k).copy() for k in keys}
    rng = np.random.default_rng(1)
    tasks = [fam.sample_task(rng) for _ in range(200)]
    for k, base in [("body_mass", 1.5), ("body_inertia", 1.5), ("geom_friction", 1.5),
                    ("dof_damping", 1.3)]:
        m = np.array([t[k] for t in tasks])
        assert m.shape[1:] == defaults[k].shape
        log = np.log(m) / np.log(base)  # U(-3, 3) per element
        assert log.min() >= -3 and log.max() <= 3 and abs(log.mean()) < 0.1
        assert np.std(log) == pytest.approx(np.sqrt(3), abs=0.05)
    for task in tasks[:3]:  # each task from the defaults, never from the previous task
        fam.set_task(env, task)
        for k in keys:
            np.testing.assert_array_equal(getattr(model, k), defaults[k] * np.asarray(task[k]))
    fam.set_task(env, {k: np.ones_like(v).tolist() for k, v in defaults.items()})
    for k in keys:
        assert np.array_equal(getattr(model, k), defaults[k])


def test_setting_a_task_does_not_leak_into_the_next():
    fam, env, sim = _env("cheetah-vel", {"velocity": 3.0})
    env.step(np.ones(6))
    fam.set_task(env, {"velocity": 0.0})
    env.reset(seed=1)
    _, r, _, q0, q1, *_ = _step(env, sim, np.zeros(6))
    assert r == pytest.approx(-abs((q1[0] - q0[0]) / 0.05), rel=1e-9)


def test_simulator_instability_is_flagged_not_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo appends its warning to ./MUJOCO_LOG.TXT
    _, env, sim = _env("cheetah-vel", {"velocity": 1.0})
    sim.model.opt.timestep = 0.5  # far beyond what the integrator can hold
    flagged = [env.step(np.ones(6))[4].get("unstable", False) for _ in range(5)]
    assert any(flagged)


# --- the families train, list, and fail clearly without MuJoCo -------------------------------------
@pytest.mark.parametrize("name", MUJOCO)
def test_one_iteration_of_training(name, tmp_path):
    cfg = make_config(name, "default", {**TINY, "num_train_tasks": 3, "num_test_tasks": 2,
                                        "meta_batch": 2, "num_iterations": 1,
                                        "max_path_length": 15})
    summary = train(cfg, tmp_path / name, progress=False)
    assert summary.iterations == 1 and np.isfinite(summary.final_test_return)
    assert np.isnan(summary.final_test_success)  # no success notion: no success column


def test_tasks_lists_all_nine_families(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in MUJOCO:
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert " 200 " in line and get_family(name).task_parameter in line
    assert len([x for x in out.splitlines()[1:] if x.strip()]) >= 9


def test_missing_mujoco_gets_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` now fails
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[mujoco\]'"):
        get_family("cheetah-vel").make_env()
    assert main(["train", "cheetah-vel", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs MuJoCo" in err and "Traceback" not in err


def test_observations_carry_what_the_reference_did():
    sizes = {"cheetah-vel": 17, "cheetah-dir": 17, "ant-dir": 27, "ant-goal": 107,
             "humanoid-dir": 348, "walker-rand-params": 17, "hopper-rand-params": 11}
    for name, size in sizes.items():
        assert get_family(name).make_env().observation_space.shape == (size,), name
    model = get_family("walker-rand-params").make_env().unwrapped.model
    friction = {model.geom(i).name: model.geom_friction[i, 0] for i in range(model.ngeom)}
    assert friction["foot_geom"] == pytest.approx(0.9) and friction["foot_left_geom"] == 1.9

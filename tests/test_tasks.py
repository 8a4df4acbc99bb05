import numpy as np
import pytest

from metapearl.tasks import family_names, get_family


def test_point_robot_reward_is_minus_distance_after_the_move():
    fam = get_family("point-robot")
    env = fam.make_env()
    fam.set_task(env, {"goal": [0.5, -0.5]})
    obs, _ = env.reset(seed=0)
    start = obs.astype(np.float64)
    obs2, reward, terminated, truncated, info = env.step(np.array([0.1, -0.3]))  # clipped to 0.1
    moved = start + np.array([0.1, -0.1])
    np.testing.assert_allclose(obs2, moved, rtol=1e-6)
    assert reward == pytest.approx(-np.hypot(moved[0] - 0.5, moved[1] + 0.5), rel=1e-6)
    assert not terminated and not truncated and "sparse_reward" not in info


def test_sparse_point_robot_rewards():
    fam = get_family("sparse-point-robot")
    env = fam.make_env()
    fam.set_task(env, {"goal": [0.0, 0.25]})
    obs, _ = env.reset(seed=0)
    assert np.all(obs == 0)  # starts at the origin
    _, r, _, _, info = env.step(np.array([0.0, 0.1]))  # distance 0.15: inside the radius
    assert r == pytest.approx(-0.15) and info["sparse_reward"] == pytest.approx(0.85)
    assert info["success"]
    _, r, _, _, info = env.step(np.array([0.0, -0.1]))  # back to 0: distance 0.25: outside
    assert r == pytest.approx(-0.25) and info["sparse_reward"] == 0.0 and not info["success"]


def test_task_sets_are_seeded_disjoint_and_in_range():
    for name in ("point-robot", "sparse-point-robot"):
        fam = get_family(name)
        a = fam.sample_tasks(80, 20, np.random.default_rng(3))
        b = fam.sample_tasks(80, 20, np.random.default_rng(3))
        c = fam.sample_tasks(80, 20, np.random.default_rng(4))
        assert a == b and a != c
        train, test = a
        assert len(train) == 80 and len(test) == 20
        goals = np.array([t["goal"] for t in train + test])
        assert len({tuple(g) for g in goals}) == 100  # disjoint, no repeats
        if name == "point-robot":
            assert np.all(np.abs(goals) <= 1)
        else:
            np.testing.assert_allclose(np.hypot(goals[:, 0], goals[:, 1]), 1.0)
            angles = np.sort(np.arctan2(goals[:, 1], goals[:, 0]))
            np.testing.assert_allclose(np.diff(angles), np.pi / 99, atol=1e-9)


def test_setting_a_task_replaces_the_previous_one():
    fam = get_family("point-robot")
    env = fam.make_env()
    fam.set_task(env, {"goal": [1.0, 1.0]})
    fam.set_task(env, {"goal": [-1.0, 0.0]})
    env.reset(seed=0)
    env.unwrapped.state = np.zeros(2)
    _, r, *_ = env.step(np.zeros(2))
    assert r == pytest.approx(-1.0)


def test_builtin_families_are_registered():
    assert {"point-robot", "sparse-point-robot"} <= set(family_names())
    with pytest.raises(ValueError, match="unknown task family"):
        get_family("nope")

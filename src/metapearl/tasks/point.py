"""2-D navigation: point-robot and sparse-point-robot (SPEC section 6)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from metapearl.tasks.base import Task, TaskFamily


class PointEnv(gym.Env):
    """A point on the plane moved by its action: x' = x + a, a in [-0.1, 0.1]^2.

    Reward -||x' - goal||. With ``sparse=True`` the step info also carries
    ``sparse_reward = 1 - dist`` inside the goal radius and 0 outside (the context and the
    meta-test see it; the critic trains on the dense reward).
    """

    def __init__(self, sparse: bool = False, random_start: bool = True, goal_radius: float = 0.2):
        self.sparse = sparse
        self.random_start = random_start
        self.goal_radius = goal_radius
        self.goal = np.zeros(2)
        self.state = np.zeros(2)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.1, shape=(2,), dtype=np.float32)

    def set_goal(self, goal) -> None:
        self.goal = np.asarray(goal, dtype=np.float64).copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.random_start:
            self.state = self.np_random.uniform(-1.0, 1.0, size=2)
        else:
            self.state = np.zeros(2)
        return self.state.astype(np.float32), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -0.1, 0.1)
        self.state = self.state + action
        dist = float(np.linalg.norm(self.state - self.goal))
        info = {"distance": dist, "success": dist <= self.goal_radius}
        if self.sparse:
            info["sparse_reward"] = 1.0 - dist if dist <= self.goal_radius else 0.0
        return self.state.astype(np.float32), -dist, False, False, info


class PointRobot(TaskFamily):
    """Goal ~ U([-1,1]^2), start ~ U([-1,1]^2), dense reward, 20-step episodes."""

    name = "point-robot"
    max_path_length = 20
    task_parameter = "goal ~ U([-1,1]^2)"
    reports_success = True  # within the goal radius 0.2

    def make_env(self) -> PointEnv:
        return PointEnv(sparse=False, random_start=True)

    def sample_task(self, rng: np.random.Generator) -> Task:
        return {"goal": rng.uniform(-1.0, 1.0, size=2).tolist()}

    def set_task(self, env: gym.Env, task: Task) -> None:
        env.unwrapped.set_goal(task["goal"])


class SparsePointRobot(PointRobot):
    """Goals evenly spaced on the unit upper half circle, start at the origin, sparse reward."""

    name = "sparse-point-robot"
    task_parameter = "goal on the unit upper half circle (evenly spaced angles)"

    def make_env(self) -> PointEnv:
        return PointEnv(sparse=True, random_start=False)

    def sample_task(self, rng: np.random.Generator) -> Task:
        angle = rng.uniform(0.0, np.pi)
        return {"goal": [float(np.cos(angle)), float(np.sin(angle))]}

    def sample_tasks(self, num_train, num_test, rng):
        # As the reference: goals at evenly spaced angles in [0, pi], shuffled, then split.
        angles = np.linspace(0.0, np.pi, num_train + num_test)
        goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        goals = goals[rng.permutation(len(goals))]
        tasks = [{"goal": g.tolist()} for g in goals]
        return tasks[:num_train], tasks[num_train:]

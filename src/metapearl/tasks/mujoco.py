"""MuJoCo task families on Gymnasium's v5 environments: the shared machinery.

A ``MujocoFamily`` builds the Gymnasium v5 env, wraps it in ``TaskEnv`` and supplies the task's
reward and termination (SPEC section 6); the v5 env's own reward and termination are ignored. The
observation is the v5 env's (documented per family where it differs from the reference code's).

Simulator instabilities (MuJoCo's bad-qacc/qpos/qvel warnings, which make MuJoCo reset the state
silently, or a NaN in the state) set ``info["unstable"]``: the rollout ends the trajectory at the
last good state and the trainer counts it (column ``Unstable episodes total``).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from metapearl.tasks.base import Task, TaskFamily

EXTRA_HINT = ("pip install -e '.[mujoco]' in the metapearl checkout, or EXTRAS=test,mujoco "
              "bash scripts/setup.sh (gymnasium[mujoco] and mujoco 3.3.x)")


class MissingExtraError(ImportError):
    """An optional dependency a family needs is not installed; the message names the fix."""


def require_mujoco(family: str):
    """The mujoco module, or MissingExtraError naming the install command."""
    try:
        import mujoco
        from gymnasium.envs.mujoco import MujocoEnv  # noqa: F401  (needs gymnasium[mujoco])
    except ImportError as e:
        raise MissingExtraError(f"the {family} family needs MuJoCo ({e}): {EXTRA_HINT}") from None
    return mujoco


class TaskEnv(gym.Wrapper):
    """A v5 MuJoCo env following one task of `family`: the family's reward and termination."""

    def __init__(self, env: gym.Env, family: MujocoFamily):
        super().__init__(env)
        mujoco = require_mujoco(family.name)
        self.family = family
        self.task: Task | None = None
        self._bad = np.array([int(w) for w in (mujoco.mjtWarning.mjWARN_BADQACC,
                                      mujoco.mjtWarning.mjWARN_BADQPOS,
                                      mujoco.mjtWarning.mjWARN_BADQVEL)])

    def step(self, action):
        if self.task is None:
            raise RuntimeError(f"set a {self.family.name} task (family.set_task) before stepping")
        sim = self.env.unwrapped
        before = self.family.snapshot(sim)
        # the counters as a list (compared after the step): half the cost of a numpy sum
        warnings = sim.data.warning.number[self._bad].tolist()
        obs, _, _, _, info = self.env.step(action)
        reward, terminated = self.family.reward(sim, self.task, before, np.asarray(action))
        if (sim.data.warning.number[self._bad].tolist() != warnings
                or not (math.isfinite(reward) and np.isfinite(obs).all())):
            info["unstable"] = True
        return obs, reward, terminated, False, info


class MujocoFamily(TaskFamily):
    """A task family over one Gymnasium v5 MuJoCo env; subclasses define the task's reward."""

    max_path_length = 200
    env_id: str = ""
    env_kwargs: dict[str, Any] = {}

    def make_env(self) -> TaskEnv:
        require_mujoco(self.name)
        return TaskEnv(gym.make(self.env_id, **self.env_kwargs).unwrapped, self)

    def set_task(self, env: gym.Env, task: Task) -> None:
        env.task = task

    def snapshot(self, sim) -> np.ndarray:
        """What the reward needs from the state before the step (default: the root x, y)."""
        return sim.data.qpos[:2].copy()

    def reward(self, sim, task: Task, before: np.ndarray, action: np.ndarray) -> tuple[float, bool]:
        """(reward, terminated) of the step just taken from the state `before`."""
        raise NotImplementedError


def x_velocity(sim, before: np.ndarray) -> float:
    """Forward velocity of the root over the last step: (x' - x) / control dt (`before`: snapshot)."""
    return (sim.data.qpos[0] - before[0]) / sim.dt


class FixedTasks(TaskFamily):
    """A family with a short fixed task list (e.g. forward/backward): train = test = the list."""

    tasks: tuple[Task, ...] = ()

    def sample_task(self, rng: np.random.Generator) -> Task:
        return dict(self.tasks[int(rng.integers(len(self.tasks)))])

    def sample_tasks(self, num_train, num_test, rng):
        # As the reference: every task is trained on and tested on (the list, repeated if asked
        # for more); the generator is not used.
        cycle = [dict(t) for t in self.tasks]
        return ([cycle[i % len(cycle)] for i in range(num_train)],
                [cycle[i % len(cycle)] for i in range(num_test)])

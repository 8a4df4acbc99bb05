"""Random-dynamics families: walker-rand-params and hopper-rand-params (SPEC section 6).

A task multiplies every element of the model's body_mass, body_inertia and geom_friction by
1.5^U(-3, 3) and of dof_damping by 1.3^U(-3, 3), starting from the model's own defaults (kept at
env creation), so setting a task undoes the previous one exactly. As in the reference, what MuJoCo
derives from them when it compiles the model (body_subtreemass, body_invweight0, which scales
the constraint regularisation) is not recomputed (no mj_setConst). Reward v_x + 1 - 1e-3 ||a||^2
with the reference's termination; the context holds s' (`use_next_obs_in_context` in the presets).
Observations are the v5 envs' (qpos[1:], clip(qvel, -10, 10)) as in the reference. The walker
runs on Gymnasium's older walker2d.xml, the reference's model (right foot friction 0.9, left 1.9);
Walker2d-v5's default model gives both feet 1.9.
"""

from __future__ import annotations

import numpy as np

from metapearl.tasks.base import Task
from metapearl.tasks.mujoco import MujocoFamily, TaskEnv, require_mujoco, x_velocity

# parameter -> base of the log-uniform multiplier (1.5^U(-3, 3) or 1.3^U(-3, 3))
RAND_PARAMS = {"body_mass": 1.5, "body_inertia": 1.5, "geom_friction": 1.5, "dof_damping": 1.3}


class RandParams(MujocoFamily):
    """v_x + 1 - 1e-3 ||a||^2 under randomised mass, inertia, friction and damping."""

    task_parameter = "mass, inertia, friction x 1.5^U(-3,3); damping x 1.3^U(-3,3) per element"
    _shapes: dict[str, tuple[int, ...]] | None = None

    def make_env(self) -> TaskEnv:
        env = super().make_env()
        model = env.unwrapped.model
        env.defaults = {k: getattr(model, k).copy() for k in RAND_PARAMS}
        return env

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the randomised model arrays (read once from a model)."""
        if self._shapes is None:
            require_mujoco(self.name)
            env = self.make_env()
            self._shapes = {k: v.shape for k, v in env.defaults.items()}
            env.close()
        return self._shapes

    def sample_task(self, rng: np.random.Generator) -> Task:
        return {name: (RAND_PARAMS[name] ** rng.uniform(-3.0, 3.0, size=shape)).tolist()
                for name, shape in self.shapes().items()}

    def set_task(self, env, task: Task) -> None:
        model = env.unwrapped.model
        for name, default in env.defaults.items():
            getattr(model, name)[:] = default * np.asarray(task[name])
        env.task = task

    def reward(self, sim, task, before, action):
        v_x = x_velocity(sim, before)
        return v_x + 1.0 - 1e-3 * float(np.square(action).sum()), not self.healthy(sim)

    def healthy(self, sim) -> bool:
        raise NotImplementedError


class WalkerRandParams(RandParams):
    """Walker2d; terminates unless 0.8 < height < 2 and -1 < angle < 1."""

    name = "walker-rand-params"
    env_id = "Walker2d-v5"
    env_kwargs = {"xml_file": "walker2d.xml"}  # the reference's feet frictions 0.9 / 1.9

    def healthy(self, sim) -> bool:
        height, angle = sim.data.qpos[1:3]
        return bool(0.8 < height < 2.0 and -1.0 < angle < 1.0)


class HopperRandParams(RandParams):
    """Hopper; terminates unless the state is finite, |state[2:]| < 100, height > 0.7, |angle| < 0.2."""

    name = "hopper-rand-params"
    env_id = "Hopper-v5"

    def healthy(self, sim) -> bool:
        state = sim.state_vector()
        height, angle = sim.data.qpos[1:3]
        return bool(np.isfinite(state).all() and (np.abs(state[2:]) < 100).all()
                    and height > 0.7 and abs(angle) < 0.2)

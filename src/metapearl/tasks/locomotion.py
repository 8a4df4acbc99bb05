"""The paper's locomotion families: cheetah-vel, cheetah-dir, ant-dir, ant-goal, humanoid-dir.

Rewards and task distributions are SPEC section 6 (the reference code's), computed from the MuJoCo
state of Gymnasium's v5 envs. Observations are the v5 envs', set up to carry what the reference's
carried; where they differ:
- HalfCheetah: qpos[1:], qvel (17); the reference also appended the torso's centre of mass (20),
  which includes the x position the task does not need.
- ant-dir: qpos[2:], qvel (27), as the reference (v5 option include_cfrc_ext_in_observation=False).
- ant-goal: qpos, qvel and clipped cfrc_ext of bodies 1.. (107; v5 option
  exclude_current_positions_from_observation=False: the goal is a place, the agent must know where
  it is); the reference also had the world body's always-zero forces (113).
- Humanoid: qpos[2:], qvel, cinert, cvel, qfrc_actuator and cfrc_ext without the world body's rows
  and the free joint's actuator forces (348); the reference kept them (376).
Contact forces: Gymnasium computes cfrc_ext after every step, so the ants' contact cost and the
humanoid's impact cost are live, as SPEC section 6 writes them. The reference ran on mujoco-py 2.0,
where these forces read as zero, so its published curves had neither term.
"""

from __future__ import annotations

import numpy as np

from metapearl.tasks.base import Task
from metapearl.tasks.mujoco import FixedTasks, MujocoFamily, x_velocity


def contact_cost(sim) -> float:
    """0.5e-3 * sum(clip(cfrc_ext, -1, 1)^2), the ant families' contact cost (SPEC section 6)."""
    return 0.5e-3 * float(np.square(np.clip(sim.data.cfrc_ext, -1.0, 1.0)).sum())


def mass_center_xy(sim) -> np.ndarray:
    """The x, y of the model's centre of mass."""
    mass = sim.model.body_mass[:, None]
    return (mass * sim.data.xipos).sum(0)[:2] / mass.sum()


class CheetahVel(MujocoFamily):
    """HalfCheetah running at a target velocity: r = -|v_x - v*| - 0.05 ||a||^2."""

    name = "cheetah-vel"
    task_parameter = "target velocity v* ~ U(0, 3)"
    env_id = "HalfCheetah-v5"

    def sample_task(self, rng: np.random.Generator) -> Task:
        return {"velocity": float(rng.uniform(0.0, 3.0))}

    def reward(self, sim, task, before, action):
        v_x = x_velocity(sim, before)
        return -abs(v_x - task["velocity"]) - 0.05 * float(np.square(action).sum()), False


class CheetahDir(FixedTasks, MujocoFamily):
    """HalfCheetah running forward or backward: r = dir * v_x - 0.05 ||a||^2."""

    name = "cheetah-dir"
    task_parameter = "direction in {-1, +1} (2 tasks, train = test)"
    env_id = "HalfCheetah-v5"
    tasks = ({"direction": -1.0}, {"direction": 1.0})

    def reward(self, sim, task, before, action):
        v_x = x_velocity(sim, before)
        return task["direction"] * v_x - 0.05 * float(np.square(action).sum()), False


class AntDir(FixedTasks, MujocoFamily):
    """Ant walking forward or backward: r = v . dir - 0.5 ||a||^2 - contact + 1.

    Terminates unless the state is finite and 0.2 <= torso z <= 1.
    """

    name = "ant-dir"
    task_parameter = "direction angle in {0, pi} (2 tasks, train = test)"
    env_id = "Ant-v5"
    env_kwargs = {"include_cfrc_ext_in_observation": False}  # as the reference: qpos[2:], qvel
    tasks = ({"angle": 0.0}, {"angle": float(np.pi)})

    def snapshot(self, sim):
        return sim.data.body("torso").xpos[:2].copy()

    def reward(self, sim, task, before, action):
        velocity = (sim.data.body("torso").xpos[:2] - before) / sim.dt
        direction = np.array([np.cos(task["angle"]), np.sin(task["angle"])])
        reward = (float(velocity @ direction) - 0.5 * float(np.square(action).sum())
                  - contact_cost(sim) + 1.0)
        z = sim.data.qpos[2]
        healthy = np.isfinite(sim.state_vector()).all() and 0.2 <= z <= 1.0
        return reward, not healthy


class AntGoal(MujocoFamily):
    """Ant walking to a goal in a disc of radius 3: r = -L1(xy, goal) - 0.1 ||a||^2 - contact."""

    name = "ant-goal"
    task_parameter = "goal uniform in the disc of radius 3"
    env_id = "Ant-v5"
    env_kwargs = {"exclude_current_positions_from_observation": False}

    def sample_task(self, rng: np.random.Generator) -> Task:
        angle, radius = rng.uniform(0.0, 2 * np.pi), 3.0 * np.sqrt(rng.uniform())
        return {"goal": [float(radius * np.cos(angle)), float(radius * np.sin(angle))]}

    def reward(self, sim, task, before, action):
        xy = sim.data.body("torso").xpos[:2]
        reward = (-float(np.abs(xy - np.asarray(task["goal"])).sum())
                  - 0.1 * float(np.square(action).sum()) - contact_cost(sim))
        return reward, False


class HumanoidDir(MujocoFamily):
    """Humanoid walking in a direction in the plane.

    r = 0.25 * (com displacement . dir) / physics timestep - 0.1 ||ctrl||^2
        - min(5e-7 ||cfrc_ext||^2, 10) + 5; terminates outside 1 <= z <= 2.
    As the reference, the displacement is divided by the physics timestep (0.003), not the control
    step (0.015): the velocity term is 5x a true velocity, so returns compare with the paper's.
    """

    name = "humanoid-dir"
    task_parameter = "direction angle ~ U(0, 2 pi)"
    env_id = "Humanoid-v5"

    def sample_task(self, rng: np.random.Generator) -> Task:
        return {"angle": float(rng.uniform(0.0, 2 * np.pi))}

    def snapshot(self, sim):
        return mass_center_xy(sim)

    def reward(self, sim, task, before, action):
        direction = np.array([np.cos(task["angle"]), np.sin(task["angle"])])
        velocity = (mass_center_xy(sim) - before) / sim.model.opt.timestep
        impact = min(0.5e-6 * float(np.square(sim.data.cfrc_ext).sum()), 10.0)
        reward = (0.25 * float(velocity @ direction) - 0.1 * float(np.square(sim.data.ctrl).sum())
                  - impact + 5.0)
        z = sim.data.qpos[2]
        return reward, not 1.0 <= z <= 2.0

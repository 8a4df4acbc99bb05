"""Trajectory collection, vectorised over tasks: one environment per task, one policy call per step.

Each *slot* is one environment with its own belief over z. A slot runs whole trajectories until it
has collected `num_steps` steps; z is drawn from the slot's belief at the start of each trajectory,
and a callback after each trajectory may add it to buffers and update the belief (SPEC sections 4-5).
A step the env flags with ``info["unstable"]`` (a diverged simulator) ends the trajectory at the last
good state; any other NaN or infinite observation or reward stops the run with NonFiniteError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from metapearl.agent import PEARLAgent, to_env_action
from metapearl.config import ConfigError
from metapearl.encoder import sample_z
from metapearl.guards import NonFiniteError


@dataclass
class Trajectory:
    """One trajectory; arrays have one row per step."""

    obs: np.ndarray
    actions: np.ndarray  # normalised to [-1, 1]
    rewards: np.ndarray  # the critic's reward
    context_rewards: np.ndarray  # the encoder's and the meta-test's reward
    next_obs: np.ndarray
    terminals: np.ndarray  # true termination only (a time limit is not a terminal)
    success: bool  # info["success"] seen at any step
    unstable: bool = False  # ended early by a simulator instability (info["unstable"])

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ret(self) -> float:
        """The return the paper reports: the sum of context (sparse where sparse) rewards."""
        return float(self.context_rewards.sum())

    def context_rows(self, agent: PEARLAgent, device) -> torch.Tensor:
        """This trajectory as context rows (len, context_dim)."""
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
        return agent.make_context(t(self.obs), t(self.actions), t(self.context_rewards[:, None]),
                                  t(self.next_obs))


class Belief:
    """Per-slot Gaussian beliefs over z: mu (slots, latent) and var (slots, latent) or
    (slots, latent, latent) (encoder.py); callbacks overwrite rows."""

    def __init__(self, mu: torch.Tensor, var: torch.Tensor):
        self.mu, self.var = mu, var

    def set(self, slot: int, mu: torch.Tensor, var: torch.Tensor) -> None:
        self.mu[slot], self.var[slot] = mu.reshape(-1), var.reshape(self.var.shape[1:])


class _Recorder:
    """Preallocated per-slot arrays of the trajectory in progress."""

    def __init__(self, slots: int, horizon: int, obs_dim: int, action_dim: int):
        self.obs = np.zeros((slots, horizon, obs_dim), np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros((slots, horizon, action_dim), np.float32)
        self.rewards = np.zeros((slots, horizon), np.float32)
        self.context_rewards = np.zeros_like(self.rewards)
        self.terminals = np.zeros((slots, horizon), np.float32)
        self.success = np.zeros(slots, bool)

    def take(self, i: int, length: int, unstable: bool = False) -> Trajectory:
        traj = Trajectory(
            self.obs[i, :length].copy(), self.actions[i, :length].copy(),
            self.rewards[i, :length].copy(), self.context_rewards[i, :length].copy(),
            self.next_obs[i, :length].copy(), self.terminals[i, :length].copy(),
            bool(self.success[i]), unstable,
        )
        self.success[i] = False
        return traj


def _not_numbers(env: gym.Env, obs, reward, context_reward) -> str:
    """What of an env's step is not numbers, for the error that says so."""
    name = type(env.unwrapped).__name__
    try:
        np.isfinite(obs)
    except TypeError:
        return f"{name} returned the observation {obs!r}; an observation is an array of numbers"
    return (f"{name} returned the reward {reward!r} (sparse reward {context_reward!r}); a reward "
            "is a number")


def collect(
    agent: PEARLAgent,
    envs: Sequence[gym.Env],
    belief: Belief,
    num_steps: int,
    max_path_length: int,
    deterministic: bool,
    generator: torch.Generator | None,
    on_trajectory: Callable[[int, Trajectory], None] | None = None,
    max_trajectories: int | None = None,
) -> list[list[Trajectory]]:
    """Run whole trajectories in every env until each has at least `num_steps` steps (or, sooner,
    `max_trajectories` trajectories).

    Returns, per slot, its trajectories in order. `on_trajectory(slot, traj)` runs as each one
    ends, before the slot's next z is drawn, so it may update `belief`.
    """
    n = len(envs)
    obs_dim = agent.obs_dim
    rec = _Recorder(n, max_path_length, obs_dim, agent.action_dim)
    policy = agent.rollout_policy()  # the weights stay fixed during a collection
    low, high = agent.action_low.cpu().numpy(), agent.action_high.cpu().numpy()
    x = np.zeros((n, obs_dim + agent.latent_size), np.float32)  # policy input rows [obs, z]
    obs = x[:, :obs_dim]
    z = x[:, obs_dim:]
    steps = np.zeros(n, np.int64)
    t = np.zeros(n, np.int64)
    active = np.ones(n, bool)
    out: list[list[Trajectory]] = [[] for _ in range(n)]

    def start(slots: list[int]) -> None:
        for i in slots:
            obs[i] = envs[i].reset()[0]
        idx = torch.as_tensor(slots, device=belief.mu.device)
        z[slots] = sample_z(belief.mu[idx], belief.var[idx], generator).cpu().numpy()

    start(list(range(n)))
    while active.any():
        live = np.flatnonzero(active)
        actions = policy(x[live], deterministic, generator)
        env_actions = to_env_action(actions, low, high)
        restart = []
        for j, i in enumerate(live):
            next_obs, reward, terminated, truncated, info = envs[i].step(env_actions[j])
            steps[i] += 1
            k = t[i]
            context_reward = info.get("sparse_reward", reward)
            unstable = bool(info.get("unstable", False))
            if not unstable:
                try:
                    finite = (np.isfinite(next_obs).all() and math.isfinite(reward)
                              and math.isfinite(context_reward))
                except TypeError:
                    raise ConfigError(_not_numbers(envs[i], next_obs, reward, context_reward)
                                      ) from None
                if not finite:
                    raise NonFiniteError(
                        f"non-finite observation or reward from {type(envs[i].unwrapped).__name__}"
                        f" at step {k} of a trajectory (an env whose simulator can diverge should "
                        "flag the step with info['unstable'] = True instead)"
                    )
                rec.obs[i, k], rec.actions[i, k], rec.next_obs[i, k] = obs[i], actions[j], next_obs
                rec.rewards[i, k] = reward
                rec.context_rewards[i, k] = context_reward
                rec.terminals[i, k] = float(terminated)
                rec.success[i] |= bool(info.get("success", False))
                t[i] += 1
            if unstable or terminated or truncated or t[i] >= max_path_length:
                # an unstable step is dropped: the trajectory ends at the last good state
                traj = rec.take(i, int(t[i]), unstable)
                t[i] = 0
                out[i].append(traj)
                if on_trajectory is not None:
                    on_trajectory(int(i), traj)
                if steps[i] >= num_steps or len(out[i]) == max_trajectories:
                    active[i] = False
                else:
                    restart.append(int(i))
            else:
                obs[i] = next_obs
        if restart:
            start(restart)
    return out

"""The meta-test protocol (SPEC section 5, Algorithm 2) and the adaptation curve.

Every (task, run) pair is its own slot with its own environment, context and belief, all stepped
side by side: the belief of one task cannot reach another, because nothing is shared between slots
and every slot starts from the prior.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from metapearl.agent import PEARLAgent
from metapearl.rollout import Belief, Trajectory, collect
from metapearl.tasks import Task, TaskFamily


@dataclass
class EvalResult:
    """Returns of one evaluation; `returns[s]` lists the trajectory returns of slot s in order."""

    returns: list[list[float]]
    successes: list[list[bool]]

    @property
    def final_return(self) -> float:
        """Mean over slots of the last trajectory's return (the paper's Figure 3 number)."""
        return float(np.mean([r[-1] for r in self.returns]))

    @property
    def mean_return(self) -> float:
        """Mean over slots of each slot's mean trajectory return (the reference's per-task
        average, so a slot with more trajectories does not weigh more)."""
        return float(np.mean([np.mean(r) for r in self.returns]))

    @property
    def final_success_rate(self) -> float:
        return float(np.mean([s[-1] for s in self.successes]))

    def adaptation_curve(self) -> np.ndarray:
        """Mean return of trajectory k over the slots, k = 1..K for the fewest trajectories K any
        slot ran, as the reference cuts them (where episodes can end early, the slots that run
        more trajectories are those whose episodes fail, so longer curves would sink)."""
        shortest = min(len(r) for r in self.returns)
        return np.mean([r[:shortest] for r in self.returns], axis=0)


def _waves(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_slots(
    agent: PEARLAgent,
    family: TaskFamily,
    envs: Sequence[gym.Env],
    tasks: list[Task],
    cfg,
    generator: torch.Generator | None,
    initial_belief: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    after_trajectory: Callable[[int, Trajectory], tuple[torch.Tensor, torch.Tensor] | None],
    max_trajectories: int | None = None,
) -> EvalResult:
    """Run slot s on tasks[s], as many side by side as there are envs, for `cfg.num_steps_per_eval`
    steps or `max_trajectories` trajectories (see `collect`).

    initial_belief(slots) gives (mu, var) for those slots; after_trajectory(slot, traj) may return
    a new (mu, var) for that slot.
    """
    returns: list[list[float]] = []
    successes: list[list[bool]] = []
    for wave in _waves(list(range(len(tasks))), len(envs)):
        wave_envs = envs[:len(wave)]
        for env, s in zip(wave_envs, wave, strict=True):
            family.set_task(env, tasks[s])
        belief = Belief(*initial_belief(wave))

        def on_trajectory(i: int, traj: Trajectory, wave=wave, belief=belief) -> None:
            new = after_trajectory(wave[i], traj)
            if new is not None:
                belief.set(i, *new)

        trajs = collect(agent, wave_envs, belief, cfg.num_steps_per_eval, cfg.max_path_length,
                        deterministic=True, generator=generator, on_trajectory=on_trajectory,
                        max_trajectories=max_trajectories)
        returns += [[t.ret for t in slot] for slot in trajs]
        successes += [[t.success for t in slot] for slot in trajs]
    return EvalResult(returns, successes)


@torch.no_grad()
def meta_test(
    agent: PEARLAgent,
    family: TaskFamily,
    envs: Sequence[gym.Env],
    tasks: list[Task],
    cfg,
    generator: torch.Generator | None,
) -> EvalResult:
    """Online adaptation (Algorithm 2) on each task, `cfg.num_evals` runs each.

    Per slot: belief = prior; deterministic policy (tanh of the mean); z drawn from the current
    belief at the start of each trajectory; after `num_exp_traj_eval` trajectories the posterior is
    re-inferred from all context gathered so far after every trajectory (or from a draw of it,
    `PEARLAgent.online_posterior`); until `num_steps_per_eval`.
    """
    slot_tasks = [task for task in tasks for _ in range(cfg.num_evals)]
    contexts: list[list[torch.Tensor]] = [[] for _ in slot_tasks]

    def after(s: int, traj: Trajectory):
        contexts[s].append(traj.context_rows(agent, agent.action_low.device))
        if len(contexts[s]) >= cfg.num_exp_traj_eval:
            return agent.online_posterior(torch.cat(contexts[s]).unsqueeze(0), generator)
        return None

    return _run_slots(agent, family, envs, slot_tasks, cfg, generator,
                      lambda slots: agent.prior(len(slots)), after)


@torch.no_grad()
def offline_test(
    agent: PEARLAgent,
    family: TaskFamily,
    envs: Sequence[gym.Env],
    tasks: list[Task],
    context_of: Callable[[list[int]], torch.Tensor],
    cfg,
    generator: torch.Generator | None,
) -> EvalResult:
    """Training tasks with the posterior inferred from buffer context, re-drawn every trajectory.

    As the reference: `num_steps_per_eval // max_path_length` trajectories per task, however early
    they end (a step budget would give a task whose episodes end early more trajectories, and
    its short ones more weight than its long ones).
    `context_of(slot_indices)` returns context rows (len(slots), n, context_dim) for those slots'
    tasks (indices into `tasks`).
    """
    return _run_slots(
        agent, family, envs, tasks, cfg, generator,
        lambda slots: agent.posterior(context_of(slots)),
        lambda s, traj: agent.posterior(context_of([s])),
        max_trajectories=cfg.num_steps_per_eval // cfg.max_path_length,  # >= 1 (config check)
    )


def adapt_to_task(
    agent: PEARLAgent,
    env: gym.Env,
    cfg,
    max_trajectories: int | None = None,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Algorithm 2 on one task through the deployment API, step by step (pictures, videos).

    Belief reset to the prior; z drawn from the belief at the start of each trajectory; the
    posterior re-inferred from all context (or a draw of it, `PEARLAgent.online_posterior`)
    after trajectory `num_exp_traj_eval` and every one after it; trajectories until
    `num_steps_per_eval` env steps (or `max_trajectories`). A step flagged unstable ends its
    trajectory and is left out, as in `collect`. `on_step(k, t, return_so_far)` runs after step t
    of trajectory k. Returns per trajectory {"obs", "next_obs", "rewards"}, the rewards being the
    context's (sparse where the family has one).
    """
    agent.reset()
    trajectories: list[dict[str, np.ndarray]] = []
    steps = 0
    while steps < cfg.num_steps_per_eval and len(trajectories) != max_trajectories:
        k = len(trajectories)
        agent.sample_z()
        obs, _ = env.reset(seed=seed * 1000 + k)
        rows: list[tuple[np.ndarray, np.ndarray, float]] = []
        for t in range(cfg.max_path_length):
            action = agent.act(obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            if info.get("unstable"):
                break
            reward = float(info.get("sparse_reward", reward))
            agent.observe(obs, action, reward, next_obs)
            rows.append((np.asarray(obs), np.asarray(next_obs), reward))
            if on_step is not None:
                on_step(k, t, sum(r[2] for r in rows))
            obs = next_obs
            if terminated or truncated:
                break
        trajectories.append({"obs": np.array([r[0] for r in rows]),
                             "next_obs": np.array([r[1] for r in rows]),
                             "rewards": np.array([r[2] for r in rows])})
        if len(trajectories) >= cfg.num_exp_traj_eval:
            agent.infer_posterior()
    return trajectories

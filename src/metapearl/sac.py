"""The critics and one PEARL gradient step (SPEC section 3).

All losses are summed and back-propagated once, then one Adam steps every network. Gradient routing
reproduces the reference's separate optimizers exactly:
- the encoder learns from L_Q + KL only (z enters Q1/Q2 undetached, the policy and V get z.detach());
- Q1/Q2 learn from L_Q only (the policy's min Q uses the ensemble with detached parameters);
- V learns from L_V only (its target is detached); the policy from L_pi only.
One difference from the reference's sequential steps: the V target and the policy's min Q use the
Q networks *before* this step's update (the reference evaluates them after its Q step). This is the
usual SAC formulation and saves a forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import torch
from torch import nn

from metapearl import cpu
from metapearl.agent import PEARLAgent
from metapearl.buffers import Batch
from metapearl.encoder import kl_to_standard_normal, marginal_variance, sample_z
from metapearl.guards import check_finite
from metapearl.networks import MLP, EnsembleMLP

LOSS_STAT_NAMES = (
    "Loss/qf", "Loss/vf", "Loss/policy", "Loss/kl", "Q/mean", "V/mean", "Policy/log_pi",
    "Z/mean_abs", "Z/variance",
)
GRAD_STAT_NAMES = ("Grad/encoder", "Grad/policy", "Grad/qf", "Grad/vf")  # gradient L2 norms
STAT_NAMES = LOSS_STAT_NAMES + GRAD_STAT_NAMES


class Critics(nn.Module):
    """Q1, Q2 (one ensemble module) over (s, a, z); V and target V over (s, z)."""

    def __init__(self, obs_dim: int, action_dim: int, latent_size: int, net_size: int):
        super().__init__()
        self.qf = EnsembleMLP(2, obs_dim + action_dim + latent_size, net_size, 1)
        self.vf = MLP(obs_dim + latent_size, net_size, 1)
        self.target_vf = copy.deepcopy(self.vf).requires_grad_(False)


class Noise(NamedTuple):
    """A step's standard normal draws: z's (tasks, latent), None for a deterministic z, and the
    policy's for its actions (tasks, n, act)."""

    z: torch.Tensor | None
    actions: torch.Tensor


def _tasks(batch: Batch, part: slice) -> Batch:
    """The transitions of a range of a batch's tasks (views)."""
    return Batch(*(getattr(batch, f.name)[part] for f in dataclasses.fields(batch)))


def critic_target(
    rewards: torch.Tensor,
    terminals: torch.Tensor,
    next_v: torch.Tensor,
    reward_scale: float,
    discount: float,
) -> torch.Tensor:
    """y = reward_scale * r + (1 - done) * gamma * Vbar(s', z) (SPEC section 3)."""
    return reward_scale * rewards + (1.0 - terminals) * discount * next_v


class PEARLUpdate:
    """Owns the optimizer and performs gradient steps on an agent and its critics."""

    def __init__(self, agent: PEARLAgent, critics: Critics, cfg):
        self.agent, self.critics, self.cfg = agent, critics, cfg
        self._groups = [list(m.parameters()) for m in
                        (agent.encoder, agent.policy, critics.qf, critics.vf)]
        self._params = params = [p for g in self._groups for p in g]
        self._pool: ThreadPoolExecutor | None = None  # the threads of a split step (backward)
        self._pool_workers = 0
        # Adam's step may be captured in a CUDA graph only when built capturable (graphs.py)
        extra = {"capturable": True} if cfg.cuda_graphs else {}
        try:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=True, **extra)
        except RuntimeError:  # torch < 2.4 has no fused Adam on CPU: the same update, unfused
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, foreach=True, **extra)
        # a tensor, so that a CUDA graph captured with it reads its current value (graphs.py)
        self.kl_lambda = torch.tensor(cfg.kl_lambda, device=params[0].device)
        self._vf_params = list(critics.vf.parameters())
        self._target_params = list(critics.target_vf.parameters())

    def draw_noise(self, rl: Batch, generator: torch.Generator | None) -> Noise:
        """The standard normal draws of a step on `rl`'s tasks, in the order the step uses them."""
        tasks, n, act = rl.actions.shape
        draw = lambda *shape: torch.randn(shape, generator=generator, device=rl.actions.device)  # noqa: E731
        z = draw(tasks, self.agent.latent_size) if self.agent.stochastic else None
        return Noise(z, draw(tasks * n, act).view(tasks, n, act))

    def losses(
        self, rl: Batch, context: Batch, noise: Noise, share: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, stats) for one meta-batch; rl and context hold (tasks, n, dim) tensors.

        share: these tasks' fraction of the step's meta-batch. The mean losses and the stats are
        scaled by it and the KL (a sum over tasks) is not, so the shares of a split meta-batch add
        up to the whole's.
        """
        cfg, agent, critics = self.cfg, self.agent, self.critics
        tasks, n = rl.obs.shape[:2]

        # q(z | c) per task and one z per task, broadcast to its transitions (SPEC section 2)
        ctx = agent.make_context(context.obs, context.actions, context.context_rewards,
                                 context.next_obs)
        mu, var = agent.posterior(ctx)
        z = sample_z(mu, var, eps=noise.z) if agent.stochastic else mu
        z = z.unsqueeze(1).expand(tasks, n, z.shape[-1]).reshape(tasks * n, -1)
        zd = z.detach()
        obs = rl.obs.reshape(tasks * n, -1)
        actions = rl.actions.reshape(tasks * n, -1)
        next_obs = rl.next_obs.reshape(tasks * n, -1)

        # KL = kl_lambda * sum over tasks and latent dims of KL(q(z|c_i) || N(0, I))
        kl = kl_to_standard_normal(mu, var).sum() if agent.stochastic else mu.new_zeros(())

        # critic: L_Q = mean (Q1 - y)^2 + mean (Q2 - y)^2; the encoder learns through z here
        q = critics.qf(torch.cat([obs, actions, z], dim=-1))  # (2, tasks*n, 1)
        with torch.no_grad():
            next_v = critics.target_vf(torch.cat([next_obs, zd], dim=-1))
            y = critic_target(rl.rewards.reshape(-1, 1), rl.terminals.reshape(-1, 1), next_v,
                              cfg.reward_scale, cfg.discount)
        loss_q = (q - y).pow(2).mean(dim=(1, 2)).sum()

        # policy and V, on z detached
        policy_in = torch.cat([obs, zd], dim=-1)
        new_actions, log_pi, mean, log_std = agent.policy(policy_in,
                                                          eps=noise.actions.reshape(tasks * n, -1))
        log_pi = log_pi.unsqueeze(-1)
        min_q_new = critics.qf.min_over_members(torch.cat([obs, new_actions, zd], dim=-1))
        v = critics.vf(policy_in)
        loss_v = (v - (min_q_new - log_pi).detach()).pow(2).mean()
        loss_pi = (
            (log_pi - min_q_new).mean()
            + cfg.policy_mean_reg_weight * mean.pow(2).mean()
            + cfg.policy_std_reg_weight * log_std.pow(2).mean()
        )

        loss_q, loss_v, loss_pi = share * loss_q, share * loss_v, share * loss_pi
        total = loss_q + self.kl_lambda * kl + loss_v + loss_pi
        stats = torch.stack([
            loss_q, loss_v, loss_pi, kl, share * q.mean(), share * v.mean(), share * log_pi.mean(),
            share * mu.abs().mean(), share * marginal_variance(var).mean(),
        ]).detach()
        return total, stats

    def set_kl_lambda(self, weight: float) -> None:
        """The KL weight of the coming steps (`PEARLConfig.kl_lambda_at`)."""
        self.kl_lambda.fill_(weight)

    def grad_norms(self) -> torch.Tensor:
        """L2 norms of the current gradients of the encoder, policy, Q ensemble and V.

        Every network enters the total loss, so every parameter has a gradient after backward.
        """
        return torch.stack([torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [p.grad for p in group]))) for group in self._groups])

    def step(self, rl: Batch, context: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """One gradient step on every network and the target-V Polyak update; returns stats.

        Raises NonFiniteError naming the losses or gradients that are NaN or infinite, before any
        parameter changes.
        """
        stats = self.backward(rl, context, generator)
        check_finite(stats, STAT_NAMES, "the gradient step")
        self.apply()
        return stats

    def backward(self, rl: Batch, context: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """The losses and every network's gradients, no parameter changed; returns the stats.

        On CPU under numpy's BLAS the meta-batch's tasks are split over the compute threads
        (`cpu.update_shards`, the reasons in cpu.py): each thread computes its tasks' share of the
        losses and their gradients, and the shares are summed in a fixed order. The noise is
        drawn beforehand, so the step is the unsplit one up to float32 rounding.
        """
        noise = self.draw_noise(rl, generator)
        tasks = rl.obs.shape[0]
        shards = cpu.update_shards(tasks) if rl.obs.device.type == "cpu" else 1
        self.optimizer.zero_grad(set_to_none=True)
        if shards == 1:
            total, loss_stats = self.losses(rl, context, noise)
            total.backward()
            return torch.cat([loss_stats, self.grad_norms()])
        bounds = [tasks * i // shards for i in range(shards + 1)]
        parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

        def share(part: slice) -> tuple[list[torch.Tensor], torch.Tensor]:
            total, stats = self.losses(_tasks(rl, part), _tasks(context, part),
                                       Noise(*(None if x is None else x[part] for x in noise)),
                                       (part.stop - part.start) / tasks)
            return list(torch.autograd.grad(total, self._params)), stats

        if self._pool is None or self._pool_workers < shards - 1:  # (more threads configured)
            if self._pool is not None:
                self._pool.shutdown()
            self._pool_workers = shards - 1
            self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="metapearl-update")
        others = [self._pool.submit(share, part) for part in parts[1:]]
        try:
            grads, loss_stats = share(parts[0])  # this thread takes the first share
            for other in others:
                more, more_stats = other.result()
                torch._foreach_add_(grads, more)
                loss_stats = loss_stats + more_stats
        finally:  # on an error, no share is left running
            wait(others)
        for p, g in zip(self._params, grads, strict=True):
            # in the parameter's layout, as autograd's own accumulation leaves it: a fused Adam
            # reads a gradient as flat memory, and autograd.grad returns each backward's layout
            p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        return torch.cat([loss_stats, self.grad_norms()])

    def apply(self) -> None:
        """Adam on every network from the current gradients, then the target-V Polyak update."""
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._vf_params, self.cfg.soft_target_tau)

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

import torch
from torch import nn

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
        params = [p for g in self._groups for p in g]
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

    def losses(
        self, rl: Batch, context: Batch, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, stats) for one meta-batch; rl and context hold (tasks, n, dim) tensors."""
        cfg, agent, critics = self.cfg, self.agent, self.critics
        tasks, n = rl.obs.shape[:2]

        # q(z | c) per task and one z per task, broadcast to its transitions (SPEC section 2)
        ctx = agent.make_context(context.obs, context.actions, context.context_rewards,
                                 context.next_obs)
        mu, var = agent.posterior(ctx)
        z = sample_z(mu, var, generator) if agent.stochastic else mu
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
        new_actions, log_pi, mean, log_std = agent.policy(policy_in, generator=generator)
        log_pi = log_pi.unsqueeze(-1)
        min_q_new = critics.qf.min_over_members(torch.cat([obs, new_actions, zd], dim=-1))
        v = critics.vf(policy_in)
        loss_v = (v - (min_q_new - log_pi).detach()).pow(2).mean()
        loss_pi = (
            (log_pi - min_q_new).mean()
            + cfg.policy_mean_reg_weight * mean.pow(2).mean()
            + cfg.policy_std_reg_weight * log_std.pow(2).mean()
        )

        total = loss_q + self.kl_lambda * kl + loss_v + loss_pi
        stats = torch.stack([
            loss_q, loss_v, loss_pi, kl, q.mean(), v.mean(), log_pi.mean(), mu.abs().mean(),
            marginal_variance(var).mean(),
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
        """The losses and every network's gradients, no parameter changed; returns the stats."""
        total, loss_stats = self.losses(rl, context, generator)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        return torch.cat([loss_stats, self.grad_norms()])

    def apply(self) -> None:
        """Adam on every network from the current gradients, then the target-V Polyak update."""
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._vf_params, self.cfg.soft_target_tau)

"""PEARLAgent: context inference and acting. The deployment API, and what rollouts call.

Typical use on a new task (SPEC section 5, Algorithm 2; `evaluation.adapt_to_task` is this)::

    cfg = load_run_config("runs/point-robot-s0")    # the run's config.json
    agent = PEARLAgent.load("runs/point-robot-s0")
    agent.reset()                                   # belief = prior, context emptied
    for k in range(3):
        agent.sample_z()                            # z ~ current belief, once per trajectory
        obs, _ = env.reset()
        for t in range(cfg.max_path_length):
            action = agent.act(obs)                 # deterministic: tanh of the mean
            next_obs, reward, term, trunc, info = env.step(action)
            # the encoder's reward: the sparse one where the env gives it
            agent.observe(obs, action, info.get("sparse_reward", reward), next_obs)
            obs = next_obs
            if term or trunc:
                break
        if k + 1 >= cfg.num_exp_traj_eval:          # the run's config: 1, 2 or 5 trajectories
            agent.infer_posterior()                 # belief = q(z | what was observed)

(README.md, "Library use", runs this on a point-robot task; a test runs the README's code.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from metapearl.encoder import make_encoder, prior, sample_z
from metapearl.networks import NumpyTanhGaussianPolicy, TanhGaussianPolicy


def to_env_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Normalised actions in [-1, 1] (clipped) -> the environment's box [low, high]."""
    return low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (high - low)


def context_dim(obs_dim: int, action_dim: int, use_next_obs_in_context: bool) -> int:
    """Width of a context row: (s, a, r), and s' where the config puts it in."""
    return obs_dim + action_dim + 1 + (obs_dim if use_next_obs_in_context else 0)


class PEARLAgent(nn.Module):
    """Context encoder + policy, and for deployment a belief over z for one task.

    Actions inside the library are normalised to [-1, 1]; `act` and `observe` speak the
    environment's units, given by `action_low` / `action_high`.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_size: int,
        net_size: int,
        encoder_size: int,
        use_information_bottleneck: bool = True,
        use_next_obs_in_context: bool = False,
        action_low: np.ndarray | None = None,
        action_high: np.ndarray | None = None,
        encoder: str = "pog",
        rnn_bptt_steps: int = 0,
        factor_rank: int = 0,
        factor_u_bound: float = 0.0,
        posterior_mean_bound: float = 0.0,
        online_context_rows: int = 0,
    ):
        super().__init__()
        self.online_context_rows = online_context_rows
        self.obs_dim, self.action_dim, self.latent_size = obs_dim, action_dim, latent_size
        self.use_next_obs_in_context = use_next_obs_in_context
        self.context_dim = context_dim(obs_dim, action_dim, use_next_obs_in_context)
        self.encoder = make_encoder(encoder, self.context_dim, latent_size, encoder_size,
                                    use_information_bottleneck, rnn_bptt_steps, factor_rank,
                                    factor_u_bound, posterior_mean_bound)
        self.policy = TanhGaussianPolicy(obs_dim + latent_size, action_dim, net_size)
        low = -np.ones(action_dim) if action_low is None else np.asarray(action_low, np.float64)
        high = np.ones(action_dim) if action_high is None else np.asarray(action_high, np.float64)
        self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32))
        self.generator: torch.Generator | None = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, obs_dim: int, action_dim: int, action_low=None, action_high=None):
        return cls(
            obs_dim, action_dim, cfg.latent_size, cfg.net_size, cfg.encoder_size,
            cfg.use_information_bottleneck, cfg.use_next_obs_in_context, action_low, action_high,
            cfg.encoder, cfg.rnn_bptt_steps, cfg.factor_rank, cfg.factor_u_bound,
            cfg.posterior_mean_bound,
            cfg.embedding_batch_size if cfg.sample_online_context else 0,
        )

    @property
    def stochastic(self) -> bool:
        return self.encoder.information_bottleneck

    # --- batched API (training, rollouts) -----------------------------------------------------
    def make_context(self, obs, actions, rewards, next_obs) -> torch.Tensor:
        """Concatenate transitions (..., dims) into context rows (..., context_dim); rewards (..., 1)."""
        parts = [obs, actions, rewards] + ([next_obs] if self.use_next_obs_in_context else [])
        return torch.cat(parts, dim=-1)

    def posterior(self, context: torch.Tensor, mask: torch.Tensor | None = None):
        """q(z | c) per task: context (tasks, n, context_dim) -> (mu, var), mu (tasks, latent),
        var (tasks, latent) or, with factor_rank > 0, a covariance (tasks, latent, latent)."""
        return self.encoder(context, mask)

    def online_posterior(self, context: torch.Tensor, generator: torch.Generator | None = None):
        """q(z | c) of one task's context gathered online, (1, n, context_dim): from all n rows,
        or with `online_context_rows` = m > 0 from m rows drawn uniformly with replacement, a
        fresh draw each call (how training collection infers from the encoder buffer)."""
        n = context.shape[1]
        if self.online_context_rows and n:
            idx = torch.randint(n, (self.online_context_rows,), generator=generator,
                                device=context.device)
            context = context[:, idx]
        return self.posterior(context)

    def prior(self, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        return prior(tasks, self.latent_size, self.action_low.device, self.stochastic,
                     self.encoder.full_covariance)

    @torch.no_grad()
    def act_batch(
        self,
        obs: np.ndarray,
        z: torch.Tensor,
        deterministic: bool,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """Normalised actions (N, action_dim) in [-1, 1] for observations (N, obs_dim), z (N, latent)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=z.device)
        action, *_ = self.policy(
            torch.cat([o, z], dim=-1), deterministic, generator, with_log_prob=False
        )
        return action.cpu().numpy()

    def rollout_policy(self):
        """`policy(x, deterministic, generator) -> actions` over numpy rows x = [obs, z] (N, .),
        for collecting with the current weights: a numpy copy of the policy on CPU (cheaper at
        rollout batch sizes), the torch policy on other devices."""
        if self.action_low.device.type == "cpu":
            return NumpyTanhGaussianPolicy(self.policy)
        device = self.action_low.device

        @torch.no_grad()
        def policy(x: np.ndarray, deterministic: bool, generator=None) -> np.ndarray:
            x_t = torch.as_tensor(x, device=device)
            return self.policy(x_t, deterministic, generator, with_log_prob=False)[0].cpu().numpy()

        return policy

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        return to_env_action(action, self.action_low.cpu().numpy(), self.action_high.cpu().numpy())

    def from_env_action(self, env_action: np.ndarray) -> np.ndarray:
        low, high = self.action_low.cpu().numpy(), self.action_high.cpu().numpy()
        return 2.0 * (np.asarray(env_action) - low) / (high - low) - 1.0

    # --- deployment API (one task at a time) --------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """Module.to/.cuda/.cpu/.double move the task's belief, z and context with the weights."""
        super()._apply(fn, *args, **kwargs)
        self.belief_mu, self.belief_var, self.z = fn(self.belief_mu), fn(self.belief_var), fn(self.z)
        self._context = [fn(row) for row in self._context]
        return self

    def reset(self) -> None:
        """Forget the current task: empty context, belief = prior, z = prior mean."""
        self._context: list[torch.Tensor] = []
        self.belief_mu, self.belief_var = self.prior(1)
        self.z = self.belief_mu.clone()

    def observe(self, obs, action, reward: float, next_obs) -> None:
        """Add one transition (environment units) to this task's context."""
        sizes = (np.size(obs), np.size(action), np.size(next_obs))
        if sizes != (self.obs_dim, self.action_dim, self.obs_dim):  # (else a later
            # infer_posterior fails, far from the cause)
            raise ValueError(f"observe: obs, action and next_obs of {sizes} values; this agent's "
                             f"have {(self.obs_dim, self.action_dim, self.obs_dim)}")
        dev = self.action_low.device
        row = self.make_context(
            torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=dev).reshape(1, -1),
            torch.as_tensor(self.from_env_action(action), dtype=torch.float32, device=dev)
            .reshape(1, -1),
            torch.tensor([[float(reward)]], device=dev),
            torch.as_tensor(np.asarray(next_obs), dtype=torch.float32, device=dev).reshape(1, -1),
        )
        self._context.append(row)

    @property
    def context(self) -> torch.Tensor:
        """The observed context, (1, n, context_dim)."""
        if not self._context:
            return torch.zeros(1, 0, self.context_dim, device=self.action_low.device)
        return torch.cat(self._context, dim=0).unsqueeze(0)

    @torch.no_grad()
    def infer_posterior(self) -> None:
        """belief = q(z | the transitions observed since `reset`): all of them, or a fresh draw of
        `online_context_rows` of them (`online_posterior`)."""
        self.belief_mu, self.belief_var = self.online_posterior(self.context, self.generator)

    @torch.no_grad()
    def sample_z(self) -> torch.Tensor:
        """Draw z from the current belief (do this at the start of each trajectory)."""
        self.z = sample_z(self.belief_mu, self.belief_var, self.generator)
        return self.z

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        """The action for `obs` under the current z, in environment units."""
        obs = np.asarray(obs, dtype=np.float32).reshape(1, -1)
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"act: an observation of {obs.shape[1]} values; this agent's have "
                             f"{self.obs_dim}")
        a = self.act_batch(obs, self.z, deterministic, self.generator)
        return self.to_env_action(a[0])

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> PEARLAgent:
        """The agent of a training run's latest checkpoint (tensors only; no code is executed):
        with `agent_average_iterations`, the averaged agent its evaluations used."""
        from metapearl.checkpoint import load_agent

        return load_agent(Path(run_dir), device)

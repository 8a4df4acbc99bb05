"""The context encoder q(z | c) (SPEC section 2): a product of Gaussian factors, or the recurrent
ablation (a GRU over the context in order); either with a deterministic z as a further ablation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapearl.config import ENCODERS
from metapearl.networks import LAST_LAYER_INIT, MLP

MIN_VARIANCE = 1e-7


def product_of_gaussians(
    mu: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of independent Gaussian factors, the prior not multiplied in.

    mu, var: (tasks, n, latent); mask: (tasks, n) of 0/1 or None.
    sigma2 = 1 / sum_n 1/sigma2_n ;  mu = sigma2 * sum_n mu_n / sigma2_n. A task whose context is
    empty (all masked) gets the prior N(0, I).
    """
    precision = 1.0 / var.clamp_min(MIN_VARIANCE)
    if mask is not None:
        precision = precision * mask.unsqueeze(-1)
    total = precision.sum(dim=1)
    empty = total <= 0
    post_var = 1.0 / torch.where(empty, torch.ones_like(total), total)
    post_mu = post_var * (precision * mu).sum(dim=1)
    return post_mu.masked_fill(empty, 0.0), post_var.masked_fill(empty, 1.0)


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) per element: 0.5 (var + mu^2 - 1 - log var). Same shape as mu."""
    return 0.5 * (var + mu.pow(2) - 1.0 - var.log())


class ContextEncoder(nn.Module):
    """f_phi: one transition -> (mu_n, sigma2_n); the posterior is their product.

    With ``use_information_bottleneck=False`` the encoder outputs `latent` numbers per transition,
    the posterior mean is their mean over the context and its variance is zero (deterministic z).
    """

    def __init__(self, context_dim: int, latent: int, hidden: int, information_bottleneck: bool):
        super().__init__()
        self.latent = latent
        self.information_bottleneck = information_bottleneck
        self.net = MLP(context_dim, hidden, 2 * latent if information_bottleneck else latent)

    def forward(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context: (tasks, n, context_dim), mask: (tasks, n) or None -> (mu, var), each (tasks, latent)."""
        tasks = context.shape[0]
        if context.shape[1] == 0:
            return prior(tasks, self.latent, context.device, self.information_bottleneck)
        out = self.net(context)
        if self.information_bottleneck:
            mu, raw = out.split(self.latent, dim=-1)
            return product_of_gaussians(mu, F.softplus(raw), mask)
        if mask is None:
            mean = out.mean(dim=1)
        else:
            count = mask.sum(dim=1, keepdim=True)
            mean = (out * mask.unsqueeze(-1)).sum(dim=1) / count.clamp_min(1.0)
            mean = mean.masked_fill(count == 0, 0.0)
        return mean, torch.zeros_like(mean)


class RecurrentEncoder(nn.Module):
    """The recurrent ablation: an MLP per transition, a GRU over the context in order, and
    (mu, sigma2) from the GRU's last state (the deterministic variant: z from the last state).

    Backpropagation through time is truncated to the last `bptt_steps` rows (0: the whole
    context): the rows before them run without a graph and only set the GRU state, so a long
    context costs one gradient-free pass plus a bounded backward; the forward still sees it all.
    """

    def __init__(self, context_dim: int, latent: int, hidden: int, information_bottleneck: bool,
                 bptt_steps: int = 0):
        super().__init__()
        self.latent = latent
        self.information_bottleneck = information_bottleneck
        self.bptt_steps = bptt_steps
        self.embed = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU())
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2 * latent if information_bottleneck else latent)
        nn.init.uniform_(self.head.weight, -LAST_LAYER_INIT, LAST_LAYER_INIT)
        nn.init.uniform_(self.head.bias, -LAST_LAYER_INIT, LAST_LAYER_INIT)

    def forward(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context: (tasks, n, context_dim) in order; mask: (tasks, n) of valid-rows-first or None.

        -> (mu, var), each (tasks, latent), read from the state after each task's last valid row.
        """
        tasks, n = context.shape[:2]
        if n == 0:
            return prior(tasks, self.latent, context.device, self.information_bottleneck)
        # truncated backprop: the first n - bptt_steps rows only set the state the rest starts from
        head = n - self.bptt_steps if self.training and 0 < self.bptt_steps < n else 0
        h, outs = None, []
        if head:
            with torch.no_grad():
                out, h = self.gru(self.embed(context[:, :head]))
            outs.append(out)
        outs.append(self.gru(self.embed(context[:, head:]), h)[0])
        out = torch.cat(outs, dim=1)
        lengths = (torch.full((tasks,), n, device=context.device) if mask is None
                   else mask.sum(dim=1).long())
        last = out[torch.arange(tasks, device=context.device), (lengths - 1).clamp_min(0)]
        params = self.head(last)
        empty = (lengths == 0).unsqueeze(-1)
        if self.information_bottleneck:
            mu, raw = params.split(self.latent, dim=-1)
            var = F.softplus(raw).clamp_min(MIN_VARIANCE)
            return mu.masked_fill(empty, 0.0), var.masked_fill(empty, 1.0)
        return params.masked_fill(empty, 0.0), torch.zeros_like(params)


def make_encoder(kind: str, context_dim: int, latent: int, hidden: int,
                 information_bottleneck: bool, bptt_steps: int = 0) -> nn.Module:
    """The encoder of config field `encoder`: `pog`, or `rnn-tran` / `rnn-traj` (a GRU; the two
    differ in how the trainer samples their batches, not in the network)."""
    if kind == "pog":
        return ContextEncoder(context_dim, latent, hidden, information_bottleneck)
    if kind in ("rnn-tran", "rnn-traj"):
        return RecurrentEncoder(context_dim, latent, hidden, information_bottleneck, bptt_steps)
    raise ValueError(f"unknown encoder {kind!r}; known: {', '.join(ENCODERS)}")


def prior(
    tasks: int, latent: int, device: torch.device | str = "cpu", stochastic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The belief before any context: N(0, I), or z = 0 for the deterministic encoder."""
    mu = torch.zeros(tasks, latent, device=device)
    var = torch.ones_like(mu) if stochastic else torch.zeros_like(mu)
    return mu, var


def sample_z(
    mu: torch.Tensor, var: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z ~ N(mu, var) by reparameterisation (gradients flow into mu and var)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + var.sqrt() * eps

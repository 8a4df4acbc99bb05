"""The context encoder q(z | c) as a product of Gaussian factors (SPEC section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapearl.networks import MLP

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

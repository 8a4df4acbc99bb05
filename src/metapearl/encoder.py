"""The context encoder q(z | c) (SPEC section 2): a product of Gaussian factors, or the recurrent
ablation (a GRU over the context in order); either with a deterministic z as a further ablation.

A posterior is (mu, var): mu (tasks, latent) and var the variances (tasks, latent), or, for the
product of low-rank factors (`factor_rank` > 0, our extension), the covariance (tasks, latent,
latent). `sample_z`, `kl_to_standard_normal` and `marginal_variance` take either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapearl.config import ENCODERS
from metapearl.networks import LAST_LAYER_INIT, MLP

MIN_VARIANCE = 1e-7
JITTER = 1e-6  # relative jitter of each variance before factoring a covariance (covariance_factor)


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


def product_of_lowrank_gaussians(
    mu: torch.Tensor, var: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of Gaussian factors whose precisions are diag(1/var_n) + u_n u_n^T (rank r), the
    prior not multiplied in (our extension of SPEC section 2; u = 0 is `product_of_gaussians`).

    mu, var: (tasks, n, latent); u: (tasks, n, latent, rank); mask: (tasks, n) of 0/1 or None.
    Lambda = sum_n P_n;  mu = Lambda^-1 sum_n P_n mu_n;  covariance Lambda^-1.
    -> (mu (tasks, latent), covariance (tasks, latent, latent)); an empty context gives N(0, I).
    Solved in float64: the latent is small and the precisions may span many orders of magnitude.
    """
    dtype = mu.dtype
    mu, u = mu.double(), u.double()
    precision = 1.0 / var.double().clamp_min(MIN_VARIANCE)
    if mask is not None:
        keep = mask.double().unsqueeze(-1)
        precision, u = precision * keep, u * keep.unsqueeze(-1)
    total = precision.sum(dim=1)
    lam = torch.diag_embed(total) + torch.einsum("tnir,tnjr->tij", u, u)
    eta = (precision * mu).sum(dim=1) + torch.einsum("tnir,tnr->ti", u,
                                                     torch.einsum("tnjr,tnj->tnr", u, mu))
    empty = (total <= 0).all(dim=-1)
    eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    lam = torch.where(empty[:, None, None], eye, lam)
    chol = torch.linalg.cholesky(lam)
    post_mu = torch.cholesky_solve(eta.masked_fill(empty[:, None], 0.0).unsqueeze(-1), chol)
    return post_mu.squeeze(-1).to(dtype), torch.cholesky_inverse(chol).to(dtype)


def soft_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Each element squashed to (-bound, bound) by bound * tanh(x / bound), about x where
    |x| << bound; bound 0 leaves x as it is."""
    return bound * torch.tanh(x / bound) if bound > 0 else x


def covariance_factor(cov: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L of a covariance S (..., d, d), in float64, with
    L L^T = S + JITTER diag(S): a very confident posterior's float32 covariance can be indefinite
    by rounding alone. The jitter is relative to each variance, so a dimension the posterior pins
    down is not widened by the others (the correlation matrix is factored, then rescaled)."""
    c = cov.double()
    std = c.diagonal(dim1=-2, dim2=-1).sqrt()
    corr = c / (std.unsqueeze(-1) * std.unsqueeze(-2))
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    return std.unsqueeze(-1) * torch.linalg.cholesky(corr + JITTER * eye)


def marginal_variance(var: torch.Tensor) -> torch.Tensor:
    """The variance of each latent dimension, (..., latent), of either form of a posterior."""
    return var.diagonal(dim1=-2, dim2=-1) if var.dim() >= 3 else var


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) summed over the latent dimension, shape mu.shape[:-1].

    Variances: 0.5 sum(var + mu^2 - 1 - log var); a covariance S: 0.5 (tr S + |mu|^2 - d - log det S).
    """
    if var.dim() == mu.dim():
        return 0.5 * (var + mu.pow(2) - 1.0 - var.log()).sum(dim=-1)
    log_det = 2.0 * covariance_factor(var).diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
    trace = var.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return 0.5 * (trace + mu.pow(2).sum(dim=-1) - mu.shape[-1] - log_det.to(mu.dtype))


class ContextEncoder(nn.Module):
    """f_phi: one transition -> (mu_n, sigma2_n); the posterior is their product.

    With ``rank`` > 0 each factor also gets u_n (latent x rank), its precision becomes
    diag(1/sigma2_n) + u_n u_n^T and the posterior covariance a full matrix (our extension: a
    point-robot transition says "the goal lies on a circle of radius |r| around s'", a plane in
    (goal, |goal|^2) that diagonal factors cannot express; see README). The outputs start near
    zero, so training starts from nearly diagonal factors. With ``u_bound`` > 0 each element of
    u is squashed to (-u_bound, u_bound) by u_bound * tanh(u / u_bound): a product of factors
    with large, nearly parallel u extrapolates its mean far outside the factors' means, and the
    critic then meets z it was never trained on. With ``mean_bound`` b > 0 each element of the
    posterior mean is squashed to (-b, b) by b tanh(mu / b): bounded u still let nearly parallel
    factors put it beyond the factors' own means, and the critic's error on that z fed back into
    the encoder until the run diverged (both: docs/measurements.md, point-robot).
    With ``use_information_bottleneck=False`` the encoder outputs `latent` numbers per transition,
    the posterior mean is their mean over the context and its variance is zero (deterministic z).
    """

    def __init__(self, context_dim: int, latent: int, hidden: int, information_bottleneck: bool,
                 rank: int = 0, u_bound: float = 0.0, mean_bound: float = 0.0):
        super().__init__()
        if rank and not information_bottleneck:
            raise ValueError("rank > 0 needs information_bottleneck=True (it shapes Gaussian factors)")
        self.latent, self.rank, self.u_bound, self.mean_bound = latent, rank, u_bound, mean_bound
        self.information_bottleneck = information_bottleneck
        self.full_covariance = rank > 0
        self.net = MLP(context_dim, hidden,
                       (2 + rank) * latent if information_bottleneck else latent)

    def forward(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context: (tasks, n, context_dim), mask: (tasks, n) or None -> (mu, var): mu (tasks,
        latent), var (tasks, latent), or with rank > 0 the covariance (tasks, latent, latent)."""
        tasks = context.shape[0]
        if context.shape[1] == 0:
            return prior(tasks, self.latent, context.device, self.information_bottleneck,
                         self.full_covariance)
        mu, var = self._posterior(self.net(context), mask)
        return soft_bound(mu, self.mean_bound), var

    def _posterior(
        self, out: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior of the network's per-transition outputs (tasks, n, outputs)."""
        if self.full_covariance:
            mu, raw, u = out.split([self.latent, self.latent, self.rank * self.latent], dim=-1)
            u = u.unflatten(-1, (self.latent, self.rank))
            u = soft_bound(u, self.u_bound)
            return product_of_lowrank_gaussians(mu, F.softplus(raw), u, mask)
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
        self.full_covariance = False
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
                 information_bottleneck: bool, bptt_steps: int = 0, factor_rank: int = 0,
                 factor_u_bound: float = 0.0, posterior_mean_bound: float = 0.0) -> nn.Module:
    """The encoder of config field `encoder`: `pog` (with `factor_rank`, `factor_u_bound` and
    `posterior_mean_bound`), or `rnn-tran` / `rnn-traj` (a GRU; the two differ in how the trainer
    samples their batches, not in the network)."""
    if kind == "pog":
        return ContextEncoder(context_dim, latent, hidden, information_bottleneck, factor_rank,
                              factor_u_bound, posterior_mean_bound)
    if kind in ("rnn-tran", "rnn-traj"):
        return RecurrentEncoder(context_dim, latent, hidden, information_bottleneck, bptt_steps)
    raise ValueError(f"unknown encoder {kind!r}; known: {', '.join(ENCODERS)}")


def prior(
    tasks: int, latent: int, device: torch.device | str = "cpu", stochastic: bool = True,
    full_covariance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The belief before any context: N(0, I) (variances, or with `full_covariance` the identity
    covariance per task), or z = 0 for the deterministic encoder."""
    mu = torch.zeros(tasks, latent, device=device)
    if full_covariance:
        return mu, torch.eye(latent, device=device).expand(tasks, latent, latent).clone()
    var = torch.ones_like(mu) if stochastic else torch.zeros_like(mu)
    return mu, var


def sample_z(
    mu: torch.Tensor,
    var: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """z ~ N(mu, var) by reparameterisation (gradients flow into mu and var); var holds variances
    (..., latent) or a covariance (..., latent, latent). eps: the standard normal draw, of mu's
    shape; drawn from `generator` when None."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    if var.dim() == mu.dim():
        return mu + var.sqrt() * eps
    return mu + (covariance_factor(var) @ eps.double().unsqueeze(-1)).squeeze(-1).to(mu.dtype)

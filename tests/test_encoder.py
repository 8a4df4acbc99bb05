import math

import numpy as np
import pytest
import torch

from metapearl.agent import PEARLAgent
from metapearl.config import make_config
from metapearl.encoder import (
    ContextEncoder,
    RecurrentEncoder,
    covariance_factor,
    kl_to_standard_normal,
    marginal_variance,
    product_of_gaussians,
    product_of_lowrank_gaussians,
    sample_z,
)


def test_product_of_two_gaussians_known_answer():
    # N(1, 1) x N(3, 1): precision 2 -> var 0.5, mean (1 + 3) / 2 = 2.
    # N(0, 4) x N(6, 2): precision 1/4 + 1/2 = 3/4 -> var 4/3, mean (0/4 + 6/2) * 4/3 = 4.
    mu = torch.tensor([[[1.0, 0.0], [3.0, 6.0]]])
    var = torch.tensor([[[1.0, 4.0], [1.0, 2.0]]])
    post_mu, post_var = product_of_gaussians(mu, var)
    torch.testing.assert_close(post_mu, torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(post_var, torch.tensor([[0.5, 4.0 / 3.0]]))


def test_product_is_permutation_invariant_and_masked_rows_are_ignored():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 7, 3, generator=g)
    var = torch.rand(2, 7, 3, generator=g) + 0.1
    perm = torch.randperm(7, generator=g)
    a = product_of_gaussians(mu, var)
    b = product_of_gaussians(mu[:, perm], var[:, perm])
    torch.testing.assert_close(a, b)
    mask = torch.ones(2, 7)
    mask[:, 4:] = 0
    masked = product_of_gaussians(mu, var, mask)
    torch.testing.assert_close(masked, product_of_gaussians(mu[:, :4], var[:, :4]))


def test_empty_context_gives_the_prior():
    mu, var = product_of_gaussians(torch.randn(1, 3, 2), torch.ones(1, 3, 2), torch.zeros(1, 3))
    torch.testing.assert_close(mu, torch.zeros(1, 2))
    torch.testing.assert_close(var, torch.ones(1, 2))
    enc = ContextEncoder(4, 2, 8, information_bottleneck=True)
    mu, var = enc(torch.zeros(3, 0, 4))
    assert torch.equal(mu, torch.zeros(3, 2)) and torch.equal(var, torch.ones(3, 2))


def test_kl_to_standard_normal_matches_numerical_integral():
    mu, var = 1.0, 2.0
    # closed form by hand: 0.5 * (2 + 1 - 1 - ln 2)
    expected = 0.5 * (2.0 - math.log(2.0))
    x = torch.linspace(-20, 20, 200_001, dtype=torch.float64)
    q = torch.exp(-0.5 * (x - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)
    p = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    numeric = torch.trapezoid(q * (q.log() - p.log()), x).item()
    got = kl_to_standard_normal(torch.tensor([mu]), torch.tensor([var])).item()
    assert abs(got - expected) < 1e-6
    assert abs(got - numeric) < 1e-5
    assert kl_to_standard_normal(torch.zeros(2, 3), torch.ones(2, 3)).abs().max() == 0
    # summed over the latent dimension: two dims, each 0.5 * (2 - ln 2)
    two = kl_to_standard_normal(torch.tensor([[mu, mu]]), torch.tensor([[var, var]]))
    assert two.shape == (1,) and abs(two.item() - 2 * expected) < 1e-6


def test_deterministic_encoder_is_the_mean_of_outputs_with_zero_variance():
    torch.manual_seed(0)
    enc = ContextEncoder(4, 3, 8, information_bottleneck=False)
    ctx = torch.randn(2, 5, 4)
    mu, var = enc(ctx)
    torch.testing.assert_close(mu, enc.net(ctx).mean(dim=1))
    assert torch.equal(var, torch.zeros(2, 3))
    assert torch.equal(enc(ctx)[0], mu)  # identical context -> identical z


def test_encoder_variance_is_softplus_of_raw_output():
    torch.manual_seed(0)
    enc = ContextEncoder(4, 2, 8, information_bottleneck=True)
    ctx = torch.randn(1, 1, 4)
    raw = enc.net(ctx)
    mu, var = enc(ctx)  # one factor: the posterior is that factor
    torch.testing.assert_close(mu, raw[..., :2].reshape(1, 2))
    torch.testing.assert_close(var, torch.nn.functional.softplus(raw[..., 2:]).reshape(1, 2))


def test_recurrent_encoder_reads_the_context_in_order_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = RecurrentEncoder(4, 3, 8, information_bottleneck=True, bptt_steps=0).eval()
    ctx = torch.randn(2, 6, 4, generator=g)
    mu, var = enc(ctx)
    assert mu.shape == (2, 3) and torch.all(var > 0)
    flipped, _ = enc(ctx.flip(1))
    assert not torch.allclose(mu, flipped)  # order matters, unlike the product of Gaussians
    # task 1 with its last two rows masked equals task 1 given only its first four rows
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    mu_m, var_m = enc(ctx, mask)
    mu_4, var_4 = enc(ctx[1:, :4])
    torch.testing.assert_close(mu_m[1], mu_4[0])
    torch.testing.assert_close(mu_m[0], mu[0])
    mu_e, var_e = enc(ctx, torch.zeros(2, 6))
    assert torch.all(mu_e == 0) and torch.all(var_e == 1)  # empty context: the prior


def test_recurrent_encoder_truncates_backprop_only_in_training():
    torch.manual_seed(0)
    ctx = torch.randn(1, 8, 4, requires_grad=True)
    enc = RecurrentEncoder(4, 2, 8, information_bottleneck=False, bptt_steps=3)
    enc(ctx)[0].sum().backward()
    # the output depends on all 8 rows, but the gradient reaches only the last 3 (rows 5, 6, 7)
    reached = ctx.grad.abs().sum(dim=-1)[0] > 0
    assert reached.tolist() == [False] * 5 + [True] * 3
    full = RecurrentEncoder(4, 2, 8, information_bottleneck=False, bptt_steps=0)
    ctx.grad = None
    full(ctx)[0].sum().backward()
    assert bool((ctx.grad.abs().sum(dim=-1) > 0).all())
    enc.eval()  # evaluation backpropagates nothing: same values as truncated training
    with torch.no_grad():
        torch.testing.assert_close(enc(ctx)[0], enc.train()(ctx)[0])
    _, var = enc(ctx)
    assert torch.all(var == 0)  # deterministic z


def test_factor_variances_are_clamped_at_1e_minus_7():
    enc = ContextEncoder(4, 2, 8, information_bottleneck=True)
    with torch.no_grad():
        last = enc.net.net[-1]
        last.weight.zero_()
        last.bias.fill_(-50.0)  # softplus(-50) ~ 2e-22 per factor without the clamp
    _, var = enc(torch.randn(1, 3, 4))
    torch.testing.assert_close(var, torch.full((1, 2), 1e-7 / 3), rtol=1e-5, atol=0)  # 3 factors


def test_sample_z_draws_from_the_posterior_by_reparameterisation():
    n = 200_000
    mu = torch.tensor([1.0, -2.0]).repeat(n, 1).requires_grad_()
    var = torch.tensor([4.0, 0.25]).repeat(n, 1).requires_grad_()
    z = sample_z(mu, var, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), torch.tensor([4.0, 0.25]), rtol=0.02, atol=0)
    z.sum().backward()  # z = mu + sqrt(var) eps: dz/dmu = 1, dz/dvar = eps / (2 sqrt(var))
    eps = ((z - mu) / var.sqrt()).detach()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(var.grad, eps / (2 * var.detach().sqrt()))


def test_context_rows_are_s_a_r_and_s_next_only_when_configured(tiny_config):
    obs, act, rew, nxt = (torch.randn(2, 3, d) for d in (2, 2, 1, 2))
    for use_next, parts in [(False, [obs, act, rew]), (True, [obs, act, rew, nxt])]:
        agent = PEARLAgent.from_config(tiny_config(use_next_obs_in_context=use_next), 2, 2)
        assert torch.equal(agent.make_context(obs, act, rew, nxt), torch.cat(parts, -1))


# --- low-rank factors (factor_rank > 0, our extension) --------------------------------------------
def test_product_of_lowrank_gaussians_known_answer():
    # factor 1: mean (0, 0), precision diag(1, 1) + u u^T with u = (1, 1) -> [[2, 1], [1, 2]]
    # factor 2: mean (3, 0), precision I (u = 0)
    # Lambda = [[3, 1], [1, 3]], det 8, covariance [[3, -1], [-1, 3]] / 8;
    # eta = P1 (0, 0) + P2 (3, 0) = (3, 0) -> mu = (9/8, -3/8).
    mu = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]])
    var = torch.ones(1, 2, 2)
    u = torch.tensor([[[[1.0], [1.0]], [[0.0], [0.0]]]])
    post_mu, cov = product_of_lowrank_gaussians(mu, var, u)
    torch.testing.assert_close(post_mu, torch.tensor([[9 / 8, -3 / 8]]))
    torch.testing.assert_close(cov, torch.tensor([[[3 / 8, -1 / 8], [-1 / 8, 3 / 8]]]))
    # KL(N(mu, cov) || N(0, I)) = 0.5 (tr + |mu|^2 - d - ln det) = 0.5 (6/8 + 90/64 - 2 + ln 8)
    expected = 0.5 * (0.75 + 90 / 64 - 2 + math.log(8))
    assert abs(kl_to_standard_normal(post_mu, cov).item() - expected) < 1e-5


def test_lowrank_product_without_lowrank_term_is_the_diagonal_product():
    g = torch.Generator().manual_seed(1)
    mu, var = torch.randn(3, 6, 4, generator=g), torch.rand(3, 6, 4, generator=g) + 0.1
    post_mu, cov = product_of_lowrank_gaussians(mu, var, torch.zeros(3, 6, 4, 2))
    diag_mu, diag_var = product_of_gaussians(mu, var)
    torch.testing.assert_close(post_mu, diag_mu)
    torch.testing.assert_close(cov, torch.diag_embed(diag_var))
    torch.testing.assert_close(kl_to_standard_normal(post_mu, cov),
                               kl_to_standard_normal(diag_mu, diag_var))


def test_lowrank_product_is_permutation_invariant_masked_and_empty_is_prior():
    g = torch.Generator().manual_seed(2)
    mu, var = torch.randn(2, 7, 3, generator=g), torch.rand(2, 7, 3, generator=g) + 0.1
    u = torch.randn(2, 7, 3, 2, generator=g)
    perm = torch.randperm(7, generator=g)
    a = product_of_lowrank_gaussians(mu, var, u)
    torch.testing.assert_close(a, product_of_lowrank_gaussians(mu[:, perm], var[:, perm],
                                                               u[:, perm]))
    mask = torch.ones(2, 7)
    mask[:, 4:] = 0
    torch.testing.assert_close(product_of_lowrank_gaussians(mu, var, u, mask),
                               product_of_lowrank_gaussians(mu[:, :4], var[:, :4], u[:, :4]))
    mask[1] = 0
    post_mu, cov = product_of_lowrank_gaussians(mu, var, u, mask)
    assert torch.equal(post_mu[1], torch.zeros(3)) and torch.equal(cov[1], torch.eye(3))


def test_kl_of_a_covariance_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    q = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    p = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64),
                                               torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(kl_to_standard_normal(mu, cov), torch.distributions.kl_divergence(q, p),
                               rtol=1e-5, atol=1e-6)


def test_sample_z_from_a_covariance_has_that_mean_and_covariance():
    mu = torch.tensor([[1.0, -2.0]])
    cov = torch.tensor([[[0.5, 0.3], [0.3, 0.4]]])
    g = torch.Generator().manual_seed(4)
    z = sample_z(mu.expand(20000, 2), cov.expand(20000, 2, 2), g)
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov[0], atol=0.02, rtol=0)
    assert torch.equal(marginal_variance(cov), torch.tensor([[0.5, 0.4]]))


def test_lowrank_encoder_single_factor_and_gradients_reach_the_lowrank_outputs():
    torch.manual_seed(0)
    enc = ContextEncoder(4, 2, 8, information_bottleneck=True, rank=1)
    ctx = torch.randn(1, 1, 4)
    raw = enc.net(ctx)[0, 0]
    mu, cov = enc(ctx)  # one factor: the posterior is that factor
    u = raw[4:6].reshape(2, 1)
    precision = torch.diag(1 / torch.nn.functional.softplus(raw[2:4])) + u @ u.T
    torch.testing.assert_close(mu, raw[:2].reshape(1, 2), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cov[0], torch.linalg.inv(precision), rtol=1e-4, atol=1e-6)
    assert enc(torch.zeros(2, 0, 4))[1].equal(torch.eye(2).expand(2, 2, 2))
    mu, cov = enc(torch.randn(3, 5, 4))
    loss = sample_z(mu, cov, torch.Generator().manual_seed(0)).pow(2).sum()
    loss = loss + kl_to_standard_normal(mu, cov).sum()
    loss.backward()
    last = enc.net.linears[-1]
    assert last.weight.grad[4:].abs().sum() > 0  # rows producing u got gradient


def test_agent_with_lowrank_factors_keeps_a_covariance_belief():
    agent = PEARLAgent(2, 2, 3, 16, 16, factor_rank=1)
    assert agent.belief_var.shape == (1, 3, 3) and torch.equal(agent.belief_var[0], torch.eye(3))
    for _ in range(4):
        agent.observe([0.1, 0.2], [0.5, -0.5], -1.0, [0.2, 0.1])
    agent.infer_posterior()
    assert agent.belief_var.shape == (1, 3, 3)
    assert agent.sample_z().shape == (1, 3)
    agent.reset()
    assert torch.equal(agent.belief_var[0], torch.eye(3))


def test_lowrank_product_matches_explicit_matrices_on_random_factors():
    rng = np.random.default_rng(5)
    mu, var = rng.normal(size=(2, 6, 3)), rng.uniform(0.2, 2.0, (2, 6, 3))
    u = rng.normal(size=(2, 6, 3, 2))
    mask = np.ones((2, 6))
    mask[1, 4:] = 0
    for t in range(2):  # numpy, factor by factor: P_n = diag(1/var_n) + u_n u_n^T
        precisions = [np.diag(1 / var[t, n]) + u[t, n] @ u[t, n].T for n in range(6) if mask[t, n]]
        infos = [p @ mu[t, n] for n, p in zip(np.flatnonzero(mask[t]), precisions, strict=True)]
        cov = np.linalg.inv(sum(precisions))
        post_mu, post_cov = product_of_lowrank_gaussians(
            *(torch.tensor(x) for x in (mu, var, u, mask)))
        np.testing.assert_allclose(post_mu[t].numpy(), cov @ sum(infos), rtol=1e-10)
        np.testing.assert_allclose(post_cov[t].numpy(), cov, rtol=1e-10, atol=1e-12)


def test_lowrank_posterior_sample_and_kl_have_exact_gradients():
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    var = (torch.rand(2, 4, 3, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    u = torch.randn(2, 4, 3, 1, generator=g, dtype=torch.float64).requires_grad_()

    def sample(mu, var, u):  # the same eps every call: sample_z is then a smooth function
        post_mu, cov = product_of_lowrank_gaussians(mu, var, u)
        return sample_z(post_mu, cov, torch.Generator().manual_seed(0))

    def kl(mu, var, u):
        return kl_to_standard_normal(*product_of_lowrank_gaussians(mu, var, u))

    assert torch.autograd.gradcheck(sample, (mu, var, u), atol=1e-5)
    assert torch.autograd.gradcheck(kl, (mu, var, u), atol=1e-5)


def test_covariance_factor_jitter_is_relative_to_each_variance():
    cov = torch.diag(torch.tensor([1e-6, 1.0, 4.0], dtype=torch.float64))
    cov[1, 2] = cov[2, 1] = 1.5
    low = covariance_factor(cov)
    torch.testing.assert_close(low @ low.T, cov + 1e-6 * torch.diag(cov.diagonal()),
                               rtol=1e-12, atol=1e-15)


def test_lowrank_factors_need_the_information_bottleneck():
    with pytest.raises(ValueError, match="rank > 0 needs information_bottleneck=True"):
        ContextEncoder(4, 2, 8, information_bottleneck=False, rank=1)


def test_factor_u_bound_squashes_each_element_of_u():
    torch.manual_seed(0)
    ctx = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(6))
    free = ContextEncoder(4, 2, 8, information_bottleneck=True, rank=1)
    torch.nn.init.normal_(free.net.linears[-1].weight, std=10.0)  # u elements beyond the bound
    bounded = ContextEncoder(4, 2, 8, information_bottleneck=True, rank=1, u_bound=2.0)
    bounded.load_state_dict(free.state_dict())
    out = free.net(ctx)
    mu_n, raw, u = out.split([2, 2, 2], dim=-1)
    assert u.abs().max() > 3.0  # beyond the bound of 2
    squashed = 2.0 * torch.tanh(u / 2.0)  # by hand: |element| < 2, about u where |u| << 2
    expected = product_of_lowrank_gaussians(mu_n, torch.nn.functional.softplus(raw),
                                            squashed.unsqueeze(-1))
    for got, want in zip(bounded(ctx), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(free(ctx)[0], expected[0])
    cfg = make_config("point-robot", "default")
    assert PEARLAgent.from_config(cfg, 2, 2).encoder.u_bound == cfg.factor_u_bound == 10.0


@pytest.mark.parametrize("stochastic,rank", [(True, 0), (True, 1), (False, 0)])
def test_posterior_mean_bound_squashes_each_element_of_the_mean(stochastic, rank):
    torch.manual_seed(0)
    ctx = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(7))
    free = ContextEncoder(4, 2, 8, information_bottleneck=stochastic, rank=rank)
    torch.nn.init.normal_(free.net.linears[-1].weight, std=30.0)  # factor means far out
    bounded = ContextEncoder(4, 2, 8, stochastic, rank=rank, mean_bound=2.0)
    bounded.load_state_dict(free.state_dict())
    mu, var = free(ctx)
    assert mu.abs().max() > 3.0  # beyond the bound of 2
    got_mu, got_var = bounded(ctx)
    torch.testing.assert_close(got_mu, 2.0 * torch.tanh(mu / 2.0))  # by hand: b tanh(mu / b)
    torch.testing.assert_close(got_var, var)  # the spread is the product's
    assert got_mu.abs().max() <= 2.0  # (float32 tanh reaches 1.0 exactly far out)
    # no context, or a task whose context is all masked: the prior, unchanged
    prior_mu, prior_var = free(ctx[:, :0])
    for got, want in zip(bounded(ctx[:, :0]), (prior_mu, prior_var), strict=True):
        torch.testing.assert_close(got, want)
    mask = torch.ones(3, 5)
    mask[1] = 0.0
    masked_mu, masked_var = bounded(ctx, mask)
    torch.testing.assert_close(masked_mu[1], torch.zeros(2))
    torch.testing.assert_close(masked_var[1], prior_var[1])
    torch.testing.assert_close(masked_mu[0], 2.0 * torch.tanh(free(ctx, mask)[0][0] / 2.0))
    cfg = make_config("point-robot", "default")
    assert PEARLAgent.from_config(cfg, 2, 2).encoder.mean_bound == cfg.posterior_mean_bound == 12.0

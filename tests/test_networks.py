import math

import numpy as np
import pytest
import torch

from metapearl.networks import MLP, EnsembleMLP, NumpyTanhGaussianPolicy, TanhGaussianPolicy


def test_tanh_gaussian_log_prob_is_the_change_of_variables_density():
    torch.manual_seed(0)
    policy = TanhGaussianPolicy(3, 2, 16)
    x = torch.randn(64, 3)
    g = torch.Generator().manual_seed(1)
    action, log_prob, mean, log_std = policy(x, generator=g)
    # independent float64 computation: u = atanh(a), log N(u; mean, std) - sum log(1 - a^2)
    a = action.double().clamp(-1 + 1e-12, 1 - 1e-12)
    u = torch.atanh(a)
    std = log_std.double().exp()
    gauss = -0.5 * ((u - mean.double()) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
    expected = (gauss - torch.log1p(-a.pow(2))).sum(-1)
    ok = a.abs().max(-1).values < 0.999  # float32 tanh loses digits at saturation
    torch.testing.assert_close(log_prob.double()[ok], expected[ok], atol=2e-3, rtol=1e-4)


def test_log_prob_stays_finite_when_saturated():
    policy = TanhGaussianPolicy(1, 1, 4)
    with torch.no_grad():
        policy.net.net[-1].bias.copy_(torch.tensor([30.0, -5.0]))  # mean 30: tanh = 1.0 exactly
    _, log_prob, _, _ = policy(torch.zeros(4, 1))
    assert torch.isfinite(log_prob).all()


def test_log_std_is_clamped_and_deterministic_action_is_tanh_of_mean():
    policy = TanhGaussianPolicy(2, 1, 4)
    with torch.no_grad():
        policy.net.net[-1].bias.copy_(torch.tensor([0.7, 50.0]))
        policy.net.net[-1].weight.zero_()
    action, log_prob, mean, log_std = policy(torch.zeros(3, 2), deterministic=True)
    assert log_prob is None
    torch.testing.assert_close(action, torch.tanh(torch.full((3, 1), 0.7)))
    assert torch.all(log_std == 2.0)
    policy.net.net[-1].bias.data[1] = -50.0
    assert torch.all(policy(torch.zeros(3, 2))[3] == -20.0)


def _members(ens: EnsembleMLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Each member's output, layer by layer from the stacked parameters held constant."""
    outs = []
    for k in range(ens.weights[0].shape[0]):
        h = x
        for i, (w, b) in enumerate(zip(ens.weights, ens.biases, strict=True)):
            h = h @ w[k].detach() + b[k].detach()
            h = torch.relu(h) if i < len(ens.weights) - 1 else h
        outs.append(h)
    return outs


def test_ensemble_equals_separate_mlps():
    torch.manual_seed(0)
    ens = EnsembleMLP(2, 5, 8, 1)
    x = torch.randn(10, 5)
    out = ens(x)
    assert out.shape == (2, 10, 1)
    for k, h in enumerate(_members(ens, x)):
        torch.testing.assert_close(out[k], h)


@pytest.mark.parametrize("members", [2, 3])
def test_min_over_members_is_the_minimum_with_gradients_to_the_input_only(members):
    torch.manual_seed(0)
    ens = EnsembleMLP(members, 5, 16, 1).double()
    with torch.no_grad():  # outputs of order 1, so that the members' minima differ row by row
        ens.weights[-1].mul_(300.0)
    x = torch.randn(200, 5, dtype=torch.float64)
    upstream = torch.randn(200, 1, dtype=torch.float64)  # a different weight for every row
    # independent: autograd through torch.min over members written out layer by layer
    xr = x.clone().requires_grad_(True)
    expected = torch.stack(_members(ens, xr)).min(dim=0)
    (expected.values * upstream).sum().backward()
    assert len(set(expected.indices.flatten().tolist())) == members  # every member is a minimum

    xg = x.clone().requires_grad_(True)
    got = ens.min_over_members(xg)
    torch.testing.assert_close(got, expected.values.detach())
    (got * upstream).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    assert all(p.grad is None for p in ens.parameters())


def test_min_over_members_when_one_member_is_never_the_minimum():
    torch.manual_seed(0)
    ens = EnsembleMLP(2, 5, 8, 1)
    with torch.no_grad():
        ens.biases[-1][1].fill_(100.0)
    x = torch.randn(7, 5, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    ens.min_over_members(x).sum().backward()
    _members(ens, xr)[0].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_min_over_members_refuses_more_than_one_output():
    with pytest.raises(ValueError, match="one output"):
        EnsembleMLP(2, 5, 8, 3).min_over_members(torch.randn(4, 5))


def test_mlp_last_layer_starts_small():
    mlp = MLP(4, 32, 3)
    assert mlp.net[-1].weight.abs().max() <= 3e-3


def test_numpy_rollout_policy_acts_as_the_torch_policy_with_the_same_noise():
    torch.manual_seed(0)
    policy = TanhGaussianPolicy(7, 3, 32)
    with torch.no_grad():  # spread the outputs so the clamp and the tanh both matter
        policy.net.net[-1].weight.mul_(300.0)
    fast = NumpyTanhGaussianPolicy(policy)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    for deterministic in (True, False):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        with torch.no_grad():
            expected = policy(x, deterministic, g1, with_log_prob=False)[0].numpy()
        np.testing.assert_allclose(fast(x.numpy(), deterministic, g2), expected, atol=1e-5)
        assert g1.get_state().equal(g2.get_state())  # the same draws from the run's stream

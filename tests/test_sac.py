import copy
import threading

import pytest
import torch

from metapearl import cpu
from metapearl.agent import PEARLAgent
from metapearl.buffers import Batch
from metapearl.sac import Critics, PEARLUpdate, critic_target


def test_critic_target_masks_done():
    r = torch.tensor([[1.0], [-2.0]])
    done = torch.tensor([[0.0], [1.0]])
    next_v = torch.tensor([[10.0], [10.0]])
    # 5 * 1 + 0.9 * 10 = 14 ; 5 * -2 + 0 = -10
    y = critic_target(r, done, next_v, reward_scale=5.0, discount=0.9)
    torch.testing.assert_close(y, torch.tensor([[14.0], [-10.0]]))


def _setup(tiny_config, seed=0, **overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    agent = PEARLAgent.from_config(cfg, 2, 2)
    critics = Critics(2, 2, cfg.latent_size, cfg.net_size)
    return cfg, agent, critics, PEARLUpdate(agent, critics, cfg)


def _batch(tasks, n, terminal=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Batch(r(tasks, n, 2), torch.rand(tasks, n, 2, generator=g) * 2 - 1, r(tasks, n, 1),
                 r(tasks, n, 1), r(tasks, n, 2), torch.full((tasks, n, 1), terminal))


def _grads(update, rl, ctx):
    update.optimizer.zero_grad(set_to_none=True)
    total, _ = update.losses(rl, ctx, update.draw_noise(rl, torch.Generator().manual_seed(5)))
    total.backward()
    return {k: (v.grad.clone() if v.grad is not None else torch.zeros_like(v))
            for k, v in {**{f"agent.{n}": p for n, p in update.agent.named_parameters()},
                         **{f"critics.{n}": p for n, p in update.critics.named_parameters()}}.items()}


def _perturb(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_encoder_learns_from_critic_and_kl_only(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config)
    rl, ctx = _batch(4, 8), _batch(4, 8, seed=1)
    base = _grads(update, rl, ctx)
    assert any(base[k].abs().sum() > 0 for k in base if k.startswith("agent.encoder"))
    _perturb(agent.policy)
    _perturb(critics.vf)
    after = _grads(update, rl, ctx)
    for k in base:
        if k.startswith("agent.encoder") or k.startswith("critics.qf"):
            torch.testing.assert_close(base[k], after[k], msg=k)
    # ... and the critic part is really there: other Q networks, other encoder gradients
    _perturb(critics.qf)
    moved = _grads(update, rl, ctx)
    assert any((moved[k] - after[k]).abs().sum() > 0 for k in base if k.startswith("agent.encoder"))


def test_q_gradients_do_not_come_from_the_policy_loss(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config)
    rl, ctx = _batch(4, 8), _batch(4, 8, seed=1)
    base = _grads(update, rl, ctx)
    _perturb(agent.policy)
    after = _grads(update, rl, ctx)
    assert any((base[k] - after[k]).abs().sum() > 0 for k in base if k.startswith("agent.policy"))
    for k in base:
        if k.startswith("critics.qf"):
            torch.testing.assert_close(base[k], after[k])


def test_terminal_transitions_ignore_the_target_network(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config)
    rl, ctx = _batch(4, 8, terminal=1.0), _batch(4, 8, seed=1)
    g = lambda rl: update.draw_noise(rl, torch.Generator().manual_seed(3))  # noqa: E731
    q_loss = update.losses(rl, ctx, g(rl))[1][0]
    _perturb(critics.target_vf)
    assert update.losses(rl, ctx, g(rl))[1][0] == q_loss
    rl_live = _batch(4, 8, terminal=0.0)
    before = update.losses(rl_live, ctx, g(rl_live))[1][0]
    _perturb(critics.target_vf)
    assert update.losses(rl_live, ctx, g(rl_live))[1][0] != before


def test_kl_term_absent_without_information_bottleneck(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config, use_information_bottleneck=False)
    rl = _batch(4, 8)
    _, stats = update.losses(rl, _batch(4, 8, seed=1), update.draw_noise(rl, None))
    assert stats[3] == 0


def test_step_updates_every_network_and_polyak_averages_target(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config)
    before = copy.deepcopy(critics.state_dict())
    enc_before = copy.deepcopy(agent.state_dict())
    update.step(_batch(4, 8), _batch(4, 8, seed=1), torch.Generator().manual_seed(0))
    after = critics.state_dict()
    for name in before:
        if name.startswith("target_vf"):
            vf_name = name.replace("target_vf", "vf")
            expected = (1 - cfg.soft_target_tau) * before[name] + cfg.soft_target_tau * after[vf_name]
            torch.testing.assert_close(after[name], expected)
        else:
            assert not torch.equal(before[name], after[name]), name
    for name, value in agent.state_dict().items():
        if name.startswith(("encoder", "policy")):
            assert not torch.equal(enc_before[name], value), name


def test_without_fused_adam_the_update_falls_back_to_the_same_unfused_one(tiny_config, monkeypatch):
    real_adam, built = torch.optim.Adam, []

    def adam_without_fused(params, lr, fused=None, foreach=None):  # as torch < 2.4 on CPU
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                               "of supported devices: ['cuda']")
        built.append(foreach)
        return real_adam(params, lr=lr, foreach=foreach)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    _, agent, critics, unfused = _setup(tiny_config)
    monkeypatch.undo()
    _, agent_f, critics_f, fused = _setup(tiny_config)
    assert built == [True] and fused.optimizer.defaults["fused"]
    for update in (unfused, fused):
        for _ in range(3):
            update.step(_batch(4, 8), _batch(4, 8, seed=1), torch.Generator().manual_seed(0))
    for a, b in zip([*agent.parameters(), *critics.parameters()],
                    [*agent_f.parameters(), *critics_f.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_losses_are_the_formulas_of_spec_section_3(tiny_config):
    """Every loss of one step, recomputed here in float64, task by task, from the networks' raw
    layers: PoG posterior from the *context* reward, z by reparameterisation, KL summed over tasks
    and latent dims, y with done masking, min of Q1/Q2, V target min Q - log pi, policy loss with
    both regularisers, total = L_Q + kl_lambda KL + L_V + L_pi."""
    cfg, agent, critics, update = _setup(
        tiny_config, reward_scale=7.0, discount=0.8, kl_lambda=0.3,
        policy_mean_reg_weight=0.05, policy_std_reg_weight=0.02)
    for module in (agent.encoder, critics.qf, critics.vf, critics.target_vf):
        _perturb(module)  # outputs well away from the small initial ones: every term counts
    _perturb(agent.policy, 0.2)  # (not so far that tanh saturates in float64 below)
    tasks, n, lat = 3, 5, cfg.latent_size
    rl, ctx = _batch(tasks, n, seed=2), _batch(tasks, 4, seed=3)
    rl.terminals = (torch.arange(tasks * n).reshape(tasks, n, 1) % 2).float()
    total, stats = update.losses(rl, ctx, update.draw_noise(rl, torch.Generator().manual_seed(11)))

    # the update draws z's noise (tasks, latent), then the policy's (tasks * n, act), in this order
    g = torch.Generator().manual_seed(11)
    eps_z = torch.randn(tasks, lat, generator=g).double()
    eps_a = torch.randn(tasks * n, 2, generator=g).double()
    enc, pol = copy.deepcopy(agent.encoder.net).double(), copy.deepcopy(agent.policy.net).double()
    vf, target_vf = copy.deepcopy(critics.vf).double(), copy.deepcopy(critics.target_vf).double()
    qf = copy.deepcopy(critics.qf).double()
    d = lambda x: x.double()  # noqa: E731
    normal01 = torch.distributions.Normal(0.0, 1.0)
    loss_q = loss_v = loss_pi_main = mean_sq = log_std_sq = kl = 0.0
    for i in range(tasks):
        out = enc(torch.cat([d(ctx.obs[i]), d(ctx.actions[i]), d(ctx.context_rewards[i])], -1))
        mu_n, var_n = out[:, :lat], torch.nn.functional.softplus(out[:, lat:])
        var = 1.0 / (1.0 / var_n).sum(0)
        mu = var * (mu_n / var_n).sum(0)
        kl += torch.distributions.kl_divergence(torch.distributions.Normal(mu, var.sqrt()),
                                                normal01).sum()
        z = (mu + var.sqrt() * eps_z[i]).expand(n, lat)
        s, a, s2 = d(rl.obs[i]), d(rl.actions[i]), d(rl.next_obs[i])
        y = 7.0 * d(rl.rewards[i]) + (1 - d(rl.terminals[i])) * 0.8 * target_vf(torch.cat([s2, z], -1))
        q1, q2 = qf(torch.cat([s, a, z], -1))
        loss_q = loss_q + ((q1 - y) ** 2).sum() + ((q2 - y) ** 2).sum()
        mean, log_std = pol(torch.cat([s, z], -1)).chunk(2, -1)
        log_std = log_std.clamp(-20, 2)
        pre = mean + log_std.exp() * eps_a[i * n:(i + 1) * n]
        new_a = torch.tanh(pre)
        assert pre.abs().max() < 6
        log_pi = (torch.distributions.Normal(mean, log_std.exp()).log_prob(pre)
                  - torch.log(1 - new_a ** 2)).sum(-1, keepdim=True)
        min_q = torch.minimum(*qf(torch.cat([s, new_a, z], -1)))
        loss_v = loss_v + ((vf(torch.cat([s, z], -1)) - (min_q - log_pi)) ** 2).sum()
        loss_pi_main = loss_pi_main + (log_pi - min_q).sum()
        mean_sq, log_std_sq = mean_sq + (mean ** 2).sum(), log_std_sq + (log_std ** 2).sum()
    rows = tasks * n
    expected = torch.stack([
        loss_q / rows, loss_v / rows,
        loss_pi_main / rows + 0.05 * mean_sq / (rows * 2) + 0.02 * log_std_sq / (rows * 2), kl])
    torch.testing.assert_close(stats[:4].double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total.double(), expected[0] + 0.3 * kl + expected[1] + expected[2],
                               rtol=1e-4, atol=1e-6)


def test_kl_weight_scales_only_the_encoder_gradient_part_from_kl(tiny_config):
    """d total / d encoder = d L_Q / d encoder + kl_lambda d KL / d encoder: linear in kl_lambda."""
    grads = {}
    for lam in (0.0, 1.0, 2.0):
        _, agent, _, update = _setup(tiny_config, kl_lambda=lam)
        g = _grads(update, _batch(4, 8), _batch(4, 8, seed=1))
        grads[lam] = torch.cat([g[k].flatten() for k in sorted(g) if k.startswith("agent.encoder")])
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-6
    torch.testing.assert_close(grads[2.0] - grads[0.0], 2 * (grads[1.0] - grads[0.0]),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("encoder", [
    {},  # the paper's product of diagonal Gaussians
    {"factor_rank": 1},
    {"use_information_bottleneck": False},  # a deterministic z: no z noise
    {"encoder": "rnn-tran", "rnn_bptt_steps": 3},
])
@pytest.mark.parametrize("tasks, threads", [(4, 2), (5, 3)])  # an even and an uneven split
def test_a_step_split_over_threads_is_the_unsplit_step(tiny_config, monkeypatch, tasks, threads,
                                                       encoder):
    cfg, agent, critics, _ = _setup(tiny_config, kl_lambda=0.3, **encoder)
    for module in (agent.encoder, agent.policy, critics.qf, critics.vf, critics.target_vf):
        _perturb(module, 0.2)
    rl, ctx = _batch(tasks, 8, seed=2), _batch(tasks, 6, seed=3)
    rl.terminals = (torch.arange(tasks * 8).reshape(tasks, 8, 1) % 3 == 0).float()
    calls, results = [], {}
    try:
        for gemm, n in (("torch", 1), ("numpy", threads)):
            cpu.configure(gemm, n)
            update = PEARLUpdate(copy.deepcopy(agent), copy.deepcopy(critics), cfg)
            losses = update.losses
            monkeypatch.setattr(update, "losses", lambda rl, *a, f=losses: calls.append(
                (threading.get_ident(), rl.obs.shape[0])) or f(rl, *a))
            calls.clear()
            stats = update.step(rl, ctx, torch.Generator().manual_seed(7))
            assert all(p.grad.stride() == p.stride() for p in update._params)  # as Adam reads it
            results[gemm] = (stats, [p.grad.clone() for p in update._params],
                             [p.detach().clone() for p in update._params])
    finally:
        cpu.configure("torch")
    # shares of near-equal task counts, the first on this thread and the others on the pool's
    # (an idle pool thread may take a second share)
    idents = [ident for ident, _ in calls]
    assert idents.count(threading.get_ident()) == 1 and len(set(idents)) >= 2
    assert sorted(count for _, count in calls) == sorted(
        tasks * (i + 1) // threads - tasks * i // threads for i in range(threads))
    (stats_t, grads_t, after_t), (stats_n, grads_n, after_n) = results["torch"], results["numpy"]
    assert all(g.abs().sum() > 0 for g in grads_t)
    torch.testing.assert_close(stats_n, stats_t, rtol=1e-5, atol=1e-6)
    for g_n, g_t in zip(grads_n, grads_t, strict=True):
        torch.testing.assert_close(g_n, g_t, rtol=1e-4, atol=1e-6)
    # Adam's first step moves each parameter by about lr * sign(gradient): rounding may flip the
    # sign of a gradient near 0, a gradient read in the wrong layout flips about half of them
    moved_alike = torch.cat([((a - b).abs() < 1e-6).flatten() for a, b in zip(after_n, after_t, strict=True)])
    assert moved_alike.float().mean() > 0.99


def test_a_split_step_on_more_threads_replaces_its_pool_and_ends_the_old_one(tiny_config):
    _, _, _, update = _setup(tiny_config)
    rl, ctx = _batch(4, 8, seed=2), _batch(4, 6, seed=3)
    pools = []
    try:
        for threads in (2, 3, 2):
            cpu.configure("numpy", threads)
            update.step(rl, ctx, torch.Generator().manual_seed(7))
            pools.append(update._pool)
    finally:
        cpu.configure("torch")
    first, second, third = pools
    assert second is not first and third is second  # fewer threads keep the larger pool
    assert first._shutdown and not second._shutdown
    assert all(not t.is_alive() for t in first._threads)

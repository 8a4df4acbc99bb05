import copy

import torch

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
    total, _ = update.losses(rl, ctx, torch.Generator().manual_seed(5))
    total.backward()
    return {k: (v.grad.clone() if v.grad is not None else torch.zeros_like(v))
            for k, v in {**{f"agent.{n}": p for n, p in update.agent.named_parameters()},
                         **{f"critics.{n}": p for n, p in update.critics.named_parameters()}}.items()}


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)


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
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    q_loss = update.losses(rl, ctx, g())[1][0]
    _perturb(critics.target_vf)
    assert update.losses(rl, ctx, g())[1][0] == q_loss
    rl_live = _batch(4, 8, terminal=0.0)
    before = update.losses(rl_live, ctx, g())[1][0]
    _perturb(critics.target_vf)
    assert update.losses(rl_live, ctx, g())[1][0] != before


def test_kl_term_absent_without_information_bottleneck(tiny_config):
    cfg, agent, critics, update = _setup(tiny_config, use_information_bottleneck=False)
    _, stats = update.losses(_batch(4, 8), _batch(4, 8, seed=1), None)
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

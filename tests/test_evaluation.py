import numpy as np
import pytest
import torch

from metapearl.agent import PEARLAgent
from metapearl.evaluation import EvalResult, meta_test, offline_test
from metapearl.rollout import Belief, collect
from metapearl.tasks import TaskFamily, get_family
from metapearl.tasks.point import PointEnv


def _agent(cfg, seed=0):
    torch.manual_seed(seed)
    return PEARLAgent.from_config(cfg, 2, 2, [-0.1, -0.1], [0.1, 0.1])


def test_collect_runs_whole_trajectories_until_the_step_count(tiny_config):
    cfg = tiny_config()
    fam = get_family("point-robot")
    envs = [fam.make_env() for _ in range(3)]
    for i, e in enumerate(envs):
        fam.set_task(e, {"goal": [0.0, 0.0]})
        e.reset(seed=i)
    agent = _agent(cfg)
    seen = []
    out = collect(agent, envs, Belief(*agent.prior(3)), 25, 10, False,
                  torch.Generator().manual_seed(0), lambda i, t: seen.append((i, len(t))))
    assert [len(slot) for slot in out] == [3, 3, 3]  # 25 steps -> three whole 10-step paths
    assert len(seen) == 9 and all(n == 10 for _, n in seen)
    traj = out[0][0]
    np.testing.assert_allclose(traj.obs[1:], traj.next_obs[:-1])
    assert np.all(np.abs(traj.actions) <= 1)


def test_deterministic_eval_policy_is_tanh_of_the_mean(tiny_config):
    cfg = tiny_config()
    agent = _agent(cfg)
    obs = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    z = torch.randn(5, cfg.latent_size)
    a1 = agent.act_batch(obs, z, True, torch.Generator().manual_seed(0))
    a2 = agent.act_batch(obs, z, True, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a1, a2)
    mean = agent.policy.net(torch.cat([torch.as_tensor(obs), z], -1))[:, :2]
    np.testing.assert_allclose(a1, torch.tanh(mean).detach().numpy(), rtol=1e-6)
    s1 = agent.act_batch(obs, z, False, torch.Generator().manual_seed(0))
    s2 = agent.act_batch(obs, z, False, torch.Generator().manual_seed(1))
    assert not np.array_equal(s1, s2)


class _FixedStartPoint(TaskFamily):
    """Dense point-robot starting at the origin: with a deterministic encoder and policy, a test
    task's returns depend only on its goal and on the belief it starts from."""

    name = "test-fixed-start-point"
    max_path_length = 10
    task_parameter = "goal"

    def make_env(self):
        return PointEnv(sparse=False, random_start=False)

    def sample_task(self, rng):
        return {"goal": rng.uniform(-1, 1, 2).tolist()}

    def set_task(self, env, task):
        env.set_goal(task["goal"])


@pytest.mark.parametrize("side_by_side", [1, 2])
def test_belief_does_not_leak_between_test_tasks(tiny_config, side_by_side):
    cfg = tiny_config(use_information_bottleneck=False, num_steps_per_eval=30,
                      num_exp_traj_eval=1)
    fam = _FixedStartPoint()
    agent = _agent(cfg, seed=1)
    with torch.no_grad():  # a policy that visibly depends on z
        agent.policy.net.net[-1].weight.normal_(0.0, 1.0)
        agent.encoder.net.net[-1].weight.normal_(0.0, 1.0)
    task_a, task_b = {"goal": [1.0, 0.0]}, {"goal": [-1.0, 0.5]}
    envs = [fam.make_env() for _ in range(side_by_side)]  # 1: one after another; 2: together
    both = meta_test(agent, fam, envs, [task_a, task_b], cfg, None)
    alone = meta_test(agent, fam, envs, [task_b], cfg, None)
    assert len(both.returns[0]) == 3  # 30 steps of 10-step trajectories
    assert both.returns[1] == alone.returns[0]
    # the check can fail: task B started from task A's final belief scores differently
    zero = torch.zeros(1, 2)
    leaked = agent.posterior(agent.make_context(zero, zero, -torch.ones(1, 1), zero).unsqueeze(0))
    agent.prior = lambda n: (leaked[0].expand(n, -1).clone(), leaked[1].expand(n, -1).clone())
    assert meta_test(agent, fam, envs, [task_b], cfg, None).returns[0] != alone.returns[0]


def test_adaptation_uses_the_posterior_after_the_exploration_trajectories(tiny_config):
    cfg = tiny_config(num_steps_per_eval=40, num_exp_traj_eval=2)
    fam = get_family("point-robot")
    agent = _agent(cfg)
    envs = [fam.make_env()]
    envs[0].reset(seed=0)
    calls = []
    original = agent.posterior

    def spy(context, mask=None):
        calls.append(context.shape[1])
        return original(context, mask)

    agent.posterior = spy
    result = meta_test(agent, fam, envs, [{"goal": [0.3, 0.3]}], cfg, None)
    # trajectories of 10 steps: posterior after the 2nd, 3rd, 4th, from all context so far
    assert calls == [20, 30, 40]
    assert len(result.adaptation_curve()) == 4


def test_sampled_online_context_infers_from_embedding_batch_size_rows(tiny_config):
    cfg = tiny_config(num_steps_per_eval=40, num_exp_traj_eval=2, sample_online_context=True,
                      embedding_batch_size=7)
    fam = get_family("sparse-point-robot")
    agent = _agent(cfg)
    assert agent.online_context_rows == 7
    envs = [fam.make_env()]
    envs[0].reset(seed=0)
    contexts = []
    original = agent.posterior

    def spy(context, mask=None):
        contexts.append(context)
        return original(context, mask)

    agent.posterior = spy
    meta_test(agent, fam, envs, [{"goal": [0.0, 1.0]}], cfg, torch.Generator().manual_seed(0))
    # after the 2nd, 3rd and 4th trajectory: 7 rows drawn from the 20, 30, 40 gathered
    assert [c.shape[1] for c in contexts] == [7, 7, 7]
    # with replacement, 7 rows drawn from n repeat one with probability 1 - n!/(n-7)!/n^7
    # (0.69, 0.53, 0.43 for n = 20, 30, 40); no repeat in all three draws: 8%; this seed repeats
    assert any(len(torch.unique(c[0], dim=0)) < 7 for c in contexts)


@pytest.mark.parametrize("sampled", [True, False])
def test_deployment_posterior_of_equal_rows_is_a_product_of_m_or_n_factors(tiny_config, sampled):
    agent = _agent(tiny_config(sample_online_context=sampled, embedding_batch_size=128))
    agent.generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # the same transition 300 times
        agent.observe([0.2, 0.5], [0.03, -0.04], 0.0, [0.23, 0.46])
    agent.infer_posterior()
    with torch.no_grad():
        mu1, var1 = agent.posterior(agent.context[:, :1])  # one factor
    # a product of m equal Gaussian factors: the factor's mean, its variance / m; m = the
    # 128 rows drawn, or all 300
    torch.testing.assert_close(agent.belief_var, var1 / (128 if sampled else 300))
    torch.testing.assert_close(agent.belief_mu, mu1)


def test_deployment_agent_resets_its_belief(tiny_config):
    cfg = tiny_config()
    agent = _agent(cfg)
    for _ in range(5):
        agent.observe([0.1, 0.2], [0.05, -0.05], -1.0, [0.15, 0.15])
    agent.infer_posterior()
    assert agent.context.shape == (1, 5, agent.context_dim)
    assert not torch.equal(agent.belief_var, torch.ones(1, cfg.latent_size))
    agent.reset()
    assert agent.context.shape[1] == 0
    assert torch.equal(agent.belief_mu, torch.zeros(1, cfg.latent_size))
    assert torch.equal(agent.belief_var, torch.ones(1, cfg.latent_size))
    a = agent.act([0.0, 0.0])
    assert a.shape == (2,) and np.all(np.abs(a) <= 0.1)
    np.testing.assert_allclose(agent.from_env_action(agent.to_env_action(np.array([0.3, -1.0]))),
                               [0.3, -1.0])


def test_a_deployment_agent_moved_mid_task_keeps_its_task_state(tiny_config):
    # what .to("cuda") does to the devices, .double() does to the dtypes, on a CPU-only machine
    agent = _agent(tiny_config())
    for _ in range(3):
        agent.observe([0.1, 0.2], [0.05, -0.05], -1.0, [0.15, 0.15])
    agent.infer_posterior()
    z = agent.sample_z().clone()
    before = agent.act([0.0, 0.0])
    agent.double()
    assert all(t.dtype == torch.float64 for t in (agent.belief_mu, agent.belief_var, agent.z,
                                                  agent.context))
    torch.testing.assert_close(agent.z, z.double())
    np.testing.assert_allclose(agent.act([0.0, 0.0]), before, rtol=1e-5, atol=1e-6)


class _FallsAfterThreeSteps(_FixedStartPoint):
    """Every episode terminates at its third step, as a falling walker's would."""

    name = "test-falls-after-three-steps"

    def make_env(self):
        env = super().make_env()
        step, reset = env.step, env.reset

        def counted_step(action):
            obs, reward, _, truncated, info = step(action)
            env.t += 1
            return obs, reward, env.t == 3, truncated, info

        def counted_reset(**kwargs):
            env.t = 0
            return reset(**kwargs)

        env.step, env.reset = counted_step, counted_reset
        return env


def test_offline_test_runs_a_fixed_number_of_trajectories_however_early_they_end(tiny_config):
    cfg = tiny_config(num_steps_per_eval=45)  # max_path_length 10: 4 trajectories per task
    fam = _FallsAfterThreeSteps()
    agent = _agent(cfg)
    tasks = [{"goal": [1.0, 0.0]}, {"goal": [0.0, 1.0]}, {"goal": [-1.0, 0.0]}]
    rows = torch.zeros(5, agent.context_dim)
    result = offline_test(agent, fam, [fam.make_env() for _ in range(2)], tasks,
                          lambda slots: rows.expand(len(slots), -1, -1), cfg, None)
    # a 45-step budget would have run 15 three-step trajectories per task, as meta_test does
    assert [len(r) for r in result.returns] == [4, 4, 4]
    assert [len(r) for r in meta_test(agent, fam, [fam.make_env()], tasks[:1], cfg,
                                      None).returns] == [15]


def test_offline_return_weighs_every_task_alike():
    result = EvalResult(returns=[[-9.0, -4.0, -1.0], [-8.0, -6.0]], successes=[[], []])
    assert result.mean_return == pytest.approx((-14.0 / 3 + -7.0) / 2)  # not -28 / 5


def test_reported_return_is_the_last_trajectory():
    result = EvalResult(returns=[[-9.0, -4.0, -1.0], [-8.0, -6.0]],
                        successes=[[False, False, True], [False, True]])
    assert result.final_return == (-1.0 + -6.0) / 2
    assert result.final_success_rate == 1.0
    np.testing.assert_allclose(result.adaptation_curve(), [-8.5, -5.0])  # the shortest slot's 2


def test_sparse_family_gives_context_the_sparse_reward_and_critic_the_dense_one(tiny_config):
    cfg = tiny_config(family="sparse-point-robot", num_exp_traj_eval=2)
    fam = get_family("sparse-point-robot")
    env = fam.make_env()
    fam.set_task(env, {"goal": [0.0, 0.1]})  # the start (origin) is inside the goal radius
    env.reset(seed=0)
    agent = _agent(cfg)
    traj = collect(agent, [env], Belief(*agent.prior(1)), 10, 10, False,
                   torch.Generator().manual_seed(0))[0][0]
    dist = np.linalg.norm(traj.next_obs - np.array([0.0, 0.1]), axis=1)
    np.testing.assert_allclose(traj.rewards, -dist, rtol=1e-5)
    np.testing.assert_allclose(traj.context_rewards, np.where(dist <= 0.2, 1 - dist, 0.0),
                               rtol=1e-5)
    assert traj.context_rewards.max() > 0 and traj.ret == pytest.approx(traj.context_rewards.sum())

import numpy as np
import pytest
import torch

from metapearl.buffers import TaskReplayBuffer, sample_context
from metapearl.encoder import marginal_variance
from metapearl.trainer import Trainer, task_waves


def _rows(buf, task, n, start=0):
    """Rows whose obs[0] encodes (task, index) so samples can be traced back."""
    obs = np.stack([np.full(n, task * 1000.0), np.arange(start, start + n)], axis=1)
    return buf.rows(obs, np.zeros((n, 1)), np.arange(n, dtype=float), np.zeros(n), obs,
                    np.zeros(n))


def test_sampling_returns_only_each_tasks_own_rows():
    buf = TaskReplayBuffer(3, 2, 1, max_size=100, initial_capacity=4)
    for t in range(3):
        buf.add(t, _rows(buf, t, 10 + t))
    tasks = torch.tensor([2, 0, 2, 1])
    batch = buf.sample(tasks, 50, torch.Generator().manual_seed(0))
    assert batch.obs.shape == (4, 50, 2) and batch.rewards.shape == (4, 50, 1)
    for i, t in enumerate(tasks.tolist()):
        assert torch.all(batch.obs[i, :, 0] == t * 1000)
        assert batch.obs[i, :, 1].max() < 10 + t
    assert buf.capacity >= 12  # grew on demand from 4


def test_fifo_keeps_the_newest_rows():
    buf = TaskReplayBuffer(1, 2, 1, max_size=8, initial_capacity=2)
    buf.add(0, _rows(buf, 0, 6))
    buf.add(0, _rows(buf, 0, 5, start=6))  # 11 rows into 8 slots: rows 3..10 survive
    assert buf.sizes[0] == 8
    kept = sorted(buf.all_of(0).obs[0, :, 1].tolist())
    assert kept == list(range(3, 11))


def test_clear_empties_one_task_only_and_empty_sampling_is_an_error():
    buf = TaskReplayBuffer(2, 2, 1, max_size=50)
    buf.add(0, _rows(buf, 0, 5))
    buf.add(1, _rows(buf, 1, 5))
    buf.clear(0)
    assert buf.sizes.tolist() == [0, 5]
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(torch.tensor([0, 1]), 3, None)


def test_context_samplers_draw_from_their_sources():
    rl = TaskReplayBuffer(1, 2, 1, max_size=50)
    enc = TaskReplayBuffer(1, 2, 1, max_size=50)
    rl.add(0, _rows(rl, 0, 20))
    enc.add(0, _rows(enc, 0, 3, start=100))
    tasks, g = torch.tensor([0]), torch.Generator().manual_seed(0)
    assert sample_context("recent", rl, enc, tasks, 30, g).obs[..., 1].min() >= 100
    assert sample_context("off-policy", rl, enc, tasks, 30, g).obs[..., 1].max() < 20
    batch = rl.sample(tasks, 7, g)
    assert sample_context("off-policy-rl-batch", rl, enc, tasks, 30, g, batch) is batch


def test_task_waves_keep_repeats_apart_and_order():
    assert task_waves([3, 1, 3, 2, 3]) == [[3, 1, 2], [3], [3]]


def test_encoder_buffer_holds_only_the_latest_collection_and_no_extra_rl_steps(tiny_config,
                                                                                tmp_path):
    cfg = tiny_config(num_steps_prior=20, num_steps_posterior=10, num_extra_rl_steps_posterior=30,
                      num_initial_steps=20, max_path_length=10, num_tasks_sample=3)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.collect_iteration_data()  # iteration 0: initial steps, then the drawn tasks
    rl0, enc0 = tr.rl_buffer.sizes.copy(), tr.enc_buffer.sizes.copy()
    tr.iteration = 1
    draw_rng = np.random.default_rng()
    draw_rng.bit_generator.state = tr.rng.bit_generator.state
    drawn = set(draw_rng.integers(cfg.num_train_tasks, size=cfg.num_tasks_sample).tolist())
    tr.collect_iteration_data()
    for t in range(cfg.num_train_tasks):
        if t in drawn:
            # encoder buffer: cleared, then prior (20) + posterior (10) steps; extra-RL kept out
            assert tr.enc_buffer.sizes[t] == 30
            assert tr.rl_buffer.sizes[t] - rl0[t] >= 60
        else:
            assert tr.enc_buffer.sizes[t] == enc0[t] and tr.rl_buffer.sizes[t] == rl0[t]


@pytest.mark.parametrize("every, inferences_per_phase", [(1, 3), (2, 2)])
def test_posterior_phases_act_on_a_posterior_reinferred_every_update_post_train_trajectories(
        every, inferences_per_phase, tiny_config, tmp_path, monkeypatch):
    import metapearl.trainer as trainer_mod

    cfg = tiny_config(num_tasks_sample=1, num_steps_prior=20, num_steps_posterior=20,
                      num_extra_rl_steps_posterior=20, max_path_length=10, update_post_train=every)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.collect_iteration_data()  # iteration 0: the initial collection, then one drawn task
    tr.iteration = 1
    starts, inferred = [], []
    real_collect, real_posterior = trainer_mod.collect, tr.agent.posterior

    def spy_collect(agent, envs, belief, *args, **kwargs):
        starts.append(belief.var.clone())
        return real_collect(agent, envs, belief, *args, **kwargs)

    def spy_posterior(context, mask=None):
        inferred.append(context.shape[0])
        return real_posterior(context, mask)

    monkeypatch.setattr(trainer_mod, "collect", spy_collect)
    monkeypatch.setattr(tr.agent, "posterior", spy_posterior)
    tr.collect_iteration_data()
    prior_phase, posterior_phase, extra_rl_phase = map(marginal_variance, starts)
    assert torch.equal(prior_phase, torch.ones_like(prior_phase))  # z ~ N(0, I)
    # the posterior phases start from q(z | prior-phase context), not from the prior ...
    assert (posterior_phase < 0.5).all() and (extra_rl_phase < 0.5).all()
    # ... and re-infer it after every `every` of their 2 trajectories
    assert inferred == [1] * 2 * inferences_per_phase


def test_sequence_batches_are_whole_trajectories_in_collection_order():
    buf = TaskReplayBuffer(2, 2, 1, max_size=1000, initial_capacity=4)
    lengths = [5, 3, 7, 4, 6]  # trajectories of task 0, rows numbered 0..24 in collection order
    starts, n0 = [], 0
    for length in lengths:
        buf.add(0, _rows(buf, 0, length, start=n0))
        starts.append(n0)
        n0 += length
    buf.add(1, _rows(buf, 1, 30))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        batch = buf.sample(torch.tensor([0, 1, 0]), 9, g, sequence=True)
        for i in (0, 2):
            idx = batch.obs[i, :, 1].tolist()
            assert idx[0] in starts and idx == list(range(int(idx[0]), int(idx[0]) + 9))
            seen.add(idx[0])
        assert torch.all(batch.obs[1, :, 0] == 1000)
    assert seen == {0, 5, 8, 15}  # every start with 9 rows after it (row 19 + 9 > 25)


def test_sequence_batches_follow_fifo_wraparound():
    buf = TaskReplayBuffer(1, 2, 1, max_size=10, initial_capacity=10)
    for k in range(4):  # four trajectories of 4 rows: rows 6..15 survive, starts 8 and 12
        buf.add(0, _rows(buf, 0, 4, start=4 * k))
    g = torch.Generator().manual_seed(1)
    firsts = set()
    for _ in range(30):
        idx = buf.sample(torch.tensor([0]), 4, g, sequence=True).obs[0, :, 1].tolist()
        assert idx == list(range(int(idx[0]), int(idx[0]) + 4))
        firsts.add(idx[0])
    assert firsts == {8.0, 12.0}
    state = buf.state_dict()
    copy = TaskReplayBuffer(1, 2, 1, max_size=10)
    copy.load_state_dict(state)
    assert np.array_equal(copy.starts, buf.starts)


def _drawn_batches(cfg, run_dir):
    """The (RL, context) batches of one iteration's gradient steps."""
    tr = Trainer(cfg, run_dir, progress=False)
    tr.collect_iteration_data()
    drawn = []
    real = tr.update.step
    tr.update.step = lambda rl, ctx, g: drawn.append((rl, ctx)) or real(rl, ctx, g)
    tr.train_steps_for_iteration()
    assert len(drawn) == cfg.num_train_steps_per_itr
    return drawn


def _whole_trajectories(batch, max_path_length) -> bool:
    """Consecutive rows (each next obs is the following row's obs), broken only where a
    trajectory ends, every max_path_length rows from the start."""
    boundary = ~(batch.next_obs[:, :-1] == batch.obs[:, 1:]).all(dim=-1)
    return bool(torch.all((torch.nonzero(boundary)[:, 1] + 1) % max_path_length == 0))


def test_rnn_traj_trainer_draws_contiguous_rl_and_context_batches(tiny_config, tmp_path):
    cfg = tiny_config("point-robot", encoder="rnn-traj", batch_size=12, embedding_batch_size=10)
    for rl, ctx in _drawn_batches(cfg, tmp_path / "run"):
        assert _whole_trajectories(rl, cfg.max_path_length)
        assert _whole_trajectories(ctx, cfg.max_path_length)


def test_context_trajectories_make_only_the_context_batch_contiguous(tiny_config, tmp_path):
    sizes = dict(batch_size=20, embedding_batch_size=20, num_train_steps_per_itr=5)
    cfg = tiny_config(context_trajectories=True, **sizes)
    drawn = _drawn_batches(cfg, tmp_path / "seq")
    assert all(_whole_trajectories(ctx, cfg.max_path_length) for _, ctx in drawn)
    # the RL batch stays i.i.d.
    assert not any(_whole_trajectories(rl, cfg.max_path_length) for rl, _ in drawn)
    drawn = _drawn_batches(tiny_config(context_trajectories=False, **sizes), tmp_path / "iid")
    assert not any(_whole_trajectories(ctx, cfg.max_path_length) for _, ctx in drawn)


def test_sequence_batches_without_a_fitting_start_take_the_newest_rows():
    buf = TaskReplayBuffer(1, 2, 1, max_size=10, initial_capacity=10)
    for k in range(4):  # rows 6..15 survive; starts 8 and 12 have fewer than 9 rows after them
        buf.add(0, _rows(buf, 0, 4, start=4 * k))
    g = torch.Generator().manual_seed(0)
    assert buf.sample(torch.tensor([0]), 9, g, sequence=True).obs[0, :, 1].tolist() == list(
        range(7, 16))
    longer = buf.sample(torch.tensor([0]), 12, g, sequence=True).obs[0, :, 1].tolist()
    assert longer == list(range(6, 16)) + [6, 7]  # fewer rows than asked: all, in order, again
    state = buf.state_dict()
    del state["starts"]  # a format-2 checkpoint
    old = TaskReplayBuffer(1, 2, 1, max_size=10)
    old.load_state_dict(state)
    assert old.sizes[0] == 10 and not old.starts.any()


def test_an_empty_trajectory_adds_nothing_even_at_a_full_capacity():
    buf = TaskReplayBuffer(1, 2, 1, max_size=100, initial_capacity=4)
    buf.add(0, _rows(buf, 0, 4))  # size == capacity: the next row would need to grow the buffer
    buf.add(0, _rows(buf, 0, 0))
    assert buf.sizes[0] == 4 and int(buf.tops[0]) == 4 and buf.capacity == 4
    buf.add(0, _rows(buf, 0, 3, start=4))
    assert sorted(buf.all_of(0).obs[0, :, 1].tolist()) == list(range(7))

"""Throughput: the gradient step against the hardware and against the reference's cost structure,
collection against the raw env, and the memory of a run. All in one process and one run.

    python benchmarks/throughput.py                    # cheetah-vel, paper preset, CPU
    python benchmarks/throughput.py --json             # one JSON object
    python benchmarks/throughput.py --device cuda --rounds 7

Figures (the --json keys):
- matmul_peak_gflops: float32 square matmul (n = 2048 on CPU, 8192 on CUDA), median of the rounds;
  on CPU the faster of torch's and numpy's BLAS in each round (the step may use either, cpu.py);
- update_ms, update_gflops, fraction_of_peak: our gradient step (sampling included), with the
  FLOPs counted analytically (`update_flops`), under the config's CPU settings (`cpu_gemm`,
  `torch_threads`), on CUDA replayed from CUDA graphs with `--set cuda_graphs=true`;
- reference_update_ms, speedup_vs_reference: the same losses and sizes written as the reference
  code does (`ReferenceStep`: separate Q1/Q2/V/policy/encoder modules, five Adam optimizers, three
  backward passes, per-task numpy batches built on every step), in plain torch on `torch_threads`
  threads; ours and it alternate round by round so machine drift hits both;
- collect_steps_per_s, raw_env_steps_per_s, collect_fraction_of_raw: env steps per second of a
  PEARL iteration's collection (prior + posterior phases, policy and posterior inference
  included) against stepping the same task env with a constant action, in alternating rounds;
- peak_rss_mb: peak resident memory of a separate process that builds the run and does iteration
  0's collection (num_initial_steps in every training task, then that iteration's prior and
  posterior collection) and one gradient step;
- device: the device and how the step ran (CPU settings, or the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from metapearl import Trainer, cpu, make_config
from metapearl.agent import PEARLAgent, context_dim
from metapearl.buffers import TaskReplayBuffer, sample_context
from metapearl.config import PEARLConfig, parse_overrides
from metapearl.graphs import WARMUP_STEPS, GraphedSteps
from metapearl.sac import Critics, PEARLUpdate
from metapearl.tasks import get_family


# --- FLOPs --------------------------------------------------------------------------------------
def mlp_macs(in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> int:
    """Multiply-accumulates of one row through an MLP."""
    dims = [in_dim] + [hidden] * layers + [out_dim]
    return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def update_flops(cfg: PEARLConfig, obs_dim: int, act_dim: int, routed_min_q: bool) -> float:
    """FLOPs of the matmuls that one PEARL gradient step needs, 2 per multiply-accumulate: every
    network's forward; the weight gradients of the trained ones (encoder, Q1, Q2, V, policy);
    and the input gradients that reach a trained weight or a learning input: through every layer
    but the first, and through the first only for the inputs that learn (Q's z, which trains the
    encoder; the min Q's actions, which train the policy). routed_min_q: the policy's min Q
    back-propagates through each member over the rows where it is the minimum only (on CPU,
    `EnsembleMLP.min_over_members`), so over one member's worth of rows; else (on CUDA) as
    autograd through torch.min does, through both members over every row.
    Counted for the pog encoder's MLP only: ValueError for the recurrent encoders."""
    if cfg.encoder != "pog":
        raise ValueError(f"FLOPs are counted for the pog encoder only, not {cfg.encoder!r}")
    n = cfg.meta_batch * cfg.batch_size
    ctx_rows = n if cfg.context_sampler == "off-policy-rl-batch" else (
        cfg.meta_batch * cfg.embedding_batch_size)
    ctx_dim = context_dim(obs_dim, act_dim, cfg.use_next_obs_in_context)
    h, lat = cfg.net_size, cfg.latent_size

    def net(in_dim: int, out_dim: int, hidden: int = h, learning_inputs: int = 0):
        """(MACs of one row's forward, of its input gradient)."""
        forward = mlp_macs(in_dim, hidden, out_dim)
        return forward, forward - (in_dim - learning_inputs) * hidden

    enc_out = (2 + cfg.factor_rank) * lat if cfg.use_information_bottleneck else lat
    enc, enc_in = net(ctx_dim, enc_out, cfg.encoder_size)
    q, q_in = net(obs_dim + act_dim + lat, 1, learning_inputs=lat)
    _, min_q_in = net(obs_dim + act_dim + lat, 1, learning_inputs=act_dim)
    v, v_in = net(obs_dim + lat, 1)
    pi, pi_in = net(obs_dim + lat, 2 * act_dim)
    # rows: Q1, Q2, V, policy, then the target V and the min Q's two members (forward only)
    forward = enc * ctx_rows + (2 * q + v + pi + v + 2 * q) * n
    weight_grads = enc * ctx_rows + (2 * q + v + pi) * n
    input_grads = enc_in * ctx_rows + (2 * q_in + v_in + pi_in
                                       + (1 if routed_min_q else 2) * min_q_in) * n
    return 2.0 * (forward + weight_grads + input_grads)


# --- the reference's cost structure -------------------------------------------------------------
# what ReferenceStep mirrors of the config: the paper's encoder and context (next_obs in context too)
REFERENCE_MODEL = {"encoder": "pog", "factor_rank": 0, "use_information_bottleneck": True,
                   "context_sampler": "recent"}


def _mlp(in_dim, hidden, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class ReferenceStep:
    """One PEARL step as the reference code (rlkit/torch/sac/sac.py, `_take_step`) performs it."""

    def __init__(self, cfg: PEARLConfig, obs_dim: int, act_dim: int, buffers: dict, rng, device):
        h, lat, self.cfg, self.device = cfg.net_size, cfg.latent_size, cfg, device
        self.buffers, self.rng = buffers, rng
        self.encoder = _mlp(context_dim(obs_dim, act_dim, cfg.use_next_obs_in_context),
                            cfg.encoder_size, 2 * lat)
        self.qf1, self.qf2 = _mlp(obs_dim + act_dim + lat, h, 1), _mlp(obs_dim + act_dim + lat, h, 1)
        self.vf, self.target_vf = _mlp(obs_dim + lat, h, 1), _mlp(obs_dim + lat, h, 1)
        self.policy = _mlp(obs_dim + lat, h, 2 * act_dim)
        for name in ("encoder", "qf1", "qf2", "vf", "target_vf", "policy"):
            getattr(self, name).to(device)
        opt = lambda m: torch.optim.Adam(m.parameters(), lr=cfg.lr)  # noqa: E731
        self.opts = {name: opt(getattr(self, name))
                     for name in ("encoder", "qf1", "qf2", "vf", "policy")}

    def _batch(self, key: str, tasks, n: int):
        """Per task: sample indices in numpy, gather, convert; then concatenate (as the reference)."""
        out = []
        for t in tasks:
            data = self.buffers[key][t]
            idx = self.rng.integers(0, len(data["obs"]), n)
            out.append({k: torch.from_numpy(v[idx]).float()[None].to(self.device)
                        for k, v in data.items()})
        return {k: torch.cat([b[k] for b in out]) for k in out[0]}

    def step(self):
        cfg, lat = self.cfg, self.cfg.latent_size
        tasks = self.rng.integers(0, cfg.num_train_tasks, cfg.meta_batch)
        rl = self._batch("rl", tasks, cfg.batch_size)
        ctx = self._batch("enc", tasks, cfg.embedding_batch_size)
        context = torch.cat([ctx["obs"], ctx["actions"], ctx["rewards"]]
                            + ([ctx["next_obs"]] if cfg.use_next_obs_in_context else []), dim=2)
        params = self.encoder(context)
        mu, sigma2 = params[..., :lat], nn.functional.softplus(params[..., lat:]).clamp(min=1e-7)
        var = 1.0 / (1.0 / sigma2).sum(1)
        mu = var * (mu / sigma2).sum(1)
        z = mu + var.sqrt() * torch.randn_like(mu)
        t, b = cfg.meta_batch, cfg.batch_size
        task_z = z[:, None].expand(t, b, lat).reshape(t * b, lat)
        obs, actions = rl["obs"].reshape(t * b, -1), rl["actions"].reshape(t * b, -1)
        next_obs = rl["next_obs"].reshape(t * b, -1)
        rewards, terms = rl["rewards"].reshape(t * b, 1), rl["terminals"].reshape(t * b, 1)
        in_pi = torch.cat([obs, task_z.detach()], 1)
        mean, log_std = self.policy(in_pi).chunk(2, -1)
        log_std = log_std.clamp(-20, 2)
        pre = mean + log_std.exp() * torch.randn_like(mean)
        new_actions = torch.tanh(pre)
        log_pi = (torch.distributions.Normal(mean, log_std.exp()).log_prob(pre)
                  - torch.log(1 - new_actions.pow(2) + 1e-6)).sum(1, keepdim=True)
        q1 = self.qf1(torch.cat([obs, actions, task_z], 1))
        q2 = self.qf2(torch.cat([obs, actions, task_z], 1))
        v = self.vf(in_pi)
        with torch.no_grad():
            target_v = self.target_vf(torch.cat([next_obs, task_z], 1))
        kl = 0.5 * (var + mu.pow(2) - 1 - var.log()).sum()
        self.opts["encoder"].zero_grad()
        (cfg.kl_lambda * kl).backward(retain_graph=True)
        self.opts["qf1"].zero_grad()
        self.opts["qf2"].zero_grad()
        y = cfg.reward_scale * rewards + (1 - terms) * cfg.discount * target_v
        ((q1 - y).pow(2).mean() + (q2 - y).pow(2).mean()).backward()
        self.opts["qf1"].step()
        self.opts["qf2"].step()
        self.opts["encoder"].step()
        in_q = torch.cat([obs, new_actions, task_z.detach()], 1)
        min_q = torch.min(self.qf1(in_q), self.qf2(in_q))
        vf_loss = (v - (min_q - log_pi).detach()).pow(2).mean()
        self.opts["vf"].zero_grad()
        vf_loss.backward()
        self.opts["vf"].step()
        with torch.no_grad():
            for p, tp in zip(self.vf.parameters(), self.target_vf.parameters(), strict=True):
                tp.mul_(1 - cfg.soft_target_tau).add_(cfg.soft_target_tau * p)
        policy_loss = ((log_pi - min_q).mean() + 1e-3 * mean.pow(2).mean()
                       + 1e-3 * log_std.pow(2).mean())
        self.opts["policy"].zero_grad()
        policy_loss.backward()
        self.opts["policy"].step()


# --- measurements -------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Seconds per call of fn, averaged over `reps` calls."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def matmul_gflops(device, n: int) -> float:
    """GFLOP/s of an n x n float32 matmul: torch's, or on CPU the faster of torch's and numpy's."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    products = [lambda: a @ b]
    if device.type == "cpu":
        an, bn = a.numpy(), b.numpy()
        products.append(lambda: an @ bn)
    best = 0.0
    for product in products:
        timed(product, device, 2)
        best = max(best, 2 * n ** 3 / timed(product, device, 5) / 1e9)
    return best


def synthetic_buffers(cfg: PEARLConfig, obs_dim: int, act_dim: int, rows: int, device, rng):
    """RL and encoder buffers of every training task filled with `rows` random transitions, as
    our TaskReplayBuffers and as the reference's per-task numpy dicts (the same numbers)."""
    ours, ref = {}, {}
    for key in ("rl", "enc"):
        buf = TaskReplayBuffer(cfg.num_train_tasks, obs_dim, act_dim, rows, device)
        ref[key] = []
        for t in range(cfg.num_train_tasks):
            d = {"obs": rng.standard_normal((rows, obs_dim), np.float32),
                 "actions": rng.uniform(-1, 1, (rows, act_dim)).astype(np.float32),
                 "rewards": rng.standard_normal((rows, 1), np.float32),
                 "terminals": np.zeros((rows, 1), np.float32),
                 "next_obs": rng.standard_normal((rows, obs_dim), np.float32)}
            ref[key].append(d)
            buf.add(t, buf.rows(d["obs"], d["actions"], d["rewards"][:, 0], d["rewards"][:, 0],
                                d["next_obs"], d["terminals"][:, 0]))
        ours[key] = buf
    return ours, ref


def measure_collection(cfg: PEARLConfig, rounds: int) -> tuple[float, float]:
    """(steps/s of a PEARL iteration's collection, steps/s of the task env, constant action),
    over `rounds` alternating rounds (an iteration's collection, then as many raw env steps), so
    that the machine's drift hits both alike."""
    # the preset's task count (the draw of num_tasks_sample tasks then has repeats as rarely as in
    # a real run, and repeats are collected one after another); one initial trajectory per task
    small = PEARLConfig.from_dict({**cfg.to_dict(), "num_test_tasks": 2,
                                   "num_initial_steps": cfg.max_path_length})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(small, tmp, progress=False)
        trainer.collect_iteration_data()  # iteration 0: initial collection
        trainer.iteration = 1
        env = trainer.family.make_env()
        trainer.family.set_task(env, trainer.train_tasks[0])
        env.reset(seed=0)
        action = np.zeros(env.action_space.shape, np.float32)
        steps = collect_s = raw_s = 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            n = trainer.collect_iteration_data()
            collect_s += time.perf_counter() - t
            steps += n
            t = time.perf_counter()
            while n > 0:
                env.reset()
                for _ in range(min(cfg.max_path_length, n)):
                    n -= 1
                    if env.step(action)[2]:
                        break
            raw_s += time.perf_counter() - t
    return steps / collect_s, steps / raw_s


RSS_CHILD = """
import resource, sys, tempfile, json
from metapearl import Trainer, make_config
cfg = make_config(sys.argv[1], sys.argv[2], {**json.loads(sys.argv[3]), "num_train_steps_per_itr": 1})
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(cfg, tmp, progress=False)
    trainer.collect_iteration_data()
    trainer.train_steps_for_iteration()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="cheetah-vel")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of timing")
    parser.add_argument("--steps", type=int, default=5, help="gradient steps per round")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child process")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    overrides = {**parse_overrides(args.set), "device": args.device}
    cfg = make_config(args.family, args.preset, overrides)
    device = torch.device(cfg.device)
    unmirrored = [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                  for k, v in REFERENCE_MODEL.items() if getattr(cfg, k) != v]
    if unmirrored:
        parser.error(f"the reference-style step (and the FLOP count) is the paper's model: set "
                     f"{', '.join(unmirrored)}")

    def ours_settings():
        cpu.configure_for(cfg)

    def reference_settings():
        cpu.configure("torch", cfg.torch_threads)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))  # noqa: E731

    probe = get_family(cfg.family).make_env()
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]

    rng = np.random.default_rng(0)
    gen = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    ours_buf, ref_buf = synthetic_buffers(cfg, obs_dim, act_dim, 2000, device, rng)
    agent = PEARLAgent.from_config(cfg, obs_dim, act_dim, -np.ones(act_dim),
                                   np.ones(act_dim)).to(device)
    update = PEARLUpdate(agent, Critics(obs_dim, act_dim, cfg.latent_size, cfg.net_size).to(device),
                         cfg)
    reference = ReferenceStep(cfg, obs_dim, act_dim, ref_buf, np.random.default_rng(1), device)

    def sample():
        tasks = torch.randint(cfg.num_train_tasks, (cfg.meta_batch,), generator=gen, device=device)
        rl = ours_buf["rl"].sample(tasks, cfg.batch_size, gen)
        return rl, sample_context(cfg.context_sampler, ours_buf["rl"], ours_buf["enc"], tasks,
                                  cfg.embedding_batch_size, gen, rl)

    if cfg.cuda_graphs:  # as the Trainer takes its steps with `--set cuda_graphs=true`
        graphed = GraphedSteps(update, sample, [ours_buf["rl"], ours_buf["enc"]], gen)
        graphed.run(WARMUP_STEPS)  # the eager warm-up; the capture comes with the next step

        def ours_step():
            graphed.run(1)
    else:
        def ours_step():
            update.step(*sample(), gen)

    n_mat = 8192 if device.type == "cuda" else 2048
    flops = update_flops(cfg, obs_dim, act_dim, routed_min_q=device.type == "cpu")
    ours_settings()
    log(f"# {cfg.family} {cfg.preset}: {flops / 1e9:.1f} GFLOP per gradient step, device "
        f"{device}, ours: {cpu.describe()}; reference-style: torch matmuls")
    peaks, ours_s, ref_s = [], [], []
    for r in range(args.rounds):  # alternate so drift hits all three alike
        reference_settings()
        peaks.append(matmul_gflops(device, n_mat))
        timed(reference.step, device, 1)  # a warm-up step after each change of thread settings
        ref_s.append(timed(reference.step, device, args.steps))
        ours_settings()
        timed(ours_step, device, 1)
        ours_s.append(timed(ours_step, device, args.steps))
        log(f"round {r}: matmul {peaks[-1]:.0f} GFLOP/s, ours {ours_s[-1] * 1e3:.0f} ms, "
            f"reference-style {ref_s[-1] * 1e3:.0f} ms")
    peak, ours, ref = (statistics.median(x) for x in (peaks, ours_s, ref_s))

    collect, raw = measure_collection(cfg, rounds=4)  # under the config's settings (the Trainer's)
    log(f"collection {collect:.0f} steps/s, task env alone {raw:.0f} steps/s")
    rss = None
    if not args.skip_rss:
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, cfg.family, cfg.preset,
                              json.dumps(overrides)], capture_output=True, text=True, check=True)
        rss = float(out.stdout.strip().splitlines()[-1])
    figures = {
        "matmul_peak_gflops": round(peak, 1),
        "update_ms": round(ours * 1e3, 1),
        "update_gflops": round(flops / ours / 1e9, 1),
        "fraction_of_peak": round(flops / ours / 1e9 / peak, 3),
        "reference_update_ms": round(ref * 1e3, 1),
        "speedup_vs_reference": round(ref / ours, 3),
        "collect_steps_per_s": round(collect, 1),
        "raw_env_steps_per_s": round(raw, 1),
        "collect_fraction_of_raw": round(collect / raw, 3),
        "peak_rss_mb": None if rss is None else round(rss, 1),
        "device": (torch.cuda.get_device_name(device) + (", CUDA graphs" if cfg.cuda_graphs else "")
                   if device.type == "cuda"
                   else f"cpu ({cpu.describe()})"),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()

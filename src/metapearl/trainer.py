"""Meta-training (SPEC section 4, Algorithm 1): collect, train, evaluate, log, checkpoint."""

from __future__ import annotations

import copy
import csv
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None

from metapearl import cpu
from metapearl.agent import PEARLAgent
from metapearl.buffers import Batch, TaskReplayBuffer, sample_context
from metapearl.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_compatible,
    config_changes,
    load_checkpoint,
    load_run_config,
    load_state,
    save_checkpoint,
)
from metapearl.config import ConfigError, PEARLConfig
from metapearl.evaluation import EvalResult, meta_test, offline_test
from metapearl.graphs import GraphedSteps
from metapearl.guards import NonFiniteError
from metapearl.logging import (
    ProgressLog,
    TensorBoardLog,
    column,
    read_progress,
    truncate_csv,
)
from metapearl.rollout import Belief, Trajectory, collect
from metapearl.sac import STAT_NAMES, Critics, PEARLUpdate
from metapearl.tasks import get_family
from metapearl.tasks.base import plain_tasks


@dataclass
class Summary:
    """The outcome of a training run."""

    run_dir: Path
    iterations: int
    env_steps: int
    wall_seconds: float
    final_test_return: float
    best_test_return: float
    final_test_success: float

    def line(self, family: str, seed: int) -> str:
        minutes, seconds = divmod(int(self.wall_seconds), 60)
        success = "" if math.isnan(self.final_test_success) else (
            f"success {self.final_test_success:.0%}, ")
        return (
            f"metapearl {family} seed {seed}: AverageReturn_all_test_tasks "
            f"{self.final_test_return:.2f} (best {self.best_test_return:.2f}), {success}"
            f"after {self.iterations} iterations, {self.env_steps} env steps, "
            f"{minutes}m{seconds:02d}s; run dir {self.run_dir}"
        )


# what a run writes into its directory: any of them there means the directory holds a run
RUN_FILES = ("config.json", "progress.csv", CHECKPOINT_NAME, "eval/adaptation.csv")


def task_waves(tasks: list[int]) -> list[list[int]]:
    """Split a draw of tasks (with repeats) into waves of distinct tasks, keeping each task's order.

    Collecting the waves one after another, tasks side by side inside a wave, leaves the buffers as
    collecting the draw sequentially would (a repeated task clears its encoder buffer again).
    """
    waves: list[list[int]] = []
    for t in tasks:
        for wave in waves:
            if t not in wave:
                wave.append(t)
                break
        else:
            waves.append([t])
    return waves


def _box(space: gym.Space, what: str) -> gym.spaces.Box:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ConfigError(f"PEARL needs a 1-D Box {what} space, got {space}")
    if what == "action" and not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise ConfigError(f"PEARL needs a bounded action space (its [-1, 1] actions are rescaled "
                          f"to it), got {space}")
    return space


class Trainer:
    """Owns a run: its generators, tasks, environments, networks, buffers and run directory."""

    def __init__(self, cfg: PEARLConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = torch.device(cfg.device)
        gpus = torch.cuda.device_count()  # (0 without CUDA)
        if self.device.type == "cuda" and (self.device.index or 0) >= gpus:
            seen = f"{gpus} CUDA GPU{'s' * (gpus != 1)}" if gpus else "no CUDA GPU"
            hint = ("a run continues on the device it was trained on" if resume
                    else "use --set device=cpu" if not gpus else "use --set device=cuda:0")
            raise ConfigError(f"device {cfg.device!r} was asked for but torch sees {seen} "
                              f"(torch {torch.__version__}); {hint}")
        cpu.configure_for(cfg)
        # the run's two generators: every random draw of the run comes from them
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.family = get_family(cfg.family)
        train_tasks, test_tasks = self.family.sample_tasks(
            cfg.num_train_tasks, cfg.num_test_tasks, self.rng
        )
        self.train_tasks = plain_tasks(self.family, train_tasks, cfg.num_train_tasks, "training")
        self.test_tasks = plain_tasks(self.family, test_tasks, cfg.num_test_tasks, "test")
        n_envs = min(cfg.max_parallel_envs,
                     max(cfg.num_train_tasks, cfg.num_test_tasks * cfg.num_evals))
        self.envs = [self.family.make_env() for _ in range(n_envs)]
        first_obs = [env.reset(seed=int(self.rng.integers(2**31)))[0] for env in self.envs][0]
        obs_space = _box(self.envs[0].observation_space, "observation")
        if np.size(first_obs) != obs_space.shape[0]:
            raise ConfigError(f"{cfg.family}: reset returned an observation of shape "
                              f"{np.shape(first_obs)}, its space says {obs_space.shape}")
        act_space = _box(self.envs[0].action_space, "action")
        obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
        self.agent_meta = {"obs_dim": obs_dim, "action_dim": act_dim,
                           "action_low": act_space.low.tolist(),
                           "action_high": act_space.high.tolist()}
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left untouched
            torch.default_generator.manual_seed(cfg.seed)  # (initialised on CPU, then moved)
            self.agent = PEARLAgent.from_config(cfg, obs_dim, act_dim, act_space.low,
                                                act_space.high).to(self.device)
            self.critics = Critics(obs_dim, act_dim, cfg.latent_size, cfg.net_size).to(self.device)
        self.update = PEARLUpdate(self.agent, self.critics, cfg)
        # what is evaluated and deployed: the last iterate, or a moving average of it (our
        # extension; a single late iterate of sparse-point-robot scores 10 points either side of
        # its level, docs/measurements.md)
        self.averaged = copy.deepcopy(self.agent) if cfg.agent_average_iterations else None
        self.rl_buffer = TaskReplayBuffer(cfg.num_train_tasks, obs_dim, act_dim,
                                          cfg.replay_buffer_size, self.device)
        self.enc_buffer = TaskReplayBuffer(cfg.num_train_tasks, obs_dim, act_dim,
                                           cfg.replay_buffer_size, self.device)
        self.graphed = None
        if cfg.cuda_graphs:
            self.graphed = GraphedSteps(self.update, self.sample_batches,
                                        [self.rl_buffer, self._context_source()], self.gen)
        self.iteration = 0
        self.env_steps = 0
        self.train_steps = 0
        self.wall_seconds = 0.0
        self.unstable_episodes = 0  # trajectories ended by a simulator instability
        self._prepare_run_dir(resume)

    # --- run directory --------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        self._lock_file = None
        self._lock_run_dir(resume)
        try:
            self._check_and_open_run_dir(resume)
        except BaseException:
            self._unlock()
            raise

    def _check_and_open_run_dir(self, resume: bool) -> None:
        cfg_path = self.run_dir / "config.json"
        if resume and (self.run_dir / CHECKPOINT_NAME).exists():
            self._restore(load_checkpoint(self.run_dir))
            if self.cfg.num_iterations < self.iteration:
                raise CheckpointError(f"{self.run_dir} has run {self.iteration} iterations; "
                                      f"num_iterations={self.cfg.num_iterations} would undo them")
        elif resume:  # stopped before its first checkpoint: the run starts over from iteration 0
            if config_changes(load_run_config(self.run_dir).to_dict(), self.cfg):
                raise CheckpointError(f"{self.run_dir} holds a run with another config")
        elif found := [name for name in RUN_FILES if (self.run_dir / name).exists()]:
            raise CheckpointError(
                f"{self.run_dir} already holds a run ({', '.join(found)}); pass --resume to "
                "continue it or choose another --out"
            )
        try:
            (self.run_dir / "eval").mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(self.cfg.to_json() + "\n")  # a resume may extend the run
        except OSError as e:
            raise CheckpointError(f"cannot write the run directory {self.run_dir}: {e}") from None
        # rows past the checkpoint go (a resume recomputes them), before the log reads its header
        truncate_csv(self.run_dir / "progress.csv", "Iteration", self.iteration)
        self.log = ProgressLog(self.run_dir / "progress.csv")
        self.tb_log = (TensorBoardLog(self.run_dir, resume, self.env_steps) if self.cfg.tensorboard
                       else None)
        truncate_csv(self.run_dir / "eval" / "adaptation.csv", "iteration", self.iteration)

    def _lock_run_dir(self, resume: bool) -> None:
        """Lock the run directory from here to the end of `train`: another Trainer, in this
        process or another (a --resume while the run goes on), is refused instead of
        interleaving its rows and checkpoints with this one's. The lock (flock on RUN_DIR/.lock)
        goes when `train` ends or the process does, however it ends. Where the file system cannot
        lock (some network mounts), or on Windows, the run goes on unlocked, with a warning."""
        try:
            if not resume:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = (self.run_dir / ".lock").open("a")
        except OSError as e:
            raise CheckpointError(f"cannot write the run directory {self.run_dir}: {e}") from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._unlock()
            raise CheckpointError(f"{self.run_dir} is in use by another metapearl trainer (a "
                                  "training still running); wait for it to end") from None
        except OSError as e:
            warnings.warn(f"{self.run_dir} cannot be locked ({e.strerror or e}); nothing stops "
                          "a second training into it", stacklevel=2)

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "iteration": self.iteration, "env_steps": self.env_steps,
            "train_steps": self.train_steps, "wall_seconds": self.wall_seconds,
            "unstable_episodes": self.unstable_episodes,
            "agent_meta": self.agent_meta,
            "agent": self.agent.state_dict(), "critics": self.critics.state_dict(),
            **({} if self.averaged is None else {"averaged_agent": self.averaged.state_dict()}),
            "optimizer": self.update.optimizer.state_dict(),
            "rl_buffer": self.rl_buffer.state_dict(), "enc_buffer": self.enc_buffer.state_dict(),
            "train_tasks": self.train_tasks, "test_tasks": self.test_tasks,
            "numpy_rng": self.rng.bit_generator.state, "torch_rng": self.gen.get_state(),
            "env_rngs": [env.unwrapped.np_random.bit_generator.state for env in self.envs],
        }

    def _restore(self, state: dict) -> None:
        check_compatible(state, self.cfg)
        try:
            self.iteration, self.env_steps = state["iteration"], state["env_steps"]
            self.train_steps, self.wall_seconds = state["train_steps"], state["wall_seconds"]
            self.unstable_episodes = state["unstable_episodes"]
            load_state(self.agent, state["agent"], "agent")
            load_state(self.critics, state["critics"], "critics")
            if self.averaged is not None:
                load_state(self.averaged, state["averaged_agent"], "averaged agent")
            load_state(self.update.optimizer, state["optimizer"], "optimizer")
            for group in self.update.optimizer.param_groups:  # a resume may switch cuda_graphs
                group["capturable"] = self.cfg.cuda_graphs
            load_state(self.rl_buffer, state["rl_buffer"], "RL buffer")
            load_state(self.enc_buffer, state["enc_buffer"], "encoder buffer")
            self.train_tasks, self.test_tasks = state["train_tasks"], state["test_tasks"]
            self.rng.bit_generator.state = state["numpy_rng"]
            self.gen.set_state(state["torch_rng"])
            for env, s in zip(self.envs, state["env_rngs"], strict=True):
                env.unwrapped.np_random.bit_generator.state = s
        except KeyError as e:
            raise CheckpointError(f"the checkpoint holds no {e}") from None
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's generator states do not fit ({e})") from None

    @property
    def sequence_batches(self) -> bool:
        """RL and context batches as whole trajectories (the rnn-traj ablation), not transitions."""
        return self.cfg.encoder == "rnn-traj"

    # --- data collection (SPEC section 4) -------------------------------------------------------
    def _context_source(self) -> TaskReplayBuffer:
        """The buffer inference contexts come from: the encoder buffer for `recent`, else RL."""
        return self.enc_buffer if self.cfg.context_sampler == "recent" else self.rl_buffer

    def _context(self, tasks: list[int]) -> torch.Tensor:
        """Context rows (len(tasks), embedding_batch_size, context_dim) for inference in a task."""
        idx = torch.as_tensor(tasks, device=self.device)
        b = self._context_source().sample(idx, self.cfg.embedding_batch_size, self.gen,
                                          self.sequence_batches)
        return self.agent.make_context(b.obs, b.actions, b.context_rewards, b.next_obs)

    @torch.no_grad()
    def _collect(self, tasks: list[int], num_steps: int, posterior: bool, to_encoder: bool) -> int:
        """Collect >= num_steps in each of `tasks` (distinct) side by side; returns steps taken.

        z ~ prior, resampled every trajectory; with `posterior`, z ~ q(z|c) inferred from the
        task's encoder buffer at the start and re-inferred every `update_post_train` trajectories.
        """
        if num_steps <= 0:
            return 0
        envs = self.envs[:len(tasks)]
        for env, t in zip(envs, tasks, strict=True):
            self.family.set_task(env, self.train_tasks[t])
        source_sizes = self._context_source().sizes
        has_context = [source_sizes[t] > 0 for t in tasks]
        belief = Belief(*self.agent.prior(len(tasks)))
        if posterior and any(has_context):
            with_ctx = [i for i, h in enumerate(has_context) if h]
            mu, var = self.agent.posterior(self._context([tasks[i] for i in with_ctx]))
            belief.mu[with_ctx], belief.var[with_ctx] = mu, var
        trajectories = [0] * len(tasks)

        def store(i: int, traj: Trajectory) -> None:
            t = tasks[i]
            self.unstable_episodes += traj.unstable
            rows = self.rl_buffer.rows(traj.obs, traj.actions, traj.rewards, traj.context_rewards,
                                       traj.next_obs, traj.terminals)
            self.rl_buffer.add(t, rows)
            if to_encoder:
                self.enc_buffer.add(t, rows)
            trajectories[i] += 1
            if posterior and trajectories[i] % self.cfg.update_post_train == 0:
                belief.set(i, *self.agent.posterior(self._context([t])))

        out = collect(self.agent, envs, belief, num_steps, self.cfg.max_path_length,
                      deterministic=False, generator=self.gen, on_trajectory=store)
        return sum(len(traj) + traj.unstable for slot in out for traj in slot)  # the dropped step too

    def collect_iteration_data(self) -> int:
        """Steps 1-2 of Algorithm 1 for the current iteration; returns env steps taken."""
        cfg = self.cfg
        steps = 0
        if self.iteration == 0:
            everyone = list(range(cfg.num_train_tasks))
            for i in range(0, len(everyone), len(self.envs)):
                wave = everyone[i:i + len(self.envs)]
                steps += self._collect(wave, cfg.num_initial_steps, False, True)
        draw = self.rng.integers(cfg.num_train_tasks, size=cfg.num_tasks_sample).tolist()
        for wave in task_waves(draw):
            for i in range(0, len(wave), len(self.envs)):
                part = wave[i:i + len(self.envs)]
                for t in part:
                    self.enc_buffer.clear(t)
                steps += self._collect(part, cfg.num_steps_prior, False, True)
                steps += self._collect(part, cfg.num_steps_posterior, True, True)
                steps += self._collect(part, cfg.num_extra_rl_steps_posterior, True, False)
        return steps

    # --- gradient steps (SPEC section 3) --------------------------------------------------------
    def sample_batches(self) -> tuple[Batch, Batch]:
        """The RL batch and the context batch of one gradient step, for `meta_batch` random
        training tasks."""
        cfg = self.cfg
        tasks = torch.randint(cfg.num_train_tasks, (cfg.meta_batch,), generator=self.gen,
                              device=self.device)
        rl = self.rl_buffer.sample(tasks, cfg.batch_size, self.gen, self.sequence_batches)
        context = sample_context(cfg.context_sampler, self.rl_buffer, self.enc_buffer, tasks,
                                 cfg.embedding_batch_size, self.gen, rl,
                                 self.sequence_batches or cfg.context_trajectories)
        return rl, context

    def train_steps_for_iteration(self) -> torch.Tensor:
        n = self.cfg.num_train_steps_per_itr
        if self.graphed is not None:
            total = self.graphed.run(n)
        else:
            total = torch.zeros(len(STAT_NAMES), device=self.device)
            for _ in range(n):
                total += self.update.step(*self.sample_batches(), self.gen)
        self.train_steps += n
        return total / max(n, 1)

    @torch.no_grad()
    def update_average(self) -> None:
        """Move the averaged agent towards the current weights after iteration `self.iteration`:
        by 1 / min(agent_average_iterations, iterations so far), so a running mean of the
        iterates at first and an exponential moving average over about that many iterations
        after."""
        if self.averaged is None:
            return
        weight = 1.0 / min(self.cfg.agent_average_iterations, self.iteration + 1)
        for avg, p in zip(self.averaged.parameters(), self.agent.parameters(), strict=True):
            avg.lerp_(p, weight)

    # --- evaluation (SPEC section 5) ------------------------------------------------------------
    @property
    def evaluated_agent(self) -> PEARLAgent:
        """The agent that meta-tests and deployment use (`agent_average_iterations`)."""
        return self.agent if self.averaged is None else self.averaged

    def evaluate(self) -> tuple[dict[str, float], dict[str, EvalResult]]:
        cfg, agent = self.cfg, self.evaluated_agent
        agent.eval()
        test = meta_test(agent, self.family, self.envs, self.test_tasks, cfg, self.gen)
        count = cfg.num_test_tasks if cfg.num_eval_train_tasks < 0 else cfg.num_eval_train_tasks
        subset = self.rng.choice(cfg.num_train_tasks, size=min(count, cfg.num_train_tasks),
                                 replace=False).tolist()
        subset_tasks = [self.train_tasks[t] for t in subset]
        train = meta_test(agent, self.family, self.envs, subset_tasks, cfg, self.gen)
        offline = offline_test(agent, self.family, self.envs, subset_tasks,
                               lambda slots: self._context([subset[s] for s in slots]), cfg,
                               self.gen)
        agent.train()
        metrics = {
            "AverageReturn_all_test_tasks": test.final_return,
            "AverageReturn_all_train_tasks": train.final_return,
            "AverageTrainReturn_all_train_tasks": offline.mean_return,
        }
        if self.family.reports_success:
            metrics["SuccessRate_test_tasks"] = test.final_success_rate
            metrics["SuccessRate_train_tasks"] = train.final_success_rate
        return metrics, {"test": test, "train": train}

    def _write_adaptation(self, results: dict[str, EvalResult]) -> None:
        path = self.run_dir / "eval" / "adaptation.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["iteration", "env_steps", "split", "trajectory", "return"])
            for split, result in results.items():
                for k, ret in enumerate(result.adaptation_curve(), start=1):
                    writer.writerow([self.iteration, self.env_steps, split, k, repr(float(ret))])

    # --- the loop -------------------------------------------------------------------------------
    def run_iteration(self) -> dict:
        """Collect, train and (when due) evaluate once; returns the iteration's progress.csv row."""
        cfg, it = self.cfg, self.iteration
        t0 = time.perf_counter()
        self.env_steps += self.collect_iteration_data()
        t1 = time.perf_counter()
        self.update.set_kl_lambda(cfg.kl_lambda_at(it))
        stats = self.train_steps_for_iteration().tolist()
        self.update_average()
        t2 = time.perf_counter()
        metrics: dict[str, float | None] = dict.fromkeys(
            ["AverageReturn_all_test_tasks", "AverageReturn_all_train_tasks",
             "AverageTrainReturn_all_train_tasks", "SuccessRate_test_tasks",
             "SuccessRate_train_tasks"])
        if it % cfg.eval_interval == 0 or it == cfg.num_iterations - 1:
            evaluated, results = self.evaluate()
            metrics.update(evaluated)
            self._write_adaptation(results)
        t3 = time.perf_counter()
        self.wall_seconds += t3 - t0
        return {"Iteration": it, "Number of env steps total": self.env_steps,
                "Number of train steps total": self.train_steps,
                "Unstable episodes total": self.unstable_episodes, **metrics,
                **dict(zip(STAT_NAMES, stats, strict=True)),
                "Time/collect_s": t1 - t0, "Time/train_s": t2 - t1, "Time/eval_s": t3 - t2,
                "Time/total_s": self.wall_seconds}

    def train(self, on_iteration: Callable[[dict], None] | None = None) -> Summary:
        """Run the remaining iterations; write progress.csv, checkpoints and plots.

        `on_iteration(row)` receives each progress.csv row once its iteration is checkpointed.
        A NaN or infinite loss, gradient or observation stops the run with NonFiniteError; the
        checkpoint of the last good iteration stays as it was.
        """
        if self._lock_file is None:  # a second call: lock again for its iterations
            self._lock_run_dir(resume=True)
        try:
            return self._train(on_iteration)
        finally:
            self._unlock()

    def _train(self, on_iteration: Callable[[dict], None] | None) -> Summary:
        cfg = self.cfg
        last_return = float("nan")
        bar = tqdm(range(self.iteration, cfg.num_iterations), initial=self.iteration,
                   total=cfg.num_iterations, disable=not self.progress, desc=cfg.family,
                   unit="itr", dynamic_ncols=True)
        for it in bar:
            self.iteration = it
            try:
                row = self.run_iteration()
            except NonFiniteError as e:
                kept = (f"the checkpoint after iteration {it - 1} is intact" if it > 0
                        else "no checkpoint was written")
                raise NonFiniteError(f"training stopped at iteration {it}: {e}; {kept} in "
                                     f"{self.run_dir}") from None
            self.log.write(row)
            if self.tb_log is not None:
                self.tb_log.write(row)
            self.iteration = it + 1
            save_checkpoint(self.run_dir, self.state_dict())
            if row["AverageReturn_all_test_tasks"] is not None:
                last_return = row["AverageReturn_all_test_tasks"]
            bar.set_postfix(test_return=f"{last_return:.2f}", steps=self.env_steps)
            if on_iteration is not None:  # after the checkpoint: a callback may stop the run
                on_iteration(row)
        bar.close()
        if self.tb_log is not None:
            self.tb_log.close()
        self.make_plots()
        return self.summary()

    def summary(self) -> Summary:
        """Final and best logged meta-test figures of the run (from progress.csv)."""
        rows = read_progress(self.run_dir / "progress.csv")
        rets = [x for x in column(rows, "AverageReturn_all_test_tasks") if x == x]
        succ = [x for x in column(rows, "SuccessRate_test_tasks") if x == x]
        nan = float("nan")
        return Summary(self.run_dir, self.iteration, self.env_steps, self.wall_seconds,
                       rets[-1] if rets else nan, max(rets) if rets else nan,
                       succ[-1] if succ else nan)

    def make_plots(self) -> None:
        from metapearl.plots import plot_run

        plot_run(self.run_dir)


def train(cfg: PEARLConfig, run_dir: str | Path, resume: bool = False,
          progress: bool = True) -> Summary:
    """Train PEARL with `cfg`, writing the run to `run_dir`; returns the summary."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).train()

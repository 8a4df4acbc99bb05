"""Crash-safety, guards and clear errors (issue: reliability)."""

import contextlib
import errno
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from conftest import TINY, trained_params
from hypothesis import event, given, settings
from hypothesis import strategies as st

from metapearl import TaskFamily, Trainer, register_family, train
from metapearl.checkpoint import CHECKPOINT_NAME, CheckpointError, load_agent, load_checkpoint
from metapearl.cli import main
from metapearl.config import FIELD_NAMES
from metapearl.guards import NonFiniteError
from metapearl.logging import read_progress
from metapearl.tasks.point import PointEnv, PointRobot


def _numbers(run_dir):
    """progress.csv without the wall-clock columns."""
    return [{k: v for k, v in r.items() if not k.startswith("Time/")}
            for r in read_progress(run_dir / "progress.csv")]


# --- exact resume after SIGKILL ---------------------------------------------------------------------
SIGKILL_RUN = {**TINY, "num_iterations": 14, "num_train_steps_per_itr": 25, "torch_threads": 1}


def _cli(*args):
    return [sys.executable, "-m", "metapearl", "train", "point-robot", *args, "--no-progress"]


def test_sigkill_at_a_random_point_then_resume_gives_the_uninterrupted_numbers(tmp_path):
    sets = [a for k, v in SIGKILL_RUN.items() for a in ("--set", f"{k}={v}")]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_cli("--out", str(whole), *sets), check=True, capture_output=True)
    iterations = len(read_progress(whole / "progress.csv"))
    assert iterations == SIGKILL_RUN["num_iterations"]

    proc = subprocess.Popen(_cli("--out", str(cut), *sets), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # generous: a loaded CI machine starts torch slowly
    while not (cut / CHECKPOINT_NAME).exists():  # at least one iteration is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))  # anywhere: mid-collection, mid-update, mid-write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(read_progress(cut / "progress.csv"))
    assert 1 <= done < iterations, "the kill must land inside the run"

    subprocess.run(_cli("--resume", "--out", str(cut)), check=True, capture_output=True)
    assert _numbers(cut) == _numbers(whole)
    assert [int(r["Iteration"]) for r in read_progress(cut / "progress.csv")] == list(
        range(iterations))
    assert ((cut / "eval" / "adaptation.csv").read_text()
            == (whole / "eval" / "adaptation.csv").read_text())


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tiny_config, tmp_path):
    cfg = tiny_config()
    train(cfg, tmp_path / "whole", progress=False)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(cfg.to_json())
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert _numbers(tmp_path / "cut") == _numbers(tmp_path / "whole")


# --- checkpoints that must be refused ------------------------------------------------------------
class _Payload:
    """Unpickling this runs `touch MARKER`: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run(tiny_config, tmp_path):
    """A finished tiny run."""
    train(tiny_config(), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    state["agent_meta"] = _Payload(marker)
    torch.save(state, run / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"refers to code \(\w+\.system\): unsafe"):
        load_checkpoint(run)
    assert main(["eval", str(run)]) == 2
    assert main(["train", "point-robot", "--resume", "--out", str(run), "--no-progress"]) == 2
    assert "unsafe" in capsys.readouterr().err
    assert not marker.exists()
    # the same payload does run when loaded without weights_only: the test can fail
    torch.load(run / CHECKPOINT_NAME, weights_only=False)
    assert marker.exists()


def test_truncated_corrupt_foreign_and_mismatched_checkpoints_get_clear_errors(run, capsys):
    path = run / CHECKPOINT_NAME
    good = path.read_bytes()
    cases = [
        (good[: len(good) // 2], "corrupt or truncated"),
        (np.random.default_rng(0).bytes(5000), "corrupt or "),
        (b"", "corrupt or truncated"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        assert main(["eval", str(run)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "weights_only" not in err

    path.write_bytes(good)
    state = torch.load(path, weights_only=True)
    for change, message in [
        (lambda s: s.update(format_version=1), "format 1; this metapearl reads formats 2, 3"),
        (lambda s: s.pop("test_tasks"), "incomplete: no test_tasks"),
        (lambda s: s["config"].update(net_size=99), "another config (differs in net_size)"),
    ]:
        bad = {**state, "config": dict(state["config"])}
        change(bad)
        torch.save(bad, path)
        assert main(["eval", str(run)]) == 2
        assert message in capsys.readouterr().err

    path.write_bytes(good)  # networks whose shapes do not fit the config
    broken = torch.load(path, weights_only=True)
    broken["agent"] = {k: v[..., :1] for k, v in broken["agent"].items()}
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="agent does not fit this model"):
        load_agent(run)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_config, tmp_path,
                                                                     monkeypatch, capsys):
    cfg = tiny_config(num_iterations=3)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    real_save = torch.save

    def full_disk_on_second_iteration(obj, f, *args, **kwargs):
        if trainer.iteration == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_second_iteration)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "run")["iteration"] == 1
    assert not (tmp_path / "run" / (CHECKPOINT_NAME + ".tmp")).exists()
    # and it resumes from there to the end
    assert train(cfg, tmp_path / "run", resume=True, progress=False).iterations == 3


# --- guards --------------------------------------------------------------------------------------
def test_nan_in_a_network_stops_training_naming_the_loss(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(num_iterations=4), tmp_path / "run", progress=False)

    def poison(row):
        if row["Iteration"] == 0:
            with torch.no_grad():
                next(trainer.critics.vf.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=r"iteration 1: non-finite Loss/vf=nan.*"
                                             r"checkpoint after iteration 0 is intact"):
        trainer.train(on_iteration=poison)
    assert load_checkpoint(tmp_path / "run")["iteration"] == 1
    assert len(read_progress(tmp_path / "run" / "progress.csv")) == 1


def test_a_nan_gradient_is_named_and_no_parameter_changes(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    trainer.collect_iteration_data()
    first = next(trainer.agent.policy.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = trained_params(trainer)
    with pytest.raises(NonFiniteError) as info:
        trainer.train_steps_for_iteration()
    assert "Grad/policy=nan" in str(info.value) and "Loss/" not in str(info.value)
    after = trainer.update.optimizer.param_groups[0]["params"]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class _Glitchy(TaskFamily):
    """Point-robot whose env breaks at the 4th step of every trajectory, flagged or not."""

    max_path_length = 20
    task_parameter = "goal ~ U([-1,1]^2)"

    def __init__(self, name, flag):
        self.name, self.flag = name, flag

    def make_env(self):
        family = self

        class Env(PointEnv):
            def reset(self, **kwargs):
                self.t = 0
                return super().reset(**kwargs)

            def step(self, action):
                obs, r, term, trunc, info = super().step(action)
                self.t += 1
                if self.t == 4:
                    obs = np.full_like(obs, np.nan)
                    if family.flag:
                        info["unstable"] = True
                return obs, r, term, trunc, info

        return Env()

    def sample_task(self, rng):
        return PointRobot().sample_task(rng)

    def set_task(self, env, task):
        env.set_goal(task["goal"])


def test_nan_observation_stops_training_with_its_source(tiny_config, tmp_path, capsys):
    register_family(_Glitchy("test-nan-obs", flag=False))
    with pytest.raises(NonFiniteError, match="non-finite observation or reward from Env at step 3"):
        train(tiny_config("test-nan-obs"), tmp_path / "run", progress=False)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "test-nan-obs", "--out", str(tmp_path / "cli"), "--no-progress",
                 *sets]) == 1
    err = capsys.readouterr().err
    assert "non-finite observation" in err and "Traceback" not in err


def test_a_flagged_instability_ends_the_episode_and_is_counted(tiny_config, tmp_path):
    register_family(_Glitchy("test-unstable", flag=True))
    trainer = Trainer(tiny_config("test-unstable"), tmp_path / "run", progress=False)
    trainer.train()
    rows = read_progress(tmp_path / "run" / "progress.csv")
    counted = [int(r["Unstable episodes total"]) for r in rows]
    # iteration 0: 20 initial steps in 6 tasks + 2 tasks x 60 steps, in 3-step trajectories
    assert counted[0] > 0 and counted[1] > counted[0]
    rl = trainer.rl_buffer
    stored = torch.cat([rl.data[t, :rl.sizes[t]] for t in range(len(rl.sizes))])
    assert torch.isfinite(stored).all() and len(stored) > 0
    assert int(rl.sizes.max()) > 0 and all(s % 3 == 0 for s in rl.sizes)
    # every unstable step was taken in the env, though not stored: it counts as an env step
    assert int(rows[-1]["Number of env steps total"]) == int(rl.sizes.sum()) + counted[-1]


# --- clear errors for bad input ------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["train", "point-robot", "--set", "batch_size=many"], "batch_size must be of type int, got 'many'"),
    (["train", "point-robot", "--set", "discount=1.5"], "discount must be in [0, 1], got 1.5"),
    (["train", "point-robot", "--set", "lr=nan"], "lr must be of type float"),
    (["train", "point-robot", "--set", "context_sampler=newest"], "context_sampler must be one of"),
    (["train", "point-robot", "--set", "num_steps_prior=0", "--set", "num_steps_posterior=0"],
     "the recent context sampler needs num_steps_prior or num_steps_posterior > 0"),
    (["train", "point-robot", "--set", "device=cuda"], "torch sees no CUDA GPU"),
    (["train", "point-robot", "--set", "device=tpu"], "device must be cpu or cuda"),
    (["train", "point-robot", "--set", "device=cuda:"], "device must be cpu or cuda"),
    (["train", "point-robot", "--set", "device=cudax"], "device must be cpu or cuda"),
    (["train", "point-robot", "--set", "device=cuda:1"], "torch sees no CUDA GPU"),
    (["train", "point-robot", "--set", "family=ant-dir"], "family is chosen by the positional"),
    (["train", "point-robot", "--resume"], "--resume needs --out RUN_DIR"),
    (["train", "point-robot", "--set", "preset=paper"], "preset is chosen by --preset"),
    (["train", "point-robot", "--seed", "5", "--set", "seed=3"], "the seed is given twice"),
    (["train", "point-robot", "--set", "meta_bach=4"], "did you mean meta_batch"),
])
def test_bad_values_and_options_get_one_clear_error(argv, message, capsys, tmp_path):
    if torch.cuda.is_available() and "device=cuda" in argv:
        pytest.skip("this machine has a GPU")
    assert main(argv + ["--out", str(tmp_path / "never")] if "--resume" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_a_cuda_run_resumed_without_a_gpu_gets_one_clear_error(run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = run / "config.json"
    config.write_text(config.read_text().replace('"device": "cpu"', '"device": "cuda"'))
    assert main(["train", "point-robot", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA GPU" in err and "a run continues on the device it was trained on" \
        in err and "Traceback" not in err


def test_bad_run_directories_get_one_clear_error(run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for argv, message in [
        (["train", "point-robot", "--out", str(afile / "run")], "cannot write the run directory"),
        (["train", "point-robot", "--resume", "--out", str(tmp_path)], "is not a metapearl run"),
        (["train", "sparse-point-robot", "--resume", "--out", str(run)],
         "is a point-robot run, not sparse-point-robot"),
        (["train", "point-robot", "--resume", "--out", str(run), "--set", "lr=0.1"],
         "--set lr cannot change it"),
        (["train", "point-robot", "--resume", "--out", str(run), "--seed", "3"],
         "--seed cannot change it"),
        (["eval", str(tmp_path)], "is not a metapearl run"),
        (["plot", str(tmp_path)], "is not a metapearl run"),
    ]:
        assert main(argv + ["--no-progress"] if argv[0] == "train" else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)

    (run / "config.json").write_text("{not json")
    assert main(["eval", str(run)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_a_run_directory_in_use_by_another_process_is_refused(run, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(run / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = (run / "progress.csv").read_text()
        argv = ["train", "point-robot", "--resume", "--out", str(run), "--set",
                "num_iterations=4", "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is in use by another metapearl trainer" in err and "Traceback" not in err
        assert (run / "progress.csv").read_text() == before
    finally:
        holder.communicate("")
    assert main(argv) == 0  # the holder has ended: the lock went with it


def _locked_elsewhere(run_dir) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
         "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "except BlockingIOError:\n    sys.exit(3)", str(run_dir / ".lock")])
    return probe.returncode == 3


def test_the_lock_holds_against_a_second_trainer_in_the_same_process(tiny_config, tmp_path):
    cfg = tiny_config(num_iterations=3)
    first = Trainer(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="in use by another metapearl trainer"):
        Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert _locked_elsewhere(tmp_path / "run")  # the refused one left the first's lock alone
    first.train()
    assert not _locked_elsewhere(tmp_path / "run")  # released when training ends
    assert train(cfg, tmp_path / "run", resume=True, progress=False).iterations == 3


def test_a_directory_holding_a_runs_files_is_not_written_over(tiny_config, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "progress.csv").write_text("my,own\n1,2\n")
    with pytest.raises(CheckpointError, match=r"already holds a run \(progress.csv\)"):
        train(tiny_config(), out, progress=False)
    assert (out / "progress.csv").read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "progress.csv"]


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch,
                                                                      capsys):
    import metapearl.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(metapearl.cli.time, "strftime", lambda fmt: "20261208-000000")
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "point-robot", "--no-progress", *sets]) == 0
    assert main(["train", "point-robot", "--no-progress", *sets, "--set", "lr=0.001"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["point-robot_default_s0_20261208-000000",
                    "point-robot_default_s0_20261208-000000_2"]
    assert all((tmp_path / "runs" / r / CHECKPOINT_NAME).exists() for r in runs)
    # a run that fails to start leaves no directory behind
    assert main(["train", "point-robot", "--no-progress", *sets, "--set", "device=cuda:7"]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_ctrl_c_names_the_command_that_continues_the_run(tmp_path, monkeypatch, capsys):
    import metapearl.trainer

    def interrupted(cfg, run_dir, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metapearl.trainer, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "point-robot", "--out", str(out), "--no-progress"]) == 130
    assert "interrupted before the run began; nothing to resume" in capsys.readouterr().err
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["train", "point-robot", "--out", str(out), "--no-progress", "--import",
                 "json"]) == 130
    assert (f"it had no checkpoint yet; start it over with: metapearl train point-robot --out "
            f"{out} --resume --import json") in capsys.readouterr().err
    (out / CHECKPOINT_NAME).parent.mkdir(parents=True)
    (out / CHECKPOINT_NAME).write_bytes(b"")
    assert main(["train", "point-robot", "--out", str(out), "--no-progress"]) == 130
    assert "its last checkpoint is intact; continue it with" in capsys.readouterr().err


def test_ctrl_c_while_checkpointing_leaves_no_partial_file(run, monkeypatch):
    from metapearl.checkpoint import save_checkpoint

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, {"iteration": 99})
    assert not (run / (CHECKPOINT_NAME + ".tmp")).exists()
    monkeypatch.undo()
    assert load_checkpoint(run)["iteration"] == 2


def test_a_damaged_progress_csv_gets_one_clear_error(run, capsys):
    path = run / "progress.csv"
    good = path.read_bytes()
    for damage, message in [(b"garbage\n", "line 4: 'Iteration' holds 'garbage', not a number"),
                            (b"\xff\n", "is not a metapearl log (not UTF-8")]:
        path.write_bytes(good + damage)
        assert main(["plot", str(run), "--tasks", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert main(["train", "point-robot", "--resume", "--out", str(run), "--set",
                     "num_iterations=3", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "progress.csv cannot be read" in err and "Traceback" not in err, err
        assert path.read_bytes() == good + damage  # left for the user to mend


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(monkeypatch):
    proc = subprocess.Popen([sys.executable, "-m", "metapearl", "config", "point-robot"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -0`: the reader is gone before the first line
    assert proc.wait() == 1
    assert proc.stderr.read() == b""
    import metapearl.cli

    def broken_elsewhere(args):  # e.g. a user's env talking to a simulator over a socket
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(metapearl.cli, "_cmd_tasks", broken_elsewhere)
    with pytest.raises(BrokenPipeError):  # not swallowed: its traceback shows
        main(["tasks"])


# --- property: any override either runs or gets the one clear error ----------------------------------
_VALUES = st.one_of(
    st.integers(-3, 40).map(str),
    st.integers(0, 12).map(str),
    st.floats(-2.0, 3.0).map(repr),
    st.sampled_from(["true", "false", "", "nan", "inf", "-0", "1e3", "2.5", "0.5", "cpu", "cuda:0",
                     "recent", "off-policy", "off-policy-rl-batch", "point-robot"]),
    st.text(max_size=6),
)
# mostly real keys, so that many examples get past parsing and actually train
_KEYS = st.sampled_from(FIELD_NAMES) | st.sampled_from(FIELD_NAMES) | st.text(min_size=1, max_size=8)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=3))
def test_random_overrides_run_or_fail_with_one_clear_error(overrides):
    threads = torch.get_num_threads()
    sets = [f"{k}={v}" for k, v in TINY.items()] + [f"{k}={v}" for k, v in overrides]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "point-robot", "--out", f"{tmp}/run", "--no-progress"]
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv + [f"--set={s}" for s in sets])
    torch.set_num_threads(threads)  # a torch_threads override must not slow the other tests
    event("ran" if code == 0 else "refused")
    if code == 0:
        assert "AverageReturn_all_test_tasks" in out.getvalue()
    else:
        # 2: a refused value; 1: a config that diverged (lr=4), stopped by the NaN guard
        assert code == 2 or (code == 1 and "non-finite" in err.getvalue()), err.getvalue()
        assert err.getvalue().startswith("metapearl: error: "), err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()

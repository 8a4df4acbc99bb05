"""The `metapearl` command line: train, eval, plot, video, tasks, config."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from pathlib import Path

from metapearl.checkpoint import CHECKPOINT_NAME, CheckpointError
from metapearl.config import (
    RESUME_FIELDS,
    SEED_LIMIT,
    ConfigError,
    PEARLConfig,
    field_help,
    make_config,
    parse_overrides,
)
from metapearl.guards import NonFiniteError
from metapearl.logging import LogError
from metapearl.tasks import MissingExtraError

EXAMPLES = """examples:
  metapearl train point-robot                       # default CPU preset, seed 0
  metapearl train point-robot --seed 1 --set num_iterations=50 --out runs/pr1
  metapearl train sparse-point-robot --preset paper
  metapearl train point-robot --resume --out runs/pr1   # continue a run
  metapearl train point-robot --resume --out runs/pr1 --set num_iterations=300   # go on
  metapearl eval runs/pr1                           # meta-test the latest checkpoint
  metapearl plot runs/pr-s0 runs/pr-s1 runs/pr-s2 --out plots/pr   # curves over seeds
  metapearl video runs/cheetah --task 3             # mp4 of the agent adapting to test task 3
  metapearl config point-robot --preset paper       # every field, its value and meaning
  metapearl train pendulum-gravity --import examples/pendulum_gravity.py   # a family of your own
"""


def _cmd_tasks(args) -> int:
    from metapearl.tasks import family_names, get_family

    print(f"{'family':<22} {'episode':>7}  task parameter")
    for name in family_names():
        fam = get_family(name)
        print(f"{name:<22} {fam.max_path_length:>7}  {fam.task_parameter}")
    return 0


def _cmd_config(args) -> int:
    cfg = make_config(args.family, args.preset, parse_overrides(args.set))
    values = cfg.to_dict()
    for name, _kind, help_text in field_help():
        print(f"{name:<30} {values[name]!s:<14} {help_text}")
    return 0


def _cmd_train(args) -> int:
    from metapearl.checkpoint import load_run_config
    from metapearl.trainer import train

    overrides = parse_overrides(args.set)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        cfg = load_run_config(Path(args.out))
        if cfg.family != args.family:
            raise ConfigError(f"{args.out} is a {cfg.family} run, not {args.family}")
        resumed = PEARLConfig.from_dict({**cfg.to_dict(), **overrides})
        # The run's own values may be repeated (the first command line plus --resume); only
        # the RESUME_FIELDS (run length, CPU threads, matmul library, CUDA graphs) may change.
        changed = [flag for flag, given, stored in [("--seed", args.seed, cfg.seed),
                                                    ("--preset", args.preset, cfg.preset)]
                   if given is not None and given != stored]
        changed += [f"--set {key}" for key in overrides
                    if key not in RESUME_FIELDS and getattr(resumed, key) != getattr(cfg, key)]
        if changed:
            raise ConfigError(f"--resume continues a run with its own config.json; "
                              f"{', '.join(changed)} cannot change it (--set may change "
                              f"{', '.join(RESUME_FIELDS)})")
        cfg = resumed
        run_dir = Path(args.out)
    else:
        if args.seed is not None:
            if "seed" in overrides:
                raise ConfigError("the seed is given twice (--seed and --set seed=); give one")
            overrides["seed"] = args.seed
        cfg = make_config(args.family, args.preset or "default", overrides)
        run_dir = Path(args.out) if args.out else _new_run_dir(cfg)
    try:
        summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    except BaseException as e:
        if not args.out and {p.name for p in run_dir.iterdir()} <= {".lock"}:
            shutil.rmtree(run_dir)  # the directory made above, for a run that never started
        if not isinstance(e, KeyboardInterrupt):
            raise
        if not (run_dir / "config.json").exists():
            print("metapearl: interrupted before the run began; nothing to resume",
                  file=sys.stderr)
            return 130
        imports = "".join(f" --import {spec}" for spec in args.imports)
        kept = ("its last checkpoint is intact; continue it with" if (run_dir / CHECKPOINT_NAME)
                .exists() else "it had no checkpoint yet; start it over with")
        print(f"metapearl: interrupted; {kept}: metapearl train {cfg.family} --out {run_dir} "
              f"--resume{imports}", file=sys.stderr)
        return 130
    print(f"learning curve: {run_dir / 'plots' / 'learning_curve.png'}")
    print(summary.line(cfg.family, cfg.seed))
    return 0


def _new_run_dir(cfg: PEARLConfig) -> Path:
    """A fresh directory under runs/, named after the family, preset, seed and time; created here,
    so runs started in the same second each get their own (a suffix _2, _3, ...)."""
    base = f"runs/{cfg.family}_{cfg.preset}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1, 1000):
        run_dir = Path(base if k == 1 else f"{base}_{k}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"no free run directory {base}_N; choose one with --out")


def _cmd_eval(args) -> int:
    import csv

    import torch

    from metapearl.checkpoint import (
        config_changes,
        load_agent,
        load_checkpoint,
        run_config_values,
    )
    from metapearl.evaluation import meta_test
    from metapearl.plots import adaptation_curves
    from metapearl.tasks import get_family

    run_dir = Path(args.run_dir)
    given = {"num_evals": args.num_evals, "num_steps_per_eval": args.num_steps_per_eval,
             "num_exp_traj_eval": args.num_exp_traj_eval,
             "sample_online_context": None if args.online_context is None
             else args.online_context == "sampled"}
    # the options go in before the stored config is validated, so they can mend its protocol
    stored = run_config_values(run_dir)
    cfg = PEARLConfig.from_dict({**stored, **{k: v for k, v in given.items() if v is not None}})
    differs = config_changes(stored, cfg)
    changed = {k: getattr(cfg, k) for k in given if k in differs}
    agent = load_agent(run_dir, cfg=cfg)
    state = load_checkpoint(run_dir, mmap=True)  # the task sets; the buffers stay unread
    family = get_family(cfg.family)
    tasks = state["test_tasks"]
    envs = [family.make_env() for _ in range(min(cfg.max_parallel_envs, len(tasks) * cfg.num_evals))]
    for i, env in enumerate(envs):
        env.reset(seed=args.seed * 100_003 + i)
    result = meta_test(agent, family, envs, tasks, cfg, torch.Generator().manual_seed(args.seed))
    # another protocol, run count or seed than the run's own gets a file of its own, so one
    # evaluation never overwrites another's
    suffix = "".join(f"_{k}{v}" for k, v in changed.items())
    suffix += f"_seed{args.seed}" if args.seed else ""
    out = run_dir / "eval" / f"meta_test_itr{state['iteration']}{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "env_steps", "split", "trajectory", "return"])
        for k, ret in enumerate(result.adaptation_curve(), start=1):
            writer.writerow([state["iteration"], state["env_steps"], "test", k, repr(float(ret))])
    png, _ = adaptation_curves({run_dir.name: [run_dir]}, run_dir / "plots" / out.stem, out.name)
    curve = ", ".join(f"{x:.2f}" for x in result.adaptation_curve())
    print(f"adaptation curve (return of trajectory k): {curve}")
    print(f"wrote {out} and {png}")
    success = (f", success {result.final_success_rate:.0%}" if family.reports_success else "")
    averaged = (f"; the agent averaged over about {cfg.agent_average_iterations} iterations"
                if cfg.agent_average_iterations else "")
    print(f"AverageReturn_all_test_tasks {result.final_return:.2f}{success} "
          f"over {len(tasks)} test tasks x {cfg.num_evals} runs "
          f"(checkpoint after {state['iteration']} iterations, {state['env_steps']} env steps"
          f"{averaged})")
    return 0


def _cmd_plot(args) -> int:
    from metapearl.plots import (
        SUCCESS,
        adaptation_curves,
        adaptation_rollouts,
        exploration,
        group_runs,
        learning_curves,
        posterior,
    )

    groups = group_runs(args.run_dirs, args.group_by)
    runs = [run for group in groups.values() for run in group]
    out = Path(args.out) if args.out else (runs[0] / "plots" if len(runs) == 1 else Path("plots"))
    paths = learning_curves(groups, out / "learning_curves")
    if all(column_present(run, SUCCESS) for run in runs):
        paths += learning_curves(groups, out / "success_curves", SUCCESS)
    paths += adaptation_curves(groups, out / "adaptation_curves")
    if args.tasks > 0:
        for number, (label, group) in enumerate(groups.items(), start=1):
            run = group[0]  # the pictures of the agent: the first run of each group
            if not (run / CHECKPOINT_NAME).exists():
                print(f"{run} keeps no checkpoint: its posterior and exploration pictures are "
                      "skipped", file=sys.stderr)
                continue
            safe = "".join(c if c.isalnum() or c in "-." else "_" for c in label)
            name = "" if len(groups) == 1 else f"_{safe}" if len(safe) <= 60 else f"_group{number}"
            rollouts = adaptation_rollouts(run, args.tasks)
            paths += posterior(run, out / f"posterior{name}", rollouts)
            if "goal" in rollouts[0]["task"] and rollouts[0]["trajectories"][0][0].shape[-1] == 2:
                paths += exploration(run, out / f"exploration{name}", rollouts)
    for path in paths:
        print(path)
    return 0


def _cmd_video(args) -> int:
    from metapearl.video import render_adaptation

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "videos" / f"task{args.task}.mp4"
    result = render_adaptation(run_dir, args.task, out, args.trajectories, args.width,
                               args.height, args.every, args.seed)
    returns = ", ".join(f"{r:.1f}" for r in result["returns"])
    print(f"wrote {result['path']} ({result['frames']} frames); returns of the trajectories: "
          f"{returns}")
    return 0


def column_present(run: Path, name: str) -> bool:
    """Whether some row of the run's progress.csv has a value in column `name` (the header has
    every column; families that report no success leave the success columns empty)."""
    from metapearl.logging import read_progress

    return any(row.get(name) for row in read_progress(run / "progress.csv"))


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


SEED = _int_in(0, SEED_LIMIT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metapearl", description="PEARL meta-reinforcement learning (Rakelly et al. 2019). "
        "Every command takes --import MODULE|FILE.py (after the command's name) for task "
        "families of your own.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train on a task family",
                       description="Meta-train PEARL on FAMILY. Writes config.json, progress.csv, "
                       "eval/adaptation.csv, checkpoints/latest.pt (every iteration) and "
                       "plots/*.png and .svg to the run directory, then prints where the learning curve is "
                       "and a one-line summary.")
    p.add_argument("family", help="task family (see `metapearl tasks`; one of your own "
                   "through --import)")
    p.add_argument("--preset", default=None,
                   help="default (CPU-sized, ours; the default) or paper (SPEC section 7 exactly)")
    p.add_argument("--seed", type=SEED, default=None, help="run seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field; repeatable (`metapearl config FAMILY` lists them)")
    p.add_argument("--out", default=None, help="run directory; it must not hold a run already (default "
                   "runs/FAMILY_PRESET_sSEED_TIME, with _2, _3, ... for runs started in the same "
                   "second)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (its first "
                   "command line plus --resume does it); with --set num_iterations=N a finished "
                   "run goes on to N iterations; torch_threads, cpu_gemm and cuda_graphs may "
                   "change too, any other changed value is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="meta-test a run's latest checkpoint",
                       description="Run the meta-test protocol (SPEC section 5) on the run's test "
                       "tasks and write the adaptation curve to RUN_DIR/eval/ and its plot to "
                       "RUN_DIR/plots/. By default the "
                       "protocol is the run's own; the options change it for this evaluation only, "
                       "e.g. to see how the agent keeps adapting over more trajectories. The file "
                       "is named after the checkpoint's iteration and every option that differs "
                       "from the run's, e.g. meta_test_itr150_num_evals10_seed3.csv, so no "
                       "evaluation overwrites another's.",
                       epilog="example: metapearl eval runs/pr1 --num-steps-per-eval 200 "
                       "(10 trajectories of point-robot instead of 3)")
    p.add_argument("run_dir")
    p.add_argument("--num-evals", type=int, default=None,
                   help="runs per test task (default: the run's num_evals)")
    p.add_argument("--num-steps-per-eval", type=int, default=None, metavar="N",
                   help="env steps per task and run, whole trajectories: N = K x max_path_length "
                   "gives K trajectories where none ends early (default: the run's)")
    p.add_argument("--num-exp-traj-eval", type=int, default=None, metavar="N",
                   help="trajectories with z from the prior before the first posterior update "
                   "(default: the run's)")
    p.add_argument("--online-context", choices=("all", "sampled"), default=None,
                   help="infer each posterior from all the context gathered so far (SPEC section "
                   "5) or from embedding_batch_size rows drawn from it (config "
                   "sample_online_context) (default: the run's)")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the evaluation's z draws, context draws and env resets (default "
                   "0)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "plot", help="plot runs: learning curves over seeds, adaptation, exploration, posterior",
        description="Write PNG and SVG figures of one or more runs: learning curves (test return "
        "and, where logged, success rate against env steps; mean and +-1 std band over the runs "
        "of a group), adaptation curves (return of trajectory k in a new task), and pictures of "
        "the first run of each group adapting to test tasks: the posterior's mean and variance "
        "as context accumulates, and for 2-D families the successive exploration trajectories.",
        epilog="Runs are grouped by --group-by KEY (a config field), by labels (LABEL=RUN_DIR), "
        "or else by their config without the seed. Example: metapearl plot runs/pr-s0 runs/pr-s1 "
        "runs/pr-s2 --out plots/point-robot")
    p.add_argument("run_dirs", nargs="+", metavar="[LABEL=]RUN_DIR")
    p.add_argument("--group-by", default=None, metavar="KEY", help="group runs by this config key")
    p.add_argument("--out", default=None,
                   help="output directory (default RUN_DIR/plots for one run, else ./plots)")
    p.add_argument("--tasks", type=_int_in(0), default=3,
                   help="test tasks in the exploration and posterior pictures (0: skip them)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "video", help="render a MuJoCo run's agent adapting to a test task (mp4 or gif)",
        description="Render the run's agent adapting to test task K offscreen, following the "
        "meta-test protocol: trajectories one after another, the posterior re-inferred from the "
        "context gathered so far. Needs an offscreen OpenGL: MUJOCO_GL=egl (the default; Debian "
        "package libegl1) or MUJOCO_GL=osmesa (Debian package libosmesa6); gif needs imageio and "
        "pillow, mp4 imageio-ffmpeg as well (all in the video extra).")
    p.add_argument("run_dir")
    p.add_argument("--task", type=_int_in(0), default=0, metavar="K",
                   help="test task index (default 0)")
    p.add_argument("--out", default=None,
                   help="output file, .mp4 or .gif (default RUN_DIR/videos/taskK.mp4)")
    p.add_argument("--trajectories", type=_int_in(1), default=None,
                   help="trajectories to show (default: the meta-test's, num_steps_per_eval / "
                   "max_path_length)")
    p.add_argument("--width", type=_int_in(1), default=480, help="frame width in pixels")
    p.add_argument("--height", type=_int_in(1), default=320, help="frame height in pixels")
    p.add_argument("--every", type=_int_in(1), default=1, help="render one step in this many")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the z draws and env resets")
    p.set_defaults(func=_cmd_video)

    p = sub.add_parser("tasks", help="list task families", description="List task families.")
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("config", help="print a family's config with the meaning of every field",
                       description="Print every config field, its value and its meaning.")
    p.add_argument("family", help="task family (see `metapearl tasks`; one of your own "
                   "through --import)")
    p.add_argument("--preset", default="default", help="default (the default) or paper")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, as for train; repeatable")
    p.set_defaults(func=_cmd_config)
    for command in sub.choices.values():
        command.add_argument(
            "--import", dest="imports", action="append", default=[], metavar="MODULE|FILE.py",
            help="import a module (a dotted name, found from the current directory too) or a .py "
            "file first, e.g. one that registers a task family of your own with "
            "register_family; repeatable")
    return parser


def _import(spec: str) -> None:
    """Run --import's module or file, so that what it registers is there for the command."""
    import importlib
    import importlib.util

    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise ConfigError(f"--import {spec}: no such file")
        if path.stem in sys.modules:  # (registering it under that name would shadow the other)
            raise ConfigError(f"--import {spec}: a module named {path.stem!r} is imported "
                              "already; rename the file")
        sys.path.insert(0, str(path.parent))  # so that it imports the modules beside it
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
        return
    if "" not in sys.path and os.getcwd() not in sys.path:  # (the console script's sys.path)
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):  # the module itself, not one it imports
            raise ConfigError(f"--import {spec}: no module {e.name!r} (from {os.getcwd()})"
                              ) from None
        raise


# the file system's refusals, each a one-line error: a full disk, no permission, a file where a
# folder goes (other OSErrors keep their traceback: they may be bugs)
FILE_SYSTEM_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                        errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                        errno.ENAMETOOLONG}


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end has closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for spec in args.imports:
            _import(spec)
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone early is met by the handler below
        return code
    except (ConfigError, CheckpointError, MissingExtraError, LogError) as e:
        print(f"metapearl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # `metapearl config point-robot | head`: the reader has gone. The Python docs' recipe:
        # the interpreter's final flush then writes nowhere, quietly, and the exit status is 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        if e.errno not in FILE_SYSTEM_REFUSALS:
            raise
        print(f"metapearl: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"metapearl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metapearl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

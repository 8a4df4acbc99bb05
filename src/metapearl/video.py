"""Videos of a trained agent adapting to a test task of a MuJoCo family, rendered offscreen.

The agent follows the meta-test protocol (SPEC section 5): belief reset to the prior, z drawn from
the current belief at the start of each trajectory, the posterior re-inferred after trajectory
`num_exp_traj_eval` and every one after it. Rendering uses MuJoCo's offscreen renderer: MUJOCO_GL=egl
(the default without a display; Debian package libegl1) or MUJOCO_GL=osmesa (Debian package
libosmesa6); with a display, MuJoCo's default (glfw) renders offscreen too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from metapearl.checkpoint import CheckpointError, load_checkpoint, load_run_config
from metapearl.evaluation import adapt_to_task
from metapearl.tasks import MissingExtraError, get_family
from metapearl.tasks.mujoco import MujocoFamily, require_mujoco

RENDERER_HINT = ("install EGL (Debian: apt install libegl1) and set MUJOCO_GL=egl, or OSMesa "
                 "(Debian: apt install libosmesa6) and set MUJOCO_GL=osmesa")


class RendererError(MissingExtraError):
    """No offscreen OpenGL renderer (or no video writer) is available; the message names the fix."""


def _renderer(model, width: int, height: int):
    import mujoco

    # the model's offscreen framebuffer (640 x 480 in Gymnasium's XML) bounds the frame: grow it
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, height)
    try:
        renderer = mujoco.Renderer(model, height, width)
    except Exception as e:  # any GL failure: missing library, no device, bad MUJOCO_GL value
        raise RendererError(f"no offscreen renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"{RENDERER_HINT}") from None
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    camera.trackbodyid = 1
    camera.distance = 4.0  # as Gymnasium's v5 default cameras
    camera.elevation = -20.0
    camera.azimuth = 90.0
    return renderer, camera


def _caption(frame: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, 14), fill=(0, 0, 0))
    draw.text((4, 1), text, fill=(255, 255, 255))
    return np.asarray(image)


def _writer(out: Path, fps: int):
    import imageio.v2 as imageio

    if out.suffix == ".gif":
        return imageio.get_writer(out, mode="I", duration=1000 / fps, loop=0)
    return imageio.get_writer(out, fps=fps, macro_block_size=8)


def _check_setup(out: Path) -> None:
    """Fail before any work when the output format, the writer or the renderer cannot work.

    Without a display MUJOCO_GL defaults to egl; MuJoCo reads it once, when it is imported.
    """
    if out.suffix not in (".mp4", ".gif"):
        raise CheckpointError(f"video output must end in .mp4 or .gif, got {out.name!r}")
    needed = ["imageio", "PIL"] + (["imageio_ffmpeg"] if out.suffix == ".mp4" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise RendererError(f"writing {out.suffix} needs {', '.join(missing)}: "
                            "pip install -e '.[video]' in the metapearl checkout")
    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if headless and "MUJOCO_GL" not in os.environ:
        if "mujoco" in sys.modules:
            raise RendererError("mujoco was imported before MUJOCO_GL was set, so it cannot "
                                "render offscreen here; set MUJOCO_GL=egl (or osmesa) before "
                                "importing it")
        os.environ["MUJOCO_GL"] = "egl"
    try:
        require_mujoco("video")
    except MissingExtraError:
        raise
    except Exception as e:  # mujoco refuses an unknown MUJOCO_GL, or its GL library is missing
        gl = os.environ.get("MUJOCO_GL", "its default")
        raise RendererError(f"MuJoCo cannot render with MUJOCO_GL={gl} ({e}); {RENDERER_HINT}"
                            ) from None


def render_adaptation(run_dir: Path, task: int, out: Path, trajectories: int | None = None,
                      width: int = 480, height: int = 320, every: int = 1, seed: int = 0) -> dict:
    """Write a video of the run's agent adapting to test task `task`; returns a summary dict.

    `every`: keep one frame in this many steps (rendering costs ~50-85 ms a frame on a CPU).
    """
    from metapearl.agent import PEARLAgent

    run_dir, out = Path(run_dir), Path(out)
    _check_setup(out)
    cfg = load_run_config(run_dir)
    family = get_family(cfg.family)
    if not isinstance(family, MujocoFamily):
        raise CheckpointError(f"videos are for MuJoCo families; {cfg.family} is not one (for 2-D "
                              "families `metapearl plot` draws the exploration trajectories)")
    tasks = load_checkpoint(run_dir, mmap=True)["test_tasks"]
    if not 0 <= task < len(tasks):
        raise CheckpointError(f"--task must be in 0..{len(tasks) - 1} (the run's test tasks)")
    agent = PEARLAgent.load(run_dir)
    agent.generator = torch.Generator().manual_seed(seed)
    label = ", ".join(f"{k}={v:.2f}" for k, v in tasks[task].items() if isinstance(v, float))
    frames = 0
    with ExitStack() as cleanup:
        env = family.make_env()
        cleanup.callback(env.close)
        family.set_task(env, tasks[task])
        renderer, camera = _renderer(env.unwrapped.model, width, height)
        cleanup.callback(renderer.close)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = _writer(out, fps=max(int(round(1.0 / env.unwrapped.dt / every)), 1))
        cleanup.callback(writer.close)

        def frame(k: int, t: int, ret: float) -> None:
            nonlocal frames
            if t % every == 0:
                renderer.update_scene(env.unwrapped.data, camera=camera)
                writer.append_data(_caption(renderer.render(), (
                    f"{cfg.family} test task {task} {label}  trajectory {k + 1}  step {t + 1}  "
                    f"return {ret:.1f}")))
                frames += 1

        runs = adapt_to_task(agent, env, cfg, trajectories, seed, on_step=frame)
    return {"path": out, "frames": frames, "returns": [float(r["rewards"].sum()) for r in runs]}

"""CPU compute settings: which BLAS multiplies the networks' large matrices, and the thread pools.

On CPU the gradient step is matmul-bound. torch's CPU wheels multiply through MKL, which on the AMD
EPYC machines of this project ran the paper-size step's skinny matmuls (4096x300 @ 300x300 and
their gradients) 1.26-1.47x slower than the OpenBLAS that numpy's wheels bundle; the gap shrinks
with fewer rows (1.1-1.2x at 1024-2048). With `cpu_gemm = "numpy"` the networks' matmuls of at
least `NUMPY_GEMM_MIN_MACS` multiply-accumulates go through numpy (`networks.linear`) on
`torch_threads` BLAS threads, and torch's own ops run on one thread (both pools spinning on the
same two cores made the step 3x slower); smaller matmuls stay in torch, whose calls cost less.
With one torch thread for everything else this pays only for large updates: the paper cheetah-vel
step (16 x 256 rows, 300 wide) ran ~1.3x faster, 8 x 256 rows the same, and the small default
presets 13-28% slower. So `cpu_gemm = "auto"` (the default) takes numpy when the RL batch's hidden
matmul (meta_batch * batch_size * net_size^2 MACs) reaches `AUTO_NUMPY_MIN_MACS`, torch otherwise.
`cpu_gemm = "torch"` keeps everything in torch, on `torch_threads` threads.

These settings are process-wide, as torch's thread count is: a Trainer applies its run's.
"""

from __future__ import annotations

import numpy  # noqa: F401  (loads the BLAS that threadpoolctl looks for)
import torch
from threadpoolctl import threadpool_info, threadpool_limits

CPU_GEMMS = ("auto", "numpy", "torch")
NUMPY_GEMM_MIN_MACS = 1 << 22  # below ~4M multiply-accumulates torch's lower call overhead wins
AUTO_NUMPY_MIN_MACS = 1 << 28  # 268M: above 8 x 256 x 300^2 (no gain), below 16 x 256 x 300^2
# each library's own default thread count, used for threads=0
_DEFAULT_TORCH_THREADS = torch.get_num_threads()
_DEFAULT_BLAS_THREADS = max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"],
                            default=_DEFAULT_TORCH_THREADS)
_numpy_gemm = False
_threads = _DEFAULT_TORCH_THREADS


def numpy_gemm_enabled() -> bool:
    """True when CPU matmuls of at least NUMPY_GEMM_MIN_MACS go through numpy's BLAS."""
    return _numpy_gemm


def configure_for(cfg) -> None:
    """Apply a run config's CPU settings: its `cpu_gemm` ("auto": numpy for a large update on
    CPU, torch otherwise) and its `torch_threads`."""
    gemm = cfg.cpu_gemm if cfg.device == "cpu" else "torch"
    if gemm == "auto":
        macs = cfg.meta_batch * cfg.batch_size * cfg.net_size ** 2
        gemm = "numpy" if macs >= AUTO_NUMPY_MIN_MACS else "torch"
    configure(gemm, cfg.torch_threads)


def configure(cpu_gemm: str, threads: int = 0) -> None:
    """Route CPU matmuls through `cpu_gemm` ("numpy" or "torch") and give the compute `threads`.

    "numpy": numpy's BLAS gets the threads and torch gets one; "torch": both get them (numpy's
    BLAS then serves only the rollouts' small matmuls). threads=0 means each library's default.
    """
    global _numpy_gemm, _threads
    if cpu_gemm not in ("numpy", "torch"):
        raise ValueError(f"cpu_gemm must be numpy or torch here, got {cpu_gemm!r}")
    _numpy_gemm = cpu_gemm == "numpy"
    blas_threads, torch_threads = threads or _DEFAULT_BLAS_THREADS, threads or _DEFAULT_TORCH_THREADS
    threadpool_limits(blas_threads, user_api="blas")
    torch.set_num_threads(1 if _numpy_gemm else torch_threads)
    _threads = blas_threads if _numpy_gemm else torch_threads


def describe() -> str:
    """The current settings in words, e.g. "numpy matmuls, 2 threads"."""
    return f"{'numpy' if _numpy_gemm else 'torch'} matmuls, {_threads} threads"

"""CPU compute settings: which BLAS multiplies the networks' large matrices, and the thread pools.

On CPU the gradient step is matmul-bound. torch's CPU wheels multiply through MKL, which on the AMD
EPYC machines of this project ran the paper-size step's skinny matmuls (4096x300 @ 300x300 and
their gradients) 1.26-1.47x slower than the OpenBLAS that numpy's wheels bundle; the gap shrinks
with fewer rows (1.1-1.2x at 1024-2048). With `cpu_gemm = "numpy"` the float32 matmuls of the
MLPs (every network but the recurrent encoders' GRU) go through numpy (`networks.mlp_chain`); BLAS
and torch get one thread each, and the gradient step splits its meta-batch's tasks over
`torch_threads` threads (`update_shards`, `PEARLUpdate.backward`), each computing its tasks' share
of the losses and of the gradients. Everything else (rollouts, evaluation) runs on one thread.

Why split. At first numpy's BLAS had the threads and torch's own ops one (both pools spinning on the
same two cores made the step 3x slower). The step's memory-bound passes (ReLU backward, bias adds
and sums, ~45 ms of the ~200 ms paper step on a Zen 4 EPYC) then ran on one core while the other
waited. Split by tasks, every pass runs on both cores and no pool spins against another: the
paper step's losses and gradients took 167 against 191 ms (medians of 6 alternating rounds in one
process; 171 against 234 ms in a slower phase of the machine). Why every matmul, small ones too:
a torch (MKL) matmul on a second thread left the process's later two-thread torch work 10-30%
slower (seen in `benchmarks/throughput.py`'s reference-style step), and numpy's calls cost the
split step nothing measurable.

Measured on 2 cores only. Each share also runs ~4 ms of Python (the losses, the autograd
Functions' backwards), holding the GIL: two threads computing tiny shares got 0.70-0.84x the
throughput of one. On 2 cores that overlaps the other share's BLAS and costs nothing measurable
(shares in forked worker processes were no faster: docs/measurements.md, and the branch
`experiment/split-processes`). With N threads the paper step's shares hold ~4N ms of Python, one
at a time, against ~320/N ms of matmuls each: beyond ~9 threads the Python would take longer
(16 shares of one task: ~64 against ~20 ms; not measured, these machines have 2 cores). On such a
machine compare `torch_threads` values and `cpu_gemm = "torch"` with `benchmarks/throughput.py`.

Where numpy pays. The old, unsplit numpy path paid only for large updates: the paper cheetah-vel
step (16 x 256 rows, 300 wide) ran ~1.3x faster than torch, 8 x 256 rows the same, and the small
default presets 13-28% slower. On an Intel Xeon (Sapphire Rapids, AVX-512), MKL's own ground, the
same paper step was instead 1.25-1.3x *slower* through numpy (192 against 148 ms), numpy's OpenBLAS
being no faster there than MKL. So `cpu_gemm = "auto"` (the default) takes numpy only on an AMD CPU
and when the RL batch's hidden matmul (meta_batch * batch_size * net_size^2 MACs) reaches
`AUTO_NUMPY_MIN_MACS`; torch otherwise. `cpu_gemm = "torch"` keeps everything in torch, on
`torch_threads` threads.

Memory: a step allocates and frees a few dozen activation tensors of several MB each. glibc serves
them by fresh mmaps or returns them to the system when freed, so every step page-faulted ~2,000-9,000
times (the pages then cleared by the kernel): 3-6% of the paper step on the Xeon. A CPU run
therefore has glibc keep freed memory for reuse (`keep_freed_memory`); its resident memory then
stays near its peak between steps instead of shrinking.

These settings are process-wide, as torch's thread count is: a Trainer applies its run's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

import numpy  # noqa: F401  (loads the BLAS that threadpoolctl looks for)
import torch
from threadpoolctl import threadpool_info, threadpool_limits

CPU_GEMMS = ("auto", "numpy", "torch")
AUTO_NUMPY_MIN_MACS = 1 << 28  # 268M: above 8 x 256 x 300^2 (no gain), below 16 x 256 x 300^2
AUTO_NUMPY_VENDORS = ("AuthenticAMD",)  # the CPUs on which numpy's BLAS was measured faster
# glibc's mallopt parameters, and what they are set to: allocations below 64 MB come from the heap,
# and the heap is not trimmed back to the system
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW_BYTES = 1 << 26
# each library's own default thread count (torch's: physical cores), used for threads=0
_DEFAULT_TORCH_THREADS = torch.get_num_threads()
_DEFAULT_BLAS_THREADS = max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"],
                            default=_DEFAULT_TORCH_THREADS)
_numpy_gemm = False
_threads = _DEFAULT_TORCH_THREADS


def numpy_gemm_enabled() -> bool:
    """True when the networks' float32 CPU matmuls go through numpy's BLAS."""
    return _numpy_gemm


def update_shards(tasks: int) -> int:
    """Over how many threads a CPU gradient step on `tasks` tasks splits them: the compute
    threads under numpy's BLAS (at most one per task), else 1 (torch's threads share each op)."""
    return min(_threads, tasks) if _numpy_gemm else 1


def configure_for(cfg) -> None:
    """Apply a run config's CPU settings: its `cpu_gemm` ("auto": numpy for a large update on an
    AMD CPU, torch otherwise) and its `torch_threads`; on CPU also `keep_freed_memory`."""
    gemm = cfg.cpu_gemm if cfg.device == "cpu" else "torch"
    if gemm == "auto":
        macs = cfg.meta_batch * cfg.batch_size * cfg.net_size ** 2
        large = macs >= AUTO_NUMPY_MIN_MACS
        gemm = "numpy" if large and cpu_vendor() in AUTO_NUMPY_VENDORS else "torch"
    configure(gemm, cfg.torch_threads)
    if cfg.device == "cpu":
        keep_freed_memory()


@cache
def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"), else ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the process's next allocations (see the module's doc):
    allocations below KEEP_BELOW_BYTES come from the heap, and the heap is never trimmed.
    Returns whether it applied (glibc on Linux only); process-wide and for the process's life."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # (mallopt takes a C int)


def configure(cpu_gemm: str, threads: int = 0) -> None:
    """Route CPU matmuls through `cpu_gemm` ("numpy" or "torch") and give the compute `threads`.

    "numpy": BLAS and torch get one thread each, and a gradient step splits its tasks over the
    threads (`update_shards`); "torch": BLAS and torch get them (numpy's BLAS then serves only the
    rollouts' small matmuls). threads=0 means torch's default, one per physical core, for torch
    and for the split (OpenBLAS's own default, one per logical CPU, only for its threads under
    "torch"): a share is compute-bound products plus a fixed ~4 ms of Python under the GIL, so a
    second share on a core's other hardware thread would add the Python for little.
    """
    global _numpy_gemm, _threads
    if cpu_gemm not in ("numpy", "torch"):
        raise ValueError(f"cpu_gemm must be numpy or torch here, got {cpu_gemm!r}")
    _numpy_gemm = cpu_gemm == "numpy"
    blas_threads, torch_threads = threads or _DEFAULT_BLAS_THREADS, threads or _DEFAULT_TORCH_THREADS
    threadpool_limits(1 if _numpy_gemm else blas_threads, user_api="blas")
    torch.set_num_threads(1 if _numpy_gemm else torch_threads)
    _threads = torch_threads


def describe() -> str:
    """The current settings in words, e.g. "torch matmuls, 2 threads"."""
    if _numpy_gemm:
        return f"numpy matmuls, the update's tasks split over {_threads} threads"
    return f"torch matmuls, {_threads} threads"

"""The CPU matmul library switch (metapearl/cpu.py): same numbers, and the settings it applies."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from metapearl import cpu, networks, train
from metapearl.config import ConfigError, make_config
from metapearl.logging import read_progress
from metapearl.networks import MLP, EnsembleMLP, TanhGaussianPolicy


@pytest.fixture
def restore_cpu_settings():
    yield
    cpu.configure("torch")


def _graph_names(t: torch.Tensor) -> set[str]:
    """The names of every autograd node behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {node.name() for node in seen}


@pytest.mark.parametrize("make_net, x_shape", [
    (lambda: MLP(6, 32, 3), (50, 6)),
    (lambda: MLP(6, 32, 3), (4, 7, 6)),  # the encoder's (tasks, transitions, dim) input
    (lambda: MLP(6, 32, 3, layers=1), (50, 6)),
    (lambda: EnsembleMLP(2, 6, 32, 1), (50, 6)),
])
def test_numpy_matmuls_give_torch_values_and_gradients(make_net, x_shape,
                                                       restore_cpu_settings):
    torch.manual_seed(0)
    net, x = make_net(), torch.randn(x_shape)
    results = {}
    for gemm in ("numpy", "torch"):
        cpu.configure(gemm, 2)
        xg = x.clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        out = net(xg)
        assert ("_NumpyMLPBackward" in _graph_names(out)) == (gemm == "numpy")
        out.pow(2).sum().backward()
        results[gemm] = (out.detach(), xg.grad, [p.grad for p in net.parameters()])
    (out_n, gx_n, grads_n), (out_t, gx_t, grads_t) = results["numpy"], results["torch"]
    torch.testing.assert_close(out_n, out_t)
    torch.testing.assert_close(gx_n, gx_t)
    assert all(g.abs().sum() > 0 for g in grads_t)
    for g_n, g_t in zip(grads_n, grads_t, strict=True):
        torch.testing.assert_close(g_n, g_t)


@pytest.mark.parametrize("members", [2, 3])
def test_min_over_members_through_numpy_gives_torch_values_and_input_gradients(
        members, restore_cpu_settings, monkeypatch):
    torch.manual_seed(0)
    ens, x = EnsembleMLP(members, 5, 32, 1), torch.randn(64, 5)
    with torch.no_grad():
        ens.weights[-1].mul_(300.0)
    decisions = []  # every matmul's choice, forward and backward
    through_numpy = networks._through_numpy
    monkeypatch.setattr(networks, "_through_numpy",
                        lambda a, w: decisions.append(through_numpy(a, w)) or decisions[-1])
    results = {}
    for gemm in ("numpy", "torch"):
        cpu.configure(gemm, 2)
        decisions.clear()
        xg = x.clone().requires_grad_(True)
        out = ens.min_over_members(xg)
        forward = len(decisions)
        (out * torch.arange(64.0).unsqueeze(1)).sum().backward()
        assert 0 < forward < len(decisions)  # matmuls of the forward and of the backward
        assert all(d == (gemm == "numpy") for d in decisions)
        results[gemm] = out.detach(), xg.grad
    assert all(p.grad is None for p in ens.parameters())
    torch.testing.assert_close(results["numpy"][0], results["torch"][0])
    torch.testing.assert_close(results["numpy"][1], results["torch"][1])
    assert results["torch"][1].abs().sum() > 0


@pytest.mark.parametrize("x, out, dx, dw0, db0, dw1", [
    # ReLU input [1.5, -1.5]: the second unit is off
    ([[1.0, -2.0]], 4.0, [[2.0, 0.0]], [[2.0, 0.0], [-4.0, 0.0]], [2.0, 0.0], [[1.5], [0.0]]),
    # ReLU input [0, 1.5]: a unit at exactly 0 passes no gradient
    ([[-0.5, 1.0]], 5.5, [[0.0, 3.0]], [[0.0, -1.5], [0.0, 3.0]], [0.0, 3.0], [[0.0], [1.5]]),
])
def test_numpy_mlp_chain_matches_hand_computed_gradients(x, out, dx, dw0, db0, dw1,
                                                         restore_cpu_settings):
    """relu(x W0 + b0) W1 + b1 with W0 = I, b0 = 0.5, W1 = [2, 3]^T, b1 = 1, worked by hand."""
    cpu.configure("numpy", 1)
    x = torch.tensor(x, requires_grad=True)
    w0, b0 = torch.eye(2).requires_grad_(True), torch.full((2,), 0.5, requires_grad=True)
    w1, b1 = torch.tensor([[2.0], [3.0]], requires_grad=True), torch.ones(1, 1, requires_grad=True)
    y = networks.mlp_chain(x, [w0, w1], [b0, b1])
    assert "_NumpyMLPBackward" in _graph_names(y)
    y.sum().backward()
    assert y.item() == out
    for got, want in ((x.grad, dx), (w0.grad, dw0), (b0.grad, db0), (w1.grad, dw1), (b1.grad, [[1.0]])):
        assert got.tolist() == want


def test_numpy_mlp_gradients_come_in_the_parameters_layout(restore_cpu_settings):
    """(a fused Adam reads a gradient as flat memory; split steps take autograd.grad's as is)"""
    cpu.configure("numpy", 1)
    torch.manual_seed(0)
    for net in (MLP(6, 32, 3), MLP(6, 32, 1), EnsembleMLP(2, 6, 32, 1), EnsembleMLP(2, 6, 32, 3)):
        params = list(net.parameters())
        grads = torch.autograd.grad(net(torch.randn(10, 6)).pow(2).sum(), params)
        assert [g.stride() for g in grads] == [p.stride() for p in params]


def test_numpy_mlp_keeps_torchs_semantics_at_the_edges(restore_cpu_settings):
    torch.manual_seed(0)
    net, x = MLP(6, 8, 3), torch.randn(4, 6)
    x[1, 2] = float("nan")
    results = {}
    for gemm in ("numpy", "torch"):
        cpu.configure(gemm, 1)
        out = net(x)
        results[gemm] = out.detach().clone()
        out[:, 1:].clamp_(-1.0, 1.0)  # an output can be changed in place before backward
        incoming = torch.randn(out.shape)
        kept = incoming.clone()
        out.backward(incoming)
        assert torch.equal(incoming, kept)  # the incoming gradient is not written to
    assert results["numpy"][1].isnan().all()  # a NaN is not clamped away by the ReLUs
    torch.testing.assert_close(results["numpy"], results["torch"], equal_nan=True)


def test_numpy_mlp_gradients_only_where_asked(restore_cpu_settings):
    torch.manual_seed(0)
    net, x = MLP(6, 32, 3), torch.randn(20, 6)
    net.linears[0].requires_grad_(False)
    grads = {}
    for gemm in ("numpy", "torch"):
        cpu.configure(gemm, 1)
        net.zero_grad(set_to_none=True)
        net(x).pow(2).sum().backward()  # x needs no gradient
        grads[gemm] = [p.grad for p in net.parameters()]
    assert grads["numpy"][:2] == [None, None]
    for g_n, g_t in zip(grads["numpy"][2:], grads["torch"][2:], strict=True):
        torch.testing.assert_close(g_n, g_t)


def test_under_numpy_small_matmuls_go_through_numpy_too(restore_cpu_settings):
    """(an MKL matmul on a split step's second thread slowed the process's later torch work)"""
    policy = TanhGaussianPolicy(6, 2, 32)
    for gemm in ("numpy", "torch"):
        cpu.configure(gemm, 2)
        names = _graph_names(policy(torch.randn(8, 6))[1])
        assert ("_NumpyMLPBackward" in names) == (gemm == "numpy")
    cpu.configure("numpy", 2)  # float64 stays in torch
    assert "_NumpyMLPBackward" not in _graph_names(
        policy.double()(torch.randn(8, 6, dtype=torch.float64))[1])


def test_auto_takes_numpy_for_the_paper_size_update_on_an_amd_cpu_only(restore_cpu_settings,
                                                                       monkeypatch):
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "GenuineIntel")
    cpu.configure_for(make_config("cheetah-vel", "paper", {"torch_threads": 2}))
    assert not cpu.numpy_gemm_enabled() and torch.get_num_threads() == 2
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    cpu.configure_for(make_config("cheetah-vel", "paper", {"torch_threads": 2}))
    assert cpu.numpy_gemm_enabled() and torch.get_num_threads() == 1
    assert cpu.describe() == "numpy matmuls, the update's tasks split over 2 threads"
    cpu.configure_for(make_config("point-robot", "default", {"torch_threads": 2}))
    assert not cpu.numpy_gemm_enabled() and torch.get_num_threads() == 2
    cpu.configure_for(make_config("cheetah-vel", "paper", {"device": "cuda"}))
    assert not cpu.numpy_gemm_enabled()
    cpu.configure_for(make_config("point-robot", "default", {"cpu_gemm": "numpy"}))
    assert cpu.numpy_gemm_enabled()


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = cpu.cpu_vendor()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert vendor == ""
    else:
        assert vendor and f"vendor_id\t: {vendor}\n" in text


_FAULTS_OF_FREED_TENSORS = """
import resource, sys, torch
from metapearl import cpu
from metapearl.config import make_config
if sys.argv[1] == "run":
    cpu.configure_for(make_config("point-robot", "default", {"torch_threads": 2}))
    assert cpu.keep_freed_memory()
# 42 MB tensors: above glibc's largest self-raised mmap threshold (32 MB), so without
# keep_freed_memory each one is a fresh mapping whose 10,240 pages fault when filled
for _ in range(3):  # warm: the heap grows to hold the tensors once
    a, b = torch.ones(4096, 2560), torch.ones(4096, 2560)
    del a, b
# the fewest faults of 3 blocks of 5: now and then a stray small allocation lands after a freed
# tensor, and its block faults one tensor's pages anew (3 of 15 runs with a single block)
blocks = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a, b = torch.ones(4096, 2560), torch.ones(4096, 2560)
        del a, b
    blocks.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(blocks))
"""


def test_a_cpu_run_keeps_freed_memory_for_reuse():
    """After configure_for, a freed large tensor's pages are reused without faults.

    Measured in fresh processes: in this one, earlier tests' allocations can take a freed
    tensor's place in the heap, and a new tensor's pages then fault once.
    """
    import platform
    import subprocess
    import sys
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_FREED_TENSORS, mode],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[-1])

    assert faults("bare") > 50_000  # 10 fresh mappings of 10,240 pages
    assert faults("run") < 500


def test_thread_settings_follow_the_library(restore_cpu_settings):
    def blas_threads():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    cpu.configure("numpy", 2)  # one thread each; the update's tasks split over the two
    assert blas_threads() == {1} and torch.get_num_threads() == 1
    assert cpu.update_shards(16) == 2 and cpu.update_shards(1) == 1
    cpu.configure("torch", 2)
    assert blas_threads() == {2} and torch.get_num_threads() == 2
    assert cpu.update_shards(16) == 1


def test_unknown_cpu_gemm_is_rejected():
    with pytest.raises(ConfigError, match="cpu_gemm must be one of auto, numpy, torch, got 'mkl'"):
        make_config("point-robot", "default", {"cpu_gemm": "mkl"})


def test_training_through_numpy_matmuls_is_seeded_and_matches_torch(
        tiny_config, tmp_path, restore_cpu_settings, monkeypatch):
    calls = []
    apply = networks._NumpyMLP.apply
    monkeypatch.setattr(networks._NumpyMLP, "apply", lambda *a: calls.append(1) or apply(*a))

    def losses(name, gemm, threads):
        calls.clear()
        train(tiny_config(seed=3, cpu_gemm=gemm, torch_threads=threads), tmp_path / name,
              progress=False)
        assert bool(calls) == (gemm == "numpy")
        return [[float(r[k]) for k in ("Loss/qf", "Loss/vf", "Loss/policy", "Loss/kl")]
                for r in read_progress(tmp_path / name / "progress.csv")]

    # seeded though each step is split over two threads (the threads' shares are summed in order)
    assert losses("a", "numpy", 2) == losses("b", "numpy", 2)
    # unsplit, the two libraries may round differently; the first iteration's losses agree to
    # float32 (a split step agrees with the unsplit one to float32 too, test_sac.py, but Adam's
    # steps then carry the rounding on: 4e-4 relative after this iteration's 3 steps)
    torch.testing.assert_close(torch.tensor(losses("c", "numpy", 1)[0]),
                               torch.tensor(losses("d", "torch", 1)[0]), rtol=1e-4, atol=1e-5)


def test_the_default_split_is_one_share_per_physical_core(restore_cpu_settings, monkeypatch):
    # torch's default counts physical cores, OpenBLAS's logical CPUs (two per core with SMT)
    monkeypatch.setattr(cpu, "_DEFAULT_TORCH_THREADS", 3)
    monkeypatch.setattr(cpu, "_DEFAULT_BLAS_THREADS", 6)
    cpu.configure("numpy", 0)
    assert cpu.update_shards(16) == 3 and torch.get_num_threads() == 1
    cpu.configure("torch", 0)
    assert torch.get_num_threads() == 3 and cpu.update_shards(16) == 1
    assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {6}


@pytest.mark.parametrize("out_dim", [1, 3])
def test_input_gradient_product_is_numpys_matmul_exactly(out_dim):
    """(one output: a broadcast product instead of numpy's naive-loop outer product)"""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((64, out_dim), np.float32)
    w_t = rng.standard_normal((out_dim, 20), np.float32)
    got = networks._input_grad(g, w_t)
    assert got.shape == (64, 20) and got.flags.c_contiguous
    assert np.array_equal(got, g @ w_t)

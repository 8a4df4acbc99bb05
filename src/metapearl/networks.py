"""Networks: MLP, an ensemble of MLPs evaluated as one batched module, the tanh-Gaussian policy."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from metapearl import cpu

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # SPEC section 2
LAST_LAYER_INIT = 3e-3  # the reference's output-layer init: small first outputs


def _numpy_chain(x: np.ndarray, weights: list, biases: list
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward of a linear-ReLU chain, its matmuls in numpy: (output, the ReLUs' outputs).
    x (N, in) float32; weights (in, out) and biases (out,) or (1, out) as tensors."""
    hidden, h = [], x
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        out = torch.from_numpy(h @ w.numpy()).add_(b.reshape(-1))
        if i < last:
            # (not aten._add_relu_, one pass for both: it clamps NaN to 0 and inf to the
            # largest float, where F.relu, the torch path, keeps them for the finite checks)
            hidden.append(out.relu_())
            h = out.numpy()
    return out, hidden


def _input_grad(g: np.ndarray, w_t: np.ndarray) -> np.ndarray:
    """g (N, out) @ w_t (out, in). For one output (a Q or V head) this is an outer product, which
    numpy's matmul computes in its naive loop: the broadcast product gives the same numbers ~4x
    faster (0.17 against 0.69 ms for 2048 x 300)."""
    return g * w_t if g.shape[1] == 1 else g @ w_t


class _NumpyMLP(torch.autograd.Function):
    """A linear-ReLU chain with its matmuls in numpy (see cpu.py), as one autograd node.

    Inputs: x (..., in), then the weights (in, out) and the biases (out,) or (1, out). Against a
    node per linear layer and per ReLU, it masks each fresh input gradient in place (no new
    2.4-4.9 MB tensor per ReLU backward) and returns each weight's gradient in the weight's own
    layout (as torch's matmul backward does), and it saves autograd's per-node work: the
    paper-size split step ran 3-4% faster. Tensors and arrays share memory both ways, so nothing is
    copied around the BLAS calls.
    """

    @staticmethod
    def forward(ctx, x, *params):
        n = len(params) // 2
        weights = [w.detach() for w in params[:n]]
        biases = [b.detach() for b in params[n:]]
        shape = x.shape
        x2 = x.detach().reshape(-1, shape[-1])
        out, hidden = _numpy_chain(x2.numpy(), weights, biases)
        ctx.save_for_backward(x2, *hidden, *weights)
        ctx.x_shape, ctx.b_shapes = shape, [b.shape for b in biases]
        # (reshaped in numpy: a torch view returned from a Function could not be changed in place)
        return torch.from_numpy(out.numpy().reshape(*shape[:-1], out.shape[-1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = len(ctx.b_shapes)
        acts, weights = saved[:n], saved[n:]
        needs = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        gws, gbs, gx = [None] * n, [None] * n, None
        for i in range(n - 1, -1, -1):
            a, w, gn = acts[i].numpy(), weights[i].numpy(), g.numpy()
            if needs[1 + i]:  # in the weight's own layout: (out, in) memory for a weight.T view
                transposed = weights[i].stride(0) == 1 and weights[i].stride(1) == w.shape[0]
                gws[i] = torch.from_numpy((gn.T @ a).T if transposed else a.T @ gn)
            if needs[1 + n + i]:
                gbs[i] = g.sum(0).reshape(ctx.b_shapes[i])
            if i > 0:
                g = torch.from_numpy(_input_grad(gn, w.T))
                torch.ops.aten.threshold_backward.grad_input(g, acts[i], 0, grad_input=g)
            elif needs[0]:
                gx = torch.from_numpy(_input_grad(gn, w.T)).reshape(ctx.x_shape)
        return (gx, *gws, *gbs)


def _through_numpy(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (..., in) @ w (in, out) goes through numpy's BLAS (cpu.py)."""
    return (cpu.numpy_gemm_enabled() and x.device.type == w.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32)


def mlp_chain(x: torch.Tensor, weights: list, biases: list) -> torch.Tensor:
    """A linear-ReLU chain x (..., in) -> (..., out); weights (in, out). CPU matmuls through numpy's
    BLAS when cpu.py says so (one autograd node), else torch."""
    if _through_numpy(x, weights[0]):
        return _NumpyMLP.apply(x, *weights, *biases)
    return _torch_chain(x, weights, biases)


def _torch_chain(h: torch.Tensor, weights: list, biases: list, hidden: list | None = None
                 ) -> torch.Tensor:
    """A linear-ReLU chain in torch; batched over members when the weights are (n, in, out).
    Appends the ReLUs' outputs to `hidden` if given."""
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() == 2:
            h = torch.addmm(b, h, w) if h.dim() == 2 else torch.matmul(h, w) + b
        else:
            h = torch.baddbmm(b, h, w) if h.dim() == 3 else torch.matmul(h, w) + b
        if i < last:
            h = F.relu(h, inplace=True)
            if hidden is not None:
                hidden.append(h)
    return h


class _MinOverMembers(torch.autograd.Function):
    """min over an ensemble's members of its one output, (N, 1), differentiable in x only.

    Row by row, the gradient of the minimum is the gradient of the member that is the minimum,
    and autograd through torch.min would back-propagate zeros through every other member. Here
    each member's backward runs over its own rows only: for Q1/Q2, half the rows (the paper-size
    CPU step ran 4-8% faster, the same gradients). Inputs: x, then the weights and the biases.
    """

    @staticmethod
    def forward(ctx, x, *params):
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        outs, hidden = [], []
        for m in range(weights[0].shape[0]):
            ws, bs = [w[m] for w in weights], [b[m] for b in biases]
            if _through_numpy(x, ws[0]):
                out, acts = _numpy_chain(x.detach().numpy(), ws, bs)
            else:
                acts = []
                out = _torch_chain(x, ws, bs, acts)
            outs.append(out)
            hidden.append(acts)
        q, ctx.which = torch.stack(outs).min(dim=0)
        ctx.save_for_backward(*weights)
        ctx.hidden = hidden
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weights = ctx.saved_tensors
        which = ctx.which.squeeze(-1)
        grad_x = grad.new_empty(grad.shape[0], weights[0].shape[1])
        for m, acts in enumerate(ctx.hidden):
            rows = (which == m).nonzero().squeeze(-1)
            g = grad.index_select(0, rows)
            for i in range(len(weights) - 1, -1, -1):
                w = weights[i][m].T
                g = (torch.from_numpy(_input_grad(g.numpy(), w.numpy())) if _through_numpy(g, w)
                     else g @ w)
                if i > 0:  # the ReLU before layer i: its gradient mask from those rows' outputs
                    torch.ops.aten.threshold_backward.grad_input(
                        g, acts[i - 1].index_select(0, rows), 0, grad_input=g)
            grad_x.index_copy_(0, rows, g)
        return (grad_x,) + (None,) * (2 * len(weights))


class MLP(nn.Module):
    """`layers` hidden ReLU layers of width `hidden`, then a linear output. x: (..., in_dim)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            mods += [nn.Linear(a, b), nn.ReLU()]
        last = nn.Linear(dims[-1], out_dim)
        nn.init.uniform_(last.weight, -LAST_LAYER_INIT, LAST_LAYER_INIT)
        nn.init.uniform_(last.bias, -LAST_LAYER_INIT, LAST_LAYER_INIT)
        self.net = nn.Sequential(*mods, last)  # the layout (and checkpoint names) of the reference
        self.linears = [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_chain(x, [m.weight.T for m in self.linears], [m.bias for m in self.linears])


class EnsembleMLP(nn.Module):
    """`n` independent MLPs of the same shape, stored as one set of stacked parameters.

    Q1 and Q2 live here as one module. On CUDA the members run as one chain of batched matmuls
    (one kernel per layer); on CPU as one matmul chain per member, since a CPU batched matmul of
    (2, 4096, 300) x (2, 300, 300) ran ~30% slower than two plain ones and copied its operands.
    forward: x (N, in_dim) -> (n, N, out_dim).
    """

    def __init__(self, n: int, in_dim: int, hidden: int, out_dim: int, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * layers + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            bound = LAST_LAYER_INIT if i == len(dims) - 2 else 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(n, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = list(self.weights), list(self.biases)
        if x.is_cuda:
            return _torch_chain(x, weights, biases)
        return torch.stack([mlp_chain(x, [w[i] for w in weights], [b[i] for b in biases])
                            for i in range(weights[0].shape[0])])

    def min_over_members(self, x: torch.Tensor) -> torch.Tensor:
        """min over the members of a one-output ensemble, x (N, in_dim) -> (N, 1), with the
        parameters held constant: gradients reach x only (the policy's min Q).

        On CPU each member back-propagates over the rows where it is the minimum only
        (`_MinOverMembers`); on CUDA autograd runs through torch.min, as the rows' split varies
        from step to step and a CUDA graph needs fixed shapes.
        """
        weights = [w.detach() for w in self.weights]
        biases = [b.detach() for b in self.biases]
        if weights[-1].shape[-1] != 1:
            raise ValueError("min_over_members needs an ensemble with one output")
        if x.is_cuda:
            return _torch_chain(x, weights, biases).min(dim=0).values
        return _MinOverMembers.apply(x, *weights, *biases)


def tanh_log_det_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u)/du| = log(1 - tanh(u)^2), in the overflow-free form 2(log 2 - u - softplus(-2u))."""
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


class TanhGaussianPolicy(nn.Module):
    """pi(a | s, z) = tanh(N(mu, std^2)); log-std clamped to [-20, 2] (SPEC section 2).

    forward: x (N, obs_dim + latent) -> action (N, act), log_prob (N,), mean (N, act), log_std.
    The Gaussian noise eps (N, act) is drawn from `generator` unless given.
    """

    def __init__(self, in_dim: int, action_dim: int, hidden: int, layers: int = 3):
        super().__init__()
        self.action_dim = action_dim
        self.net = MLP(in_dim, hidden, 2 * action_dim, layers)

    def forward(
        self,
        x: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        with_log_prob: bool = True,
        eps: torch.Tensor | None = None,
    ):
        mean, log_std = self.net(x).chunk(2, dim=-1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        if deterministic:
            return torch.tanh(mean), None, mean, log_std
        std = log_std.exp()
        if eps is None:  # the standard normal draw, (N, act)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        pre_tanh = mean + std * eps  # reparameterised
        action = torch.tanh(pre_tanh)
        log_prob = None
        if with_log_prob:
            # Gaussian log-density of pre_tanh, minus log|det J| of the tanh squashing.
            gauss = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2.0 * math.pi)
            log_prob = (gauss - tanh_log_det_jacobian(pre_tanh)).sum(-1)
        return action, log_prob, mean, log_std


class NumpyTanhGaussianPolicy:
    """A frozen float32 numpy copy of a TanhGaussianPolicy's action, for CPU rollouts.

    A forward pass over a handful of observations costs ~3x less in numpy than through torch's
    per-op dispatch (the rollout calls it once per env step). The Gaussian noise is drawn from the
    same torch generator, with the same shape, as the torch policy draws it, so a run's random
    stream does not depend on which path acts. Take a new copy after the weights change.
    """

    def __init__(self, policy: TanhGaussianPolicy):
        self.layers = [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                       for m in policy.net.linears]
        self.action_dim = policy.action_dim

    def __call__(
        self, x: np.ndarray, deterministic: bool, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """x (N, in_dim) float32 -> actions (N, action_dim) in [-1, 1]."""
        h = x
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        w, b = self.layers[-1]
        out = h @ w + b
        mean = out[:, :self.action_dim]
        if deterministic:
            return np.tanh(mean)
        log_std = np.clip(out[:, self.action_dim:], LOG_STD_MIN, LOG_STD_MAX)
        eps = torch.randn(mean.shape, generator=generator).numpy()
        return np.tanh(mean + np.exp(log_std) * eps)

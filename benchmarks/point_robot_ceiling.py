"""What meta-test return can PEARL's encoder reach on point-robot? An upper bound, measured.

The meta-test (SPEC section 5, point-robot preset) reports the return of the 3rd trajectory; the
posterior it acts on comes from the first two. This script removes everything but the inference:

1. the return of a *perfect* policy that walks straight to a point at distance `err` from the goal
   (err = 0 is the goal-aware oracle, -5.19 per episode; docs/measurements.md), so a goal
   error maps to a return;
2. PEARL's product-of-Gaussians encoder (``metapearl.encoder.ContextEncoder``, latent size
   --latent) followed by a small MLP decoder from the posterior mean to the goal (the part of the
   policy and critic that reads z), trained *supervised* (squared goal error) on the contexts of
   that perfect policy: trajectory 1 aims at a uniform random point, trajectories 2 and 3 at the
   current estimate. Its goal error after k trajectories is the best a PoG encoder of this size
   does with this much training;
3. the same with factors of low-rank precision (`factor_rank` --rank, our extension: each factor's
   precision is diag(1/sigma2_n) + u_n u_n^T, so the product has a full covariance);
4. the same with a permutation-invariant encoder that is not a product of Gaussians (mean-pooled
   features, then an MLP), to show how much of the gap is the model class.

    python benchmarks/point_robot_ceiling.py --steps 4000 [--latent 16] [--encoders pog,lowrank]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from metapearl.encoder import ContextEncoder
from metapearl.networks import MLP

HORIZON, MAX_STEP = 20, 0.1  # point-robot: 20 steps, |a_i| <= 0.1 (SPEC section 6)


def walk(goal: np.ndarray, target: np.ndarray, rng: np.random.Generator):
    """Perfect-policy trajectories from U([-1,1]^2) starts straight to `target` (B, 2).

    Returns the context rows (B, 20, 5) = (s, a normalised to [-1,1], r) and the returns (B,).
    """
    x = rng.uniform(-1.0, 1.0, goal.shape)
    rows, ret = [], np.zeros(len(goal))
    for _ in range(HORIZON):
        a = np.clip(target - x, -MAX_STEP, MAX_STEP)
        nx = x + a
        r = -np.linalg.norm(nx - goal, axis=1)
        rows.append(np.concatenate([x, a / MAX_STEP, r[:, None]], axis=1))
        ret += r
        x = nx
    return torch.tensor(np.stack(rows, 1), dtype=torch.float32), ret


def return_at_error(err: float, rng: np.random.Generator, n: int = 20000) -> float:
    goal = rng.uniform(-1.0, 1.0, (n, 2))
    angle = rng.uniform(0.0, 2 * np.pi, n)
    target = goal + err * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return float(walk(goal, target, rng)[1].mean())


class PoGGoal(nn.Module):
    """PEARL's encoder (latent `latent`, factors of precision rank `rank` beyond the diagonal),
    then an MLP from the posterior mean to the goal."""

    def __init__(self, context_dim: int, hidden: int, latent: int, rank: int = 0):
        super().__init__()
        self.encoder = ContextEncoder(context_dim, latent, hidden, True, rank)
        self.decoder = MLP(latent, 64, 2)

    def forward(self, context):
        return self.decoder(self.encoder(context)[0])


class MeanPoolGoal(nn.Module):
    """Not PEARL: per-transition features, averaged, then an MLP to the goal."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.phi = MLP(context_dim, hidden, hidden)
        self.rho = MLP(hidden, hidden, 2)

    def forward(self, context):
        return self.rho(self.phi(context).mean(dim=1))


def contexts(encoder, batch: int, rng: np.random.Generator):
    """Contexts after 1, 2, 3 trajectories of the idealised meta-test, and the goals."""
    goal = rng.uniform(-1.0, 1.0, (batch, 2))
    target = rng.uniform(-1.0, 1.0, (batch, 2))
    out, context = [], None
    for _ in range(3):
        rows = walk(goal, target, rng)[0]
        context = rows if context is None else torch.cat([context, rows], dim=1)
        out.append(context)
        with torch.no_grad():
            target = encoder(context).clamp(-1.5, 1.5).numpy()
    return out, torch.tensor(goal, dtype=torch.float32)


def goal_errors(encoder, steps: int, rng: np.random.Generator) -> list[float]:
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    for _ in range(steps):
        ctxs, goal = contexts(encoder, 64, rng)
        loss = sum((encoder(c) - goal).pow(2).sum(1).mean() for c in ctxs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ctxs, goal = contexts(encoder, 4000, rng)
        return [float((encoder(c) - goal).norm(dim=1).mean()) for c in ctxs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="supervised training steps")
    parser.add_argument("--hidden", type=int, default=200, help="encoder width (SPEC: 200)")
    parser.add_argument("--latent", type=int, default=5, help="PoG latent size (SPEC: 5)")
    parser.add_argument("--rank", type=int, default=1, help="factor_rank of the lowrank encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoders", default="pog,lowrank,meanpool",
                        help="comma-separated subset of pog (PEARL's), lowrank and meanpool")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    print("return of a perfect policy aiming at a point `err` from the goal (20 steps):")
    errors = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    table = [(e, return_at_error(e, rng)) for e in errors]
    print("  " + "  ".join(f"err {e:.2f}: {r:6.2f}" for e, r in table))

    chosen = args.encoders.split(",")
    for key, name, encoder in [
        ("pog", f"PEARL product of Gaussians, latent {args.latent}",
         PoGGoal(5, args.hidden, args.latent)),
        ("lowrank", f"product of Gaussians with rank-{args.rank} precision terms, latent "
         f"{args.latent}", PoGGoal(5, args.hidden, args.latent, args.rank)),
        ("meanpool", "mean-pooled MLP (not PEARL)", MeanPoolGoal(5, args.hidden)),
    ]:
        if key not in chosen:
            continue
        start = time.perf_counter()
        errs = goal_errors(encoder, args.steps, rng)
        implied = return_at_error(errs[1], rng)
        print(f"{name}: goal error after 1, 2, 3 trajectories "
              f"{errs[0]:.3f}, {errs[1]:.3f}, {errs[2]:.3f}; a perfect policy acting on the "
              f"2-trajectory posterior scores {implied:.2f} on trajectory 3 "
              f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

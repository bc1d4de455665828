"""Launches per column step of the solvers: the plain torch loops against the fused Triton kernels.

A launch is an ATen op (on a GPU each is at most one kernel launch: views launch none, so the counts are
an upper bound) or a fused Triton kernel launch; per column step = launches of the whole solver call
(grid fit, Hessian preparation, solve, objective) / the number of input columns. Counts depend on the
shapes only: the fused path runs here in Triton's interpreter (TRITON_INTERPRET semantics, slow: its
wall time says nothing about GPU speed and is not reported).

    python benchmarks/launch_count.py [--rows 16] [--cols 576]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from obc_lightning import exact_obc, gptq, quantize_weight
from obc_lightning.kernels import ENV, triton_available
from obc_lightning.kernels.counting import count_launches


def problem(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(2 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


SOLVERS = {
    "exact_obc": lambda W, H: exact_obc(W, H, 4, damp=0.01),
    "gptq": lambda W, H: gptq(W, H, 4),
    "auto (quantize_weight)": lambda W, H: quantize_weight(W, H, 4),
}


def measure(rows: int, cols: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    W, H = problem(rows, cols)
    out = []
    for name, fn in SOLVERS.items():
        row = {}
        for path in ("torch", "triton"):
            os.environ[ENV] = path
            with count_launches() as c:
                fn(W, H)
            row[path] = (c.aten, c.triton)
        out.append((name, row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cols", type=int, default=576)
    args = ap.parse_args()
    if not triton_available():
        raise SystemExit("triton does not import: pip install triton")
    old = os.environ.get(ENV)
    try:
        results = measure(args.rows, args.cols)
    finally:
        os.environ.pop(ENV, None) if old is None else os.environ.__setitem__(ENV, old)
    import triton

    print(f"# {args.rows} x {args.cols}, 4 bits, float32; torch {torch.__version__}, triton {triton.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("| solver | torch path: ATen ops | per column step | fused: ATen ops + Triton launches | per column step |")
    print("|---|---|---|---|---|")
    for name, row in results:
        (a0, _), (a1, k1) = row["torch"], row["triton"]
        print(f"| {name} | {a0} | {a0 / args.cols:.1f} | {a1} + {k1} | {(a1 + k1) / args.cols:.2f} |")


if __name__ == "__main__":
    main()

"""Layers batched by width against one layer at a time: ResNet-20's conv/fc set on the CPU torch path.

ResNet-20 (CIFAR, option-A shortcuts) has 20 weighted layers in five widths d (27, 144 x 7, 288 x 6,
576 x 5, 64): batched, the solvers run one column loop per width instead of one per layer. The Hessians
come from random 32 x 32 images through the real (untrained) network; the solving stage
(:func:`obc_lightning.scheduling.solve_modules`) is timed alone, both ways, on copies of the same Hessians,
alternating the order over ``--repeats`` rounds (the median is reported; the machine may be shared).
Also: ATen ops of the whole solve (deterministic; on a GPU each is at most one kernel launch), and a
check that both ways give bit-identical weights.

    python benchmarks/batched.py [--solvers auto obc] [--repeats 3] [--threads 1] [--fused-counts]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from obc_lightning.calibration import collect_hessians  # noqa: E402
from obc_lightning.compress import select_modules  # noqa: E402
from obc_lightning.kernels import ENV  # noqa: E402
from obc_lightning.kernels.counting import count_launches  # noqa: E402
from obc_lightning.models import resnet20  # noqa: E402
from obc_lightning.scheduling import SolveSettings, solve_modules  # noqa: E402


def hessians_of_resnet20():
    torch.manual_seed(0)
    model = resnet20().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(4)]
    targets = select_modules(model)
    calib = collect_hessians(model, batches, targets, warn=False)
    return model, targets, calib.hessians


def solve(targets, hessians, settings, batched: bool) -> tuple[float, dict]:
    hs = {n: copy.copy(lh) for n, lh in hessians.items()}  # popped as used; the tensors are shared
    t = time.perf_counter()
    weights = {out.name: out.weight for out in solve_modules(hs, targets, settings, batch_by_width=batched)}
    return time.perf_counter() - t, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", nargs="+", default=["auto", "obc"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused-counts", action="store_true", help="also count the fused path's launches (slow)")
    args = ap.parse_args()
    os.environ[ENV] = "torch"
    torch.set_num_threads(args.threads)
    model, targets, hessians = hessians_of_resnet20()
    widths: dict[int, int] = {}
    for lh in hessians.values():
        widths[lh.hessians.shape[-1]] = widths.get(lh.hessians.shape[-1], 0) + 1
    print(f"# ResNet-20: {len(hessians)} layers, widths {dict(sorted(widths.items()))}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), kernels: torch path")
    rows = []
    for solver in args.solvers:
        settings = SolveSettings(bits=4, solver=solver)
        solve(targets, hessians, settings, True)  # warm-up (allocator, lazy imports)
        times = {True: [], False: []}
        same = True
        for r in range(args.repeats):
            for batched in ((True, False) if r % 2 == 0 else (False, True)):
                secs, w = solve(targets, hessians, settings, batched)
                times[batched].append(secs)
                if batched:
                    wb = w
                else:
                    wa = w
            same &= all(torch.equal(wa[n], wb[n]) for n in wa)
        ops = {}
        for batched in (False, True):
            with count_launches() as c:
                solve(targets, hessians, settings, batched)
            ops[batched] = c.aten
        per, bat = statistics.median(times[False]), statistics.median(times[True])
        rows.append((solver, per, bat, ops[False], ops[True], same, times))
    print("\n| solver | one layer at a time (s) | batched by width (s) | speed-up | ATen ops: per layer | "
          "batched | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for solver, per, bat, o1, o2, same, _ in rows:
        print(f"| {solver} | {per:.2f} | {bat:.2f} | {per / bat:.2f}x | {o1} | {o2} | {'yes' if same else 'NO'} |")
    for solver, *_, times in rows:
        print(f"# {solver}: per-layer runs {[round(t, 2) for t in times[False]]}, "
              f"batched runs {[round(t, 2) for t in times[True]]}")
    if args.fused_counts:
        fused_counts(targets, hessians)


def fused_counts(targets, hessians) -> None:
    """Launches (ATen ops + Triton launches) of the fused path on the 144-wide layers, counted in the
    interpreter (counts depend on shapes only; the interpreter's wall time means nothing)."""
    from obc_lightning.kernels import triton_available

    if not triton_available():
        print("# fused-path counts skipped: triton does not import")
        return
    os.environ[ENV] = "triton"
    group = {n: lh for n, lh in hessians.items() if lh.hessians.shape[-1] == 144}
    print(f"\n| fused path, {len(group)} layers of width 144 | ATen ops | Triton launches | total |")
    print("|---|---|---|---|")
    for solver in ("auto", "obc"):
        for batched in (False, True):
            with count_launches() as c:
                solve(targets, group, SolveSettings(bits=4, solver=solver), batched)
            label = "batched" if batched else "one layer at a time"
            print(f"| {solver}, {label} | {c.aten} | {c.triton} | {c.total} |")
    os.environ[ENV] = "torch"


if __name__ == "__main__":
    main()

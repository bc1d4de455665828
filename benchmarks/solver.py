"""ExactOBC speed: the fast solver against the plain one-step-at-a-time loop, on ResNet layer shapes.

The baseline is the paper's loop written without needless work (``exact_obc(method="reference")``:
rows batched, the H^-1 downdate in place with ``baddbmm_``), so the ratio measures the algorithmic gain
(deferred blocked downdates, shrinking working set), not an allocator. Both run on the same rows, the
same Hessian and the same grid, in the same process; the loss ratio is fast / baseline.

    python benchmarks/solver.py                      # CPU, default shapes (rows capped, see --max-rows)
    python benchmarks/solver.py --device cuda --full # the ResNet-18 and ResNet-50 conv/fc shapes
    python benchmarks/solver.py --published ../OBC   # also time IST-DASLab/OBC's trueobs.py (not shipped)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import time

import torch

from obc_lightning import exact_obc
from obc_lightning.solvers.obc import obc_row_batch

DEFAULT_SHAPES = [(64, 576), (128, 1152), (256, 2304), (512, 4608), (1000, 512)]
CPU_SHAPES = [(64, 576), (128, 1152), (1000, 512)]  # the baseline needs minutes per row batch beyond


def resnet18_shapes():
    """(rows, cols) of every conv/fc of torchvision's ResNet-18 (ImageNet), in order, with repeats."""
    s = [(64, 3 * 49)]
    cin = 64
    for cout, blocks in ((64, 2), (128, 2), (256, 2), (512, 2)):
        for b in range(blocks):
            s.append((cout, cin * 9))
            s.append((cout, cout * 9))
            if b == 0 and cin != cout:
                s.append((cout, cin))  # 1x1 downsample
            cin = cout
    s.append((1000, 512))
    return s


def resnet50_shapes():
    s = [(64, 3 * 49)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            s += [(width, cin), (width, width * 9), (4 * width, width)]
            if b == 0:
                s.append((4 * width, cin))
            cin = 4 * width
    s.append((1000, 2048))
    return s


def problem(rows, cols, device, seed=0):
    """A correlated Hessian like a conv layer's (H = 2/N X^T X with mixed inputs) and weights."""
    g = torch.Generator().manual_seed(seed)
    n = max(2 * cols, 1024)
    X = torch.randn(n, cols, generator=g)
    X = X @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5)
    H = 2 * X.T @ X / n
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    return W.to(device), H.to(device)


REPEAT = 1


def timed(fn, device):
    """(result, seconds): the fastest of ``--repeat`` runs (a shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(REPEAT):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, best


def published_obc(path, W, H, bits):
    """IST-DASLab/OBC ``TrueOBS.quantize`` on the same problem (its own min-max/MSE grid)."""
    sys.path.insert(0, path)
    # a checkout the user points at, never shipped
    from quant import Quantizer
    from trueobs import TrueOBS

    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(W.device)
    layer.weight.data = W.clone()
    obs = TrueOBS(layer)
    obs.H = H.double().clone()
    obs.quantizer = Quantizer()
    obs.quantizer.configure(bits, perchannel=True, sym=False, mse=True)
    sync = torch.cuda.synchronize
    if W.device.type != "cuda":
        torch.cuda.synchronize = lambda *a, **k: None  # it calls this unconditionally
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _, secs = timed(lambda: obs.quantize(parallel=32), W.device)
    finally:
        torch.cuda.synchronize = sync
    Q = layer.weight.data
    d = Q - W
    return secs, float(0.5 * ((d @ H) * d).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="the ResNet-18 and ResNet-50 layer sets")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="time only this many rows of each layer (default: 64 on CPU, all on CUDA)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the (slow) baseline")
    ap.add_argument("--published", default=None, help="path to a checkout of IST-DASLab/OBC to time too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="time each solver this many times, keep the fastest")
    ap.add_argument("--shapes", default=None, help="comma-separated ROWSxCOLS list, e.g. 64x576,128x1152")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_rows = args.max_rows if args.max_rows is not None else (64 if device.type == "cpu" else None)

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# ExactOBC, {args.bits} bits, float32, device {device} ({machine}), torch {torch.__version__}, "
          f"fastest of {REPEAT}")

    if args.full:
        sets = [("resnet18", resnet18_shapes()), ("resnet50", resnet50_shapes())]
    elif args.shapes:
        sets = [("layers", [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")])]
    else:
        sets = [("layers", DEFAULT_SHAPES if device.type == "cuda" else CPU_SHAPES)]
    header = (f"| {'set':9} | {'shape':>10} | {'rows timed':>10} | {'baseline s':>10} | {'fast s':>8} "
              f"| {'speed-up':>8} | {'loss ratio':>10} |")
    if args.published:
        header += " published s | published loss ratio |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, shapes in sets:
        tot_base = tot_fast = 0.0
        for i, (rows, cols) in enumerate(shapes):
            W, H = problem(rows, cols, device, seed=i)
            if max_rows:
                W = W[:max_rows]
            fast, t_fast = timed(lambda W=W, H=H: exact_obc(W, H, args.bits, batch_size=None), device)
            tot_fast += t_fast
            if args.no_baseline:
                t_base, ratio = float("nan"), float("nan")
            else:
                # same row batch as the fast path, so only the algorithm differs
                R = obc_row_batch(W.shape[0], cols, W.dtype, device, "fast", None, None)
                base, t_base = timed(lambda W=W, H=H, R=R: exact_obc(W, H, args.bits, batch_size=R, method="reference"),
                                     device)
                ratio = float(fast.loss.sum() / base.loss.sum())
                tot_base += t_base
            row = (f"| {name:9} | {rows:>4}x{cols:<5} | {W.shape[0]:>10} | {t_base:>10.3f} | {t_fast:>8.3f} | "
                   f"{t_base / t_fast:>7.1f}x | {ratio:>10.4f} |")
            if args.published:
                t_pub, loss_pub = published_obc(args.published, W, H, args.bits)
                row += f" {t_pub:>11.3f} | {loss_pub / float(fast.loss.sum()):>20.4f} |"
            print(row, flush=True)
        if len(shapes) > 1:
            print(f"| {name:9} | {'total':>10} | {'':>10} | {tot_base:>10.2f} | {tot_fast:>8.2f} | "
                  f"{tot_base / tot_fast:>7.1f}x | {'':>10} |", flush=True)


if __name__ == "__main__":
    main()

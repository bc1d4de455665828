"""Product quantization per layer: plain k-means PQ (fairseq's iPQ) against Hessian-aware PQ.

    python examples/cifar.py --model resnet20 --epochs 30 --save-fp32 r20.pt --solvers   # train once
    python benchmarks/pq.py --fp32 r20.pt            # real ResNet-20 layers and Hessians
    python benchmarks/pq.py                          # synthetic correlated Hessians only

For every layer, both methods get the same layout (sub-vectors of ``--block-size`` consecutive inputs,
one codebook of ``--n-centroids`` entries, the same seed) and are scored by the layer objective
1/2 trace((Q - W) H (Q - W)^T). Columns: that objective for each method, their ratio (the target: Hessian-
aware at most 0.5 of plain), and the time of each (the ratio is the price of the Hessian: plain PQ is the
baseline, measured in the same run). Also an ablation of the Hessian-aware steps on each layer (only the
weighted k-means initialisation; + the compensated assignment; + the codebook update rounds).

Hessians: for ResNet-20, H = 2/N X^T X from 1,024 training images of the shared CIFAR-10 subset (one
pass, every conv position); synthetic: AR(1) inputs (correlation 0.9 between neighbours, like
adjacent pixels) with random per-input scales.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from obc_lightning.solvers.common import layer_objective
from obc_lightning.solvers.pq import kmeans, nearest, product_quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def ar1_hessian(d: int, n: int = 8192, rho: float = 0.9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    for i in range(1, d):
        X[:, i] = rho * X[:, i - 1] + (1 - rho**2) ** 0.5 * X[:, i]
    X = X * (0.2 + 2 * torch.rand(d, generator=g))
    return 2 / n * X.T @ X


def synthetic_layers(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # the last shape is ResNet-50's largest 3x3 conv (layer4: 512 x 512 x 3 x 3)
    for rows, d in ((64, 576), (128, 1152), (256, 2304), (512, 4608)):
        yield f"AR(1) {rows}x{d}", 0.05 * torch.randn(rows, d, generator=g), ar1_hessian(d, seed=seed)


def resnet_layers(path: str, subset: str):
    from cifar import CifarClassifier, CifarDataModule, load_subset

    from obc_lightning.calibration import collect_hessians
    from obc_lightning.compress import select_modules

    lit = CifarClassifier("resnet20")
    lit.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    lit.eval()
    dm = CifarDataModule(load_subset(subset))
    targets = {n: m for n, m in select_modules(lit).items() if n.startswith("net.layer")}
    calib = collect_hessians(lit, dm.calibration_batches(1024), targets)
    for name, m in targets.items():
        W = m.weight.detach().reshape(m.weight.shape[0], -1)
        yield name, W, calib.hessians[name].hessians[0].float()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", default=None, help="state dict of examples/cifar.py's CifarClassifier (resnet20)")
    ap.add_argument("--subset", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10_subset.npz"))
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--n-centroids", type=int, default=256)
    args = ap.parse_args()
    b, K = args.block_size, args.n_centroids
    print(
        f"block_size={b}, n_centroids={K}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    layers = list(synthetic_layers())
    if args.fp32:
        layers += list(resnet_layers(args.fp32, args.subset))
    head = (
        "| layer | plain PQ objective | Hessian-aware | ratio | weighted init only | + compensation, 1 round "
        "| plain s | aware s | time ratio |"
    )
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    ratios, tp_all, ta_all = [], 0.0, 0.0
    for name, W, H in layers:
        if W.shape[0] * W.shape[1] // b < K:
            continue
        plain, tp = timed(product_quantize, W, None, block_size=b, n_centroids=K)
        aware, ta = timed(product_quantize, W, H, block_size=b, n_centroids=K)
        one = product_quantize(W, H, block_size=b, n_centroids=K, n_rounds=1)
        # weighted k-means alone: the codebook of the Hessian-aware run's first step, nearest assignment
        x = W.reshape(-1, b)
        w8 = torch.diagonal(H).clamp_min(1e-12).reshape(1, -1, b).expand(W.shape[0], -1, b).reshape(-1, b)
        C, _ = kmeans(x, K, weights=w8)
        init_only = C[nearest(x, C, w8)].reshape(W.shape)
        lp = float(layer_objective(W, plain.quantized_matrix, H).sum())
        la = float(aware.loss.sum())
        li = float(layer_objective(W, init_only, H).sum())
        l1 = float(one.loss.sum())
        ratios.append(la / lp)
        tp_all, ta_all = tp_all + tp, ta_all + ta
        print(
            f"| {name} {tuple(W.shape)} | {lp:.4g} | {la:.4g} | {la / lp:.3f} | {li:.4g} | {l1:.4g} | {tp:.2f} | "
            f"{ta:.2f} | {ta / tp:.1f} |",
            flush=True,
        )
    if ratios:
        gm = torch.tensor(ratios).log().mean().exp()
        print(
            f"\nHessian-aware / plain objective: geometric mean {float(gm):.3f}, worst {max(ratios):.3f}; "
            f"total time plain {tp_all:.1f} s, aware {ta_all:.1f} s ({ta_all / tp_all:.1f}x)"
        )


if __name__ == "__main__":
    main()

"""Does multiplying XᵀX in bfloat16 change what ExactOBC does with it? Paired runs on a trained ResNet-20.

    python examples/cifar.py --epochs 30 --save-fp32 r20.pt          # train once (or any saved weights)
    OMP_NUM_THREADS=1 python benchmarks/hessian_precision.py --load-fp32 r20.pt --draws 8

For each calibration draw (1,024 training images of the shared CIFAR-10 subset, seeded by the draw),
the Hessians are collected twice from the same images, with ``product_dtype=None`` (float32 products)
and ``"bfloat16"``, and ExactOBC quantizes a fresh copy of the network from each. Both results are then
judged by the same yardsticks, all computed here: the sum over layers of the layer objective
1/2 Σ_rows (w − q) H (w − q)ᵀ on the *exact* float32-product H (what the solver minimises, so a worse H
shows up as a larger loss), the KL divergence of the quantized network's test-set outputs from the fp32
network's, and test accuracy. Pairing by draw removes the calibration-draw noise (±0.5 points of
accuracy on 846 test images) from the comparison of the two precisions.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import cifar

from obc_lightning import collect_hessians, compress_model
from obc_lightning.compress import select_modules


def layer_loss(original: torch.nn.Module, quantized: torch.nn.Module, exact) -> float:
    """Σ over layers of 1/2 Σ_rows dw H dwᵀ, dW = quantized − original weights, on the exact H."""
    total = 0.0
    modules = dict(quantized.named_modules())
    for name, module in select_modules(original).items():
        if name not in exact.hessians:
            continue
        dW = (modules[name].weight - module.weight).detach().double()
        for block, H in zip(exact[name].weight_blocks(dW), exact[name].hessians):
            total += 0.5 * float(((block @ H) * block).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load-fp32", type=Path, required=True, help="state_dict of a trained CifarClassifier")
    ap.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    ap.add_argument("--subset", type=Path, default=cifar.DEFAULT_SUBSET)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    args = ap.parse_args()

    dm = cifar.CifarDataModule(cifar.load_subset(args.subset), 128, 0)
    lit = cifar.CifarClassifier(args.model)
    lit.load_state_dict(torch.load(args.load_fp32, map_location="cpu", weights_only=True))
    lit.eval()
    with torch.no_grad():
        xs, ys = map(torch.cat, zip(*dm.val_dataloader()))
        reference = F.log_softmax(lit(xs), -1)
    dtypes = {"float32": None, "bfloat16": "bfloat16"}
    rows = {(b, d): [] for b in args.bits for d in dtypes}  # (loss, kl, accuracy) per draw
    for draw in range(args.draws):
        calib = dm.calibration_batches(1024, seed=draw)
        exact = collect_hessians(lit, calib, select_modules(lit))
        for bits in args.bits:
            for label, dtype in dtypes.items():
                model = copy.deepcopy(lit)
                compress_model(model, calib, bits, solver="obc", product_dtype=dtype)
                with torch.no_grad():
                    logits = model(xs)
                kl = F.kl_div(F.log_softmax(logits, -1), reference, log_target=True, reduction="batchmean")
                acc = 100 * (logits.argmax(-1) == ys).float().mean()
                rows[bits, label].append((layer_loss(lit, model, exact), float(kl), float(acc)))
        print(f"draw {draw} done", file=sys.stderr, flush=True)

    def mean_se(values):
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4g} ± {se:.2g}"

    cpu = platform.processor() or platform.machine()
    print(f"{args.model}, {args.draws} calibration draws of 1,024 images; {cpu}, torch {torch.__version__}; "
          "mean ± standard error (the ratio: mean ± standard deviation over the draws)")
    print("| bits | Σ layer loss on the exact H, float32 products | bfloat16 products | per-draw ratio "
          "| KL to fp32, float32 | bfloat16 | accuracy, float32 | bfloat16 |\n|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        f32, b16 = rows[bits, "float32"], rows[bits, "bfloat16"]
        ratio = [b[0] / f[0] for f, b in zip(f32, b16)]
        spread = statistics.stdev(ratio) if len(ratio) > 1 else float("nan")
        cells = [mean_se([r[i] for r in rs]) for i in range(3) for rs in (f32, b16)]
        print(f"| {bits} | {cells[0]} | {cells[1]} | {statistics.mean(ratio):.4f} ± {spread:.4f} | "
              f"{cells[2]} | {cells[3]} | {cells[4]} | {cells[5]} |")


if __name__ == "__main__":
    main()

"""Pruning a trained CIFAR-10 ResNet-20: OBS (`compress_model(sparsity= / n_m=)`) against magnitude pruning.

    python examples/cifar.py --model resnet20 --epochs 30 --save-fp32 r20.pt --solvers   # train once
    python benchmarks/cifar_prune.py --fp32 r20.pt

Every Conv2d and the classifier are pruned, except the 3-channel stem in the N:M rows (3 input
channels cannot form groups of 4; it stays dense there). Magnitude: the smallest |w| per layer (or per
group of 4 input channels at each kernel position), no compensation. OBS: one-pass Hessians from 1,024
training images, greedy OBS with the layer-wise global selection (unstructured) or N:M-restricted steps,
then, for the joint rows, the kept weights quantized to 4 bits with the pruned ones held at zero.
Accuracy on the test split of the shared subset (846 images: one image = 0.12 points).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cifar import DEFAULT_SUBSET, CifarClassifier, CifarDataModule, evaluate, load_subset

from obc_lightning import compress_model
from obc_lightning.solvers.prune import conv_nm_group_index, magnitude_prune


@torch.no_grad()
def magnitude_(model: nn.Module, sparsity=None, n_m=None) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            W = m.weight.flatten(1)
            if n_m is not None:
                if isinstance(m, nn.Conv2d) and m.in_channels % n_m[1]:
                    continue  # the stem: no N:M groups
                gi = conv_nm_group_index(m.in_channels, m.weight[0, 0].numel(), n_m[1]) if isinstance(
                    m, nn.Conv2d) else None
                mask = magnitude_prune(W, n_m=n_m, group_index=gi)
            else:
                mask = magnitude_prune(W, sparsity=sparsity)
            m.weight.mul_(mask.view_as(m.weight))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", required=True, help="state dict of examples/cifar.py's CifarClassifier")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--subset", default=str(DEFAULT_SUBSET))
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()

    lit = CifarClassifier(args.model)
    lit.load_state_dict(torch.load(args.fp32, map_location="cpu", weights_only=True))
    dm = CifarDataModule(load_subset(args.subset))
    val, calib = dm.val_dataloader(), dm.calibration_batches(1024)
    fp32 = evaluate(lit, val)
    s = args.sparsity
    runs = [
        (f"magnitude {s:.0%}", lambda m: magnitude_(m, sparsity=s)),
        (f"OBS {s:.0%}", lambda m: compress_model(m, calib, None, sparsity=s)),
        ("magnitude 2:4", lambda m: magnitude_(m, n_m=(2, 4))),
        ("OBS 2:4", lambda m: compress_model(m, calib, None, n_m=(2, 4), exclude="net.conv1")),
        (f"OBS {s:.0%} + 4-bit", lambda m: compress_model(m, calib, 4, sparsity=s)),
        ("OBS 2:4 + 4-bit", lambda m: compress_model(m, calib, 4, n_m=(2, 4), exclude="net.conv1")),
    ]
    print(f"{args.model}, fp32 accuracy {fp32:.2f} %, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | zeros in Conv/Linear weights | accuracy | vs fp32 | seconds |\n|---|---|---|---|---|")
    for name, fn in runs:
        m = copy.deepcopy(lit)
        t0 = time.perf_counter()
        fn(m)
        secs = time.perf_counter() - t0
        acc = evaluate(m, val)
        ws = [x.weight for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        print(f"| {name} | {zeros:.1%} | {acc:.2f} | {acc - fp32:+.2f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()

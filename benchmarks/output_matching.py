"""Output matching on a CNN: ResNet-20 on CIFAR-10, one-pass vs sequential vs sequential + match_outputs.

    python examples/cifar.py --epochs 30 --solvers --save-fp32 r20.pt     # train once (or any saved weights)
    OMP_NUM_THREADS=1 python benchmarks/output_matching.py --load-fp32 r20.pt --draws 4 --bits 3 2

For each calibration draw (1,024 training images of the shared CIFAR-10 subset, seeded by the draw) and
bit width, a fresh copy of the trained network is compressed by ``compress_model`` (solver ``auto``,
every Conv2d and the classifier) three ways: one-pass Hessians (``auto``), ``sequential=True``
(``auto-seq``) and ``sequential=True, match_outputs=True`` (``auto-seq-match``). Each result is judged
as it is and after re-estimating its BatchNorm statistics (``reestimate_batchnorm`` over
``--recalibrate-bn`` augmented training batches, the same batches for every method of a draw): test
accuracy and the mean KL(fp32 || quantized) of the test-set outputs (what the compression tries to
keep, with less noise than the accuracy of 846 images). Differences are paired by draw (the same
calibration images for every method). Calibration seconds are ``report.calibration_seconds``.

    OMP_NUM_THREADS=1 python benchmarks/output_matching.py --load-fp32 r20.pt --cost 5

``--cost PAIRS``: only the calibration cost, PAIRS alternating pairs of ``compress_model`` runs with
``sequential=True`` and with ``sequential=True, match_outputs=True`` (4-bit GPTQ, whose solve is not part
of ``report.calibration_seconds``); prints every pair and the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import cifar

from obc_lightning import compress_model, reestimate_batchnorm

METHODS = {
    "auto": dict(sequential=False),
    "auto-seq": dict(sequential=True, match_outputs=False),
    "auto-seq-match": dict(sequential=True, match_outputs=True),
}


def mean_se(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale / len(values) ** 0.5:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load-fp32", type=Path, required=True, help="state_dict of a trained CifarClassifier")
    ap.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    ap.add_argument("--subset", type=Path, default=cifar.DEFAULT_SUBSET)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--first-draw", type=int, default=0)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--recalibrate-bn", type=int, default=36, help="augmented training batches for BatchNorm")
    ap.add_argument("--calibration-images", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per run")
    ap.add_argument("--from-json", type=Path, default=None, help="only print the tables of these runs")
    ap.add_argument("--cost", type=int, default=0, help="only time calibration: this many alternating pairs")
    ap.add_argument("--product-dtype", default=None, choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.cost:
        return cost(args)

    runs = []
    if args.from_json is None:
        dm = cifar.CifarDataModule(cifar.load_subset(args.subset), 128, 0)
        lit = cifar.CifarClassifier(args.model)
        lit.load_state_dict(torch.load(args.load_fp32, map_location="cpu"))
        lit.eval()
        with torch.no_grad():
            xs, ys = map(torch.cat, zip(*dm.val_dataloader()))
            reference = F.log_softmax(lit(xs), -1)
            fp32_acc = float(100 * (reference.argmax(-1) == ys).float().mean())
        print(f"fp32 accuracy {fp32_acc:.2f} on {len(ys)} test images; {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

        def judge(model):
            with torch.no_grad():
                logits = model(xs)
            kl = F.kl_div(F.log_softmax(logits, -1), reference, log_target=True, reduction="batchmean")
            return float(100 * (logits.argmax(-1) == ys).float().mean()), float(kl)

        for draw in range(args.first_draw, args.first_draw + args.draws):
            calib = dm.calibration_batches(args.calibration_images, seed=draw)
            torch.manual_seed(draw)  # the shuffle and augmentation of the BatchNorm batches
            bn_batches = [x for _, (x, _) in zip(range(args.recalibrate_bn), dm.train_dataloader())]
            for bits in args.bits:
                for method in args.methods:
                    model = copy.deepcopy(lit)
                    t0 = time.perf_counter()
                    rep = compress_model(model, calib, bits, solver="auto", **METHODS[method])
                    seconds = time.perf_counter() - t0
                    acc, kl = judge(model)
                    reestimate_batchnorm(model, bn_batches)
                    acc_bn, kl_bn = judge(model)
                    r = dict(draw=draw, bits=bits, method=method, acc=acc, kl=kl, acc_bn=acc_bn, kl_bn=kl_bn,
                             seconds=seconds, calibration_seconds=rep.calibration_seconds,
                             passes=rep.calibration_passes, fp32_acc=fp32_acc)
                    runs.append(r)
                    print(json.dumps(r), flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(r) + "\n")
    else:
        runs = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]

    bits_list = sorted({r["bits"] for r in runs}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by = {(r["bits"], r["method"], r["draw"]): r for r in runs}
    draws = sorted({r["draw"] for r in runs})
    print(f"\n{len(draws)} calibration draws; mean ± standard error over the draws; KL x 10^3")
    print("| bits | method | accuracy | KL | accuracy, BN re-estimated | KL, BN re-estimated | calibration s |")
    print("|---|---|---|---|---|---|---|")
    for bits in bits_list:
        for m in methods:
            rs = [by[bits, m, d] for d in draws if (bits, m, d) in by]
            print(f"| {bits} | {m} | {mean_se([r['acc'] for r in rs])} | {mean_se([r['kl'] for r in rs], 1e3)} | "
                  f"{mean_se([r['acc_bn'] for r in rs])} | {mean_se([r['kl_bn'] for r in rs], 1e3)} | "
                  f"{mean_se([r['calibration_seconds'] for r in rs], digits=1)} |")
    print("\nPaired differences (auto-seq-match minus the other), mean ± s.e. over the draws")
    print("| bits | against | Δ accuracy | Δ KL x 10^3 | Δ accuracy, BN | Δ KL x 10^3, BN | KL ratio | KL ratio, BN |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in bits_list:
        for other in [m for m in methods if m != "auto-seq-match"]:
            pairs = [(by[bits, "auto-seq-match", d], by[bits, other, d]) for d in draws
                     if (bits, "auto-seq-match", d) in by and (bits, other, d) in by]
            if not pairs:
                continue
            cells = [mean_se([a[k] - b[k] for a, b in pairs], 1e3 if k.startswith("kl") else 1.0)
                     for k in ("acc", "kl", "acc_bn", "kl_bn")]
            ratios = [mean_se([a[k] / b[k] for a, b in pairs], digits=3) for k in ("kl", "kl_bn")]
            print(f"| {bits} | {other} | " + " | ".join(cells + ratios) + " |")


def cost(args) -> None:
    dm = cifar.CifarDataModule(cifar.load_subset(args.subset), 128, 0)
    lit = cifar.CifarClassifier(args.model)
    lit.load_state_dict(torch.load(args.load_fp32, map_location="cpu"))
    calib = dm.calibration_batches(args.calibration_images, seed=0)
    print(f"{args.model}, {sum(map(len, calib))} calibration images in {len(calib)} batches, products "
          f"{args.product_dtype or 'float32'}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratios = []
    for i in range(args.cost):
        seconds = {}
        for match in (False, True) if i % 2 == 0 else (True, False):
            rep = compress_model(copy.deepcopy(lit), calib, 4, solver="gptq", sequential=True, match_outputs=match,
                                 product_dtype=args.product_dtype)
            seconds[match] = rep.calibration_seconds, rep.calibration_passes
        ratios.append(seconds[True][0] / seconds[False][0])
        print(f"pair {i}: sequential {seconds[False][0]:.2f} s ({seconds[False][1]} passes), + match_outputs "
              f"{seconds[True][0]:.2f} s ({seconds[True][1]} passes): {ratios[-1]:.2f}x", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()

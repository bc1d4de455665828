"""Mixed precision to a size target on a trained CIFAR-10 ResNet-20: allocation against uniform widths.

    python examples/cifar.py --model resnet20 --epochs 30 --save-fp32 r20.pt     # train once
    OMP_NUM_THREADS=1 python benchmarks/size_target.py --fp32 r20.pt --seeds 0 1 2 3
    OMP_NUM_THREADS=1 python benchmarks/size_target.py --fp32 r20.pt --seeds 0 1 --diffq-penalty 20

Per calibration draw (``--seeds``: 1,024 training images drawn with that seed), every Conv2d and the
classifier, ``compress_model`` with its defaults (``solver="auto"``, damp 0.01, MSE grid):

- ``uniform b``: every module at b bits (b = 3, 2);
- ``alloc @ uniform 3``: ``compress_model(bits=(2, 3, 4, 8), target_bits=<uniform 3-bit's avg_bits>)``,
  the same stored bits per weight (scales and zero points included) as uniform 3-bit;
- ``alloc @ uniform 2 + 0.5``: ``target_bits=<uniform 2-bit's avg_bits> + 0.5``.

The allocation minimises ``--metric`` (default KL of the softmax outputs from the fp32 ones) on the
calibration images, with ``--steps`` model evaluations. Reported on the 846 test images of the shared
subset: top-1 accuracy (1 image = 0.12 points), KL(p_fp32 || p_quantized) per image, and the seconds of
each ``compress_model`` call with its ratio to the uniform 3-bit call of the same draw (same process, same
load). Means ± standard error over the draws.

``--prune s``: instead, OBS pruning (prune-only) to s in every module against ``target_sparsity=s``
(levels 0, 0.05, ..., 0.95 per module from each module's OBS trace, as many weights removed in all).

``--diffq-penalty P``: DiffQ (``OBCQuantize(finetune="noise")``, the recipe of the README's fine-tuning
section: from 4 bits, ``--diffq-epochs`` epochs at lr 0.002, bits' Adam lr 0.03, BatchNorm re-estimated
over 36 augmented training batches) once per seed, then the allocation at DiffQ's achieved
``avg_bits`` (post-training, and with the same BatchNorm re-estimation).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cifar import DEFAULT_SUBSET, CifarClassifier, CifarDataModule, evaluate, load_subset

from obc_lightning import compress_model
from obc_lightning.batchnorm import reestimate_batchnorm


@torch.no_grad()
def kl_to(ref: torch.nn.Module, model: torch.nn.Module, loader) -> float:
    """Mean over the images of KL(softmax(ref(x)) || softmax(model(x)))."""
    ref.eval()
    model.eval()
    total, n = 0.0, 0
    for x, _ in loader:
        lp0, lp = F.log_softmax(ref(x).double(), -1), F.log_softmax(model(x).double(), -1)
        total += float((lp0.exp() * (lp0 - lp)).sum())
        n += len(x)
    return total / n


def mean_se(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.4g}"
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return f"{m:.4g} ± {se:.2g}"


def bn_batches(dm: CifarDataModule, n: int, seed: int) -> list:
    torch.manual_seed(seed)
    out = []
    for x, _ in dm.train_dataloader():
        out.append(x)
        if len(out) >= n:
            break
    return out


def run_diffq(lit, dm, args, seed: int) -> tuple[torch.nn.Module, dict]:
    import lightning as L
    from cifar import FinetuneClassifier

    from obc_lightning.callback import OBCQuantize

    L.seed_everything(seed, workers=True)
    model = FinetuneClassifier("resnet20", lr=0.002)
    model.load_state_dict(lit.state_dict())
    cb = OBCQuantize(bits=4, finetune="noise", finetune_epochs=args.diffq_epochs, noise_penalty=args.diffq_penalty,
                     noise_bits_lr=0.03, recalibrate_bn=36, monitor="val_acc", calibration_batches=8,
                     plot=False, verbose=False)
    trainer = L.Trainer(max_epochs=args.diffq_epochs, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return model, {"avg_bits": cb.metrics["obc/avg_bits"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", required=True, help="state dict of examples/cifar.py's CifarClassifier")
    ap.add_argument("--subset", default=str(DEFAULT_SUBSET))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--images", type=int, default=1024, help="calibration images per draw")
    ap.add_argument("--metric", default="kl", choices=["kl", "mse"])
    ap.add_argument("--steps", type=int, default=16, help="allocation_steps")
    ap.add_argument("--skip-2bit", action="store_true")
    ap.add_argument("--diffq-only", action="store_true", help="with --diffq-penalty: uniform 3-bit and the DiffQ rows")
    ap.add_argument("--diffq-penalty", type=float, default=None)
    ap.add_argument("--diffq-epochs", type=int, default=5)
    ap.add_argument("--prune", type=float, default=None,
                    help="instead: uniform OBS pruning to this sparsity against target_sparsity (prune-only)")
    ap.add_argument("--json", default=None, help="append one JSON line per run")
    args = ap.parse_args()

    lit = CifarClassifier("resnet20")
    lit.load_state_dict(torch.load(args.fp32, map_location="cpu", weights_only=True))
    lit.eval()
    dm = CifarDataModule(load_subset(args.subset))
    val = dm.val_dataloader()
    fp32 = evaluate(lit, val)
    print(f"ResNet-20, fp32 accuracy {fp32:.2f} % on {len(val.dataset)} test images; calibration {args.images} "
          f"images per draw, seeds {args.seeds}; allocation metric {args.metric}, {args.steps} evaluations; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}",
          flush=True)
    rows: dict[str, dict[str, list]] = {}

    def record(name: str, seed: int, model, report=None, seconds=None, base_seconds=None, extra=None):
        r = dict(run=name, seed=seed, acc=evaluate(model, val), kl=kl_to(lit, model, val))
        if report is not None:
            r.update(avg_bits=report.avg_bits, size_mb=report.bytes_after / 2**20,
                     calibration_s=report.calibration_seconds)
            a = report.allocation
            if a is not None:
                r.update(bits=report.bits, calib_error=a.error, calib_uniform=a.uniform, evaluations=a.evaluations,
                         database_s=a.database_seconds, search_s=a.search_seconds, history=a.history)
        if seconds is not None:
            r["seconds"] = seconds
        if base_seconds:
            r["cost_ratio"] = seconds / base_seconds
        r.update(extra or {})
        d = rows.setdefault(name, {})
        for k in ("acc", "kl", "avg_bits", "seconds", "cost_ratio"):
            if k in r:
                d.setdefault(k, []).append(r[k])
        print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = compress_model(*a, **kw)
        return out, time.perf_counter() - t0

    for seed in args.seeds:
        calib = dm.calibration_batches(args.images, seed=seed)
        if args.prune is not None:
            s = args.prune
            m = copy.deepcopy(lit)
            rep, base = timed(m, calib, None, sparsity=s)
            record(f"OBS {s:.0%} in every module", seed, m, rep, base, base, extra={"sparsity": rep.sparsity})
            m = copy.deepcopy(lit)
            rep, secs = timed(m, calib, None, target_sparsity=s, allocation_metric=args.metric,
                              allocation_steps=args.steps, seed=seed)
            record(f"OBS target_sparsity={s:g}", seed, m, rep, secs, base, extra={
                "sparsity": rep.sparsity, "levels": {x.name: x.sparsity for x in rep.modules}})
            continue
        uniform = {}
        for bits in (3,) if args.skip_2bit or args.diffq_only else (3, 2):
            m = copy.deepcopy(lit)
            rep, secs = timed(m, calib, bits)
            uniform[bits] = (rep, secs)
            record(f"uniform {bits}-bit", seed, m, rep, secs, uniform[3][1])
        targets = [("alloc @ uniform 3-bit", uniform[3][0].avg_bits)] + (
            [] if 2 not in uniform else [("alloc @ uniform 2-bit + 0.5", uniform[2][0].avg_bits + 0.5)])
        for name, target in [] if args.diffq_only else targets:
            m = copy.deepcopy(lit)
            rep, secs = timed(m, calib, bits=(2, 3, 4, 8), target_bits=target, allocation_metric=args.metric,
                              allocation_steps=args.steps, seed=seed)
            record(name, seed, m, rep, secs, uniform[3][1])
        if args.diffq_penalty is not None:
            m, info = run_diffq(lit, dm, args, seed)
            record(f"DiffQ penalty {args.diffq_penalty:g}, {args.diffq_epochs} epochs", seed, m, None,
                   info["seconds"], extra={"avg_bits": info["avg_bits"]})
            rows[f"DiffQ penalty {args.diffq_penalty:g}, {args.diffq_epochs} epochs"].setdefault(
                "avg_bits", []).append(info["avg_bits"])
            m = copy.deepcopy(lit)
            rep, secs = timed(m, calib, bits=(2, 3, 4, 8), target_bits=info["avg_bits"],
                              allocation_metric=args.metric, allocation_steps=args.steps, seed=seed)
            record("alloc @ DiffQ's bits", seed, m, rep, secs, uniform[3][1])
            reestimate_batchnorm(m, bn_batches(dm, 36, seed))
            record("alloc @ DiffQ's bits + BN re-estimated", seed, m, rep)

    print(f"\n| run | avg bits | accuracy (fp32 {fp32:.2f}) | KL to fp32 | seconds | x uniform 3-bit |")
    print("|---|---|---|---|---|---|")
    for name, d in rows.items():
        print(f"| {name} | {mean_se(d.get('avg_bits', []))} | {mean_se(d['acc'])} | {mean_se(d['kl'])} | "
              f"{mean_se(d.get('seconds', []))} | {mean_se(d.get('cost_ratio', []))} |")


if __name__ == "__main__":
    main()

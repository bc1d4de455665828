"""Mixed precision to a size target against uniform widths, judged on data the search never saw.

    OMP_NUM_THREADS=1 python benchmarks/size_target.py --model digits-mlp --seeds 0 1 2     # trains in seconds
    python examples/cifar.py --model resnet20 --epochs 30 --save-fp32 r20.pt                # train once
    OMP_NUM_THREADS=1 python benchmarks/size_target.py --fp32 r20.pt --seeds 0 1 2 3
    OMP_NUM_THREADS=1 python benchmarks/size_target.py --fp32 r20.pt --seeds 0 1 --diffq-penalty 20

Models: ``resnet20`` (``--fp32``: a trained CIFAR-10 ResNet-20 of examples/cifar.py; calibration: 1,024
training images drawn with the seed; test: the 846 test images of the shared subset) and ``digits-mlp``
(the overfit case: a 64-256-256-128-10 MLP trained here to ~100 % training accuracy on 1,400 of
scikit-learn's 1,797 digits, the seed drawing the split and the initialisation; calibration: those 1,400
training images; test: the other 397). Every Conv2d / Linear, ``compress_model`` with its defaults
(``--solver``, default ``"auto"``; damp 0.01, MSE grid):

- ``uniform b``: every module at b bits;
- ``target_bits=b``: ``compress_model(bits=(2, 3, 4, 8), target_bits=b)``: b code bits per weight, uniform
  b-bit's own size (scales and zero points cost the same at every width); ``target_bits=b + 0.5`` too.

The allocation judges its assignments (``--metric``, default KL of the softmax outputs from the fp32
ones) on the quarter of the calibration batches it holds out (``allocation_holdout=0.25``; those give no
Hessian), with ``--steps`` model evaluations. Reported: KL(p_fp32 || p_quantized) per image and the
relative output MSE sum ||y - y0||^2 / sum ||y0||^2, on the calibration images (every one, what the
search saw or fitted) and on the test images (never seen), the test top-1 accuracy (one test image =
0.12 points for ResNet-20, 0.25 for the MLP), the code and stored bits per weight, and the seconds of
each ``compress_model`` call with its ratio to the uniform b-bit call of the same draw (same process).
Means ± standard error over the draws.

The targets use ``compress_model``'s default ``allocation_refit`` (the chosen widths solved again on every
calibration batch, as uniform's are); ``--no-refit``: ``allocation_refit=False`` (the weights the search
measured, fitted on three quarters of the batches).
 ``--judged-on-calibration``: also ``target_bits=b`` with ``allocation_holdout=0``, the
search judging its assignments on the batches the Hessians came from (as before held-out selection).

``--prune s`` (resnet20): instead, OBS pruning (prune-only) to s in every module against
``target_sparsity=s`` (levels 0, 0.05, ..., 0.95 per module from each module's OBS trace).

``--diffq-penalty P`` (resnet20): DiffQ (``OBCQuantize(finetune="noise")``, the recipe of the
fine-tuning docs: from 4 bits, ``--diffq-epochs`` epochs at lr 0.002, bits' Adam lr 0.03, BatchNorm
re-estimated over 36 augmented training batches) once per seed, then the allocation at DiffQ's achieved
stored bits per weight as ``target_size_mb`` (post-training, and with the same BatchNorm re-estimation).
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
from cifar import DEFAULT_SUBSET, CifarClassifier, CifarDataModule, load_subset

from obc_lightning import compress_model
from obc_lightning.batchnorm import reestimate_batchnorm


def inputs_of(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def output_errors(ref: torch.nn.Module, model: torch.nn.Module, batches) -> tuple[float, float]:
    """(mean over the images of KL(softmax(ref(x)) || softmax(model(x))), sum ||y - y0||^2 / sum ||y0||^2)."""
    ref.eval()
    model.eval()
    kl, n, se, energy = 0.0, 0, 0.0, 0.0
    for batch in batches:
        x = inputs_of(batch)
        y0, y = ref(x).double(), model(x).double()
        lp0, lp = F.log_softmax(y0, -1), F.log_softmax(y, -1)
        kl += float((lp0.exp() * (lp0 - lp)).sum())
        n += len(x)
        se, energy = se + float((y - y0).square().sum()), energy + float(y0.square().sum())
    return kl / n, se / energy


def digits_task(seed: int):
    """The overfit MLP: (fp32 model, calibration batches, test batches with labels)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(X), generator=g)
    train, test = idx[:1400], idx[1400:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        for b in torch.randperm(1400, generator=g).split(100):
            loss = F.cross_entropy(model(X[train[b]]), y[train[b]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    calib = list(X[train].split(100))
    test_batches = list(zip(X[test].split(100), y[test].split(100)))
    return model, calib, test_batches


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


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
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "digits-mlp"])
    ap.add_argument("--fp32", default=None, help="resnet20: state dict of examples/cifar.py's CifarClassifier")
    ap.add_argument("--subset", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--images", type=int, default=1024, help="resnet20: calibration images per draw")
    ap.add_argument("--metric", default="kl", choices=["kl", "mse"])
    ap.add_argument("--solver", default="auto", choices=["auto", "obc", "gptq"], help="every compress_model call")
    ap.add_argument("--steps", type=int, default=16, help="allocation_steps")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4], help="uniform widths and their targets")
    ap.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.5], help="targets: target_bits=b + offset")
    ap.add_argument("--no-refit", action="store_true", help="targets with allocation_refit=False")
    ap.add_argument("--judged-on-calibration", action="store_true",
                    help="also target_bits=b with allocation_holdout=0: judged on the batches it was fitted to")
    ap.add_argument("--diffq-penalty", type=float, default=None)
    ap.add_argument("--diffq-epochs", type=int, default=5)
    ap.add_argument("--prune", type=float, default=None,
                    help="resnet20, instead: uniform OBS pruning to this sparsity against target_sparsity")
    ap.add_argument("--json", default=None, help="append one JSON line per run")
    args = ap.parse_args()

    lit = dm = None
    if args.model == "resnet20":
        if args.fp32 is None:
            raise SystemExit("--model resnet20 needs --fp32 (train with examples/cifar.py --save-fp32)")
        lit = CifarClassifier("resnet20")
        lit.load_state_dict(torch.load(args.fp32, map_location="cpu", weights_only=True))
        lit.eval()
        dm = CifarDataModule(load_subset(args.subset or DEFAULT_SUBSET))
    print(f"{args.model}; solver {args.solver}; seeds {args.seeds}; allocation metric {args.metric}, "
          f"{args.steps} evaluations, allocation_holdout 0.25; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}", flush=True)
    rows: dict[str, dict[str, list]] = {}
    columns = ("code_bits", "stored_bits", "calib_kl", "calib_mse", "test_kl", "test_mse", "acc", "seconds",
               "cost_ratio")

    def record(name, seed, ref, model, calib, test, report=None, seconds=None, base_seconds=None, extra=None):
        r = dict(run=name, seed=seed, acc=accuracy(model, test))
        r["calib_kl"], r["calib_mse"] = output_errors(ref, model, calib)
        r["test_kl"], r["test_mse"] = output_errors(ref, model, test)
        if report is not None:
            r.update(code_bits=report.avg_code_bits, stored_bits=report.avg_bits,
                     size_mb=report.bytes_after / 2**20, calibration_s=report.calibration_seconds)
            a = report.allocation
            if a is not None:
                r.update(bits=report.bits, heldout=a.heldout, heldout_error=a.error, heldout_uniform=a.uniform,
                         calib_error=a.calibration_error, calib_uniform=a.uniform_calibration, fill=a.fill,
                         fill_upgrades=a.fill_upgrades, evaluations=a.evaluations, database_s=a.database_seconds,
                         search_s=a.search_seconds, history=a.history, refit=a.refit)
        if seconds is not None:
            r["seconds"] = seconds
        if base_seconds:
            r["cost_ratio"] = seconds / base_seconds
        r.update(extra or {})
        d = rows.setdefault(name, {})
        for k in columns:
            if k in r:
                d.setdefault(k, []).append(r[k])
        print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = compress_model(*a, solver=args.solver, **kw)
        return out, time.perf_counter() - t0

    fp_acc = []
    for seed in args.seeds:
        if args.model == "digits-mlp":
            ref, calib, test = digits_task(seed)
        else:
            ref, calib, test = lit, dm.calibration_batches(args.images, seed=seed), dm.val_dataloader()
        fp_acc.append(accuracy(ref, test))
        if args.prune is not None:
            s = args.prune
            m = copy.deepcopy(ref)
            rep, base = timed(m, calib, None, sparsity=s)
            record(f"OBS {s:.0%} in every module", seed, ref, m, calib, test, rep, base, base,
                   extra={"sparsity": rep.sparsity})
            m = copy.deepcopy(ref)
            rep, secs = timed(m, calib, None, target_sparsity=s, allocation_metric=args.metric,
                              allocation_steps=args.steps, seed=seed)
            record(f"OBS target_sparsity={s:g}", seed, ref, m, calib, test, rep, secs, base, extra={
                "sparsity": rep.sparsity, "levels": {x.name: x.sparsity for x in rep.modules}})
            continue
        base = None  # the seconds of uniform b-bit, the baseline of b's targets
        for b in args.widths:
            m = copy.deepcopy(ref)
            rep, secs = timed(m, calib, b)
            base = secs
            record(f"uniform {b}-bit", seed, ref, m, calib, test, rep, secs, base)
            for target in (b + o for o in args.offsets):
                m = copy.deepcopy(ref)
                rep, secs = timed(m, calib, bits=(2, 3, 4, 8), target_bits=target, allocation_metric=args.metric,
                                  allocation_steps=args.steps, seed=seed,
                                  **({"allocation_refit": False} if args.no_refit else {}))
                record(f"target_bits={target:g}" + (", no refit" if args.no_refit else ""), seed, ref, m, calib, test,
                       rep, secs, base)
            if args.judged_on_calibration:
                m = copy.deepcopy(ref)
                rep, secs = timed(m, calib, bits=(2, 3, 4, 8), target_bits=b, allocation_metric=args.metric,
                                  allocation_steps=args.steps, seed=seed, allocation_holdout=0)
                record(f"target_bits={b:g}, judged on the calibration batches", seed, ref, m, calib, test, rep, secs,
                       base)
        if args.diffq_penalty is not None and args.model == "resnet20":
            m, info = run_diffq(lit, dm, args, seed)
            name = f"DiffQ penalty {args.diffq_penalty:g}, {args.diffq_epochs} epochs"
            record(name, seed, ref, m, calib, test, None, info["seconds"], extra={"stored_bits": info["avg_bits"]})
            rows[name].setdefault("stored_bits", []).append(info["avg_bits"])
            uniform = copy.deepcopy(ref)
            rep3 = compress_model(uniform, calib, 3, solver=args.solver)  # MB per stored bit, from its report
            mb = (rep3.bytes_after + (info["avg_bits"] - rep3.avg_bits) * rep3.quantized_weights / 8) / 2**20
            m = copy.deepcopy(ref)
            rep, secs = timed(m, calib, bits=(2, 3, 4, 8), target_size_mb=mb, allocation_metric=args.metric,
                              allocation_steps=args.steps, seed=seed)
            record("alloc @ DiffQ's size", seed, ref, m, calib, test, rep, secs, base)
            reestimate_batchnorm(m, bn_batches(dm, 36, seed))
            record("alloc @ DiffQ's size + BN re-estimated", seed, ref, m, calib, test, rep)

    print(f"\n| run | code bits | stored bits | calibration KL | calibration rel. MSE | test KL | test rel. MSE | "
          f"test accuracy (fp32 {mean_se(fp_acc)}) | seconds | x uniform b-bit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, d in rows.items():
        print(f"| {name} | " + " | ".join(mean_se(d.get(k, [])) for k in columns[:8]) + " | "
              + mean_se(d.get("cost_ratio", [])) + " |")


if __name__ == "__main__":
    main()

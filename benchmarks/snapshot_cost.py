"""What the callback's failure guarantee costs: the copy of the model kept on the CPU until its work is done.

    python benchmarks/snapshot_cost.py

Before it touches the model, ``OBCQuantize`` takes a :class:`~obc_lightning.pipeline.ModelSnapshot` (every
parameter and buffer copied to the CPU) and keeps it until compression, evaluation and export succeeded, or,
with fine-tuning, until fine-tuning ended; on a failure it is copied back. The table gives the snapshot's
size, the time to take it and to restore it, and, for scale, one ``compress_model`` of the same model at 4
bits on 4 batches of 64 CIFAR-sized inputs (best of 5 for the copies, one compression run). Times are CPU
time of this process with one thread (``time.process_time``): on a shared machine wall time measures the
neighbours.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from obc_lightning import compress_model
from obc_lightning.models import resnet18, resnet20
from obc_lightning.pipeline import ModelSnapshot


def best_of(fn, n=5) -> float:
    times = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    p.add_argument("--compress", nargs="*", default=["resnet20"],
                   help="models also compressed for scale (ResNet-18 takes many minutes on one CPU thread)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, device {args.device}")
    print(f"{'model':<10}{'snapshot MB':>13}{'take s':>10}{'restore s':>11}{'compress s':>12}{'take / compress':>17}")
    for name in args.models:
        model = {"resnet20": resnet20, "resnet18": resnet18}[name]().to(args.device).eval()
        batches = [torch.randn(64, 3, 32, 32, device=args.device) for _ in range(4)]
        snap = ModelSnapshot(model)
        take = best_of(lambda: ModelSnapshot(model))  # noqa: B023
        restore = best_of(snap.restore)
        if name not in args.compress:
            print(f"{name:<10}{snap.nbytes / 2**20:>13.2f}{take:>10.4f}{restore:>11.4f}{'-':>12}{'-':>17}")
            continue
        t0 = time.process_time()
        compress_model(model, batches, bits=4)
        compress = time.process_time() - t0
        print(f"{name:<10}{snap.nbytes / 2**20:>13.2f}{take:>10.4f}{restore:>11.4f}{compress:>12.2f}"
              f"{take / compress:>17.2e}")


if __name__ == "__main__":
    main()

"""Deployment: the compressed model as ONNX in ONNX Runtime against the float ONNX of the same model.

    OMP_NUM_THREADS=1 python benchmarks/deploy.py                    # every model, one thread
    python benchmarks/deploy.py --models mlp --bits 4 --runs 50

Per model and width: the file (``export_onnx`` against ``torch.onnx.export`` of the float model), the peak
resident memory of a process that opens an ONNX Runtime session and runs one serving batch (minus the same
process before the session: Python, numpy, onnxruntime), the median latency at batch 1 and at a serving
batch, for the float ONNX, the compressed file in exact mode (``MatMulNBits`` ``accuracy_level=0``) and in
fast mode (``export_onnx(..., mode="fast")``: ``accuracy_level=4``, int8 activations inside the op), all
measured in the same run, sessions interleaved run by run (the lowest of three medians), one intra-op
thread. Task metrics: CIFAR-10 accuracy on the real test subset (``shared/data/cifar10_subset.npz``, a
ResNet-20 trained here for ``--epochs`` on its 4,660 training
images), the mean cosine between the fast and exact sentence embeddings of the MiniLM-shaped encoder
(random weights: its shapes and ops, not its training), the relative error of the MLP's fast outputs.

Models: ``mlp``: six Linear 384 <-> 1536 with GELU (one input row: a Linear-heavy classifier head or one
token at a time); ``resnet20``: CIFAR ResNet-20; ``encoder``: all-MiniLM-L6-v2's shapes (6 layers, hidden
384, 12 heads, intermediate 1536, vocabulary 30522), one sentence of 32 tokens. Compression: GPTQ
(``solver="gptq"``) on random calibration inputs (the MLP, the encoder) or 512 training images.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's obc_lightning first
from torch import nn
from torch.nn import functional as F

from obc_lightning import compress_model, export_onnx, inference_session
from obc_lightning.models import resnet20

HERE = Path(__file__).resolve().parent
SUBSET = HERE.parent.parent / "shared" / "data" / "cifar10_subset.npz"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [nn.Linear(384, 1536) if i % 2 == 0 else nn.Linear(1536, 384), nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


def encoder() -> nn.Module:
    sys.path.insert(0, str(HERE))
    from transformer import SentenceBert

    torch.manual_seed(0)
    model = SentenceBert().eval()
    for p in model.parameters():  # BERT's initialisation: N(0, 0.02) weights
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
    return model


def cifar(subset: Path, epochs: int, cache: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ResNet-20 trained on the subset (cached), the calibration images, the test images and labels."""
    with np.load(subset) as z:
        tx, ty, vx, vy = (torch.from_numpy(z[k]) for k in ("train_x", "train_y", "test_x", "test_y"))
    norm = lambda x: (x.float() / 255 - 0.5) / 0.25  # noqa: E731
    model = resnet20()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = epochs * (len(tx) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(tx))
            for i in range(0, len(tx) - 63, 64):
                idx = perm[i : i + 64]
                x = norm(tx[idx])
                x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
                loss = F.cross_entropy(model(x), ty[idx].long())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.save(model.state_dict(), cache)
    return model.eval(), norm(tx[:512]), norm(vx), vy.long()


def export_float(model, path, args, dynamic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=True, opset_version=21, dynamic_shapes=dynamic, verbose=False,
                          external_data=False)


def median_ms(sessions: dict, feed: dict, runs: int, rounds: int = 3) -> dict[str, float]:
    """Latency of each session: the median of ``runs`` runs, sessions interleaved run by run, the lowest of
    ``rounds`` such medians (a burst of load on a shared machine spoils a round, not the result)."""
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    best = {k: float("inf") for k in sessions}
    for _ in range(rounds):
        times = {k: [] for k in sessions}
        for _ in range(runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        best = {k: min(best[k], 1e3 * statistics.median(v)) for k, v in times.items()}
    return best


RSS_SCRIPT = """
import sys, numpy as np, onnxruntime
from obc_lightning import inference_session
def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
feed = dict(np.load(sys.argv[2]))
base = kb('VmRSS')
s = inference_session(sys.argv[1], threads=1)
s.run(None, feed)
print(kb('VmHWM') - base)
"""


def session_rss_mb(path: str, feed: dict, tmp: str) -> float:
    """Peak RSS of a fresh process opening the session and running the feed, above its RSS before it."""
    npz = os.path.join(tmp, "feed.npz")
    np.savez(npz, **feed)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, npz], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)})
    return int(out.stdout.split()[-1]) / 1024


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    import onnxruntime as ort

    return (f"{model}, {os.cpu_count()} cores, 1 intra-op thread; Python {platform.python_version()}, torch "
            f"{torch.__version__}, onnxruntime {ort.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20", "encoder"])
    p.add_argument("--bits", type=int, nargs="+", default=None, help="widths (default: per model)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--subset", type=Path, default=SUBSET, help=f"CIFAR-10 subset npz (default {SUBSET})")
    p.add_argument("--epochs", type=int, default=4, help="ResNet-20 training epochs on the subset")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "deploy_resnet20.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            g = torch.Generator().manual_seed(0)
            metric = None
            if name == "mlp":
                model, widths = mlp(), args.bits or [2, 4, 8]
                calib = [torch.randn(64, 384, generator=g) for _ in range(4)]
                one, serving = (torch.randn(1, 384, generator=g),), (torch.randn(128, 384, generator=g),)
                dyn, serve_label = ({0: torch.export.Dim.AUTO},), "128 rows"
            elif name == "resnet20":
                model, calib_x, vx, vy = cifar(args.subset, args.epochs, args.cache)
                widths = args.bits or [2, 4, 8]
                calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
                one, serving = (vx[:1],), (vx[:32],)
                dyn, serve_label = ({0: torch.export.Dim.AUTO},), "32 images"
            else:
                model, widths = encoder(), args.bits or [4]
                ids = [torch.randint(1000, 30000, (b, 32), generator=g) for b in (8, 8, 8, 8, 1, 16)]
                calib = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids[:4]]
                one, serving = (ids[4], torch.ones_like(ids[4])), (ids[5], torch.ones_like(ids[5]))
                auto = torch.export.Dim.AUTO
                dyn, serve_label = ({0: auto, 1: auto},) * 2, "16 x 32 tokens"
            fpath = os.path.join(tmp, f"{name}_float.onnx")
            state = {k: v.clone() for k, v in model.state_dict().items()}
            export_float(model, fpath, serving, dyn)
            for bits in widths:
                model.load_state_dict(state)
                compress_model(model, calib, bits=bits, solver="gptq", progress=False)
                qpath, fast_path = (os.path.join(tmp, f"{name}_{bits}_{m}.onnx") for m in ("exact", "fast"))
                export_onnx(model, qpath, serving, dynamic_shapes=dyn)
                export_onnx(model, fast_path, serving, dynamic_shapes=dyn, mode="fast")
                sessions = {"float": inference_session(fpath, threads=1),
                            "exact": inference_session(qpath, threads=1),
                            "fast": inference_session(fast_path, threads=1)}
                names = [i.name for i in sessions["float"].get_inputs()]
                feed1 = {n: x.numpy() for n, x in zip(names, one)}
                feedn = {n: x.numpy() for n, x in zip(names, serving)}
                t1, tn = median_ms(sessions, feed1, args.runs), median_ms(sessions, feedn, max(5, args.runs // 3))
                rss = {k: session_rss_mb(pth, feedn, tmp)
                       for k, pth in (("float", fpath), ("q", qpath), ("fast", fast_path))}
                if name == "resnet20":
                    acc = {}
                    for k, s in sessions.items():
                        pred = np.concatenate([s.run(None, {names[0]: vx[i : i + 128].numpy()})[0].argmax(1)
                                               for i in range(0, len(vx), 128)])
                        acc[k] = 100 * float((torch.from_numpy(pred) == vy).float().mean())
                    metric = f"acc {acc['float']:.2f} / {acc['exact']:.2f} / {acc['fast']:.2f}"
                else:
                    outs = {k: torch.from_numpy(s.run(None, feedn)[0]) for k, s in sessions.items()}
                    if name == "encoder":
                        cos = F.cosine_similarity(outs["fast"], outs["exact"], dim=-1).mean()
                        cos_f = F.cosine_similarity(outs["exact"], outs["float"], dim=-1).mean()
                        metric = f"cos(fast, exact) {cos:.5f}; cos(exact, float) {cos_f:.4f}"
                    else:
                        rel = (outs["fast"] - outs["exact"]).norm() / outs["exact"].norm()
                        metric = f"fast vs exact rel. {rel:.1e}"
                fmb, qmb = os.path.getsize(fpath) / 2**20, os.path.getsize(qpath) / 2**20
                rows.append(
                    f"| {name} | {bits} | {fmb:.2f} / {qmb:.2f} ({fmb / qmb:.1f}x) | "
                    f"{rss['float']:.0f} / {rss['q']:.0f} / {rss['fast']:.0f} | "
                    f"{t1['float']:.3f} / {t1['exact']:.3f} / {t1['fast']:.3f} | "
                    f"{t1['float'] / t1['exact']:.2f}x / {t1['float'] / t1['fast']:.2f}x | {serve_label}: "
                    f"{tn['float']:.2f} / {tn['exact']:.2f} / {tn['fast']:.2f} | "
                    f"{tn['float'] / tn['exact']:.2f}x / {tn['float'] / tn['fast']:.2f}x | {metric} |"
                )
                print(rows[-1], flush=True)
    print()
    print("| model | bits | file MB float / compressed | session peak RSS MB float / exact / fast | batch 1 ms "
          "float / exact / fast | speed-up exact / fast | serving batch ms float / exact / fast | speed-up exact / "
          "fast | task (float / exact / fast) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

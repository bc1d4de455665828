"""OBS pruning vs magnitude pruning per layer: 50 % unstructured and 2:4, objective and seconds.

    python benchmarks/prune.py                  # synthetic CNN-like layers and a ResNet-20 layer, CPU
    python benchmarks/prune.py --device cuda
    python benchmarks/prune.py --published /path/to/IST-DASLab/OBC   # also its trueobs.py (not shipped)

Objective: sum over rows of 1/2 (p - w) H (p - w)^T (H damped by 1 % of its mean diagonal, as the solver
sees it), relative to plain magnitude pruning (= 1.000). Rows:
- magnitude: the smallest |w| (over the layer / in every group of 4 input channels), no compensation;
- magnitude+comp: the same mask, kept weights set to their optimal values (closed form);
- OBS: :func:`obs_prune` (greedy OBS, global selection / N:M-restricted steps, fast engine);
- published (with ``--published``): IST-DASLab/OBC ``TrueOBS`` on the same W and H, as a 3x3 Conv2d
  (``prepare_unstr`` + ``prune_unstr`` for unstructured, ``nmprune`` for N:M along the input channels).
ResNet-20 layer: random weights (no training), Hessian from random CIFAR-sized inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

import torch
import torch.nn.functional as F

from obc_lightning.calibration import collect_hessians
from obc_lightning.models import resnet20
from obc_lightning.solvers.common import layer_objective
from obc_lightning.solvers.prune import compensate, conv_nm_group_index, magnitude_prune, obs_prune

DAMP = 0.01


def cnn_layer(c_in: int, rows: int, gen: torch.Generator, n_img: int = 64):
    """3x3 conv on smooth, channel-correlated images: d = 9 c_in correlated inputs (as benchmarks/solvers)."""
    x = torch.randn(n_img, c_in, 20, 20, generator=gen)
    x = F.avg_pool2d(x, 5, stride=1)
    x = torch.einsum("nchw,cd->ndhw", x, torch.eye(c_in) + 0.5 * torch.randn(c_in, c_in, generator=gen))
    X = F.unfold(F.relu(x), 3).transpose(1, 2).reshape(-1, 9 * c_in)  # column c * 9 + k, as conv weights
    W = torch.randn(rows, 9 * c_in, generator=gen) / (9 * c_in) ** 0.5
    return W, 2 / X.shape[0] * X.T @ X, c_in


def resnet20_layer(name: str, gen: torch.Generator):
    torch.manual_seed(0)
    model = resnet20().eval()
    batches = [torch.randn(64, 3, 32, 32, generator=gen) for _ in range(4)]
    m = dict(model.named_modules())[name]
    lh = collect_hessians(model, batches, {name: m}, warn=False)[name]
    return m.weight.detach().reshape(m.weight.shape[0], -1), lh.hessians[0], m.in_channels


def published_prune(path: str, W, H, c_in: int, kw: dict):
    """IST-DASLab/OBC's ``TrueOBS`` pruning of the same problem (a checkout the user points at)."""
    sys.path.insert(0, path)
    from trueobs import TrueOBS

    layer = torch.nn.Conv2d(c_in, W.shape[0], 3, bias=False).to(W.device)
    layer.weight.data = W.reshape(W.shape[0], c_in, 3, 3).clone()
    obs = TrueOBS(layer, rel_damp=DAMP)
    obs.H = H.double().clone()
    sync = torch.cuda.synchronize
    if W.device.type != "cuda":
        torch.cuda.synchronize = lambda *a, **k: None  # it calls this unconditionally
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            if "sparsity" in kw:
                obs.prepare_unstr()
                P = obs.prune_unstr([kw["sparsity"]])[0]
            else:
                n, m = kw["n_m"]
                obs.nmprune(m - n, m)  # its (n, m) counts the weights removed per group; ours those kept
                P = layer.weight.data.reshape(W.shape[0], -1)
            return P.to(W.dtype), time.perf_counter() - t0
    finally:
        torch.cuda.synchronize = sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--published", default=None, help="path to a checkout of IST-DASLab/OBC to compare with")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    layers = [
        ("cnn c16 (64 x 144)", *cnn_layer(16, 64, gen)),
        ("cnn c32 (64 x 288)", *cnn_layer(32, 64, gen)),
        ("resnet20 layer2.1.conv1", *resnet20_layer("layer2.1.conv1", gen)),
    ]
    print(f"{'layer':<26}{'pattern':<8}{'method':<16}{'objective':>12}{'rel':>8}{'seconds':>9}")
    for name, W, H, c_in in layers:
        W, H = W.to(args.device), H.to(args.device, W.dtype)
        Hd = H + DAMP * H.diagonal().mean() * torch.eye(H.shape[0], device=H.device)
        gi = conv_nm_group_index(c_in, W.shape[1] // c_in, 4).to(args.device)
        gi4 = gi
        patterns = (("50%", dict(sparsity=0.5)), ("2:4", dict(n_m=(2, 4), group_index=gi4)),
                    ("1:4", dict(n_m=(1, 4), group_index=gi4)))
        for pattern, kw in patterns:
            t0 = time.perf_counter()
            mask = magnitude_prune(W, **kw)
            t_mag = time.perf_counter() - t0
            t0 = time.perf_counter()
            comp = compensate(W, Hd, ~mask, 64)
            t_comp = t_mag + time.perf_counter() - t0
            t0 = time.perf_counter()
            res = obs_prune(W, H, damp=DAMP, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t_obs = time.perf_counter() - t0
            base = float(layer_objective(W, W * mask, Hd).sum())
            rows = [("magnitude", W * mask, t_mag), ("magnitude+comp", comp, t_comp), ("OBS", res.pruned_matrix, t_obs)]
            if args.published:
                rows.append(("published", *published_prune(args.published, W, H, c_in, kw)))
            for method, P, t in rows:
                obj = float(layer_objective(W, P, Hd).sum())
                print(f"{name:<26}{pattern:<8}{method:<16}{obj:>12.4g}{obj / base:>8.3f}{t:>9.3f}")


if __name__ == "__main__":
    main()

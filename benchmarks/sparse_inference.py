"""2:4 Linear layers on sparse tensor cores (``to_semi_structured``) against the same layers dense.

    python benchmarks/sparse_inference.py                      # needs a CUDA GPU, compute capability >= 8.0
    python benchmarks/sparse_inference.py --tokens 4096 --dtype bfloat16 --backend cutlass

For each (in, out) shape: a 2:4 weight (2 random non-zeros in every 4 inputs), a batch of ``tokens``
input rows, and the median time of the Linear forward dense (cuBLAS, the zeros multiplied) and with
the weight as a semi-structured sparse tensor, measured with ``torch.utils.benchmark`` (CUDA-synchronised)
in the same run; the speed-up is their ratio, and the last column the largest difference of the outputs.
There is nothing to measure without such a GPU: the CPU path of the library keeps 2:4 weights dense.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from obc_lightning.semi_structured import BACKENDS, MIN_CAPABILITY, default_backend, to_semi_structured

SHAPES = [(768, 3072), (3072, 768), (4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): BERT-base, LLaMA-7B


def two_of_four(rows: int, cols: int, dtype, device) -> torch.Tensor:
    w = torch.randn(rows, cols // 4, 4, device=device)
    keep = torch.rand(rows, cols // 4, 4, device=device).argsort(-1) < 2
    return (w * keep).reshape(rows, cols).to(dtype)


def median_ms(fn, *args) -> float:
    timer = benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args})
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="input rows per forward")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--backend", choices=sorted(BACKENDS), default=None, help=f"default: {default_backend()}")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < MIN_CAPABILITY:
        sys.exit("sparse_inference.py needs a CUDA GPU with compute capability >= 8.0; nothing measured")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"backend {args.backend or default_backend()}, {args.tokens} tokens")
    print("| in × out | dense (ms) | 2:4 semi-structured (ms) | speed-up | max abs diff |\n|---|---|---|---|---|")
    for cols, rows in SHAPES:
        layer = nn.Linear(cols, rows, device="cuda", dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(two_of_four(rows, cols, dtype, "cuda"))
            x = torch.randn(args.tokens, cols, device="cuda", dtype=dtype)
            w, b = layer.weight.detach().clone(), layer.bias.detach()
            dense_out = F.linear(x, w, b)
            dense = median_ms(F.linear, x, w, b)
            to_semi_structured(nn.Sequential(layer), backend=args.backend)
            diff = float((layer(x) - dense_out).abs().max())
            sparse = median_ms(layer, x)
        print(f"| {cols} × {rows} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f}× | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()

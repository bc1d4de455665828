"""One command for a GPU machine: the CUDA tests and the solver-engine table of issue 24.

    python benchmarks/gpu_check.py            # on a CUDA machine (torch, lightning, triton; no internet)
    python benchmarks/gpu_check.py --cpu-smoke  # a tiny version of every part on CPU (kernels interpreted)

Parts, each skipped with a printed note when the time left (8 minutes in all) is too short:
1. the ``cuda``-marked tests (``pytest -m cuda tests``): fused float32 vs the CPU torch path within 0.1 %
   of the total loss, no host sync in the step loops (``torch.cuda.set_sync_debug_mode("error")``), the
   memory budget against ``torch.cuda.max_memory_allocated``, the TF32 guard, the callback on one GPU;
2. ResNet-18 and ResNet-50 conv/fc layer sets (real shapes, random weights, Hessians of correlated
   synthetic feature maps unfolded with each layer's kernel): seconds for ``exact_obc`` and the default
   ``quantize_weight`` (``auto``), peak memory, over all layers solved one after the other, then the same
   batched by width (``quantize_weights`` once per input width: ExactOBC as ``solver="obc",
   polish=False``; ``auto`` checked to give the same codes as layer after layer);
3. launches per column step (``torch.profiler``, CUDA kernels / input columns) on one layer;
4. the fused engine against the in-place reference loop (``method="reference"``, on a row subset,
   scaled to all rows) on two shapes;
5. with more than one GPU: the default solver over each layer set shared out over all GPUs
   (``solve_modules(distributed=True)``, NCCL, one process per GPU), against one GPU batched by width.
Nothing here is a pass/fail of speed: it prints what it measured, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from obc_lightning import exact_obc, quantize_weight  # noqa: E402
from obc_lightning.kernels import ENV, triton_available  # noqa: E402
from obc_lightning.solvers.quantize import quantize_weights  # noqa: E402

TOTAL_S = 480.0
T0 = time.perf_counter()


def left() -> float:
    return TOTAL_S - (time.perf_counter() - T0)


def note(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------ layer sets (out, in, kernel)
def resnet18_layers() -> list[tuple[str, int, int, int]]:
    out = [("conv1", 64, 3, 7)]
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            name = f"layer{stage}.{block}"
            out.append((f"{name}.conv1", width, cin, 3))
            out.append((f"{name}.conv2", width, width, 3))
            if block == 0 and cin != width:
                out.append((f"{name}.downsample", width, cin, 1))
            cin = width
    out.append(("fc", 1000, 512, 1))
    return out


def resnet50_layers() -> list[tuple[str, int, int, int]]:
    out = [("conv1", 64, 3, 7)]
    cin = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            out.append((f"{name}.conv1", width, cin, 1))
            out.append((f"{name}.conv2", width, width, 3))
            out.append((f"{name}.conv3", 4 * width, width, 1))
            if block == 0:
                out.append((f"{name}.downsample", 4 * width, cin, 1))
            cin = 4 * width
    out.append(("fc", 1000, 2048, 1))
    return out


def tiny_layers() -> list[tuple[str, int, int, int]]:
    return [("conv1", 8, 3, 3), ("conv2", 8, 8, 3), ("conv3", 8, 8, 3), ("proj", 16, 8, 1), ("fc", 10, 16, 1)]


def synthetic_hessian(cin: int, k: int, device, samples: int, seed: int = 0) -> torch.Tensor:
    """H = 2/N X^T X of feature maps with correlated channels and smooth space, unfolded k x k (padding
    k // 2) as the layer sees them: the layer's real geometry, synthetic data."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1000 * cin + k)
    side = 8
    n_img = max(2, -(-samples // (side * side)))
    mix = (torch.eye(cin) + 0.5 * torch.randn(cin, cin, generator=g) / cin**0.5).to(device)
    x = torch.randn(n_img, side, side, cin, generator=g).to(device) @ mix
    x = x.permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) + 0.3 * x  # spatial correlation
    x = x * torch.exp(0.5 * torch.randn(cin, generator=g)).to(device).view(1, -1, 1, 1)
    X = torch.nn.functional.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, cin * k * k)
    return 2 * X.T @ X / X.shape[0]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ parts
def part_tests(smoke: bool) -> None:
    need = 20 if smoke else 150
    if left() < need:
        note(f"SKIPPED the cuda tests: {left():.0f} s left")
        return
    note("part 1: pytest -m cuda tests")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, min(240, left() - 60)))
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
        print(tail, flush=True)
    except subprocess.TimeoutExpired:
        note("the cuda tests ran past their time and were stopped")


def layer_problems(layers, device, hess: dict, rows_cap=None, dtype=torch.float32):
    """(name, W, H) of every layer: random W (seeded by the layer's index), the synthetic H of its geometry."""
    out = []
    for i, (name, cout, cin, k) in enumerate(layers):
        d = cin * k * k
        if (cin, k) not in hess:
            hess[(cin, k)] = synthetic_hessian(cin, k, device, samples=max(256, 2 * d))
        rows = cout if rows_cap is None else min(cout, rows_cap)
        W = torch.randn(rows, d, generator=torch.Generator().manual_seed(i)).to(device, dtype)
        out.append((name, W, hess[(cin, k)]))
    return out


MODES = ("exact_obc", "auto", "exact_obc, batched by width", "auto, batched by width")


def part_networks(device, smoke: bool) -> dict:
    """Each layer set solved layer after layer (``exact_obc``; ``quantize_weight``, the default ``auto``),
    then batched by width (``quantize_weights`` per width: ``solver="obc", polish=False`` for ExactOBC)."""
    nets = {"tiny": tiny_layers()} if smoke else {"ResNet-18": resnet18_layers(), "ResNet-50": resnet50_layers()}
    rows_cap = 4 if smoke else None
    results = {}
    hess: dict[tuple[int, int], torch.Tensor] = {}
    for net, layers in nets.items():
        probs = layer_problems(layers, device, hess, rows_cap)
        widths: dict[int, list[int]] = {}
        for i, (_, W, _) in enumerate(probs):
            widths.setdefault(W.shape[1], []).append(i)
        auto_codes = None
        for mode in MODES:
            est = 10 if smoke else (60 if net == "ResNet-18" else 120)
            if left() < est:
                note(f"SKIPPED {net} {mode}: {left():.0f} s left (needs ~{est} s)")
                continue
            where = f" in {len(widths)} widths" if "batched" in mode else ""
            note(f"part 2: {net}, {mode}, {len(layers)} layers{where}")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            secs, done, codes = 0.0, 0, {}
            if "batched" not in mode:
                for i, (_, W, H) in enumerate(probs):
                    if left() < 15:
                        note(f"stopped {net} {mode} after {done} layers: time")
                        break
                    sync(device)
                    t = time.perf_counter()
                    if mode == "exact_obc":
                        res = exact_obc(W, H, 4, damp=0.01, batch_size=None)
                    else:
                        res = quantize_weight(W, H, 4)
                    sync(device)
                    secs += time.perf_counter() - t
                    codes[i] = res.codes
                    done += 1
            else:
                kw = dict(solver="obc", polish=False) if mode.startswith("exact_obc") else {}
                for idx in widths.values():
                    if left() < 15:
                        note(f"stopped {net} {mode} after {done} layers: time")
                        break
                    sync(device)
                    t = time.perf_counter()
                    out = quantize_weights([(probs[i][1], probs[i][2]) for i in idx], 4, damp=0.01, **kw)
                    sync(device)
                    secs += time.perf_counter() - t
                    codes.update({i: r.codes for i, r in zip(idx, out)})
                    done += len(idx)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            same = ""
            if mode == "auto":
                auto_codes = codes
            elif mode.startswith("auto") and auto_codes is not None:
                common = [i for i in codes if i in auto_codes]
                same = "yes" if all(torch.equal(codes[i], auto_codes[i]) for i in common) else "NO"
                same += f" ({len(common)} layers)"
            results[(net, mode)] = (secs, done, len(layers), peak, same)
    return results


def part_launches(device, smoke: bool) -> list[tuple[str, float]]:
    if left() < (10 if smoke else 40):
        note(f"SKIPPED launches per step: {left():.0f} s left")
        return []
    note("part 3: launches per column step")
    rows, cin, k = (4, 8, 3) if smoke else (128, 128, 3)
    d = cin * k * k
    H = synthetic_hessian(cin, k, device, samples=2 * d)
    W = torch.randn(rows, d, generator=torch.Generator().manual_seed(0)).to(device)
    out = []
    solvers = (("exact_obc", lambda: exact_obc(W, H, 4, damp=0.01)), ("auto", lambda: quantize_weight(W, H, 4)))
    for solver, fn in solvers:
        fn()  # compile outside the profile
        sync(device)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                sync(device)
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        else:
            from obc_lightning.kernels.counting import count_launches

            with count_launches() as c:
                fn()
            kernels = c.total
        out.append((f"{solver} ({rows} x {d})", kernels / d))
    return out


def part_reference(device, smoke: bool) -> list[tuple[str, float, float]]:
    shapes = [(8, 8, 3), (8, 16, 1)] if smoke else [(128, 128, 3), (512, 512, 3)]
    subset = {8: 2} if smoke else {128: 16, 512: 8}
    out = []
    for cout, cin, k in shapes:
        d = cin * k * k
        need = 10 if smoke else (30 if d <= 1152 else 120)
        if left() < need:
            note(f"SKIPPED reference ratio on {cout} x {d}: {left():.0f} s left")
            continue
        note(f"part 4: fused vs reference loop, {cout} x {d}")
        H = synthetic_hessian(cin, k, device, samples=2 * d)
        W = torch.randn(cout, d, generator=torch.Generator().manual_seed(1)).to(device)
        exact_obc(W[:2], H, 4, damp=0.01)  # compile
        sync(device)
        t = time.perf_counter()
        exact_obc(W, H, 4, damp=0.01, batch_size=None)
        sync(device)
        fast = time.perf_counter() - t
        r = subset.get(cout, 2)
        t = time.perf_counter()
        exact_obc(W[:r], H, 4, damp=0.01, method="reference", batch_size=r)
        sync(device)
        ref = (time.perf_counter() - t) * cout / r
        out.append((f"{cout} x {d} (reference on {r} rows, x {cout // r})", fast, ref))
    return out


def _sharded_worker(rank: int, world: int, backend: str, rendezvous: str, net: str, out: str) -> None:
    """One rank of part 5: the layer set as modules on this rank's device, solved with
    ``solve_modules(distributed=True)`` (default ``auto``), every weight written as it arrives."""
    import torch.distributed as dist

    from obc_lightning.calibration import LayerHessian
    from obc_lightning.scheduling import SolveSettings, solve_modules

    dist.init_process_group(backend, init_method="file://" + rendezvous, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layers = {"tiny": tiny_layers(), "ResNet-18": resnet18_layers(), "ResNet-50": resnet50_layers()}[net]
    targets, hessians = {}, {}
    for name, W, H in layer_problems(layers, device, {}, 4 if net == "tiny" else None):
        m = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
        m.weight.data.copy_(W)
        targets[name] = m
        hessians[name] = LayerHessian(name, H.double().unsqueeze(0), 1024, 1)
    settings = SolveSettings(bits=4, solver="auto", damp=0.01, scale_dtype=None)
    dist.barrier()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for solved in solve_modules(hessians, targets, settings, distributed=True):
            targets[solved.name].weight.copy_(solved.weight)
    sync(device)
    secs = time.perf_counter() - t
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{secs}")
    dist.destroy_process_group()


def sharded_main(net: str, backend: str, world: int, out: str) -> None:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sharded_worker, args=(world, backend, os.path.join(tmp, "rendezvous"), net, out), nprocs=world)


def part_sharded(smoke: bool, one_gpu: dict) -> list[tuple]:
    """The default solver shared out over all GPUs (NCCL; with --cpu-smoke: 2 gloo processes on CPU)."""
    world = 2 if smoke else torch.cuda.device_count()
    if not smoke and world < 2:
        return []
    out = []
    for net in (["tiny"] if smoke else ["ResNet-18", "ResNet-50"]):
        need = 30 if smoke else (60 if net == "ResNet-18" else 120)
        if left() < need:
            note(f"SKIPPED sharded {net}: {left():.0f} s left (needs ~{need} s)")
            continue
        note(f"part 5: {net}, auto, shared out over {world} processes")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            res = os.path.join(tmp, "seconds")
            backend = "gloo" if smoke else "nccl"
            cmd = [sys.executable, os.path.abspath(__file__), "--sharded", net, backend, str(world), res]
            try:
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, left() - 20))
            except subprocess.TimeoutExpired:
                note(f"sharded {net} ran past its time and was stopped")
                continue
            if r.returncode != 0 or not os.path.exists(res):
                note(f"sharded {net} failed:\n" + "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:]))
                continue
            secs = float(open(res).read())
        base = one_gpu.get((net, "auto, batched by width"))
        out.append((net, world, secs, base[0] if base and base[1] == base[2] else float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny version of every part on CPU (interpreter)")
    ap.add_argument("--sharded", nargs=4, metavar=("NET", "BACKEND", "WORLD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sharded:  # part 5's processes (run by part_sharded)
        net, backend, world, out = args.sharded
        sharded_main(net, backend, int(world), out)
        return
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --cpu-smoke for the CPU version")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        if not triton_available():
            raise SystemExit("gpu_check --cpu-smoke: triton does not import")
        os.environ[ENV] = "triton"  # the fused kernels, interpreted
    torch.set_float32_matmul_precision("high")  # what Lightning suggests: the solvers must not care
    import triton

    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# gpu_check: {dev}; torch {torch.__version__}, triton {triton.__version__}, "
          f"GPUs: {torch.cuda.device_count()}, kernels: {os.environ.get(ENV, 'auto')}"
          + (" (CPU smoke: interpreter timings mean nothing)" if smoke else ""), flush=True)
    part_tests(smoke)
    nets = part_networks(device, smoke)
    launches = part_launches(device, smoke)
    refs = part_reference(device, smoke)
    sharded = part_sharded(smoke, nets)

    print("\n| network | solver | layers solved | seconds | peak memory (MiB) | codes = one layer at a time |")
    print("|---|---|---|---|---|---|")
    for (net, solver), (secs, done, total, peak, same) in nets.items():
        print(f"| {net} | {solver} | {done} / {total} | {secs:.2f} | {peak:.0f} | {same} |")
    print("\n| launches per column step | count |")
    print("|---|---|")
    for name, per in launches:
        print(f"| {name} | {per:.2f} |")
    print("\n| exact_obc shape | fused engine (s) | reference loop, scaled (s) | ratio |")
    print("|---|---|---|---|")
    for name, fast, ref in refs:
        print(f"| {name} | {fast:.3f} | {ref:.3f} | {ref / fast:.1f}x |")
    if sharded:
        print("\n| network | auto, shared out over | seconds | one device, batched by width (s) | speed-up |")
        print("|---|---|---|---|---|")
        for net, world, secs, base in sharded:
            print(f"| {net} | {world} {'CPU processes (gloo)' if smoke else 'GPUs (NCCL)'} | {secs:.2f} | "
                  f"{base:.2f} | {base / secs:.2f}x |")
    elif not smoke:
        print(f"\nsharding over GPUs: {torch.cuda.device_count()} GPU here, nothing to share out")
    note(f"done in {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()

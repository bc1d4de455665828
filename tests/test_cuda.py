"""GPU checks of the fused solver engine (skipped without CUDA; benchmarks/gpu_check.py runs them)."""

import pytest
import torch

from obc_lightning import exact_obc, quantize_weight
from obc_lightning.grids import fit_grid
from obc_lightning.kernels import use_triton

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore::UserWarning:triton"),
]


def problem(rows, cols, seed=0, samples=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(samples or 4 * cols, cols, generator=g)
    X = X @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


def fp32_tolerance(solver, W, H) -> tuple[float, float]:
    """(total loss in float64, tolerance on a float32 total's relative deviation from it), on the CPU.

    A compiled float32 path cannot match the CPU bit for bit (approximate division and square root, FMA
    contraction, cuBLAS's summation order), and float32 greedy paths part at the first near-tie. What it
    can promise is the accuracy of float32 itself: the plain float32 loop (ExactOBC's one-step loop; for
    ``auto`` the torch path) deviates from the float64 result by some amount; the GPU may deviate by
    twice that (at least 3e-3). (In float64 the fast engine's codes are the one-step loop's: tested.)"""
    exact = run_solver(solver)(W.double(), H.double()).loss.sum().item()
    plain = run_solver(solver, **({"method": "reference"} if solver == "exact_obc" else {}))(W, H).loss.sum().item()
    return exact, max(3e-3, 2 * abs(plain / exact - 1))


def run_solver(solver, **kw):
    if solver == "exact_obc":
        return lambda W, H: exact_obc(W, H, 4, damp=0.01, **kw)
    return lambda W, H: quantize_weight(W, H, 4, **kw)


def test_default_path_on_cuda_is_triton():
    pytest.importorskip("triton")
    assert use_triton(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("solver", ["exact_obc", "auto"])
def test_float32_fused_path_is_as_accurate_as_the_plain_float32_loop(solver):
    W, H = problem(128, 576, seed=1, samples=2000)
    exact, tol = fp32_tolerance(solver, W, H)
    gpu = run_solver(solver)(W.cuda(), H.cuda())  # the fused kernels
    assert gpu.quantized_matrix.device.type == "cuda"
    assert abs(gpu.loss.sum().item() / exact - 1) <= tol, (gpu.loss.sum().item(), exact, tol)


def test_no_host_sync_inside_the_step_loops():
    pytest.importorskip("triton")
    from obc_lightning.kernels.fused import gptq_blocks, greedy_fast_fused, polish_fused
    from obc_lightning.solvers.gptq import upper_cholesky_of_inverse

    W, H = problem(64, 288, seed=2)
    W, H = W.cuda(), (H + 0.01 * torch.eye(288)).cuda()
    grid = fit_grid(W, 4)
    s, z = (t.contiguous() for t in grid.per_column())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = upper_cholesky_of_inverse(hinv)
    rows = torch.zeros(64, dtype=torch.long, device="cuda")
    codes = grid.codes(W).float()
    # two layers batched (rows 0..39 and 40..63, the second with 2 H): each row reads its own layer's
    two = torch.stack([hinv, hinv / 2])
    lid = (torch.arange(64, device="cuda") >= 40).long()
    U2, H2 = torch.stack([U, U / 2**0.5]), torch.stack([H, 2 * H])
    # warm up (compilation reads device properties), then every loop under "error"
    greedy_fast_fused(W, hinv.unsqueeze(0), rows, s, z, grid.maxq, 32)
    gptq_blocks(W.clone(), torch.empty_like(W), s, z, None, U.unsqueeze(0), None, [64], grid.maxq, 64)
    polish_fused(W, H.unsqueeze(0), None, [64], codes, s, z, grid.maxq, 2, 64, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        greedy_fast_fused(W, hinv.unsqueeze(0), rows, s, z, grid.maxq, 32)
        gptq_blocks(W.clone(), torch.empty_like(W), s, z, W == 0, U.unsqueeze(0), None, [64], grid.maxq, 64)
        polish_fused(W, H.unsqueeze(0), None, [64], codes, s, z, grid.maxq, 3, 64, W == 0)
        greedy_fast_fused(W, two, lid, s, z, grid.maxq, 32)
        gptq_blocks(W.clone(), torch.empty_like(W), s, z, None, U2, lid, [40, 24], grid.maxq, 64)
        polish_fused(W, H2, lid, [40, 24], codes, s, z, grid.maxq, 3, 64, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_batched_layers_match_one_layer_at_a_time_on_cuda():
    # the per-row kernel code is the same either way, but the per-layer products act on row slices at
    # other offsets (cuBLAS may pick another kernel): float32 rounding differs, so totals are held to the
    # plain float32 loop's own deviation from float64; gpu_check.py reports whether codes were identical
    from obc_lightning.solvers.quantize import quantize_weights

    pairs = [problem(rows, 288, seed=10 + i) for i, rows in enumerate((32, 64, 48))]
    tols = [fp32_tolerance("auto", W, H)[1] for W, H in pairs]
    pairs = [(W.cuda(), H.cuda()) for W, H in pairs]
    one = [quantize_weight(W, H, 4) for W, H in pairs]
    many = quantize_weights(pairs, 4)
    for a, b, tol in zip(one, many, tols):
        assert abs(b.loss.sum().item() / a.loss.sum().item() - 1) <= tol


def test_memory_budget_is_respected():
    W, H = problem(256, 1152, seed=3)
    W, H = W.cuda(), H.cuda()
    budget = 64 << 20
    # first a small solve: the cuBLAS / cuSOLVER workspaces (32 MiB for cuBLAS on Hopper) and the Triton
    # kernels exist before the baseline is read, so the peak above it is the solver's alone
    exact_obc(W[:16], H, 4, damp=0.01)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    exact_obc(W, H, 4, batch_size=None, max_memory=budget, damp=0.01)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the budget bounds the row batches' working set; the solver also holds d x d matrices of its own
    # (H damped, its Cholesky factor, the inverse, one spare) and (rows, d) matrices of the layer (W, its
    # copy, codes, grid per column, Q, the objective's product: 8)
    d, rows = 1152, 256
    fixed = 4 * (4 * d * d + 8 * rows * d)
    assert peak <= budget + fixed, (peak / 2**20, budget / 2**20, fixed / 2**20)


def test_callback_end_to_end_on_one_gpu(tmp_path):
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from obc_lightning.callback import OBCQuantize

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Linear(16 * 8 * 8, 4)

        def forward(self, x):
            return self.head(self.conv(x).relu().flatten(1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    ds = TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())
    model = Net()
    cb = OBCQuantize(bits=4, calibration_batches=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=16))
    assert cb.quantized_modules == ["conv", "head"]
    for name in ("conv", "head"):
        w = model.get_submodule(name).weight.detach()
        for row in w.reshape(w.shape[0], -1):
            assert row.unique().numel() <= 16

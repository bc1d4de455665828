"""Solvers and Hessian products run with IEEE float32 matmuls whatever the global precision setting."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from obc_lightning import collect_hessians, exact_obc, gptq, obs_prune, polish, product_quantize, quantize_weight
from obc_lightning.precision import full_fp32_matmul

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addmv", "mv", "matmul", "dot", "addr", "linalg_cholesky_ex"}


class PrecisionSpy(TorchDispatchMode):
    """Records torch.get_float32_matmul_precision() at every matmul-like op."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in MATMULS:
            self.seen.add(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def high_precision_setting():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


def problem(device="cpu"):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g)
    X = torch.randn(64, 16, generator=g)
    return W.to(device), (2 * X.T @ X / 64).to(device)


def run_all(W, H):
    out = [exact_obc(W, H, 4).codes, gptq(W, H, 4).codes, quantize_weight(W, H, 4).codes]
    res = quantize_weight(W, H, 3, solver="gptq", polish=False)
    out.append(polish(W, H, res.codes, res.grid).codes)
    out.append(obs_prune(W, H, sparsity=0.5).mask)
    out.append(product_quantize(W, H, block_size=4, n_centroids=4, n_iter=3).codes)
    return out


def test_solvers_use_full_fp32_under_high_and_restore_it(high_precision_setting):
    W, H = problem()
    spy = PrecisionSpy()
    with spy:
        got = run_all(W, H)
    assert spy.seen == {"highest"}
    assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is back
    torch.set_float32_matmul_precision("highest")
    for a, b in zip(got, run_all(W, H)):
        assert torch.equal(a, b)


def test_hessian_products_use_full_fp32(high_precision_setting):
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    spy = PrecisionSpy()
    with spy:
        collect_hessians(model, batches, {"0": model[0], "2": model[2]})
    # the model's own forward keeps the caller's setting; every X^T X product runs at "highest"
    assert "highest" in spy.seen
    assert torch.get_float32_matmul_precision() == "high"


def test_guard_is_reentrant_and_restores_on_error(high_precision_setting):
    with pytest.raises(RuntimeError, match="boom"):
        with full_fp32_matmul():
            with full_fp32_matmul():
                assert torch.get_float32_matmul_precision() == "highest"
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tf32_guard(high_precision_setting):
    # under "high" a float32 cuBLAS matmul is TF32: the guard must make the solver's products IEEE
    assert torch.backends.cuda.matmul.allow_tf32
    W, H = problem("cuda")
    with full_fp32_matmul():
        assert not torch.backends.cuda.matmul.allow_tf32
    # TF32 products (10-bit mantissa) would leave the float32 accuracy the plain CPU loop reaches
    exact = exact_obc(W.cpu().double(), H.cpu().double(), 4).loss.sum().item()
    plain = exact_obc(W.cpu(), H.cpu(), 4, method="reference").loss.sum().item()
    got = exact_obc(W, H, 4)
    assert torch.backends.cuda.matmul.allow_tf32  # restored
    assert abs(got.loss.sum().item() / exact - 1) <= max(3e-3, 2 * abs(plain / exact - 1))

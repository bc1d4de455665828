"""to_semi_structured: which Linear layers can run on sparse tensor cores, refusals that leave the model
as it was, and (on a capable GPU) outputs equal to the dense layers'."""

import itertools

import pytest
import torch
from torch import nn

from obc_lightning import compress_model, to_semi_structured
from obc_lightning.semi_structured import is_2_to_4, semi_structured_plan

torch.manual_seed(0)

CAPABLE_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def two_of_four(rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
    """A random weight with exactly 2 non-zeros at random places in every group of 4 inputs."""
    w = torch.randn(rows, cols // 4, 4)
    keep = torch.rand(rows, cols // 4, 4).argsort(-1) < 2
    return (w * keep).reshape(rows, cols).to(dtype)


def linear(weight: torch.Tensor) -> nn.Linear:
    m = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    m.weight.data.copy_(weight)
    return m


def test_2_to_4_check_against_every_pattern_of_one_group():
    for pattern in itertools.product([0.0, 1.5], repeat=4):
        w = torch.tensor([pattern, [1.0, 0.0, 0.0, 0.0]])
        assert is_2_to_4(w) == (sum(v != 0 for v in pattern) <= 2)
    assert not is_2_to_4(torch.zeros(2, 6))  # 6 inputs are no whole groups of 4
    assert is_2_to_4(two_of_four(8, 16)) and not is_2_to_4(torch.randn(8, 16))


def model_of_every_case() -> nn.Sequential:
    return nn.Sequential(
        linear(two_of_four(64, 128)),  # 0: eligible
        linear(torch.randn(64, 64, dtype=torch.float16)),  # 1: dense
        linear(two_of_four(64, 64, torch.float32)),  # 2: float32: CUTLASS only
        linear(two_of_four(40, 64)),  # 3: 40 rows: not a multiple of 16 (cuSPARSELt) or 32 (CUTLASS)
        nn.Conv2d(4, 4, 3),  # not a Linear: never planned
    )


def test_plan_gives_every_linear_a_reason_or_none_per_backend():
    model = model_of_every_case()
    sparse_lt = semi_structured_plan(model, backend="cusparselt")
    cutlass = semi_structured_plan(model, backend="cutlass")
    assert list(sparse_lt) == list(cutlass) == ["0", "1", "2", "3"]
    assert sparse_lt["0"] is None and cutlass["0"] is None
    assert "not 2:4" in sparse_lt["1"] and "not 2:4" in cutlass["1"]
    assert "dtype float32" in sparse_lt["2"] and "model.half()" in sparse_lt["2"]
    assert cutlass["2"] is None
    assert "out_features must be a multiple of 16" in sparse_lt["3"]
    assert "multiple of 32" in cutlass["3"]
    assert list(semi_structured_plan(model, include="0", backend="cutlass")) == ["0"]


def test_bad_backend_and_nothing_eligible_are_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        semi_structured_plan(model_of_every_case(), backend="triton")
    dense = nn.Sequential(nn.Linear(64, 64).half())
    with pytest.raises(RuntimeError, match=r"no Linear layer can be converted:\n  0: weight not 2:4"):
        to_semi_structured(dense)


@pytest.mark.skipif(CAPABLE_GPU, reason="the refusal is for machines without sparse tensor cores")
def test_cpu_model_refused_by_name_and_left_dense():
    model = model_of_every_case()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"module '0' is on cpu.*CUDA GPU of compute capability >= 8\.0"):
        to_semi_structured(model, backend="cutlass")
    after = model.state_dict()
    assert all(type(p) is torch.Tensor and torch.equal(p, after[n]) for n, p in before.items())


def test_pruned_linears_from_compress_model_are_eligible_after_half():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [torch.randn(16, 128) for _ in range(4)]
    compress_model(model, batches, bits=None, n_m=(2, 4))
    model.half()
    assert semi_structured_plan(model, backend="cusparselt") == {"0": None, "2": None}


@pytest.mark.skipif(not CAPABLE_GPU, reason="needs a CUDA GPU with compute capability >= 8.0")
def test_converted_linears_match_dense_outputs_on_gpu():
    model = model_of_every_case()[:2].cuda()  # one eligible, one dense Linear
    x = torch.randn(256, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense_out = model[0](x)
    with pytest.warns(UserWarning, match=r"1 Linear layer\(s\) stay dense:\n  1: weight not 2:4"):
        assert to_semi_structured(model) == ["0"]
    assert isinstance(model[0].weight.data, torch.sparse.SparseSemiStructuredTensor)
    assert type(model[1].weight.data) is torch.Tensor
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), dense_out, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(model[0](x.view(4, 64, 128)), dense_out.view(4, 64, -1), rtol=1e-2, atol=1e-2)

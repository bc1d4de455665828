"""Quantization-aware fine-tuning: each mode against hand-derived values, then the callback end to end."""

import csv
import os

import lightning.pytorch as pl
import pytest
import torch
from classifier_steps import ClassifierSteps
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from obc_lightning.finetune import (
    FinetuneSession,
    NoiseQuantizer,
    STEQuantizer,
    TernaryQuantizer,
    add_param_group,
    attach,
    attach_ternary,
    finalize,
    noise_penalty,
    remove_last_param_group,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


# ------------------------------------------------------------------------------------------------ STE
def ste_grid():
    # one row, 2 bits (maxq = 3), scale 0.5, zero 1: grid {-0.5, 0, 0.5, 1.0}, clip range [-0.5, 1.0]
    return STEQuantizer(torch.tensor([[0.5]]), torch.tensor([[1.0]]), n_bits=2, group_size=None, cols=6)


def test_ste_forward_rounds_and_gradient_passes_only_inside_clip_range():
    q = ste_grid()
    w = torch.tensor([[-0.9, -0.5, 0.2, 0.3, 1.0, 1.4]], requires_grad=True)
    out = q(w)
    assert torch.equal(out.detach(), torch.tensor([[-0.5, -0.5, 0.0, 0.5, 1.0, 1.0]]))
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]))
    # inside [-0.5, 1.0] (bounds included): gradient passes unchanged; outside: zero
    assert torch.equal(w.grad, torch.tensor([[0.0, 2.0, 3.0, 4.0, 5.0, 0.0]]))


def test_ste_groups_and_eval_on_grid():
    # two groups of 2 columns with different scales / zeros
    q = STEQuantizer(torch.tensor([[0.1, 1.0]]), torch.tensor([[2.0, 0.0]]), n_bits=2, group_size=2, cols=4)
    w = torch.tensor([[0.04, 0.3, 0.4, 2.6]])
    q.eval()
    # group 0: grid 0.1·(k − 2), k ∈ 0..3 → {-0.2, -0.1, 0, 0.1}; group 1: {0, 1, 2, 3}
    assert torch.allclose(q(w), torch.tensor([[0.0, 0.1, 0.0, 3.0]]))


def test_ste_on_conv_weight_shape():
    q = STEQuantizer(torch.full((2, 1), 0.25), torch.full((2, 1), 2.0), n_bits=3, group_size=None, cols=4)
    w = torch.randn(2, 1, 2, 2)
    out = q.eval()(w)
    assert out.shape == w.shape
    codes = out / 0.25 + 2
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 7


# -------------------------------------------------------------------------------------------- ternary
def test_ternary_init_forward_and_gradients_by_hand():
    w0 = torch.tensor([[1.0, -2.0, 0.02, 3.0, -0.5, 0.1]])
    q = TernaryQuantizer(w0, threshold=0.05)  # Δ = 0.05 · 3 = 0.15
    # I_p = {1, 3}, I_n = {-2, -0.5}, I_z = {0.02, 0.1}
    assert q.w_p.item() == pytest.approx(2.0)  # mean(1, 3)
    assert q.w_n.item() == pytest.approx(1.25)  # mean(2, 0.5)
    w = w0.clone().requires_grad_(True)
    out = q(w)
    assert torch.allclose(out.detach(), torch.tensor([[2.0, -1.25, 0.0, 2.0, -1.25, 0.0]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    out.backward(g)
    # Σ_{I_p} g and −Σ_{I_n} g, each scaled by 1/√|I| (LSQ gradient scale; |I_p| = |I_n| = 2)
    assert q.w_p.grad.item() == pytest.approx((1.0 + 4.0) / 2**0.5)
    assert q.w_n.grad.item() == pytest.approx(-(2.0 + 5.0) / 2**0.5)
    # latent: w_p·g on I_p, g on I_z, w_n·g on I_n
    assert torch.allclose(w.grad, torch.tensor([[2.0 * 1, 1.25 * 2, 3.0, 2.0 * 4, 1.25 * 5, 6.0]]))


def test_ternary_scale_gradient_is_lsq_scaled_and_sgd_keeps_scales_positive():
    # 10 000 positive / 10 000 negative weights, a uniform upstream gradient of 1e-3 · (−1): Σ g = −10 per side
    torch.manual_seed(0)
    w0 = torch.cat([torch.rand(10_000) + 0.5, -(torch.rand(10_000) + 0.5)]).reshape(200, 100)
    q = TernaryQuantizer(w0)
    (q(w0.clone().requires_grad_(True)) * -1e-3).sum().backward()
    assert q.w_p.grad.item() == pytest.approx(-10 / 100, rel=1e-5)  # Σ g / √10 000
    assert q.w_n.grad.item() == pytest.approx(10 / 100, rel=1e-5)
    # a plain SGD step at a weight learning rate of 0.05 moves w_p (≈ 1) by 0.5 %, not by 50 %
    w_p = q.w_p.item()
    torch.optim.SGD(q.parameters(), lr=0.05).step()
    assert 0 < q.w_p.item() - w_p < 0.01 * w_p


def test_ternary_eval_has_three_values():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = TernaryQuantizer(w).eval()
    vals = set(q(w).unique().tolist())
    w_p, w_n = q.w_p.half().float().item(), q.w_n.half().float().item()  # as stored: float16
    assert vals == {w_p, 0.0, -w_n}
    full = TernaryQuantizer(w, scale_dtype=torch.float32).eval()
    assert set(full(w).unique().tolist()) == {full.w_p.item(), 0.0, -full.w_n.item()}


# ---------------------------------------------------------------------------------------------- noise
def test_noise_bounded_by_half_step_of_row_range():
    torch.manual_seed(0)
    # one row, range [-1, 3] (4 wide); groups of 4 with 3 and 5 bits → Δ = 4/7 and 4/31
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, 1.0, 0.0, 0.5]])
    q = NoiseQuantizer(w, group_size=4, min_bits=2, max_bits=6, init_bits=4)
    with torch.no_grad():
        q.logits.copy_(torch.tensor([[0.25, 0.75]]).logit())  # σ⁻¹(¼), σ⁻¹(¾): b = 2 + 4·¼ = 3, 2 + 4·¾ = 5
    assert torch.allclose(q.bits(), torch.tensor([[3.0, 5.0]]), atol=1e-5)
    assert q.logits.shape == (1, 2)  # one parameter per group, not per weight
    delta = torch.tensor([4.0 / 7] * 4 + [4.0 / 31] * 4)
    lo, step = q.step(w, q.bits().detach())
    assert torch.allclose(step, delta[None], atol=1e-5) and torch.equal(lo, torch.full((1, 8), -1.0))
    worst = torch.zeros(8)
    for _ in range(200):
        noise = (q(w) - w)[0]
        assert (noise.abs() <= delta / 2 + 1e-6).all()
        worst = torch.maximum(worst, noise.abs())
    assert (worst > delta / 4).all()  # the noise fills its interval, group by group


def test_noise_range_is_per_row():
    w = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.0, 10.0, 5.0, 2.0]])
    q = NoiseQuantizer(w, group_size=2, min_bits=2, max_bits=4, init_bits=3)
    _, step = q.step(w, torch.full((2, 2), 2.0))
    assert torch.allclose(step, torch.tensor([[1 / 3] * 4, [10 / 3] * 4]))


def test_noise_penalty_gradient_wrt_logit():
    w = torch.randn(3, 16)
    q = NoiseQuantizer(w, group_size=8, min_bits=2, max_bits=8, init_bits=5)
    penalty = 0.7
    noise_penalty([q], penalty).backward()
    s = torch.sigmoid(q.logits.detach())
    # ∂/∂logit of penalty · n_g · b / 8 / 2^20 with b = 2 + 6σ(logit), n_g = 8
    expected = penalty * 8 / 8 / 2**20 * (8 - 2) * s * (1 - s)
    assert torch.allclose(q.logits.grad, expected)


def test_noise_eval_on_each_groups_grid_with_short_last_group():
    # one row, range [0, 3]; groups of 2: [0, .4] at 2 bits, [1.3, 2.9] at 3 bits, [3] (short) at 2 bits
    w = torch.tensor([[0.0, 0.4, 1.3, 2.9, 3.0]])
    q = NoiseQuantizer(w, group_size=2, min_bits=2, max_bits=4, init_bits=3)
    with torch.no_grad():
        q.logits.copy_(torch.tensor([[-3.0, 0.3, -3.0]]))  # b ≈ 2.09, 3.15, 2.09 → rounded 2, 3, 2
    assert q.rounded_bits().tolist() == [[2.0, 3.0, 2.0]]
    out = q.eval()(w)
    # 2 bits: step 3/3 = 1 → {0, 1, 2, 3}; 3 bits: step 3/7 → 1.3 ≈ 3·(3/7) = 1.2857, 2.9 ≈ 7·(3/7) = 3
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 9 / 7, 3.0, 3.0]]))
    assert q.group_numel.tolist() == [2.0, 2.0, 1.0]
    assert q.size_mb(exact=True).item() == pytest.approx((2 * 2 + 3 * 2 + 2 * 1) / 8 / 2**20)
    codes = (out - 0.0) / torch.tensor([[1.0, 1.0, 3 / 7, 3 / 7, 1.0]])
    assert torch.allclose(codes, codes.round(), atol=1e-5)


def test_noise_storage_formula():
    # 3 rows x 40 cols, groups of 16 → 16, 16, 8; bits 2..8 → 7 widths → 3 bits per group
    q = NoiseQuantizer(torch.randn(3, 40), group_size=16, min_bits=2, max_bits=8, init_bits=4)
    assert q.bit_width_bits == 3 and q.rounded_bits().unique().tolist() == [4.0]
    assert q.storage_bits(120) == 4 * 120 + 32 * 3 + 3 * 3 * 3
    with torch.no_grad():
        q.logits[0, 2] = 10.0  # 8 bits on the short group of row 0
    assert q.storage_bits(120) == 4 * 120 + (8 - 4) * 8 + 32 * 3 + 3 * 3 * 3
    # 2..4 bits: 3 widths → 2 bits each; 1..2 bits: 2 widths → 1 bit
    assert NoiseQuantizer(torch.randn(2, 8), group_size=4, min_bits=2, max_bits=4).bit_width_bits == 2
    assert NoiseQuantizer(torch.randn(2, 8), group_size=4, min_bits=1, max_bits=2, init_bits=1.5).bit_width_bits == 1
    # default layout: 16-weight groups, 4 bits: 4 + 3/16 bits per weight + 32 bits per row
    big = NoiseQuantizer(torch.randn(64, 576))
    assert big.group_size == 16 and big.storage_bits(64 * 576) == 64 * 576 * 4 + 64 * 32 + 64 * 36 * 3


def test_noise_latent_min_max_not_detached():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    q = NoiseQuantizer(w.detach(), group_size=2, min_bits=2, max_bits=4, init_bits=3)
    torch.manual_seed(1)
    q(w).sum().backward()
    assert q.logits.grad is not None and q.logits.grad.abs().sum() > 0
    assert w.grad[0, 0] != 1 or w.grad[0, 3] != 1  # the row range's gradient reaches the extremes
    assert w.grad[0, 1] == 1 and w.grad[0, 2] == 1  # interior weights: identity


# ------------------------------------------------------------------------------- parametrize / finalize
@pytest.mark.parametrize("mode", ["ste", "ternary", "noise"])
def test_attach_keeps_parameter_and_finalize_leaves_quantized_parameter(mode):
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    original = lin.weight
    if mode == "ste":
        q = STEQuantizer(torch.full((4, 1), 0.1), torch.full((4, 1), 8.0), n_bits=4, group_size=None, cols=8)
    elif mode == "ternary":
        q = TernaryQuantizer(lin.weight)
    else:
        q = NoiseQuantizer(lin.weight, group_size=4, init_bits=3)
    attach(lin, q)
    assert lin.parametrizations.weight.original is original
    lin.weight.sum().backward()  # training mode: gradients reach the latent Parameter
    assert original.grad is not None
    q.eval()
    expected = lin.weight.detach().clone()
    q.train()  # finalize must use eval semantics even if the model is in training mode
    finalize(lin)
    assert not parametrize.is_parametrized(lin)
    assert type(lin.weight) is nn.Parameter and lin.weight is original
    assert torch.equal(lin.weight.detach(), expected)
    if mode == "ste":
        codes = lin.weight.detach() / 0.1 + 8
        assert torch.allclose(codes, codes.round(), atol=1e-5)
    elif mode == "ternary":
        assert len(lin.weight.unique()) <= 3


def test_attach_ternary_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    qs = attach_ternary(model, ["2"], threshold=0.1)
    assert list(qs) == ["2"] and parametrize.is_parametrized(model[2]) and not parametrize.is_parametrized(model[0])


# ------------------------------------------------------------------------------- optimizer / schedulers
def lr_trace(make_sched, steps, extra=False):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = make_sched(opt)
    lrs = []
    for i in range(steps):
        if extra and i == 2:
            assert add_param_group(opt, [nn.Parameter(torch.zeros(1))], [sched])
        opt.zero_grad()
        sum(q.sum() for g in opt.param_groups for q in g["params"]).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return opt, sched, lrs


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 6),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1.0, total_steps=8),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_add_param_group_keeps_schedule(name):
    _, _, ref = lr_trace(SCHEDULERS[name], 6)
    opt, sched, lrs = lr_trace(SCHEDULERS[name], 6, extra=True)
    assert lrs == pytest.approx(ref)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"])  # the new group is scheduled
    remove_last_param_group(opt, [sched])
    assert len(opt.param_groups) == 1 and len(sched.base_lrs) == 1
    sched.step()


# ------------------------------------------------------------------------------------ callback end to end
from quiet_trainer import quiet_trainer  # noqa: E402

from obc_lightning.callback import OBCQuantize  # noqa: E402  (after the Lightning-free unit tests)


def mlp_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


class MLP(ClassifierSteps, pl.LightningModule):
    """2-layer MLP; records the optimizer's lrs and the momentum buffer at the start of every epoch."""

    def __init__(self, scheduler=True):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)
        self.scheduler = scheduler
        self.lrs, self.buffers, self.n_groups = [], [], []

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())

    def on_train_epoch_start(self):
        opt = self.trainer.optimizers[0]
        latent = self.fc1.parametrizations.weight.original if parametrize.is_parametrized(self.fc1) else self.fc1.weight
        self.lrs.append([g["lr"] for g in opt.param_groups])
        self.n_groups.append(len(opt.param_groups))
        self.buffers.append(opt.state.get(latent, {}).get("momentum_buffer"))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def fit(tmp_path, cb, model=None, max_epochs=4, **kw):
    model = model or MLP()
    kw.setdefault("callbacks", [cb] if cb is not None else [])
    t = quiet_trainer(tmp_path, max_epochs=max_epochs, **kw)
    t.fit(model, DataLoader(mlp_data(), batch_size=16), DataLoader(mlp_data(32), batch_size=16))
    return t, model


def csv_rows(t):
    with open(t.logger.experiment.metrics_file_path) as f:
        return list(csv.DictReader(f))


def test_ste_loop_reports_finetuned_and_keeps_optimizer_state(tmp_path):
    model = MLP()
    fc1_weight = model.fc1.weight
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc", plot=False)
    t, model = fit(tmp_path, cb, model)
    rows = csv_rows(t)
    final = [r for r in rows if r.get("obc/val_acc_finetuned")]
    assert len(final) == 1 and float(final[0]["obc/finetune_epochs"]) == 2
    assert any(r.get("obc/val_acc_after") for r in rows) and any(r.get("obc/val_acc_before") for r in rows)
    assert cb.metrics["obc/finetune_epochs"] == 2 and "obc/val_acc_finetuned" in cb.metrics
    # the weights are plain Parameters (the same objects) and on the OBC grid
    assert not parametrize.is_parametrized(model.fc1) and model.fc1.weight is fc1_weight
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        assert torch.equal(cb.quantizers[name].eval()(w), w)
    # K = 4 - 2 - 1 = 1: compression after epoch 1; the latent Parameter's momentum buffer carries on
    assert model.buffers[2] is model.buffers[1] is not None
    opt = t.optimizers[0]
    assert opt.param_groups[0]["params"][0] is fc1_weight
    assert opt.state[fc1_weight]["momentum_buffer"] is model.buffers[1]


def test_ternary_loop_adds_scales_to_optimizer_and_keeps_lr_schedule(tmp_path):
    _, ref = fit(tmp_path / "ref", None)
    cb = OBCQuantize(
        finetune="ternary", finetune_epochs=2, ternary_skip_first_last=False, monitor="val_acc", plot=False
    )
    t, model = fit(tmp_path, cb)
    assert [lrs[0] for lrs in model.lrs] == pytest.approx([lrs[0] for lrs in ref.lrs])  # 0.1, 0.05, ...
    assert model.n_groups == [1, 1, 2, 2]  # scales added after epoch K = 1, removed at the end
    assert model.lrs[2][1] == pytest.approx(model.lrs[2][0]) and model.lrs[3][1] == pytest.approx(model.lrs[3][0])
    assert len(t.optimizers[0].param_groups) == 1 and t.lr_scheduler_configs[0].scheduler.base_lrs == [0.1]
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight
        assert type(w) is nn.Parameter and len(w.unique()) <= 3
        q = cb.quantizers[name]
        w_p, w_n = q.stored_scales()
        assert set(w.unique().tolist()) <= {w_p.item(), 0.0, -w_n.item()}
        assert w_p == q.w_p.half().float() and w_n == q.w_n.half().float()
    # 2-bit codes + the codebook {0, w_p, -w_n} in float16 per layer
    assert cb.metrics["obc/avg_bits"] == pytest.approx((2 * 8 * 16 + 48 + 2 * 16 * 3 + 48) / (8 * 16 + 16 * 3))
    assert "obc/val_acc_finetuned" in cb.metrics


@pytest.mark.parametrize(
    "bits_lr,penalty", [(None, 1e7), (0.5, 1e3)], ids=["users-optimizer", "own-adam"]
)
def test_noise_loop_penalty_lowers_bits(tmp_path, bits_lr, penalty):
    cb = OBCQuantize(
        bits=6, finetune="noise", finetune_epochs=2, noise_group_size=4, noise_penalty=penalty, monitor="val_acc",
        noise_bits_lr=bits_lr, plot=False,
    )
    t, model = fit(tmp_path, cb, MLP(scheduler=False))
    assert cb.metrics["obc/noise_bits"] < 3  # from 6 bits: the size penalty's gradient was applied
    q = cb.quantizers["fc1"]
    w = model.fc1.weight.detach()
    assert not parametrize.is_parametrized(model.fc1)
    assert torch.equal(q.eval()(w), w)  # on each group's uniform grid already
    assert cb.metrics["obc/finetune_epochs"] == 2


def test_noise_bits_have_their_own_adam_by_default(tmp_path):
    """DiffQ's recipe: the bit logits are stepped by the callback's Adam, not added to the user's SGD."""
    seen = {}

    class Spy(OBCQuantize):
        def on_train_epoch_end(self, trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            if self.phase == "finetuning" and "groups" not in seen:
                seen["groups"] = len(trainer.optimizers[0].param_groups)
                seen["logits"] = self.quantizers["fc1"].logits.detach().clone()
                seen["adam"] = self.session.bits_optimizer

    cb = Spy(bits=4, finetune="noise", finetune_epochs=2, noise_penalty=0.0, monitor="val_acc", plot=False)
    t, model = fit(tmp_path, cb, MLP(scheduler=False))
    assert seen["groups"] == 1  # nothing added to the user's optimizer
    assert isinstance(seen["adam"], torch.optim.Adam) and seen["adam"].defaults["lr"] == 1e-3
    assert seen["adam"].defaults["weight_decay"] == 0
    assert seen["adam"].state  # it stepped
    assert cb.session is None  # released after fine-tuning
    with pytest.raises(ValueError, match="noise_bits_lr"):
        OBCQuantize(finetune="noise", noise_bits_lr=0)


def test_budget_met_stops_early_without_parametrization(tmp_path):
    cb = OBCQuantize(
        bits=8, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc", max_drop=1.0,
        plot=False,
    )
    t, model = fit(tmp_path, cb)
    assert t.current_epoch == 2 and len(model.lrs) == 2  # epochs 2 and 3 were skipped
    assert not parametrize.is_parametrized(model.fc1) and not parametrize.is_parametrized(model.fc2)
    assert cb.quantizers == {} and cb.metrics["obc/finetune_epochs"] == 0
    assert "obc/val_acc_after" in cb.metrics and "obc/val_acc_finetuned" not in cb.metrics
    assert len(t.optimizers[0].param_groups) == 1


@pytest.mark.parametrize(
    "mode,budget", [("ternary", None), ("noise", None), ("noise", 1.0)], ids=["ternary", "noise", "noise-within-budget"]
)
def test_ternary_and_noise_export_the_final_weights(tmp_path, mode, budget):
    from obc_lightning.export import load_quantized, read_metadata

    path = tmp_path / "out" / "m.safetensors"
    cb = OBCQuantize(
        finetune=mode, finetune_epochs=2, ternary_skip_first_last=False, noise_min_bits=2, noise_max_bits=6,
        monitor="val_acc", max_drop=budget, export_path=path, plot=False,
    )
    t, model = fit(tmp_path, cb)
    assert (t.current_epoch, cb.metrics["obc/finetune_epochs"]) == ((2, 0.0) if budget else (4, 2.0))
    configs = read_metadata(path)
    assert sorted(configs) == ["fc1", "fc2"]
    assert {c["scheme"] for c in configs.values()} == {"pq" if mode == "ternary" else "mixed"}
    other = MLP()
    load_quantized(path, other)
    for name in ("fc1", "fc2"):  # the file holds exactly the weights the fit ended with
        assert torch.equal(getattr(other, name).weight, getattr(model, name).weight)
    assert cb.metrics["obc/file_mb"] == cb.metrics["obc/size_mb_after"] == os.path.getsize(path) / 2**20


def test_state_is_plain_and_a_fine_tuning_state_without_session_is_refused(tmp_path):
    cb = OBCQuantize(finetune="ste", finetune_epochs=1, monitor="val_acc", max_drop=0.5, plot=False)
    state = cb.state_dict()
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["phase"] == "idle"
    state["phase"] = "finetuning"  # what an older version wrote: no session to resume
    with pytest.raises(RuntimeError, match="holds no fine-tuning session"):
        OBCQuantize(finetune="ste").load_state_dict(state)


def test_finetune_epochs_at_most_max_epochs(tmp_path):
    with pytest.raises(ValueError, match="finetune_epochs=5 must be <= max_epochs=4"):
        fit(tmp_path, OBCQuantize(finetune="ste", finetune_epochs=5))
    with pytest.raises(ValueError, match="ternary_skip_first_last"):
        fit(tmp_path, OBCQuantize(finetune="ternary", finetune_epochs=1))


def test_finetune_epochs_equal_max_epochs_compresses_at_fit_start(tmp_path):
    """A model that arrives trained: compression before the first step, every epoch fine-tunes."""
    model = MLP()
    w0 = model.fc1.weight.detach().clone()
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=3, monitor="val_acc", plot=False)
    t, model = fit(tmp_path, cb, model, max_epochs=3)
    assert cb.start_epoch == -1 and cb.metrics["obc/finetune_epochs"] == 3
    # "before" is the model as it arrived: evaluated before any optimizer step
    assert len(model.lrs) == 3 and "obc/val_acc_before" in cb.metrics and "obc/val_acc_finetuned" in cb.metrics
    assert not torch.equal(model.fc1.weight.detach(), w0)
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        assert torch.equal(cb.quantizers[name].eval()(w), w)


def test_budget_met_at_fit_start_trains_nothing(tmp_path):
    model = MLP()
    cb = OBCQuantize(
        bits=8, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc", max_drop=1.0, plot=False
    )
    t, model = fit(tmp_path, cb, model, max_epochs=2)
    assert len(model.lrs) == 0 and t.global_step == 0  # stopped before the first epoch
    assert cb.metrics["obc/finetune_epochs"] == 0 and not parametrize.is_parametrized(model.fc1)


def test_fit_ending_before_compression_epoch_compresses_at_end(tmp_path):
    cb = OBCQuantize(bits=4, calibration_batches=2, finetune="ste", finetune_epochs=2, plot=False)
    with pytest.warns(UserWarning, match="without fine-tuning"):
        t, model = fit(tmp_path, cb, max_steps=3)
    assert cb.phase == "done" and cb.metrics["obc/finetune_epochs"] == 0
    assert not parametrize.is_parametrized(model.fc1) and cb.quantized_modules == ["fc1", "fc2"]


def test_noise_penalty_backward_scaled_by_amp_and_accumulation():
    from types import SimpleNamespace

    class Scaler:
        def is_enabled(self):
            return True

        def get_scale(self):
            return 4.0

    q = NoiseQuantizer(torch.randn(2, 8), group_size=8, min_bits=2, max_bits=8, init_bits=4)
    cb = OBCQuantize(finetune="noise", noise_penalty=3.0)
    cb.session = FinetuneSession(nn.Linear(8, 2), "noise", {"layer": q}, noise_penalty=3.0)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=Scaler()), accumulate_grad_batches=2)
    cb.on_after_backward(trainer, None)
    s = torch.sigmoid(q.logits.detach())
    expected = 3.0 * 8 / 8 / 2**20 * (8 - 2) * s * (1 - s) * 4.0 / 2
    assert torch.allclose(q.logits.grad, expected)


# --- pruned models: the mask held fixed ---------------------------------------------------------------
def test_masked_weight_forward_and_gradient():
    from obc_lightning.finetune import MaskedWeight

    mask = torch.tensor([[True, False], [False, True]])
    q = MaskedWeight(mask)
    w = torch.tensor([[1.5, -2.0], [0.3, 0.7]], requires_grad=True)
    out = q(w)
    assert torch.equal(out.detach(), torch.tensor([[1.5, 0.0], [0.0, 0.7]]))
    out.sum().backward()
    assert torch.equal(w.grad, mask.float())  # pruned weights get no gradient


def test_ste_with_mask_keeps_pruned_weights_at_zero():
    from obc_lightning.finetune import STEQuantizer

    q = STEQuantizer(torch.tensor([[0.5]]), torch.tensor([[2.0]]), 2, None, 3)
    q.register_buffer("mask", torch.tensor([[True, False, True]]))
    w = torch.tensor([[0.4, 0.6, -0.2]], requires_grad=True)
    out = q.train()(w)
    out.sum().backward()
    assert out[0, 1].item() == 0.0 and w.grad.tolist() == [[1.0, 0.0, 1.0]]
    assert q.eval()(w.detach())[0, 1].item() == 0.0


def test_n_m_quantized_finetune_keeps_pattern_and_grid(tmp_path):
    cb = OBCQuantize(
        bits=3, n_m=(2, 4), exclude="fc2", calibration_batches=2, finetune="ste", finetune_epochs=2,
        monitor="val_acc", plot=False,
    )
    _, model = fit(tmp_path, cb)
    W = model.fc1.weight.detach()
    assert not parametrize.is_parametrized(model.fc1)
    assert (W.view(W.shape[0], -1, 4) != 0).sum(dim=2).max() <= 2  # the 2:4 pattern survived training
    assert torch.equal(cb.quantizers["fc1"].eval()(W), W)  # and the weights are on the grid
    assert cb.metrics["obc/finetune_epochs"] == 2 and "obc/val_acc_finetuned" in cb.metrics


def test_obcprune_masked_finetune_trains_kept_weights_only(tmp_path):
    from obc_lightning import OBCPrune

    model = MLP()
    cb = OBCPrune(sparsity=0.5, calibration_batches=2, finetune="masked", finetune_epochs=2, monitor="val_acc",
                  plot=False)
    captured = {}

    class Snapshot(pl.Callback):  # the weights right after pruning, before fine-tuning
        def on_train_epoch_start(self, trainer, pl_module):
            if cb.phase == "finetuning" and "w" not in captured:
                captured["w"] = pl_module.fc1.parametrizations.weight.original.detach().clone()

    _, model = fit(tmp_path, None, model, callbacks=[cb, Snapshot()])
    W, W0 = model.fc1.weight.detach(), captured["w"]
    pruned = W0 == 0
    assert pruned.float().mean() >= 0.45 and torch.equal(W == 0, pruned)  # the same mask at the end
    assert not torch.equal(W[~pruned], W0[~pruned])  # the kept weights trained
    assert "obc/val_acc_finetuned" in cb.metrics and not parametrize.is_parametrized(model.fc1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=4, n_m=(2, 4), finetune="ternary"), "cannot keep a pruning mask"),
        (dict(bits=4, sparsity=0.5, finetune="noise"), "cannot keep a pruning mask"),
        (dict(bits=4, finetune="masked"), "masked"),
    ],
)
def test_pruned_finetune_modes_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBCQuantize(**kwargs)


def test_obcprune_rejects_quantizing_finetune():
    from obc_lightning import OBCPrune

    with pytest.raises(ValueError, match="masked"):
        OBCPrune(sparsity=0.5, finetune="ste")

"""The CIFAR ResNets of obc_lightning.models: architecture, parameter counts, initialisation."""

import math

import pytest
import torch
from torch import nn

from obc_lightning.models import BasicBlock, CifarResNet, resnet18, resnet20


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def weighted_layers(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("factory", [resnet20, resnet18])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(factory, num_classes):
    torch.manual_seed(0)
    model = factory(num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_resnet20_matches_the_paper():
    model = resnet20()
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters; with option-A shortcuts exactly 269,722
    assert n_params(model) == 269_722
    # 6n + 2 = 20 weighted layers for n = 3: stem + 18 convs in blocks + fc, and no 1x1 shortcut convs
    layers = weighted_layers(model)
    assert len(layers) == 20
    assert all(c.kernel_size == (3, 3) for c in layers if isinstance(c, nn.Conv2d))
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]


def test_resnet18_cifar_variant():
    model = resnet18()
    assert n_params(model) == 11_173_962  # the usual ~11.2M of the CIFAR ResNet-18
    # 3x3 stride-1 stem, no max-pool: the first stage still sees 32x32
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # 1x1-conv shortcuts where the shape changes (3 stage transitions), 17 3x3 convs, 1 fc
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert len(convs) == 20 and len(weighted_layers(model)) == 21


@pytest.mark.parametrize(
    "factory, shapes",
    [
        (resnet20, [(16, 32), (32, 16), (64, 8)]),
        (resnet18, [(64, 32), (128, 16), (256, 8), (512, 4)]),
    ],
)
def test_stage_resolutions(factory, shapes):
    model = factory().eval()
    seen = []
    for i in range(1, model.num_stages + 1):
        getattr(model, f"layer{i}").register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[1:3])))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == shapes


def test_option_a_shortcut_pads_channels_and_subsamples():
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert n_params(block.shortcut) == 0
    # the identity lands in the middle channels (8 zero channels on each side), at even positions
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert (s[:, :8] == 0).all() and (s[:, 24:] == 0).all()


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="shortcut"):
        BasicBlock(16, 32, stride=2, shortcut="C")
    with pytest.raises(ValueError, match="option-A"):
        BasicBlock(32, 16, stride=2, shortcut="A")
    with pytest.raises(ValueError, match="equal length"):
        CifarResNet((16, 32), (3,))


def test_kaiming_init():
    torch.manual_seed(0)
    model = resnet18()
    # kaiming_normal_(mode="fan_out", relu): std = sqrt(2 / (out_channels * k * k))
    for conv in (model.layer3[0].conv2, model.layer4[1].conv1):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in bns)


def test_trains_one_step():
    torch.manual_seed(0)
    model = resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert nn.functional.cross_entropy(model(x), y) < loss

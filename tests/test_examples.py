"""The examples run end to end on CPU: CIFAR (on a few hundred images of the shared subset) and quickstart.

The CIFAR runs use 1 epoch on 256 training images; the point is that every path -- training, the
callback, the multi-bit comparison with save / reload, round-to-nearest -- runs and reports sensible
numbers, not the accuracy (that is what the benchmark run in the README measures). They use the fast
GPTQ solver: ExactOBC on ResNet-20's 576-wide convs takes about a minute on a shared 2-core CPU.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from obc_lightning.export import load_quantized

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBSET = REPO_ROOT.parent / "shared" / "data" / "cifar10_subset.npz"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cifar = _load_example("cifar")

needs_subset = pytest.mark.skipif(
    not SUBSET.is_file(), reason=f"CIFAR-10 subset not found at {SUBSET} (see shared/data/README.md)"
)
QUICK = [
    "--log-dir",
    "none",
    "--subset",
    str(SUBSET),
    "--epochs",
    "1",
    "--limit-train",
    "256",
    "--limit-test",
    "128",
    "--batch-size",
    "64",
    "--calibration-images",
    "128",
    "--quiet",
    "--accelerator",
    "cpu",
]


def test_random_crop_flip_is_a_shifted_possibly_flipped_crop():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    g = torch.Generator().manual_seed(1)
    out = cifar.random_crop_flip(x, padding=4, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        # exactly one of the 81 offsets x 2 flips reproduces each output image
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 10 < flips < 54  # about half flipped


def test_missing_subset_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="--subset PATH, or leave --subset out to download"):
        cifar.load_subset(tmp_path / "nope.npz")


def test_the_default_is_the_torchvision_download_and_offline_says_what_to_do(tmp_path, monkeypatch):
    """Without --subset the example downloads CIFAR-10 through torchvision (imported only then); without
    torchvision, or offline, it stops with the remedy (--subset PATH)."""
    import types

    args = cifar.build_parser().parse_args(["--data-dir", str(tmp_path)])
    assert args.subset is None and args.data_dir == tmp_path
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(SystemExit, match="needs torchvision .* --subset PATH"):
        cifar.run(args)

    def offline(root, train, download):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(SystemExit, match="could not download CIFAR-10 .* --subset PATH"):
        cifar.run(args)


def test_torchvision_path_converts_to_the_npz_layout(tmp_path, monkeypatch):
    """``--data-dir`` calls torchvision's CIFAR10(root, train=..., download=True); HWC uint8 -> CHW.

    torchvision cannot be installed on the offline test machines, so a stand-in with the same
    attributes (``data``: (N, 32, 32, 3) uint8 ndarray, ``targets``: list of int) replaces it.
    """
    import types

    import numpy as np

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
            self.targets = list(range(n))

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=FakeCIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    a = cifar.load_torchvision(tmp_path)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert a.train_x.shape == (6, 3, 32, 32) and a.test_x.shape == (4, 3, 32, 32)
    assert a.train_x.dtype == torch.uint8 and a.train_y.tolist() == list(range(6))
    ref = torch.from_numpy(FakeCIFAR10("", True, True).data)
    assert torch.equal(a.train_x[2, 1], ref[2, :, :, 1])  # channel 1 of image 2


def test_round_to_nearest_puts_every_row_on_a_small_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 5))
    cifar.round_to_nearest_(model, bits=3)
    for m in (model[0], model[2]):
        for row in m.weight.detach().flatten(1):
            assert len(torch.unique(row)) <= 2**3


@needs_subset
def test_datamodule_batches():
    arrays = cifar.load_subset(SUBSET).limit(300, 100)
    assert arrays.train_x.shape == (300, 3, 32, 32) and arrays.test_y.shape == (100,)
    dm = cifar.CifarDataModule(arrays, batch_size=64)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    assert len(dm.train_dataloader()) == 300 // 64  # drop_last
    calib = dm.calibration_batches(200, batch_size=64)
    assert [len(b) for b in calib] == [64, 64, 64, 8]
    # the model normalises uint8 input itself, so calibration batches are valid forward inputs
    lit = cifar.CifarClassifier("resnet20").eval()
    with torch.no_grad():
        assert lit(calib[-1]).shape == (8, 10)


@pytest.mark.slow  # 1 + 2 x 19 calibration passes through the callback: ~16 s of a quiet 2-core machine
@needs_subset
def test_cifar_callback_path(tmp_path, capsys):
    logs = tmp_path / "logs"
    res = cifar.main(QUICK + ["--bits", "4", "--solvers", "gptq", "--export", str(tmp_path / "r20.safetensors")]
                     + ["--log-dir", str(logs), "--sequential"])
    assert capsys.readouterr().out.count("quantized, 0 skipped | size") == 1  # the table, once
    assert res["method"] == "callback/gptq" and res["bits"] == 4
    # --sequential: calibrated layer by layer, fitted to the fp32 outputs (two passes per layer after the first)
    assert res["calibration_passes"] == 1 + 2 * 19
    # the example logs by default (TensorBoard here: tensorboardX is a dev dependency), the chart included
    assert list(logs.glob("train/version_0/events.out.tfevents.*"))
    assert (logs / "train" / "version_0" / "obc_rel_error.png").exists()
    assert res["file_bytes"] == (tmp_path / "r20.safetensors").stat().st_size
    assert 0 <= res["acc"] <= 100 and 0 <= res["fp32_acc"] <= 100
    # 20 weighted layers of ResNet-20 at 4 bits + per-row fp16 scale / zero: close to 8x smaller
    assert 6 < res["compression_ratio"] < 8


@needs_subset
def test_cifar_multi_bit_comparison_save_and_reload(tmp_path):
    ckpt, out = tmp_path / "fp32.pt", tmp_path / "results.json"
    res = cifar.main(
        QUICK + ["--bits", "4", "2", "--rtn", "--solvers", "gptq", "--save-fp32", str(ckpt), "--out", str(out)]
    )
    assert [(r["bits"], r["method"]) for r in res["runs"]] == [(4, "rtn"), (4, "gptq"), (2, "rtn"), (2, "gptq")]
    assert json.loads(out.read_text())["fp32_acc"] == res["fp32_acc"]
    assert res["calibration_images"] == 128
    # the saved weights are the fp32 ones: reloading them (no training) gives the same fp32 accuracy
    again = cifar.main(QUICK + ["--load-fp32", str(ckpt), "--solvers"])
    assert again["fp32_acc"] == res["fp32_acc"] and again["runs"] == []
    table = cifar.results_table(res)
    assert "round-to-nearest" in table and "GPTQ" in table


def test_quickstart_runs_keeps_accuracy_and_logs(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="quickstart needs the optional extra: pip install obc_lightning[examples]")
    quickstart = _load_example("quickstart")
    res = quickstart.main(["--epochs", "5", "--quiet", "--solver", "gptq", "--log-dir", str(tmp_path)])
    assert capsys.readouterr().out.count("4 quantized, 0 skipped") == 1  # the table, once
    logged = list((tmp_path / "quickstart" / "version_0").iterdir())  # TensorBoard here (tensorboardX), or CSV
    assert any(p.name.startswith("events.out.tfevents") or p.name == "metrics.csv" for p in logged)
    assert res["before"] > 0.85  # 5 epochs on the digits already separate them well
    assert res["after"] > res["before"] - 0.05
    assert len(res["report"].modules) == 4


@needs_subset
@pytest.mark.parametrize("mode", ["ste", "noise"])
def test_cifar_finetune_path(tmp_path, mode, capsys):
    """--load-fp32 + --finetune: epoch 0 passes through (compression sees the loaded weights), 1 epoch of
    fine-tuning, then the table. Tiny: 128 training images, 64 test images."""
    ckpt = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    lit = cifar.CifarClassifier("resnet20")
    torch.save(lit.state_dict(), ckpt)
    tiny = [a for a in QUICK]
    tiny[tiny.index("--limit-train") + 1], tiny[tiny.index("--limit-test") + 1] = "128", "64"
    res = cifar.main(
        tiny
        + ["--load-fp32", str(ckpt), "--bits", "4", "--solvers", "gptq", "--finetune", mode]
        + ["--finetune-epochs", "1", "--finetune-lr", "0.01", "--noise-penalty", "0"]
        + ["--export", str(tmp_path / "m.safetensors")]
    )
    assert res["finetune"] == mode and res["finetune_epochs"] == 1
    # the size reported is the file's; the file loads back into a fresh ResNet-20
    assert res["size_mb"] * 2**20 == res["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size
    fresh = cifar.CifarClassifier("resnet20")
    load_quantized(tmp_path / "m.safetensors", fresh, packed=True)
    schemes = {m.scheme for m in fresh.modules() if hasattr(m, "scheme")}
    assert schemes == ({"mixed"} if mode == "noise" else {"affine"})
    # compression at fit start sees the loaded weights: "before" is the loaded model's accuracy
    lit.eval()
    data = cifar.load_subset(SUBSET).limit(128, 64)
    assert res["fp32_acc"] == pytest.approx(cifar.evaluate(lit, cifar.CifarDataModule(data).val_dataloader()))
    for key in ("after_acc", "acc"):
        assert 0 <= res[key] <= 100
    # ~270k weights at ~4 bits (0.13 MB), plus BatchNorm and the rest in fp32 in the file
    assert 4 < res["avg_bits"] < 4.5 and 0.13 < res["size_mb"] < 0.2
    out = capsys.readouterr().out
    assert "post-training" in out and "fine-tuned" in out


@needs_subset
def test_cifar_pq_comparison_and_finetune(tmp_path, capsys):
    """--method pq: k-means vs Hessian-aware PQ after loading weights; --finetune pq: centroid fine-tuning."""
    ckpt = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(cifar.CifarClassifier("resnet20").state_dict(), ckpt)
    tiny = [a for a in QUICK]
    tiny[tiny.index("--limit-train") + 1], tiny[tiny.index("--limit-test") + 1] = "128", "64"
    res = cifar.main(tiny + ["--load-fp32", str(ckpt), "--method", "pq", "--n-centroids", "64"])
    assert [r["method"] for r in res["runs"]] == ["pq-kmeans", "pq"]
    kmeans, aware = res["runs"]
    assert aware["layer_loss"] < 0.5 * kmeans["layer_loss"]
    # 18 convs: a 6-bit code per 8 weights + a 64 x 8 fp16 codebook each
    assert 0.75 < aware["avg_bits"] < 1.5 and aware["avg_bits"] == kmeans["avg_bits"]
    assert "PQ (Hessian)" in capsys.readouterr().out
    res = cifar.main(
        tiny + ["--load-fp32", str(ckpt), "--method", "pq", "--n-centroids", "64", "--finetune", "pq"]
        + ["--finetune-epochs", "1", "--finetune-lr", "0.01"]
    )
    assert res["finetune"] == "pq" and res["finetune_epochs"] == 1 and "K=64" in res["pq"]
    with pytest.raises(SystemExit, match="--finetune pq goes with --method pq"):
        cifar.main(tiny + ["--load-fp32", str(ckpt), "--finetune", "pq"])

"""Issue 23, "files": every changed bit of an export file is refused before the model is touched; scales and
ranges are validated on load and on save; two saves give the same bytes; format_version 1 files (no
checksums) still load, with a warning.

Issue 33, "files": what is not a regular file is refused without blocking; an unreadable file is reported as
unreadable; overwriting keeps the file's mode; the temporary file of a killed save is removed by the next save
to its folder; examples and benchmarks load pickles with an explicit ``weights_only``."""

import ast
import errno
import json
import os
import random
import signal
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from obc_lightning import compress_model, load_quantized, save_quantized
from obc_lightning.export import pack_model, prepare_for_load, read_metadata
from obc_lightning.export import write as export_write
from obc_lightning.solvers import product_quantize

pytestmark = pytest.mark.filterwarnings("ignore::obc_lightning.calibration.CalibrationWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 16)

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x)).relu())


def quantized_net():
    """fc1: 4-bit, two groups per row (codes, scales, zeros); fc2: product-quantized (codes, codebook);
    the BatchNorm statistics and biases: other tensors."""
    model = Net()
    model.train()
    model(torch.randn(64, 16))  # BatchNorm statistics, num_batches_tracked = 1
    model.eval()
    report = compress_model(model, [torch.randn(32, 16)], bits=4, group_size=8, include="fc1", keep_results=True)
    pq = product_quantize(model.fc2.weight.detach(), None, block_size=4, n_centroids=8)
    with torch.no_grad():
        model.fc2.weight.copy_(pq.quantized_matrix)
    return model, {**report.results, "fc2": [pq]}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def layout(data: bytes):
    """(header length, header JSON, {tensor: (start, end) in the file})."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    spans = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
             if k != "__metadata__"}
    return n, header, spans


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, results = quantized_net()
    path = tmp_path_factory.mktemp("files") / "m.safetensors"
    save_quantized(model, path, results)
    return path, path.read_bytes()


def test_every_tensor_of_the_file_is_checked_and_a_clean_file_loads(saved):
    path, data = saved
    _, header, spans = layout(data)
    assert {"fc1.weight_codes", "fc1.weight_scales", "fc1.weight_zeros", "fc2.weight_codes", "fc2.weight_codebook",
            "bn.running_mean", "bn.num_batches_tracked", "fc1.bias"} <= set(spans)
    sums = json.loads(header["__metadata__"]["sha256"])
    assert set(sums) == set(spans) | {"__metadata__"}
    assert header["__metadata__"]["format_version"] == "2"
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_quantized(path, model)


def test_single_bit_flips_in_every_tensor_are_refused_naming_the_tensor_and_the_model_is_untouched(saved, tmp_path):
    _, data = saved
    _, _, spans = layout(data)
    rng = random.Random(0)
    flips = []  # (bit, tensor): the sign bit of every scale and codebook entry's first element, then random bits
    for name in ("fc1.weight_scales", "fc2.weight_codebook"):
        start, _ = spans[name]
        flips.append((8 * (start + 1) + 7, name))  # float16, little-endian: bit 7 of byte 1 is the sign
        flips.append((8 * (start + 1) + 6, name))  # the top exponent bit: a scale x 2^16 or so
    for name, (start, end) in sorted(spans.items()):
        flips += [(rng.randrange(8 * start, 8 * end), name) for _ in range(3)]
    assert len(flips) >= 40
    model = Net()
    before = state(model)
    bad = tmp_path / "bad.safetensors"
    for bit, name in flips:
        bad.write_bytes(flipped(data, bit))
        with pytest.raises(ValueError, match=rf"bad.safetensors: tensor '{name}' does not match its checksum"):
            load_quantized(bad, model)
        assert_untouched(model, before)


def test_single_bit_flips_in_the_header_are_refused_and_the_model_is_untouched(saved, tmp_path):
    # every bit of the length prefix, and random header bits: those where the header still parses as JSON
    # (the flips a parser cannot see: digits, names, metadata, checksums) and some where it does not
    _, data = saved
    n, _, _ = layout(data)
    rng = random.Random(1)
    parsing, broken = [], []
    for bit in rng.sample(range(64, 8 * (8 + n)), 8 * (8 + n) - 64):
        try:
            json.loads(flipped(data, bit)[8 : 8 + n])
            parsing.append(bit)
        except (json.JSONDecodeError, UnicodeDecodeError):
            broken.append(bit)
    flips = list(range(64)) + parsing[:60] + broken[:20]
    assert len(parsing) >= 60
    model = Net()
    before = state(model)
    bad = tmp_path / "bad.safetensors"
    for bit in flips:
        bad.write_bytes(flipped(data, bit))
        with pytest.raises(ValueError, match="bad.safetensors"):
            load_quantized(bad, model)
        assert_untouched(model, before)


def test_two_saves_give_the_same_bytes(tmp_path):
    model, results = quantized_net()
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        save_quantized(model, p, results)
    assert len({p.read_bytes() for p in paths}) == 1
    other, other_results = quantized_net()  # the same model rebuilt: the same file
    save_quantized(other, tmp_path / "other.safetensors", other_results)
    assert (tmp_path / "other.safetensors").read_bytes() == paths[0].read_bytes()


def test_format_version_1_files_load_with_a_warning(saved, tmp_path):
    # a file as obc_lightning wrote it before checksums: the same tensors, format_version "1"
    path, _ = saved
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = {k: v for k, v in meta.items() if k != "sha256"}
    old["format_version"] = "1"
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, v1, metadata=old)
    expected = Net()
    load_quantized(path, expected)
    model = Net()
    match = r"v1.safetensors: .*format_version 1, without checksums: its integrity cannot be verified"
    with pytest.warns(UserWarning, match=match):
        load_quantized(v1, model)
    assert_untouched(model, expected.state_dict())

    # a version 1 file cannot carry checksums (a damaged version string must not switch them off), and a
    # version 2 file must
    save_file(tensors, v1, metadata={**old, "sha256": meta["sha256"]})
    with pytest.raises(ValueError, match="format_version '1' is not supported"):
        load_quantized(v1, Net())
    save_file(tensors, v1, metadata={**old, "format_version": "2"})
    with pytest.raises(ValueError, match="'sha256' metadata entry"):
        load_quantized(v1, Net())


def test_non_positive_or_non_finite_scales_refused_on_load_with_valid_checksums(saved, tmp_path):
    from safetensors_edit import rewrite

    path, data = saved
    for value, what in ((-1.0, "-1.0"), (0.0, "0.0"), (float("inf"), "inf")):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        rewrite(bad, tensors_fn=lambda t, v=value: t["fc1.weight_scales"].__setitem__((3, 1), v))
        model = Net()
        before = state(model)
        match = rf"module 'fc1': weight_scales must be finite and > 0 .*got {what} in row 3, group 1"
        with pytest.raises(ValueError, match=match):
            load_quantized(bad, model)
        assert_untouched(model, before)


def test_save_refuses_a_file_that_would_not_load(tmp_path):
    model, results = quantized_net()
    pack_model(model, results)
    with torch.no_grad():
        model.fc1.weight_scales[2, 0] *= -1  # a packed module whose buffer went bad after packing
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"save_quantized: module 'fc1': weight_scales must be finite and > 0"):
        save_quantized(model, path)
    assert not path.exists()


# ------------------------------------------------------------------ issue 33: what is not a file, modes, leftovers
def forked(fn, timeout: float):
    """fn() run in a forked child (torch-free work only): ("returned" | "ExceptionName: message"), or None if
    it was still running after ``timeout`` seconds (then killed). A child, so that a call blocked in native
    code holding the GIL cannot hang the test process."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads
        pid = os.fork()
    if pid == 0:
        try:
            try:
                fn()
                outcome = "returned"
            except BaseException as e:  # reported to the parent
                outcome = f"{type(e).__name__}: {e}"
            os.write(w, outcome.encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return None
        time.sleep(0.02)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "fork"), reason="no named pipes or no fork")
def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    outcome = forked(lambda: read_metadata(fifo), timeout=20)
    assert outcome is not None, "read_metadata blocked on a FIFO"
    fifo_message = "m.safetensors is a named pipe (FIFO), not a regular file"
    assert outcome.startswith("ValueError: read_metadata: ") and fifo_message in outcome
    with pytest.raises(ValueError, match=r"load_quantized: .*m.safetensors is a named pipe \(FIFO\)"):
        load_quantized(fifo, Net())  # does not block: the same check
    with pytest.raises(ValueError, match=r"read_metadata: .* is a directory, not a regular file"):
        read_metadata(tmp_path)


def test_an_unreadable_file_is_reported_as_unreadable_and_the_model_is_untouched(saved, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(saved[1])
    path.chmod(0)
    if os.access(path, os.R_OK):
        # a privileged process (root in CI, CAP_DAC_OVERRIDE) reads a mode-000 file: the kernel's answer to every
        # other user is given by the open that reads the file (os.open, the only way in: safetensors opens it later)
        real_open = os.open

        def denied(p, flags, *args, **kwargs):
            if os.fspath(p) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
            return real_open(p, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    model = Net()
    before = state(model)
    with pytest.raises(PermissionError, match=r"load_quantized: .*m.safetensors exists but cannot be read"):
        load_quantized(path, model)
    assert_untouched(model, before)
    with pytest.raises(PermissionError, match=r"prepare_for_load: .*m.safetensors exists but cannot be read"):
        prepare_for_load(model, path)
    assert_untouched(model, before)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_overwriting_a_file_keeps_its_mode_and_a_new_file_follows_the_umask(tmp_path):
    model, results = quantized_net()
    path = tmp_path / "m.safetensors"
    umask = os.umask(0o027)
    try:
        save_quantized(model, path, results)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        for mode in (0o600, 0o644, 0o444):
            path.chmod(mode)
            save_quantized(model, path, results)
            assert stat.S_IMODE(path.stat().st_mode) == mode
    finally:
        os.umask(umask)
    load_quantized(path, Net())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a save in progress")
def test_the_temporary_file_of_a_killed_save_is_removed_by_the_next_save_and_a_running_one_is_kept(tmp_path):
    model, results = quantized_net()
    target = tmp_path / "killed.safetensors"
    ready_r, ready_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads: the child runs no torch
        pid = os.fork()
    if pid == 0:  # the child: a save that is killed while it writes
        try:
            def write_then_hang(tmp):
                Path(tmp).write_bytes(b"half a file")
                os.write(ready_w, b"1")
                time.sleep(60)

            export_write.atomic_write(str(target), write_then_hang)
        finally:
            os._exit(1)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1"
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.safetensors.")]
        save_quantized(model, tmp_path / "other.safetensors", results)  # while the save runs: its file is kept
        assert partial.exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert partial.exists()  # what a killed save leaves
    save_quantized(model, tmp_path / "other.safetensors", results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_examples_and_benchmarks_call_torch_load_with_an_explicit_weights_only():
    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in sorted([*root.glob("examples/*.py"), *root.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                explicit = any(k.arg == "weights_only" for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", explicit))
    assert len(calls) >= 7
    assert [where for where, explicit in calls if not explicit] == []

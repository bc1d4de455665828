"""benchmarks/gpu_check.py --cpu-smoke: every part runs (kernels interpreted, tiny shapes), each figure is
written as it comes, and a part that fails leaves the others' figures (the error path, via --fail-part)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # every part interpreted: ~27 s of a quiet 2-core machine
def test_gpu_check_smoke_keeps_the_figures_of_the_parts_that_did_not_fail(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path),
           "--fail-part", "networks"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    figures: dict[str, list] = {}
    for rec in records:
        if "value" in rec and rec["name"] != "part_seconds":
            figures.setdefault(rec["part"], []).append(rec)
    assert records[0]["part"] == "machine" and figures["machine"][0]["name"] == "python"  # the machine first
    errors = [rec for rec in records if "error" in rec]
    assert [rec["part"] for rec in errors] == ["networks"] and "--fail-part networks" in errors[0]["error"]
    assert not any(rec.get("skipped") is True for rec in records)  # the budget held every part
    for part in ("machine", "warmup", "flush", "reference", "launches", "tests", "sharded"):
        assert figures.get(part), part  # every other part still measured something
    assert "networks" not in figures
    # each figure is on stdout too, as one line
    assert "flush | ResNet-18 flush GFLOP, all layers" in r.stdout

"""``python -m bench.gpu`` in its CPU mode (``--device cpu --tiny``), in-process.

The real run needs a CUDA GPU; this keeps every path it shares with the CPU working between such
runs: every row is printed and written, every figure is a finite positive number, and the CUDA-only
parts (torch.compile, the out-of-memory check) say that they were skipped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MODELS = ("sd-turbo", "sdxl-lightning")
ROWS = (
    "build + save (random weights; not node work)",
    "load (engine.load)",
    "warm-up (first engine.generate)",
    "raw pipeline call",
    "engine.generate",
    "engine/raw",
    "PNG encoding of one image (the store's, beside the device thread)",
    "images/s through the node, one request at a time",
    "images/s through the node, requests at once",
    "node/raw (images/s)",
    "images/s, 1 image per call",
    "images/s, 4 requests batched",
    "TORCH_COMPILE",
)


def _rows(report: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(model, measurement) -> (value, note) for each row of the markdown table."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in MODELS:
            rows[cells[0], cells[1]] = (cells[2], cells[3])
    return rows


def _number(value: str) -> float:
    """``"0.08 s"``, ``"46.0 ms"``, ``"21.42"``, ``"1.015x"`` -> the number."""
    match = re.fullmatch(r"([0-9.]+)(?: s| ms|x)?", value)
    assert match, value
    return float(match.group(1))


def test_tiny_cpu_run_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gpu

    out = tmp_path / "report.md"
    assert gpu.main(["--device", "cpu", "--tiny", "--repeats", "2", "--out", str(out)]) == 0
    report = out.read_text()
    assert capsys.readouterr().out.strip() == report.strip()  # what is printed is what is written

    assert "date: " in report and "machine: CPU" in report and "torch " in report and "diffusers " in report
    rows = _rows(report)
    for model in MODELS:
        for what in ROWS:
            assert (model, what) in rows, f"no row {what!r} for {model}"
        assert rows[model, "TORCH_COMPILE"] == ("skipped", "CUDA only")
    assert rows["sdxl-lightning", "out-of-memory, then recovery"][0] == "skipped (CUDA only)"
    for (model, what), (value, _) in rows.items():
        if "skipped" not in value:
            number = _number(value)
            assert math.isfinite(number) and number > 0, (model, what, value)

    summary = [line for line in report.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 1
    for kind in ("engine/raw", "node/raw"):
        ratios = dict(re.findall(rf"([\w-]+) {kind} ([0-9.]+)x", summary[0]))
        assert set(ratios) == set(MODELS)
        assert all(math.isfinite(float(ratio)) and float(ratio) > 0 for ratio in ratios.values())
    assert "compiled/raw skipped (CUDA only)" in summary[0] and "oom-recovery skipped (CUDA only)" in summary[0]


def test_missing_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu.main(["--tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err

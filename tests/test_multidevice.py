"""Every multi-device check (sharded kernels, operator, eigenpairs, factored convolutions, layer
blocks, the out-of-core store, data-parallel training) against one device, in ONE subprocess with
4 forced CPU devices: tests/multidevice_checks.py, where each check's docstring says what it
checks. The device count is fixed when JAX starts, and one shared process pays the start-up and
the shared compilations once. A failing check fails this test with its name and traceback; the
other checks still run and are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "multidevice_checks.py"


def test_multidevice_checks_all_pass(tmp_path):
    results_path = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(results_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-5000:]}"
    assert results_path.exists(), f"no results (exit status {result.returncode})\n{output}"
    results = json.loads(results_path.read_text())
    assert len(results) >= 7, results  # the seven checks that replaced per-module subprocesses
    failures = [f"{name}:\n{text}" for name, text in results.items() if text not in ("ok", None)]
    missing = [name for name, text in results.items() if text is None]
    if missing:
        failures.append(
            f"checks that never finished (exit status {result.returncode}): {', '.join(missing)}"
            f"\n{output}"
        )
    if failures:
        pytest.fail(f"{len(failures)} multi-device check(s) failed:\n\n" + "\n\n".join(failures))
    assert result.returncode == 0, output
    print(result.stdout)  # each check's time

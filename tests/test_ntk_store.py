"""Fault injection on the out-of-core kernel store: damaged files, changed models, other layouts,
full disks and two writers. Each fault either gives the correct kernel or a clear error."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import _store, empirical_ntk

TESTS = Path(__file__).parent
SHAPE = (4, 4, 1)


def model(activation: str = "gelu"):
    net = build_model("mlp", widths=(8, 6), activation=activation)
    variables = init_variables(net, jax.random.PRNGKey(0), SHAPE)
    return inference_apply_fn(net, variables), variables["params"]


@pytest.fixture(scope="module")
def setup():
    apply_fn, params = model()
    x = np.random.default_rng(0).standard_normal((9, *SHAPE)).astype(np.float32)
    reference = empirical_ntk(apply_fn, params, x, batch_size=2)
    return apply_fn, params, x, reference


class Interrupted(Exception):
    pass


def stop_after(count: int):
    def hook(units_done: int) -> None:
        if units_done == count:
            raise Interrupted

    return hook


def interrupted_run(setup, out: Path, units: int, **options) -> None:
    apply_fn, params, x, _ = setup
    with pytest.raises(Interrupted):
        empirical_ntk(apply_fn, params, x, out=out, batch_size=2, _after_unit=stop_after(units),
                      **options)  # fmt: skip


def record(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".progress.json").read_text())


def resume(setup, out: Path, **options) -> np.ndarray:
    apply_fn, params, x, _ = setup
    return np.asarray(empirical_ntk(apply_fn, params, x, out=out, batch_size=2, **options))


def test_truncated_kernel_with_a_complete_record_is_recomputed(setup, tmp_path, caplog):
    out = tmp_path / "kernel.npy"
    resume(setup, out)
    assert record(out)["complete"]
    size = out.stat().st_size
    with open(out, "r+b") as file:
        file.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="ntklab.ntk"):
        kernel = resume(setup, out)
    assert f"{out} is inconsistent with its resume record (file size" in caplog.text
    np.testing.assert_array_equal(kernel, setup[3])


def test_flipped_header_dtype_is_recomputed(setup, tmp_path, caplog):
    out = tmp_path / "kernel.npy"
    resume(setup, out)
    data = out.read_bytes()
    assert b"'<f4'" in data[:128]
    out.write_bytes(data[:128].replace(b"'<f4'", b"'<f8'") + data[128:])
    with caplog.at_level(logging.WARNING, logger="ntklab.ntk"):
        kernel = resume(setup, out)
    assert "header dtype float64 instead of float32" in caplog.text
    np.testing.assert_array_equal(kernel, setup[3])


def test_record_ahead_of_the_data_recomputes_the_missing_units(setup, tmp_path, caplog):
    out = tmp_path / "kernel.npy"
    interrupted_run(setup, out, 2)
    snapshot = tmp_path / "snapshot.npy"
    shutil.copy(out, snapshot)  # the data as of 2 units
    interrupted_run(setup, out, 5)
    assert record(out)["units_done"] == 5
    shutil.copy(snapshot, out)  # the record says 5 units, the data hold 2
    with caplog.at_level(logging.WARNING, logger="ntklab.ntk"):
        kernel = resume(setup, out)
    assert "do not match their recorded digest; recomputing them" in caplog.text
    np.testing.assert_array_equal(kernel, setup[3])


def test_flipped_bytes_in_a_finished_unit_are_recomputed(setup, tmp_path, caplog):
    out = tmp_path / "kernel.npy"
    interrupted_run(setup, out, 4)
    first = record(out)["units"][0]["region"]
    kernel = np.load(out, mmap_mode="r+")
    kernel[first[0], first[2]] = 1e6  # inside the first finished unit
    kernel.flush()
    del kernel
    with caplog.at_level(logging.WARNING, logger="ntklab.ntk"):
        resumed = resume(setup, out)
    assert f"rows {first[0]}:{first[1]}, cols {first[2]}:{first[3]} do not match" in caplog.text
    np.testing.assert_array_equal(resumed, setup[3])


def test_stale_kernel_without_a_record_is_replaced(setup, tmp_path):
    out = tmp_path / "kernel.npy"
    np.save(out, np.ones_like(setup[3]))
    np.testing.assert_array_equal(resume(setup, out), setup[3])


def test_changed_apply_fn_is_refused(setup, tmp_path):
    out = tmp_path / "kernel.npy"
    interrupted_run(setup, out, 2)
    relu_apply, _ = model("relu")  # same parameters, another activation
    _, params, x, _ = setup
    with pytest.raises(ValueError, match=r"different arguments \(changed: apply_fn_sha256\)"):
        empirical_ntk(relu_apply, params, x, out=out, batch_size=2)

    def scaled(p, inputs):  # closed-over constants (like BatchNorm statistics) count too
        return setup[0](p, inputs) * jnp.asarray(np.float32(2.0))

    with pytest.raises(ValueError, match="apply_fn_sha256"):
        empirical_ntk(scaled, params, x, out=out, batch_size=2)


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 3},
        {"memory_bytes": 800},
        {"batch_size": 4, "param_chunk_size": 40, "implementation": "jacobian"},
    ],
    ids=["batch_size", "memory_bytes", "chunks"],
)
def test_other_memory_layout_resumes_to_the_same_kernel(setup, tmp_path, options, caplog):
    out = tmp_path / "kernel.npy"
    interrupted_run(setup, out, 3)
    apply_fn, params, x, reference = setup
    with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
        kernel = empirical_ntk(apply_fn, params, x, out=out, **{"batch_size": 2, **options})
    assert re.search(r"resuming .*: [1-9]\d* of \d+ units already done", caplog.text), caplog.text
    np.testing.assert_allclose(np.asarray(kernel), reference, rtol=2e-6, atol=1e-6)
    assert record(out)["complete"]


# The resume-on-another-device-count check on 4 devices is
# store_other_device_count_resumes_to_the_same_kernel in tests/multidevice_checks.py (one shared
# 4-device subprocess for the whole suite, run by tests/test_multidevice.py).


def test_full_disk_is_refused_before_writing(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(_store, "free_bytes", lambda directory: 100)
    apply_fn, params, x, _ = setup
    out = tmp_path / "kernel.npy"
    with pytest.raises(
        OSError, match=r"not enough disk space for the kernel .*: 4,420 bytes needed, 100 available"
    ):
        empirical_ntk(apply_fn, params, x, out=out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file or lock left behind


FSIZE_SCRIPT = """
import resource, signal, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_ntk_store import model, SHAPE
from ntklab.ntk import empirical_ntk
apply_fn, params = model()
x = np.zeros((300, *SHAPE), np.float32)  # a 360 KB kernel
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the file-size limit then fails the write
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    empirical_ntk(apply_fn, params, x, out=sys.argv[1], batch_size=300)
except OSError as error:
    print("REFUSED", error)
"""


def test_file_size_limit_fails_with_a_message_not_sigbus(tmp_path):
    script = tmp_path / "fsize.py"
    script.write_text(FSIZE_SCRIPT.format(tests=str(TESTS)))
    out = tmp_path / "out" / "kernel.npy"
    result = subprocess.run([sys.executable, script, out], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "REFUSED" in result.stdout and "360,000 bytes needed" in result.stdout, result.stdout
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


SECOND_WRITER = """
import sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_ntk_store import model, SHAPE
from ntklab.ntk import KernelInUseError, empirical_ntk
apply_fn, params = model()
x = np.random.default_rng(0).standard_normal((9, *SHAPE)).astype(np.float32)
try:
    empirical_ntk(apply_fn, params, x, out=sys.argv[1], batch_size=2)
except KernelInUseError as error:
    print("IN-USE", error)
"""


def test_second_process_on_the_same_out_gets_a_clear_error(setup, tmp_path):
    import os

    out = tmp_path / "kernel.npy"
    script = tmp_path / "second.py"
    script.write_text(SECOND_WRITER.format(tests=str(TESTS)))
    seen = {}

    def hook(units_done: int) -> None:  # while this process holds the kernel
        if units_done == 1:
            seen["second"] = subprocess.run([sys.executable, script, out], capture_output=True,
                                            text=True, timeout=600)  # fmt: skip

    apply_fn, params, x, reference = setup
    kernel = empirical_ntk(apply_fn, params, x, out=out, batch_size=2, _after_unit=hook)
    second = seen["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"being written by another process (PID {os.getpid()}" in second.stdout
    np.testing.assert_array_equal(np.asarray(kernel), reference)
    assert not out.with_name("kernel.npy.lock").exists()  # released

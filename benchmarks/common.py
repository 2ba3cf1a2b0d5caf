"""Shared helpers of the benchmarks: machine facts, memory high-water marks, matmul rates, tables.

Dimensions: B examples per block, P parameters.

    rate = matmul_rate(256, 136_121, precision="highest")  # FLOP/s of [B, P] x [P, B]
    reset_peak_rss(); ...; peak_rss_bytes()                 # per-case process RSS high-water mark
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GB = 1e9


def dot_precision(precision: str) -> object:
    """``precision=`` for ``jnp.matmul``/``einsum`` on JAX's default device.

    Args:
      precision: ``"float32"`` (full float32), ``"tf32"`` (TF32 tensor cores on a GPU; plain
        float32 elsewhere) or ``"bfloat16"`` (operands cast to bfloat16 by the caller).
    """
    if precision == "tf32" and jax.devices()[0].platform == "gpu":
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    if precision == "bfloat16":
        return jax.lax.Precision.DEFAULT
    return jax.lax.Precision.HIGHEST


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def total_ram_bytes() -> int:
    """Physical memory of the host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_header() -> dict[str, str]:
    """Machine, library versions and date, for the report header."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores visible",
        "ram": f"{total_ram_bytes() / GB:.1f} GB",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax devices": ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["torch cuda"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = "not installed (torch peers skipped; `pip install -e .[bench]`)"
    return info


# --- memory -------------------------------------------------------------------------------------


def _vm_status(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux only), else None."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Resets the process's RSS high-water mark to its current RSS (Linux ``clear_refs`` 5).

    Returns:
        whether the reset worked; if not, ``peak_rss_bytes`` is the whole process's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last ``reset_peak_rss`` (or process start)."""
    hwm = _vm_status("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def current_rss_bytes() -> int:
    """Current resident set size (0 where /proc is missing)."""
    return _vm_status("VmRSS") or 0


def jax_device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of JAX's default device (None on CPU); never reset by JAX."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def jax_device_memory_bytes() -> int | None:
    """Memory limit of JAX's default device (None on CPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    return (device.memory_stats() or {}).get("bytes_limit")


# --- matmul rates -------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], *, repeats: int = 3, min_seconds: float = 0.3) -> float:
    """Best wall time of ``fn()`` (results blocked on) after one warm-up call.

    Runs at least ``repeats`` times and until ``min_seconds`` have been spent.
    """
    jax.block_until_ready(fn())
    best, spent, runs = float("inf"), 0.0, 0
    while runs < repeats or spent < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def matmul_rate(
    m: int, k: int, n: int, *, precision: str = "float32", max_operand_bytes: int = 1 << 30
) -> tuple[float, tuple[int, int, int]]:
    """Measured FLOP/s of ``jnp.matmul(a[m, k], b[n, k].T)`` on JAX's default device.

    Operands are float32 (cast to bfloat16 for ``precision="bfloat16"``), accumulation float32.
    ``k`` is capped so that each operand fits in ``max_operand_bytes`` (the rate of a skinny
    product barely changes with its inner dimension once it is large).

    Returns:
        (FLOP/s, the (m, k, n) actually measured).
    """
    k = max(1, min(k, max_operand_bytes // (4 * max(m, n))))
    keys = jax.random.split(jax.random.PRNGKey(0))
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32)
    rhs = jax.random.normal(keys[1], (n, k), jnp.float32)
    prec = dot_precision(precision)
    if precision == "bfloat16":
        lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    product = jax.jit(
        lambda a, b: jnp.matmul(a, b.T, precision=prec, preferred_element_type=jnp.float32)
    )
    seconds = best_time(lambda: product(lhs, rhs))
    return 2.0 * m * k * n / seconds, (m, k, n)


# --- tables -------------------------------------------------------------------------------------


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown pipe table, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(col), *(len(r[i]) for r in cells)) if cells else len(col)
        for i, col in enumerate(columns)
    ]
    numeric = [
        all(_looks_numeric(r[i]) for r in cells) if cells else False for i in range(len(columns))
    ]
    head = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if num else "-" * (w + 2)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    body = [
        "| "
        + " | ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        )
        + " |"
        for r in cells
    ]
    return "\n".join([head, rule, *body])


def _looks_numeric(text: str) -> bool:
    text = text.strip().rstrip("x%")
    if text in {"-", "—"}:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def fmt(value: float | None, spec: str = ".3g") -> str:
    """Formats a number, or "—" for None / NaN."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return format(value, spec)

"""eNTK benchmark: ntklab against plain JAX and torch.func, side by side on the same inputs.

Dimensions: N examples, P parameters, B examples per block.

For each model, N and implementation it times the scalar-output kernel [N, N] (after a warm-up on a
small N that compiles the same block shapes) and prints a Markdown table of seconds, seconds per
entry, achieved FLOP/s against the FLOP floor (2·P per entry, P·N(N+1) for the symmetric kernel)
and against the matmul rate measured at startup, peak memory, and the max relative difference to
ntklab's kernel. For ntklab it also splits the time (its Jacobian phase, one batched forward +
backward of the same blocks, the ideal contraction; their floor = fwd+bwd + ideal contraction,
and total ÷ floor) and, with several models, times every ntklab case again alone in a fresh
process beside its time after the models before it in this one (the sequence table), so a
slowdown an earlier model leaves behind cannot hide. Run ``python benchmarks/bench_ntk.py
--help``; see benchmarks/README.md.

    python benchmarks/bench_ntk.py --models lenet --sizes 2000 --impls ntklab,torch_jac
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# JAX must not grab 75% of a GPU up front: torch shares the device in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import common

from ntklab import threads
from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

try:
    import torch
    import torch_peers
except ImportError:  # the optional ``bench`` extra
    torch = torch_peers = None

INPUT_SHAPE = (32, 32, 3)
MODELS = ("mlp", "lenet", "resnet18")
IMPLS = ("ntklab", "jax_jacrev", "torch_jac", "torch_ntkvp")
PRECISION_ALIASES = {"highest": "float32", "high": "tf32"}
PRECISIONS = ("float32", "tf32", "bfloat16")
_LEGACY_ENGINE_PRECISION = {"float32": "highest", "tf32": "high"}
_JAX_DEFAULT_PRECISION = {"float32": "highest", "tf32": "tensorfloat32", "bfloat16": "bfloat16"}
NTKVP_BATCH = {"mlp": 32, "lenet": 32, "resnet18": 8}
"""Default examples per side of a torch_ntkvp block pair (B² single-example VJP+JVP per call)."""
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULT_TAG = "BENCH_CASE_RESULT "

log = logging.getLogger("bench_ntk")


# --- setup --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="lenet,mlp,resnet18", help="comma list of " + ",".join(MODELS)
    )
    parser.add_argument("--sizes", default="500,1000,2000", help="comma list of N")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help="comma list of " + ",".join(IMPLS) + "; 'ntklab:<implementation>' picks the engine's"
        " implementation= (default: the engine's own default). The first ntklab entry is the"
        " reference for diffs and speed-ups.",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="examples per block B")
    parser.add_argument(
        "--ntkvp-batch-size",
        type=int,
        default=0,
        help="examples per side of a torch_ntkvp block pair; 0 = per model "
        + ", ".join(f"{k} {v}" for k, v in NTKVP_BATCH.items()),
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=[*PRECISIONS, *PRECISION_ALIASES],
        help="contraction precision (highest = float32, high = tf32)",
    )
    parser.add_argument(
        "--model-precision",
        default="same",
        choices=["same", "framework"],
        help="'same': forward/backward matmuls and convs of every implementation at --precision "
        "(sets jax_default_matmul_precision and torch's TF32 switches); 'framework': each "
        "framework's default (TF32 convs on Ampere+ GPUs)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (best kept)")
    parser.add_argument(
        "--data", default="auto", choices=["auto", "cifar10", "normal"], help="input images"
    )
    parser.add_argument(
        "--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding cifar-10-batches-py"
    )
    parser.add_argument(
        "--torch-device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="device of the torch peers (auto: cuda when available)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="ntklab shards over the first this many JAX devices (0: all; the other "
        "implementations use JAX's default device); passed only if the engine has devices=",
    )
    parser.add_argument(
        "--peer-memory-gb",
        type=float,
        default=None,
        help="memory the peers may fill with cached Jacobians of all N examples (else they "
        "recompute column blocks per row block); default 40%% of RAM (CPU) or device memory",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="skip a case whose time projected from its warm-up exceeds this many seconds (0: off)",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run every case in a fresh child process (clean per-case peaks, survives OOM kills)",
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip ntklab's time split")
    parser.add_argument(
        "--no-sequence",
        action="store_true",
        help="skip the sequence check: with several models, every ntklab case is also run alone "
        "in a fresh process and compared with its time after the models before it in this one",
    )
    parser.add_argument("--floor-only", action="store_true", help="print the matmul rates and exit")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show ntklab's INFO logs")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    args.precision = PRECISION_ALIASES.get(args.precision, args.precision)
    args.models = [m for m in args.models.split(",") if m]
    args.sizes = [int(n) for n in args.sizes.split(",") if n]
    args.impls = [i for i in args.impls.split(",") if i]
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; valid choices: {', '.join(MODELS)}")
    for impl in args.impls:
        if impl.split(":")[0] not in IMPLS:
            parser.error(f"unknown implementation {impl!r}; valid choices: {', '.join(IMPLS)}")
    if args.torch_device == "auto":
        args.torch_device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if args.peer_memory_gb is None:
        device_bytes = common.jax_device_memory_bytes()
        args.peer_memory_gb = 0.4 * (device_bytes or common.total_ram_bytes()) / common.GB
    return args


class _EngineChoice(logging.Handler):
    """Remembers which implementation ntklab ran, from its INFO log (best effort)."""

    last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"output=\w+, (\w+),", record.getMessage())
        if match:
            _EngineChoice.last = match.group(1)


def configure(args: argparse.Namespace) -> None:
    """Logging, thread counts and the framework-wide precision switches."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("ntklab.ntk").addHandler(_EngineChoice())
    if args.model_precision == "same":
        jax.config.update("jax_default_matmul_precision", _JAX_DEFAULT_PRECISION[args.precision])
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        if args.model_precision == "same":
            tf32 = args.precision != "float32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32


def engine_kwargs(variant: str | None, precision: str, num_devices: int = 0) -> dict:
    """Keyword arguments for ``empirical_ntk`` that its current signature accepts.

    Raises:
      ValueError: the engine has no such implementation or precision.
    """
    signature = inspect.signature(empirical_ntk).parameters
    hints = typing.get_type_hints(empirical_ntk)
    kwargs: dict = {}
    if "precision" in signature:
        choices = typing.get_args(hints.get("precision")) or (precision,)
        value = precision if precision in choices else _LEGACY_ENGINE_PRECISION.get(precision)
        if value not in choices:
            raise ValueError(f"engine has no precision {precision!r} (choices {choices})")
        kwargs["precision"] = value
    if "implementation" in signature and variant is not None:
        choices = typing.get_args(hints.get("implementation"))
        if choices and variant not in choices:
            raise ValueError(f"engine has no implementation {variant!r}; choices {choices}")
        kwargs["implementation"] = variant
    elif variant is not None:
        raise ValueError("this engine has no implementation= option")
    if num_devices:
        if "devices" not in signature:
            raise ValueError("this engine has no devices= option")
        kwargs["devices"] = jax.devices()[:num_devices]
    if "progress" in signature:
        kwargs["progress"] = False
    return kwargs


# --- inputs and models --------------------------------------------------------------------------


_INPUT_CACHE: dict[tuple, tuple[np.ndarray, str]] = {}


def load_inputs(n: int, data: str, root: str) -> tuple[np.ndarray, str]:
    """The N images every implementation sees: CIFAR-10 training images, else N(0, 1) noise.

    Deterministic (the same N gives the same images in every process); the last N is cached.

    Returns:
      (x [N, 32, 32, 3] float32, description).
    """
    key = (n, data, root)
    if key not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        _INPUT_CACHE[key] = _load_inputs(n, data, root)
    return _INPUT_CACHE[key]


def _load_inputs(n: int, data: str, root: str) -> tuple[np.ndarray, str]:
    if data in ("auto", "cifar10"):
        try:
            from ntklab.data import load_dataset

            ds = load_dataset("cifar10", root=root, num_train=n, seed=0)
            return np.ascontiguousarray(ds.train.images, np.float32), (
                f"CIFAR-10 training images (stratified subset, seed 0, standardized) from {root}"
            )
        except (FileNotFoundError, ValueError) as error:
            if data == "cifar10":
                raise
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    else:
        reason = "--data normal"
    x = np.random.default_rng(0).standard_normal((n, *INPUT_SHAPE), dtype=np.float32)
    return x, f"standard-normal inputs [N, 32, 32, 3], seed 0 ({reason})"


@dataclasses.dataclass
class ModelContext:
    name: str
    model: object
    variables: dict
    apply_fn: Callable
    params: dict
    num_params: int
    _torch: object = None

    def torch_model(self, device: str):
        if self._torch is None:
            self._torch = torch_peers.mirror_model(self.name, self.variables, INPUT_SHAPE).to(
                device
            )
        return self._torch


_MODEL_CACHE: dict[str, ModelContext] = {}


def model_context(name: str) -> ModelContext:
    if name not in _MODEL_CACHE:
        model = build_model(name)
        variables = init_variables(model, jax.random.PRNGKey(0), INPUT_SHAPE)
        _MODEL_CACHE[name] = ModelContext(
            name,
            model,
            variables,
            inference_apply_fn(model, variables),
            variables["params"],
            count_params(variables["params"]),
        )
    return _MODEL_CACHE[name]


def mirror_check(ctx: ModelContext, device: str, x: np.ndarray) -> str:
    """Torch mirror vs Flax outputs on the first 8 images: 'P ok, max rel diff 1e-7'."""
    if torch is None:
        return "torch not installed"
    tmodel = ctx.torch_model(device)
    y = np.asarray(ctx.apply_fn(ctx.params, jnp.asarray(x[:8])))
    with torch.no_grad():
        y_torch = tmodel(torch_peers.to_torch_images(x[:8], device)).cpu().numpy()
    diff = float(np.max(np.abs(y - y_torch)) / max(np.max(np.abs(y)), 1e-30))
    p_torch = torch_peers.count_params(tmodel)
    status = "ok" if p_torch == ctx.num_params and diff < 1e-4 else "MISMATCH"
    return f"{status}: P {p_torch:,} (torch) vs {ctx.num_params:,} (flax), outputs max rel diff {diff:.1e}"


# --- implementations ----------------------------------------------------------------------------
# Each maker returns ``compute(x[N, 32, 32, 3] numpy) -> (kernel [N, N] numpy, info dict)``.


def make_ntklab(ctx: ModelContext, args: argparse.Namespace, variant: str | None) -> Callable:
    kwargs = engine_kwargs(variant, args.precision, args.devices)
    shown = {k: v for k, v in kwargs.items() if k not in ("progress", "devices")}
    if "devices" in kwargs:
        shown["devices"] = len(kwargs["devices"])

    def compute(x: np.ndarray) -> tuple[np.ndarray, dict]:
        _EngineChoice.last = None
        kernel = empirical_ntk(ctx.apply_fn, ctx.params, x, batch_size=args.batch_size, **kwargs)
        return np.asarray(kernel), {"kwargs": shown, "ran": _EngineChoice.last}

    return compute


def make_jax_jacrev(ctx: ModelContext, args: argparse.Namespace, variant: str | None) -> Callable:
    """Plain JAX: jit(vmap(jacrev)) per-example Jacobians per leaf, einsum, both triangles."""
    del variant
    precision = common.dot_precision(args.precision)
    apply_fn = ctx.apply_fn

    def f_single(params: dict, x: jax.Array) -> jax.Array:
        return apply_fn(params, x[None])[0, 0]

    @jax.jit
    def jacobian(params: dict, x: jax.Array) -> list[jax.Array]:
        jac = jax.vmap(jax.jacrev(f_single), (None, 0))(params, x)
        return [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(jac)]

    @jax.jit
    def contract(j1: list[jax.Array], j2: list[jax.Array]) -> jax.Array:
        dtype = jnp.bfloat16 if args.precision == "bfloat16" else None
        blocks = [
            jnp.einsum(
                "ip,jp->ij",
                a.astype(dtype) if dtype else a,
                b.astype(dtype) if dtype else b,
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            for a, b in zip(j1, j2, strict=True)
        ]
        return sum(blocks[1:], blocks[0])

    def compute(x: np.ndarray) -> tuple[np.ndarray, dict]:
        n = len(x)
        slices = _blocks(n, args.batch_size)
        cached = n * ctx.num_params * 4 <= args.peer_memory_gb * common.GB
        kernel = np.empty((n, n), np.float32)

        def jac(rows: slice) -> list[jax.Array]:
            return jacobian(ctx.params, jnp.asarray(x[rows]))

        if cached:
            jacobians = [jac(s) for s in slices]
            for i, rows in enumerate(slices):
                blocks = [contract(jacobians[i], jacobians[j]) for j in range(len(slices))]
                for cols, block in zip(slices, blocks, strict=True):
                    kernel[rows, cols] = np.asarray(jax.block_until_ready(block))
            del jacobians
        else:
            for rows in slices:
                jac_rows = jac(rows)
                for cols in slices:
                    jac_cols = jac_rows if cols == rows else jac(cols)
                    kernel[rows, cols] = np.asarray(contract(jac_rows, jac_cols))
                    del jac_cols
        return kernel, {"jacobians": "cached" if cached else "recomputed"}

    return compute


def make_torch_jac(ctx: ModelContext, args: argparse.Namespace, variant: str | None) -> Callable:
    del variant
    tmodel = ctx.torch_model(args.torch_device)

    def compute(x: np.ndarray) -> tuple[np.ndarray, dict]:
        x_t = torch_peers.to_torch_images(x, args.torch_device)
        return torch_peers.jacobian_contraction_ntk(
            tmodel,
            x_t,
            batch_size=args.batch_size,
            cache_bytes=int(args.peer_memory_gb * common.GB),
        )

    return compute


def make_torch_ntkvp(ctx: ModelContext, args: argparse.Namespace, variant: str | None) -> Callable:
    del variant
    tmodel = ctx.torch_model(args.torch_device)
    batch = ntkvp_batch(args, ctx.name)

    def compute(x: np.ndarray) -> tuple[np.ndarray, dict]:
        x_t = torch_peers.to_torch_images(x, args.torch_device)
        kernel, info = torch_peers.ntk_vector_products_ntk(tmodel, x_t, batch_size=batch)
        return kernel, {**info, "pair block": batch}

    return compute


MAKERS = {
    "ntklab": make_ntklab,
    "jax_jacrev": make_jax_jacrev,
    "torch_jac": make_torch_jac,
    "torch_ntkvp": make_torch_ntkvp,
}


def ntkvp_batch(args: argparse.Namespace, model: str) -> int:
    return args.ntkvp_batch_size or NTKVP_BATCH[model]


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def warmup_size(n: int, block: int) -> int:
    """Smallest N' whose blocks have the same shapes as N's: one full block plus the remainder."""
    return n if n <= block else block + n % block


# --- one case -----------------------------------------------------------------------------------


def run_case(spec: dict, args: argparse.Namespace) -> dict:
    """Warm-up, timed runs and memory of one (model, N, implementation); saves the kernel.

    Returns:
      a result dict: seconds, peak memory, info, or ``skipped``/``error`` with the reason.
    """
    model_name, n, impl = spec["model"], spec["n"], spec["impl"]
    base, _, variant = impl.partition(":")
    result: dict = {"model": model_name, "n": n, "impl": impl}
    if base.startswith("torch") and torch is None:
        return {**result, "skipped": "torch not installed"}
    ctx = model_context(model_name)
    result["num_params"] = ctx.num_params
    x, _ = load_inputs(n, args.data, args.data_root)
    try:
        compute = MAKERS[base](ctx, args, variant or None)
        block = ntkvp_batch(args, model_name) if base == "torch_ntkvp" else args.batch_size
        n_warm = warmup_size(n, block)
        start = time.perf_counter()
        compute(x[:n_warm])
        warm_seconds = time.perf_counter() - start
        projected = warm_seconds * (n / n_warm) ** 2
        result["warmup"] = {"n": n_warm, "seconds": warm_seconds}
        if args.time_limit and projected > args.time_limit:
            return {
                **result,
                "skipped": f"projected {projected:.0f} s > --time-limit {args.time_limit:.0f} s",
            }
        gc_collect()
        rss_reset = common.reset_peak_rss()
        if torch is not None and args.torch_device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, compile_times = [], []
        for _ in range(args.repeats):
            _COMPILE_SECONDS[0] = 0.0
            start = time.perf_counter()
            kernel, info = compute(x)
            times.append(time.perf_counter() - start)
            compile_times.append(_COMPILE_SECONDS[0])
        best = int(np.argmin(times))
        result.update(
            seconds=times[best], compile_seconds=compile_times[best], times=times, info=info
        )
        result["peak_rss_bytes"] = common.peak_rss_bytes()
        result["rss_reset"] = rss_reset
        if base.startswith("torch") and args.torch_device == "cuda":
            result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        else:
            result["peak_device_bytes"] = common.jax_device_peak_bytes()
        if not np.all(np.isfinite(kernel)):
            result["error"] = "non-finite kernel entries"
        if spec.get("kernel_path"):
            np.save(spec["kernel_path"], kernel)
        del kernel
        if base == "ntklab" and spec.get("breakdown"):
            result["breakdown"] = ntklab_breakdown(ctx, x, args, variant or None)
    except Exception as error:  # report and go on with the next case
        log.exception("case %s N=%d %s failed", model_name, n, impl)
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return result


_COMPILE_SECONDS = [0.0]


def _on_duration(name: str, seconds: float, **_: object) -> None:
    if name.startswith("/jax/core/compile/"):
        _COMPILE_SECONDS[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def gc_collect() -> None:
    import gc

    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def ntklab_breakdown(
    ctx: ModelContext, x: np.ndarray, args: argparse.Namespace, variant: str | None
) -> dict:
    """Seconds of the engine's own per-block features of all N examples, each block once.

    Lays out the same plan as the timed run (``_schedule.choose_plan`` with the same keywords:
    layerwise Jacobians, factored layers, host-formed convolutions, parameter chunks) and times
    its finished block features (``_units.block_features``: XLA's feature functions, compiled
    beforehand, then the host's part), one block after the other (no overlap); the rest of
    ntklab's time is contraction, host copies, mirroring and compilation. Also returns the
    plan's contraction FLOPs (factored layers counted by their factored cost).
    """
    from ntklab.ntk import _problem, _schedule, _units

    kwargs = engine_kwargs(variant, args.precision, args.devices)
    devices = kwargs.get("devices")
    problem = _problem.make_problem(
        ctx.apply_fn, ctx.params, x, x, symmetric=True, output="trace",
        precision=kwargs.get("precision", "float32"), projection_dim=None,
        projection="rademacher", projection_seed=0,
        devices=tuple(devices) if devices is not None else tuple(jax.devices()),
    )  # fmt: skip
    plan = _schedule.choose_plan(
        problem, kwargs.get("implementation", "auto"), batch_size=args.batch_size,
        memory_bytes=None, param_chunk_size=None,
    )  # fmt: skip
    if plan.implementation == "ntk_vector_products":
        return {}
    leaves = list(problem.leaves)
    first = problem.put_block(x, plan.row_slices[0], plan.block)
    jax.block_until_ready(_units.block_features(plan, x, plan.row_slices[0]))
    start = time.perf_counter()
    with threads.beside_xla():  # as in the engine's run
        for rows in plan.row_slices:
            jax.block_until_ready(_units.block_features(plan, x, rows))
    jacobian_seconds = time.perf_counter() - start
    # The floor the issue names: one batched forward + backward (gradient of the summed outputs
    # wrt all parameters) per block of B examples.
    params = jax.tree.unflatten(problem.treedef, leaves)
    grad = jax.jit(jax.grad(lambda p, xs: ctx.apply_fn(p, xs).sum()))
    jax.block_until_ready(grad(params, first))
    start = time.perf_counter()
    for rows in plan.row_slices:
        jax.block_until_ready(grad(params, problem.put_block(x, rows, plan.block)))
    return {
        "jacobian_seconds": jacobian_seconds,
        "forward_backward_seconds": time.perf_counter() - start,
        "block": plan.block,
        "blocks": len(plan.row_slices),
        "contraction_flops": plan.cost(0.0),
        "factored": plan.num_factored,
    }


def run_case_isolated(spec: dict, argv: list[str]) -> dict:
    """``run_case`` in a fresh child process (same arguments plus ``--case``)."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--case", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {
        "model": spec["model"],
        "n": spec["n"],
        "impl": spec["impl"],
        "error": f"child exited with {proc.returncode} (a negative code is a signal: -9 is an "
        f"out-of-memory kill): {tail}",
    }


# --- report -------------------------------------------------------------------------------------


def measure_rates(args: argparse.Namespace) -> dict:
    """float32 matmul rates: 4096², and [B, P] x [P, B] per model."""
    rates = {}
    flops, shape = common.matmul_rate(4096, 4096, 4096, precision=args.precision)
    rates["square"] = {"flops_per_s": flops, "shape": shape}
    for model in args.models:
        ctx = model_context(model)
        block = min(args.batch_size, max(args.sizes))
        flops, shape = common.matmul_rate(block, ctx.num_params, block, precision=args.precision)
        rates[model] = {"flops_per_s": flops, "shape": shape}
    return rates


def max_rel_diff(path: str, reference_path: str) -> float:
    """max |K - K_ref| / max |K_ref|, read in row chunks from the saved kernels."""
    kernel = np.load(path, mmap_mode="r")
    reference = np.load(reference_path, mmap_mode="r")
    diff = scale = 0.0
    for start in range(0, len(reference), 1024):
        ref = np.asarray(reference[start : start + 1024], np.float64)
        diff = max(diff, float(np.max(np.abs(np.asarray(kernel[start : start + 1024]) - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
    return diff / max(scale, 1e-300)


def table(results: list[dict], rates: dict, gpu: bool) -> str:
    columns = [
        "model",
        "P",
        "N",
        "impl",
        "seconds",
        "compile s",
        "s/entry",
        "GFLOP/s",
        "% peak B×P",
        "% peak 4096²",
        "peak RSS GB",
    ]
    columns += ["peak dev GB"] if gpu else []
    columns += ["max rel diff", "ntklab speed-up", "notes"]
    rows = []
    reference_seconds = {}
    for r in results:
        if r.get("reference"):
            reference_seconds[(r["model"], r["n"])] = r["seconds"]
    for r in results:
        n, p = r["n"], r.get("num_params")
        seconds = r.get("seconds")
        notes = r.get("skipped") or r.get("error") or ""
        info = r.get("info") or {}
        if info.get("jacobians") == "recomputed":
            notes = (notes + "; " if notes else "") + "column Jacobians recomputed per row block"
        if info.get("ran"):
            notes = (notes + "; " if notes else "") + f"ran {info['ran']}"
        if "pair block" in info:
            notes = (notes + "; " if notes else "") + f"{info['pair block']}² pairs per call"
        flops = p * n * (n + 1) / seconds if seconds and p else None
        ref = reference_seconds.get((r["model"], n))
        row = [
            r["model"],
            f"{p:,}" if p else "—",
            n,
            r["impl"],
            common.fmt(seconds, ".3f"),
            common.fmt(
                r.get("compile_seconds") if not r["impl"].startswith("torch") else None, ".2f"
            ),
            common.fmt(seconds / n**2 if seconds else None, ".2e"),
            common.fmt(flops / 1e9 if flops else None, ".1f"),
            common.fmt(100 * flops / rates[r["model"]]["flops_per_s"] if flops else None, ".0f"),
            common.fmt(100 * flops / rates["square"]["flops_per_s"] if flops else None, ".0f"),
            common.fmt(r["peak_rss_bytes"] / common.GB if "peak_rss_bytes" in r else None, ".2f"),
        ]
        if gpu:
            dev = r.get("peak_device_bytes")
            row.append(common.fmt(dev / common.GB if dev else None, ".2f"))
        is_reference = r.get("reference", False)
        speedup = seconds / ref if seconds and ref else None
        row += [
            "ref" if is_reference else common.fmt(r.get("max_rel_diff"), ".1e"),
            f"{speedup:.2f}x" if speedup else "—",
            notes,
        ]
        rows.append(row)
    return common.markdown_table(columns, rows)


def breakdown_table(results: list[dict], rates: dict) -> str:
    columns = [
        "model",
        "N",
        "impl",
        "total s",
        "compile s",
        "Jacobians s",
        "batched fwd+bwd s",
        "Jacobians ÷ fwd+bwd",
        "rest s",
        "rest GFLOP/s",
        "rest % peak B×P",
        "ideal contraction s",
        "floor s",
        "total ÷ floor",
    ]
    rows = []
    for r in results:
        b = r.get("breakdown")
        if not b or "seconds" not in r:
            continue
        n, p, total = r["n"], r["num_params"], r["seconds"]
        compile_seconds = r.get("compile_seconds", 0.0)
        rest = total - compile_seconds - b["jacobian_seconds"]
        floor = p * n * (n + 1)
        rate = rates[r["model"]]["flops_per_s"]
        pairs = b["blocks"] * (b["blocks"] + 1) / 2
        ideal = b.get("contraction_flops", pairs * 2 * b["block"] ** 2 * p) / rate
        fwd_bwd = b.get("forward_backward_seconds")
        rows.append(
            [
                r["model"],
                n,
                r["impl"],
                f"{total:.3f}",
                f"{compile_seconds:.3f}",
                f"{b['jacobian_seconds']:.3f}",
                common.fmt(b.get("forward_backward_seconds"), ".3f"),
                common.fmt(
                    b["jacobian_seconds"] / b["forward_backward_seconds"]
                    if b.get("forward_backward_seconds")
                    else None,
                    ".2f",
                ),
                f"{rest:.3f}",
                common.fmt(floor / rest / 1e9 if rest > 0 else None, ".1f"),
                common.fmt(100 * floor / rest / rate if rest > 0 else None, ".0f"),
                f"{ideal:.3f}",
                common.fmt(ideal + fwd_bwd if fwd_bwd else None, ".3f"),
                common.fmt(total / (ideal + fwd_bwd) if fwd_bwd else None, ".2f"),
            ]
        )
    return common.markdown_table(columns, rows)


def sequence_table(results: list[dict], alone: dict[tuple, dict]) -> str:
    """Each ntklab case as run in this process (after the models before it) beside the same case
    alone in a fresh process."""
    columns = ["model", "N", "impl", "in this process after", "seconds", "alone s", "÷ alone"]
    rows, before = [], []
    for r in results:
        key = (r["model"], r["n"], r["impl"])
        if key in alone:
            single = alone[key].get("seconds")
            ratio = r["seconds"] / single if single and r.get("seconds") else None
            rows.append([
                r["model"], r["n"], r["impl"], ", ".join(before) or "nothing (first)",
                common.fmt(r.get("seconds"), ".3f"),
                common.fmt(single, ".3f") if single else alone[key].get("error", "—"),
                common.fmt(ratio, ".2f"),
            ])  # fmt: skip
        if not before or before[-1] != r["model"]:
            before.append(r["model"])
    return common.markdown_table(columns, rows)


def print_header(args: argparse.Namespace, argv: list[str], rates: dict, extra: dict) -> dict:
    header = common.machine_header()
    header["command"] = "python benchmarks/bench_ntk.py " + shlex.join(argv)
    header.update(extra)
    header["precision"] = f"{args.precision} contraction; model matmuls/convs: " + (
        "same" if args.model_precision == "same" else "each framework's default"
    )
    if args.precision == "bfloat16":
        header["precision"] += " (torch peers contract in float32: no bfloat16 path)"
    header["batch size B"] = str(args.batch_size)
    header["torch"] = header.get("torch", "") + (
        f" on {args.torch_device}, {torch.get_num_threads()} threads" if torch else ""
    )
    header["FLOP floor"] = (
        "2·P per kernel entry, upper triangle only: P·N(N+1) FLOPs for every impl"
    )
    header["peers"] = (
        "both triangles; per-example Jacobians cached if N·P·4 bytes ≤ "
        f"{args.peer_memory_gb:.1f} GB, else column blocks recomputed per row block"
    )
    header["memory"] = (
        "peak RSS of each case in a fresh child process"
        if args.isolate
        else "per-case RSS high-water mark in this process (reset with /proc/self/clear_refs; "
        "includes the process's resident baseline)"
    )
    if jax.devices()[0].platform != "cpu" or args.torch_device == "cuda":
        header["memory"] += (
            "; peak dev GB: torch.cuda.max_memory_allocated (reset per case) for torch, JAX's "
            "peak_bytes_in_use for JAX impls"
            + ("" if args.isolate else " (never reset by JAX: cumulative; use --isolate)")
        )
    keywords = [
        name
        for name, par in inspect.signature(empirical_ntk).parameters.items()
        if par.kind is par.KEYWORD_ONLY and not name.startswith("_")
    ]
    header["ntklab"] = (
        f"empirical_ntk(apply_fn, params, x, batch_size=B, ...) with keywords {', '.join(keywords)}"
    )
    header["matmul rate 4096²"] = _rate_text(rates["square"])
    for model in args.models:
        header[f"matmul rate {model}"] = _rate_text(rates[model])
    print("# eNTK benchmark\n")
    for key, value in header.items():
        print(f"- **{key}**: {value}")
    print()
    return header


def _rate_text(rate: dict) -> str:
    m, k, n = rate["shape"]
    return f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s (jnp.matmul [{m}, {k}] x [{k}, {n}])"


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure(args)
    if args.case is not None:
        print(RESULT_TAG + json.dumps(run_case(json.loads(args.case), args)), flush=True)
        return
    rates = measure_rates(args)
    if args.floor_only:
        print_header(args, argv, rates, {})
        return

    extra = {}
    inputs_desc = {}
    for n in args.sizes:
        inputs_desc[n] = load_inputs(n, args.data, args.data_root)[1]
    descriptions = sorted(set(inputs_desc.values()))
    extra["inputs"] = "; ".join(
        f"N ∈ {{{', '.join(str(n) for n, d in inputs_desc.items() if d == desc)}}}: {desc}"
        for desc in descriptions
    )
    x_check, _ = load_inputs(8, args.data, args.data_root)
    for model in args.models:
        if any(i.startswith("torch") for i in args.impls):
            extra[f"torch mirror {model}"] = mirror_check(
                model_context(model), args.torch_device, x_check
            )
    header = print_header(args, argv, rates, extra)

    child_argv = [a for a in argv if a != "--isolate"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ntk_") as tmp:
        for model in args.models:
            for n in args.sizes:
                paths = {}
                case_results = []
                for impl in args.impls:
                    spec = {
                        "model": model,
                        "n": n,
                        "impl": impl,
                        "kernel_path": os.path.join(tmp, f"{model}_{n}_{impl}.npy")
                        if len(args.impls) > 1
                        else None,
                        "breakdown": impl.startswith("ntklab") and not args.no_breakdown,
                    }
                    print(f"running {model} N={n} {impl} ...", file=sys.stderr, flush=True)
                    result = (
                        run_case_isolated(spec, child_argv)
                        if args.isolate
                        else run_case(spec, args)
                    )
                    result.setdefault("num_params", model_context(model).num_params)
                    if "seconds" in result and spec["kernel_path"]:
                        paths[impl] = spec["kernel_path"]
                    print(f"  -> {_short(result)}", file=sys.stderr, flush=True)
                    case_results.append(result)
                reference = next(
                    (i for i in args.impls if i.startswith("ntklab") and i in paths), None
                )
                for result in case_results:
                    result["reference"] = result["impl"] == reference
                    if reference and result["impl"] in paths and result["impl"] != reference:
                        result["max_rel_diff"] = max_rel_diff(
                            paths[result["impl"]], paths[reference]
                        )
                for path in paths.values():
                    with contextlib.suppress(OSError):
                        os.remove(path)
                results += case_results

    alone = {}
    if not args.no_sequence and not args.isolate and len(args.models) > 1:
        for r in results:
            if r["impl"].startswith("ntklab") and "seconds" in r:
                spec = {"model": r["model"], "n": r["n"], "impl": r["impl"], "kernel_path": None,
                        "breakdown": False}  # fmt: skip
                print(f"running {r['model']} N={r['n']} {r['impl']} alone (fresh process) ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                alone[(r["model"], r["n"], r["impl"])] = run_case_isolated(spec, child_argv)

    gpu = jax.devices()[0].platform != "cpu" or args.torch_device == "cuda"
    print(table(results, rates, gpu))
    if any("breakdown" in r for r in results):
        print(
            "\nntklab's time split (compile: JAX tracing, lowering and XLA compilation inside the "
            "timed run; Jacobians: the engine's own plan's block features of all N examples "
            "once, precompiled; batched fwd+bwd: the gradient of the summed outputs of the same "
            "blocks wrt all parameters; rest = total - compile - Jacobians: contraction, host copies "
            "and mirroring (negative where the host's work overlaps XLA's next block); ideal "
            "contraction: the plan's contraction FLOPs (factored layers at their factored cost) "
            "at the measured B×P matmul rate; floor = batched fwd+bwd + ideal contraction):\n"
        )
        print(breakdown_table(results, rates))
    if alone:
        print(
            "\nSequence: each ntklab case timed in this process, after the models before it, "
            "beside the same case alone in a fresh child process (same arguments, its own "
            "warm-up), so a slowdown left behind by an earlier model shows:\n"
        )
        print(sequence_table(results, alone))
    if args.json:
        alone_rows = [{"model": m, "n": n, "impl": i, **r} for (m, n, i), r in alone.items()]
        Path(args.json).write_text(
            json.dumps(
                {"header": header, "rates": rates, "results": results, "alone": alone_rows},
                indent=2,
            )
            + "\n"
        )


def _short(result: dict) -> str:
    if "seconds" in result:
        return f"{result['seconds']:.3f} s"
    return result.get("skipped") or result.get("error") or "?"


if __name__ == "__main__":
    main()

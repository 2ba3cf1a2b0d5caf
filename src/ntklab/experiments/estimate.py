"""A sweep's time estimate, printed before it starts: training, prerequisite runs, alignment.

Each kind of run (the overrides other than ``TIMING_KEYS_IGNORED``) is composed once and timed on
this machine: one jitted training step and one evaluation batch at the run's shapes give the
training time; a kernel of ``KERNEL_PROBE`` examples, scaled by N², gives each prerequisite
``compute_ntk.py`` run (kernel, plus its eigenpairs at the host's matmul rate) and each alignment
measurement of a network run (one kernel pass each, ``alignment.every``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts
from ntklab.experiments.sweeps import data_sizes, distinct_by, job_config, nads_shape

__all__ = ["TIMING_KEYS_IGNORED", "estimate"]

TIMING_KEYS_IGNORED = ("seed", "order_seed", "label_idx", "progress", "overwrite")
"""Overrides that do not change how long a run takes (one timing covers them)."""


def estimate(config: DictConfig, jobs: list[list[str]], script: str) -> list[str]:
    """The sweep's estimated wall time: training, alignment and missing prerequisite runs.

    Each kind of run (the overrides other than ``TIMING_KEYS_IGNORED``) is composed once; one
    jitted training step at ``train.batch_size`` and one evaluation batch on inputs of the data's
    shape are compiled, then timed; a run trains for ``epochs × (steps per epoch × step +
    evaluation of train and test)``, plus their compilation and ``RUN_SETUP_SECONDS``. A network
    run of ``train_ntk`` with alignment adds the kernel's compilation and one kernel pass per
    measurement (every ``alignment.every`` epochs and at the end); each missing ``compute_ntk.py``
    run adds its kernel, eigenpairs and readouts (see the module docstring).

    Returns:
      Lines to print, the total first.
    """
    kinds: dict[tuple[str, ...], list[list[str]]] = {}
    for job in jobs:
        kind = tuple(o for o in job if o.split("=", 1)[0] not in TIMING_KEYS_IGNORED)
        kinds.setdefault(kind, []).append(job)
    training = alignment = 0.0
    measured = []
    for members in kinds.values():
        cfg = job_config(config, members[0])
        seconds, what = _run_seconds(cfg, script)
        training += seconds * len(members)
        alignment += _alignment_seconds(cfg, script) * len(members)
        measured.append(what)
    prerequisites, notes = _prerequisites(config, jobs, script)
    total = training + alignment + prerequisites
    lines = [
        f"estimated wall time {_duration(total)} on {_devices()}: training "
        f"{_duration(training)}, alignment {_duration(alignment)}, prerequisite runs "
        f"{_duration(prerequisites)} (timed here: {'; '.join(sorted(set(measured)))})"
    ]
    return lines + notes


def _alignment_seconds(cfg: DictConfig, script: str) -> float:
    """One train_ntk network run's alignment: the kernel's compilation, one pass per measurement."""
    if script != "train_ntk" or cfg.linearize or not cfg.alignment.enabled:
        return 0.0
    _, num_train, num_test = data_sizes(cfg)
    epochs, every = int(cfg.train.epochs), cfg.alignment.every
    count = 1 if every is None else len({*range(every, epochs + 1, every), epochs})
    batch_size = cfg.alignment.batch_size
    kernel = _kernel_seconds(cfg, num_train + num_test, batch_size=batch_size)
    return _kernel_compile_seconds(cfg, batch_size) + count * kernel


def _prerequisites(config: DictConfig, jobs: list[list[str]], script: str) -> tuple[float, list]:
    """The missing prerequisite runs' estimated seconds, and lines saying which exist."""
    if script == "train_cifar":
        return 0.0, []
    what = "compute_nads.py" if script == "train_nads" else "compute_ntk.py"
    missing, present, seconds = [], [], 0.0
    for job in distinct_by(jobs, ("seed", "model", "data", "paths")):
        cfg = job_config(config, job)
        path = str(cfg.paths.nads if script == "train_nads" else cfg.paths.eigenfunctions)
        if path in missing + present:
            continue
        if (Path(path) / artifacts.META_FILE).is_file():
            present.append(path)
            continue
        missing.append(path)
        if script != "train_nads":
            seconds += _compute_ntk_seconds(cfg, _needed_eigvecs(config, jobs))
    lines = [f"{len(present)} {what} prerequisite run(s) exist"]
    if missing:
        action = "created by the first run that needs each" if _creates(config) else "MISSING"
        included = "in the estimate" if script != "train_nads" else "NOT in the estimate"
        lines.append(
            f"{len(missing)} {what} prerequisite run(s) missing, {action} ({included}): "
            + ", ".join(missing)
        )
    return seconds, lines


def _needed_eigvecs(config: DictConfig, jobs: list[list[str]]) -> int:
    """The eigenvectors a created compute_ntk run keeps: at least 200, the largest label_idx."""
    from ntklab.experiments.prerequisites import DEFAULT_NUM_EIGVECS

    wanted = [
        int(o.split("=", 1)[1]) + 1 for job in jobs for o in job if o.startswith("label_idx=")
    ]
    return max([DEFAULT_NUM_EIGVECS, *wanted])


KERNEL_PROBES = (256, 1024)
"""Kernel sizes timed to estimate an N-example kernel as a + b·N² (fixed cost + entries)."""
_KERNEL_FITS: dict[str, tuple[float, float, float]] = {}


def _kernel_seconds(cfg: DictConfig, n: int, *, batch_size: int) -> float:
    """Seconds of the symmetric N×N kernel of ``cfg``'s model: two timed probes fit a + b·N²."""
    fixed, slope, _ = _kernel_fit(cfg, batch_size)
    return fixed + slope * n * n


def _kernel_compile_seconds(cfg: DictConfig, batch_size: int) -> float:
    """Seconds a run spends compiling the kernel's blocks once (the first probe's extra time)."""
    return _kernel_fit(cfg, batch_size)[2]


def _kernel_fit(cfg: DictConfig, batch_size: int) -> tuple[float, float, float]:
    """(a, b, compile seconds) of the kernel time a + b·N², from two timed probes (cached)."""
    shape = nads_shape(cfg) if "nads" in cfg.paths else data_sizes(cfg)[0]
    key = json.dumps([artifacts.to_container(cfg.model), shape, batch_size], default=str)
    if key not in _KERNEL_FITS:
        (t1, compile_s), (t2, _) = (_time_kernel(cfg, shape, m, batch_size) for m in KERNEL_PROBES)
        (n1, n2) = KERNEL_PROBES
        slope = max(t2 - t1, 0.0) / (n2**2 - n1**2)
        _KERNEL_FITS[key] = (max(t1 - slope * n1**2, 0.0), slope, compile_s)
    return _KERNEL_FITS[key]


def _time_kernel(
    cfg: DictConfig, shape: tuple[int, ...], n: int, batch_size: int
) -> tuple[float, float]:
    """Seconds of one (compiled) n×n kernel of ``cfg``'s model on random inputs of ``shape``, and
    the first call's extra seconds (compilation)."""
    import jax

    from ntklab.models import build_model, inference_apply_fn, init_variables
    from ntklab.ntk import empirical_ntk

    model = build_model(**artifacts.to_container(cfg.model))
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    apply_fn = inference_apply_fn(model, variables)
    probe = np.random.default_rng(0).standard_normal((n, *shape), np.float32)
    tic = time.perf_counter()
    empirical_ntk(apply_fn, variables["params"], probe, batch_size=batch_size)  # compiles
    first = time.perf_counter() - tic
    tic = time.perf_counter()
    empirical_ntk(apply_fn, variables["params"], probe, batch_size=batch_size)
    seconds = time.perf_counter() - tic
    return seconds, max(first - seconds, 0.0)


def _compute_ntk_seconds(cfg: DictConfig, num_eigvecs: int) -> float:
    """A created compute_ntk run: the kernel (with its compilation), the eigensolve and the
    readouts (a Cholesky of K_tr,tr and the quotients), at the host's measured matmul rate.

    The eigensolve as ``ntk.eigen_dtype`` and ``ntk.solver`` resolve it: the float64 ``evr`` costs
    about 10 N³ + 60 k N² float32-matmul flops (fit to N = 6,102, k = 200 and 1,000: 10.4 s and
    17.7 s where the float32 rate measured 250 GFLOP/s); a float32 Chebyshev about 15 passes of
    2 N² (k + oversampling).
    """
    from ntklab.experiments.kernel_job import eigen_precision

    _, num_train, num_test = data_sizes(cfg)
    n = num_train + num_test
    k = min(n, num_eigvecs)
    kernel = _kernel_seconds(cfg, n, batch_size=256) + _kernel_compile_seconds(cfg, 256)
    ntk = cfg.get("ntk") or {}
    dtype, solver = eigen_precision(
        str(ntk.get("eigen_dtype", "auto")), str(ntk.get("solver", "auto")), n
    )
    if dtype == "float64" and solver == "evr":
        eigen = 10.0 * n**3 + 60.0 * k * n * n
    else:
        eigen = 15 * 2.0 * n * n * (k + max(16, k // 4))
    readouts = num_train**3 / 3 + 12.0 * n * n * k
    return kernel + (eigen + readouts) / _matmul_rate()


_RATE: list[float] = []


def _matmul_rate() -> float:
    """The host's float32 matmul rate (FLOP/s) under the thread policy, measured once."""
    if not _RATE:
        from ntklab import threads

        a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
        b = a[:, :512].copy()
        with threads.host_only(flops=1e12):
            a @ b
            tic = time.perf_counter()
            for _ in range(3):
                a @ b
            _RATE.append(3 * 2.0 * 2048 * 2048 * 512 / (time.perf_counter() - tic))
    return _RATE[0]


_STEP_TIMES: dict[str, tuple[float, float, float]] = {}
RUN_SETUP_SECONDS = 2.0
"""Per run: composing its config, loading the data and its prerequisite run, initializing the
model, writing its files and checkpoints (about 2 s per MLP job of a measured miniature sweep)."""


def _run_seconds(cfg: DictConfig, script: str) -> tuple[float, str]:
    """Estimated seconds of one run of ``cfg`` and what was timed."""
    from ntklab.train import TrainConfig

    train = TrainConfig.from_mapping(artifacts.to_container(cfg.train))
    if script == "train_nads":
        shape = nads_shape(cfg)
        num_train, num_test = int(cfg.data.num_train), int(cfg.data.num_test)
    else:
        shape, num_train, num_test = data_sizes(cfg)
    if script == "pretrained_ntk_comparison":
        models = [(False, True), (True, False), (True, False)]  # network, two linear without bias
    else:
        models = [(bool(cfg.linearize), bool(cfg.with_bias))]
    seconds, timed = 0.0, []
    for linearize, with_bias in models:
        step_s, eval_s, compile_s = _step_times(
            cfg, train, shape, linearize=linearize, with_bias=with_bias
        )
        steps = math.ceil(num_train / train.batch_size)
        eval_batch = min(train.eval_batch_size, max(num_train, num_test))
        evals = math.ceil(num_train / eval_batch) + math.ceil(num_test / eval_batch)
        seconds += train.epochs * (steps * step_s + evals * eval_s) + evals * eval_s
        seconds += compile_s + RUN_SETUP_SECONDS
        step = f"{'linear' if linearize else 'network'} {step_s * 1e3:.3g} ms"
        if step not in timed:
            timed.append(step)
    what = f"{cfg.model.name} B={train.batch_size} {list(shape)}: {', '.join(timed)} per step"
    return seconds, what


def _step_times(
    cfg: DictConfig, train: Any, shape: tuple[int, ...], *, linearize: bool, with_bias: bool
) -> tuple[float, float, float]:
    """Seconds of one jitted training step [B, *shape], of one evaluation batch, and of their
    compilation (cached)."""
    import jax

    from ntklab.experiments.training import make_trainee
    from ntklab.models import build_model, init_variables
    from ntklab.train_steps import compiled_steps, model_fns

    key = json.dumps(
        [artifacts.to_container(cfg.model), shape, repr(train), linearize, with_bias],
        sort_keys=True,
        default=str,
    )
    if key in _STEP_TIMES:
        return _STEP_TIMES[key]
    model = build_model(**artifacts.to_container(cfg.model))
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    trainee = make_trainee(
        model, variables, linearize_at=variables["params"] if linearize else None,
        with_bias=with_bias,
    )  # fmt: skip
    train_fn, infer = model_fns(
        trainee.apply_fn, trainee.train_apply_fn, trainee.eval_apply_fn, trainee.batch_stats
    )
    compiled = compiled_steps(train, max(train.epochs, 1))
    state, _ = compiled.initial_state(trainee.params, trainee.batch_stats)
    batch = {
        "x": np.zeros((train.batch_size, *shape), np.float32),
        "y": np.zeros((train.batch_size,), np.float32),
    }
    tic = time.perf_counter()
    state, _ = jax.block_until_ready(compiled.train_step(train_fn, state, batch))  # compiles
    compile_s = time.perf_counter() - tic
    step_s = math.inf
    for _ in range(3):  # the fastest of three: the least disturbed by other work
        tic = time.perf_counter()
        state, _ = jax.block_until_ready(compiled.train_step(train_fn, state, batch))
        step_s = min(step_s, time.perf_counter() - tic)
    eval_batch = {
        "x": np.zeros((train.eval_batch_size, *shape), np.float32),
        "y": np.zeros((train.eval_batch_size,), np.float32),
        "mask": np.ones((train.eval_batch_size,), bool),
    }
    params, stats = state.params, state.batch_stats
    tic = time.perf_counter()
    jax.block_until_ready(compiled.eval_step(infer, params, stats, eval_batch))
    compile_s += time.perf_counter() - tic
    eval_s = math.inf
    for _ in range(3):
        tic = time.perf_counter()
        jax.block_until_ready(compiled.eval_step(infer, params, stats, eval_batch))
        eval_s = min(eval_s, time.perf_counter() - tic)
    _STEP_TIMES[key] = (step_s, eval_s, max(compile_s - step_s - eval_s, 0.0))
    return _STEP_TIMES[key]


def _creates(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "prerequisites", default="require")) == "create"


def _devices() -> str:
    import jax

    devices = jax.devices()
    return f"{len(devices)} {devices[0].platform} device(s)"


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

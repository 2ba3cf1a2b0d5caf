"""One process of the 2-process JAX cluster that tests/test_multiprocess.py starts on localhost.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MODE OUT_DIR [KILL_AFTER]

MODE ``kernel``: the eNTK of a tiny MLP in memory, by brute-force jacrev on one device, K·V by
``ntklab.ntk.KernelOperator``, then with ``out=`` (process 0 owns the file); process 0 writes the
results as .npy files into OUT_DIR. ``compute_ntk``: ``compute_ntk.run`` on the tiny config of
:func:`compute_ntk_overrides` (artifacts in OUT_DIR/artifacts) with ``distributed.*`` overrides:
the run starts the runtime itself. With KILL_AFTER, process 1 SIGKILLs itself after that many
finished kernel units. Not collected by pytest.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

# The test session's compile flags (tests/conftest.py), then the 2 forced devices.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

NUM_EXAMPLES = 26  # not a multiple of the 4 devices' block: padding is exercised
INPUT_SHAPE = (4, 4, 2)


def problem():
    """(apply_fn, params, x [N, 4, 4, 2]): a small float32 MLP, identical in every process."""
    from ntklab.models import build_model, inference_apply_fn, init_variables

    model = build_model("mlp", widths=(16, 8), num_outputs=1)
    variables = init_variables(model, jax.random.PRNGKey(0), INPUT_SHAPE)
    x = np.random.default_rng(0).standard_normal((NUM_EXAMPLES, *INPUT_SHAPE)).astype(np.float32)
    return inference_apply_fn(model, variables), variables["params"], x


def local_jacrev_kernel(apply_fn, params, x: np.ndarray) -> np.ndarray:
    """Brute-force J Jᵀ [N, N] on this process's first device alone (no sharding, no engine)."""
    from jax.flatten_util import ravel_pytree

    theta, unravel = ravel_pytree(params)
    device = jax.local_devices()[0]
    jacobian = jax.jit(
        jax.vmap(jax.grad(lambda t, e: apply_fn(unravel(t), e[None])[0, 0]), in_axes=(None, 0)),
        device=device,
    )(theta, x)
    jacobian = np.asarray(jacobian, dtype=np.float64)
    return jacobian @ jacobian.T


def compute_ntk_overrides(artifacts: Path) -> list[str]:
    """The tiny compute_ntk.py command line both processes (and the reference) run."""
    return [
        "model=mlp",
        "model.widths=[16,8]",
        "data=digits",
        "data.num_train=20",
        "data.num_test=6",
        "ntk.batch_size=4",
        "ntk.num_eigvecs=5",
        "ntk.out_of_core=true",
        "ntk.save_kernel=true",
        f"paths.artifacts={artifacts}",
    ]


def distributed_overrides(process_id: int, num_processes: int, port: int) -> list[str]:
    """The ``distributed.*`` keys of one process of the cluster (as in the README)."""
    return [
        f"distributed.coordinator_address=127.0.0.1:{port}",
        f"distributed.num_processes={num_processes}",
        f"distributed.process_id={process_id}",
        "distributed.timeout_s=60",
    ]


def kill_after_fn(kill_after: int | None, process_id: int):
    """The engine's ``_after_unit`` hook: process 1 SIGKILLs itself after ``kill_after`` units."""
    if kill_after is None or process_id != 1:
        return None

    def after_unit(done: int) -> None:
        if done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_unit


def main() -> None:
    process_id, num_processes, port = (int(value) for value in sys.argv[1:4])
    mode, out_dir = sys.argv[4], Path(sys.argv[5])
    kill_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
    jax.config.update("jax_default_prng_impl", "rbg")  # as tests/conftest.py: same θ0 as pytest
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from ntklab.ntk import _store

    _store._SAVE_INTERVAL_S = 0.0  # the resume record after every unit: a kill leaves it exact
    if mode == "compute_ntk":
        run_compute_ntk(process_id, num_processes, port, out_dir, kill_after)
        print(f"process {process_id}: {mode} done", flush=True)
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes and jax.local_device_count() == 2
    from ntklab.ntk import KernelOperator, empirical_ntk

    apply_fn, params, x = problem()
    writer = process_id == 0
    if mode == "kernel" and kill_after is None:
        kernel = empirical_ntk(apply_fn, params, x, batch_size=4)
        if writer:
            np.save(out_dir / "kernel_in_memory.npy", np.asarray(kernel))
            np.save(out_dir / "kernel_local_jacrev.npy", local_jacrev_kernel(apply_fn, params, x))
        operator = KernelOperator(apply_fn, params, x, batch_size=4)
        vectors = np.random.default_rng(1).standard_normal((NUM_EXAMPLES, 3))
        product = operator.matmat(vectors)
        if writer:
            np.save(out_dir / "operator_product.npy", product)
    if mode == "kernel":  # with KILL_AFTER only this part: process 1 dies in it
        after_unit = kill_after_fn(kill_after, process_id)
        stored = empirical_ntk(
            apply_fn, params, x, batch_size=4, out=out_dir / "kernel.npy", _after_unit=after_unit
        )
        if writer != (stored is not None):
            raise SystemExit(f"process {process_id}: out= returned {type(stored)}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"process {process_id}: {mode} done", flush=True)


def run_compute_ntk(
    process_id: int, num_processes: int, port: int, out_dir: Path, kill_after: int | None
) -> None:
    """``compute_ntk.run`` as one process of the cluster; ``run`` starts the runtime itself."""
    import functools

    from hydra import compose, initialize_config_dir

    import ntklab.experiments.schema  # noqa: F401  (registers the config schemas)
    from ntklab.experiments import compute_ntk

    after_unit = kill_after_fn(kill_after, process_id)
    if after_unit is not None:
        from ntklab.experiments import kernel_job  # forms the kernel (the engine path here)

        kernel_job.empirical_ntk = functools.partial(
            kernel_job.empirical_ntk, _after_unit=after_unit
        )
    config_dir = Path(__file__).resolve().parents[1] / "config"
    overrides = compute_ntk_overrides(out_dir / "artifacts")
    overrides += distributed_overrides(process_id, num_processes, port)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="compute_ntk", overrides=overrides)
    compute_ntk.run(cfg)
    assert jax.process_count() == num_processes and jax.local_device_count() == 2


if __name__ == "__main__":
    main()

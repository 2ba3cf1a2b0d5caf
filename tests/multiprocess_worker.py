"""One process of the 2-process JAX cluster that tests/test_multiprocess.py starts on localhost.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MODE OUT_DIR [KILL_AFTER]

MODE ``kernel``: the eNTK of a tiny MLP in memory, with ``out=`` (process 0 owns the file) and by
brute-force jacrev on one device; ``operator``: K·V by ``ntklab.ntk.KernelOperator``; ``compute_ntk``: ``compute_ntk.run`` on a tiny
config. With KILL_AFTER, process 1 SIGKILLs itself after that many finished kernel units.
Process 0 writes its results as .npy files into OUT_DIR. Not collected by pytest.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
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
        f"paths.artifacts={artifacts}",
    ]


def main() -> None:
    process_id, num_processes, port = (int(value) for value in sys.argv[1:4])
    mode, out_dir = sys.argv[4], Path(sys.argv[5])
    kill_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_prng_impl", "rbg")  # as tests/conftest.py: same θ0 as pytest
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
    if mode == "kernel":
        kernel = empirical_ntk(apply_fn, params, x, batch_size=4)
        if writer:
            np.save(out_dir / "kernel_in_memory.npy", np.asarray(kernel))
            np.save(out_dir / "kernel_local_jacrev.npy", local_jacrev_kernel(apply_fn, params, x))
        after_unit = None
        if kill_after is not None and process_id == 1:

            def after_unit(done: int) -> None:
                if done >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        stored = empirical_ntk(
            apply_fn, params, x, batch_size=4, out=out_dir / "kernel.npy", _after_unit=after_unit
        )
        if writer != (stored is not None):
            raise SystemExit(f"process {process_id}: out= returned {type(stored)}")
    elif mode == "operator":
        operator = KernelOperator(apply_fn, params, x, batch_size=4)
        vectors = np.random.default_rng(1).standard_normal((NUM_EXAMPLES, 3))
        product = operator.matmat(vectors)
        if writer:
            np.save(out_dir / "operator_product.npy", product)
    elif mode == "compute_ntk":
        from hydra import compose, initialize_config_dir

        import ntklab.experiments.schema  # noqa: F401  (registers the config schemas)
        from ntklab.experiments import compute_ntk

        config_dir = Path(__file__).resolve().parents[1] / "config"
        overrides = compute_ntk_overrides(out_dir / "artifacts")
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="compute_ntk/config", overrides=overrides)
        compute_ntk.run(cfg)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"process {process_id}: {mode} done", flush=True)


if __name__ == "__main__":
    main()

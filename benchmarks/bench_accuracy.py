"""Accuracy of the eNTK's approximate modes against exact references.

Two tables on real CIFAR-10 images (../shared/data, else standard-normal inputs):

1. precision: relative error max|K - K64| / max|K64| and relative Frobenius error of the float32,
   TF32 (emulated on CPU by rounding inputs to a 10-bit mantissa, as tensor cores do) and
   bfloat16 contractions against the float64 kernel;
2. projection: relative Frobenius error and top-eigenvector overlap |<v1, v1_exact>| of the
   projected NTK (Rademacher and Gaussian maps) as a function of the projection dimension K.

    python benchmarks/bench_accuracy.py --models lenet,resnet18 --num 128 --dims 64,256,1024,4096
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from ntklab.data import load_dataset
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def inputs(num: int) -> tuple[np.ndarray, str]:
    if (SHARED / "cifar-10-batches-py").exists():
        data = load_dataset("cifar10", root=SHARED, num_train=num, seed=0)
        return data.train.images, f"CIFAR-10 train subset ({num}, stratified, seed 0)"
    rng = np.random.default_rng(0)
    return rng.standard_normal((num, 32, 32, 3)).astype(np.float32), "standard normal"


def relative_errors(kernel: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    diff = kernel.astype(np.float64) - exact
    return float(np.abs(diff).max() / np.abs(exact).max()), float(
        np.linalg.norm(diff) / np.linalg.norm(exact)
    )


def top_vector(kernel: np.ndarray) -> np.ndarray:
    return np.linalg.eigh(kernel.astype(np.float64))[1][:, -1]


def row(
    label: str,
    mode: str,
    kernel: np.ndarray,
    exact: np.ndarray,
    exact_top: np.ndarray,
    seconds: float,
) -> None:
    """Prints one table row: errors of ``kernel`` [N, N] against ``exact`` [N, N]."""
    max_err, fro_err = relative_errors(kernel, exact)
    overlap = abs(top_vector(kernel) @ exact_top)
    print(
        f"{label} {mode} | {max_err:.2e} | {fro_err:.2e} | {overlap:.6f} | {seconds:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet,resnet18")
    parser.add_argument("--num", type=int, default=128, help="N examples")
    parser.add_argument("--dims", default="64,256,1024,4096", help="projection dimensions K")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-projection", default="", help="models without projection rows")
    args = parser.parse_args()
    x, source = inputs(args.num)
    print(f"inputs: {source}; JAX {jax.__version__} on {jax.devices()}; date {time.strftime('%F')}")
    print()
    print("| model | P | N | mode | max rel err | rel Frobenius err | top-eigvec overlap | s |")
    print("|---|--:|--:|---|--:|--:|--:|--:|")
    for name in args.models.split(","):
        model = build_model(name)
        variables = init_variables(model, jax.random.PRNGKey(0), x.shape[1:])
        apply_fn = inference_apply_fn(model, variables)
        params = variables["params"]
        num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
        jax.config.update("jax_enable_x64", True)
        params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        apply64 = inference_apply_fn(model, variables64)
        exact = empirical_ntk(apply64, params64, x.astype(np.float64), batch_size=args.batch_size)
        jax.config.update("jax_enable_x64", False)
        exact_top = top_vector(exact)

        label = f"| {name} | {num_params:,} | {len(x)} |"
        for precision in ("float32", "tf32", "bfloat16"):
            tic = time.perf_counter()
            kernel = empirical_ntk(
                apply_fn, params, x, batch_size=args.batch_size, precision=precision
            )
            row(
                label, f"precision={precision}", kernel, exact, exact_top, time.perf_counter() - tic
            )
        if name in args.skip_projection.split(","):
            continue
        for dim in [int(d) for d in args.dims.split(",")]:
            for projection in ("rademacher", "gaussian"):
                tic = time.perf_counter()
                kernel = empirical_ntk(
                    apply_fn,
                    params,
                    x,
                    batch_size=args.batch_size,
                    projection_dim=dim,
                    projection=projection,
                )
                seconds = time.perf_counter() - tic
                row(label, f"projection {projection} K={dim}", kernel, exact, exact_top, seconds)


if __name__ == "__main__":
    main()

"""Eigensolver benchmark: top-k eigenpairs of a LeNet eNTK by LAPACK (evr, evd) and subspace
iteration (float32 or float64 products), side by side on one kernel, after computing the kernel.

Dimensions: N examples, k eigenpairs.

    python benchmarks/bench_eigen.py --num 6102 --k 1000 --solvers evr,evd,subspace:float32
    python benchmarks/bench_eigen.py --num 20000 --random --k 1000 --solvers subspace:float32

With ``--data-root`` holding CIFAR-10 the inputs are the real images (the first ``--num`` of the
seeded subset ntklab.data returns); ``--random`` uses CIFAR-shaped standard-normal inputs instead
(say so when quoting). ``--out-of-core`` writes the kernel as a ``.npy`` memmap (as compute_ntk.py
does beyond a quarter of RAM) and the solvers stream it. Prints a Markdown table: seconds, iterations,
passes over the kernel, max residual ‖Kv − λv‖/λ_1, peak RSS; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from ntklab.data import load_dataset
from ntklab.eigen import top_eigenpairs
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk


def inputs(num: int, *, random: bool, data_root: str) -> tuple[np.ndarray, str]:
    """Inputs [N, 32, 32, 3] float32 and a description of where they come from."""
    if random:
        x = np.random.default_rng(0).standard_normal((num, 32, 32, 3), dtype=np.float32)
        return x, "CIFAR-shaped standard-normal inputs (random)"
    dataset = load_dataset("cifar10", seed=0, root=data_root)
    x = np.concatenate([dataset.train.images, dataset.test.images])
    if num > len(x):
        raise ValueError(f"--num {num} > {len(x)} CIFAR-10 images under {data_root}; use --random")
    return x[:num], f"real CIFAR-10 images from {data_root}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=6102, help="N examples")
    parser.add_argument("--k", type=int, default=1000, help="eigenpairs")
    parser.add_argument(
        "--solvers",
        default="evr,evd,subspace:float32,subspace:float64",
        help="comma-separated: evr, evd, lanczos, subspace:float32, subspace:float64",
    )
    parser.add_argument("--random", action="store_true", help="random normal inputs")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tol", type=float, default=None, help="subspace tolerance")
    parser.add_argument("--oversampling", type=int, default=None)
    parser.add_argument("--out-of-core", action="store_true", help="kernel as a .npy memmap")
    parser.add_argument("--kernel", default=None, help="reuse a saved kernel.npy (memmapped)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    header = common.machine_header()
    print("\n".join(f"{key}: {value}" for key, value in header.items()))
    rows, stages = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.kernel:
            kernel = np.load(args.kernel, mmap_mode="r" if args.out_of_core else None)
            source = f"kernel from {args.kernel}"
        else:
            x, source = inputs(args.num, random=args.random, data_root=args.data_root)
            model = build_model("lenet", num_outputs=1)
            variables = init_variables(model, jax.random.PRNGKey(0), x.shape[1:])
            apply_fn = inference_apply_fn(model, variables)
            common.reset_peak_rss()
            tic = time.perf_counter()
            kernel = empirical_ntk(
                apply_fn,
                variables["params"],
                x,
                batch_size=args.batch_size,
                out=Path(scratch) / "kernel.npy" if args.out_of_core else None,
                progress=True,
            )
            stages["kernel_s"] = time.perf_counter() - tic
            stages["kernel_peak_rss_gb"] = common.peak_rss_bytes() / common.GB
        print(f"inputs: {source}; N = {kernel.shape[0]}, k = {args.k}; stages {stages}")
        for name in args.solvers.split(","):
            solver, _, dtype = name.partition(":")
            common.reset_peak_rss()
            tic = time.perf_counter()
            pairs = top_eigenpairs(
                kernel,
                args.k,
                solver=solver,
                product_dtype=dtype or "auto",
                tol=args.tol,
                oversampling=args.oversampling,
                progress=True,
            )
            seconds = time.perf_counter() - tic
            rows.append(
                {
                    "solver": name,
                    "seconds": seconds,
                    "iterations": pairs.iterations,
                    "passes": pairs.passes,
                    "max_residual": pairs.max_residual,
                    "lambda_1": float(pairs.values[0]),
                    "lambda_k": float(pairs.values[-1]),
                    "peak_rss_gb": common.peak_rss_bytes() / common.GB,
                    "values": pairs.values,
                }
            )
            print(f"{name}: {seconds:.1f} s, max residual {pairs.max_residual:.2e}", flush=True)
    reference = rows[0]["values"]
    table = []
    for row in rows:
        difference = np.max(np.abs(row.pop("values") - reference)) / reference[0]
        row["max_value_difference_vs_first"] = float(difference)
        table.append(
            [
                row["solver"],
                common.fmt(row["seconds"], ".1f"),
                row["iterations"],
                row["passes"],
                common.fmt(row["max_residual"], ".1e"),
                common.fmt(difference, ".1e"),
                common.fmt(row["peak_rss_gb"], ".2f"),
            ]
        )
    columns = [
        "solver",
        "s",
        "iterations",
        "passes",
        "max ‖Kv−λv‖/λ₁",
        "Δλ/λ₁ vs first",
        "peak RSS GB",
    ]
    print(common.markdown_table(columns, table))
    if args.json:
        payload = {"machine": header, "inputs": source, "n": int(kernel.shape[0]), "k": args.k}
        Path(args.json).write_text(
            json.dumps({**payload, "stages": stages, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()

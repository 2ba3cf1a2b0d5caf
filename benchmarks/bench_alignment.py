"""Alignment of the end-of-training kernel vs the init kernel's time, side by side in one run.

Dimensions: N examples (train then test), k eigenvectors, P parameters.

Times, on the same inputs and model: (1) the init kernel [N, N] with ``empirical_ntk``, (2) its
top-k eigenvectors (not part of the ratio), (3) ``rayleigh_quotients`` of those k vectors against
the kernel at perturbed ("trained") parameters, as ``train_ntk.py`` measures alignment, with
``method="auto"`` (the kernel when it fits) and, optionally, the matrix-free operator. Prints a
Markdown table with the ratio alignment / init kernel (issue target: ≤ 1.5).

    python benchmarks/bench_alignment.py --model lenet --num-eigvecs 50      # all 6,102 images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from ntklab.alignment import rayleigh_quotients
from ntklab.data import load_dataset
from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--num-eigvecs", type=int, default=50)
    parser.add_argument("--num-train", type=int, default=None, help="None: all 5,085")
    parser.add_argument("--num-test", type=int, default=None, help="None: all 1,017")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--operator", action="store_true", help="also time method='operator'")
    args = parser.parse_args(argv)
    data = load_dataset("cifar10", root=args.data_root, num_train=args.num_train,
                        num_test=args.num_test)  # fmt: skip
    x = np.concatenate([data.train.images, data.test.images]).astype(np.float32)
    num_train = len(data.train.images)
    model = build_model(args.model)
    variables = init_variables(model, jax.random.PRNGKey(0), x.shape[1:])
    apply_fn = inference_apply_fn(model, variables)
    params = variables["params"]
    key = jax.random.PRNGKey(1)
    trained = jax.tree.map(
        lambda p: p + 0.05 * jax.numpy.std(p) * jax.random.normal(key, p.shape), params
    )
    print(f"# bench_alignment: {' '.join(sys.argv)}")
    print(f"# {common.machine_header()}")
    print(f"# {args.model}, P={count_params(params):,}, N={len(x)} ({num_train} train), "
          f"k={args.num_eigvecs}, jax {jax.__version__}, devices {jax.devices()}")  # fmt: skip

    start = time.perf_counter()
    kernel = np.asarray(empirical_ntk(apply_fn, params, x, batch_size=args.batch_size))
    init_s = time.perf_counter() - start
    print(f"  init kernel: {init_s:.2f} s", flush=True)
    start = time.perf_counter()
    n = len(x)
    _, vectors = scipy.linalg.eigh(kernel.astype(np.float64),
                                   subset_by_index=(n - args.num_eigvecs, n - 1))  # fmt: skip
    eig_s = time.perf_counter() - start
    vectors = vectors[:, ::-1].T
    print(f"  top-{args.num_eigvecs} eigenvectors: {eig_s:.2f} s", flush=True)
    rows = [("init kernel (empirical_ntk)", init_s)]
    methods = ["auto", *(["operator"] if args.operator else [])]
    for method in methods:
        start = time.perf_counter()
        quotients = rayleigh_quotients(apply_fn, trained, x, vectors, num_train=num_train,
                                       batch_size=args.batch_size, method=method)  # fmt: skip
        seconds = time.perf_counter() - start
        print(f"  alignment ({method}): {seconds:.2f} s, first quotients "
              f"{np.round(quotients['all'][:3], 3)}", flush=True)  # fmt: skip
        rows.append((f"alignment, {args.num_eigvecs} vectors, method={method}", seconds))
    print()
    print("| step | seconds | / init kernel |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / init_s:.2f} |")


if __name__ == "__main__":
    main()

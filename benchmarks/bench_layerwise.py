"""The engine with and without layerwise Jacobians, alternating in one process.

Dimensions: N examples, B examples per block.

    python benchmarks/bench_layerwise.py --model resnet18 --num 128 --batch-size 64 --repeats 2
    python benchmarks/bench_layerwise.py --model lenet --num 2000 --batch-size 256 --repeats 3

Inputs are CIFAR-shaped standard-normal [N, 32, 32, 3] (the timing does not depend on the image
content). Each repeat times ``empirical_ntk`` once with ``NTKLAB_LAYERWISE=1`` (the default: on a
CPU, layerwise Jacobians for convolution-dominated models such as ResNet-18, and for models like
LeNet with the convolutions' Jacobians formed on the host) and once with ``0``
(``vmap(jacrev)``), after a compiling warm-up on one block; the two kernels are compared. Prints a
Markdown table of the per-repeat times, the medians, their ratio and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num", type=int, default=128, help="N")
    parser.add_argument("--batch-size", type=int, default=64, help="B")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for key, value in common.machine_header().items():
        print(f"{key}: {value}")
    model = build_model(args.model)
    variables = init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
    apply_fn, params = inference_apply_fn(model, variables), variables["params"]
    x = np.random.default_rng(0).standard_normal((args.num, 32, 32, 3)).astype(np.float32)
    times: dict[str, list[float]] = {"1": [], "0": []}
    kernels: dict[str, np.ndarray] = {}
    rows = []
    for repeat in range(args.repeats):
        for mode in ("1", "0"):
            os.environ["NTKLAB_LAYERWISE"] = mode
            empirical_ntk(apply_fn, params, x[: args.batch_size], batch_size=args.batch_size)
            start = time.perf_counter()
            kernels[mode] = np.asarray(
                empirical_ntk(apply_fn, params, x, batch_size=args.batch_size)
            )
            seconds = time.perf_counter() - start
            times[mode].append(seconds)
            label = "layerwise" if mode == "1" else "vmap(jacrev)"
            rows.append([repeat, label, f"{seconds:.2f}", f"{os.getloadavg()[0]:.1f}"])
    os.environ.pop("NTKLAB_LAYERWISE")
    scale = np.abs(kernels["0"]).max()
    print(f"{args.model}, N = {args.num}, B = {args.batch_size}, random normal inputs")
    print(common.markdown_table(["repeat", "Jacobians", "seconds", "load avg"], rows))
    on, off = np.median(times["1"]), np.median(times["0"])
    print(
        f"medians: layerwise {on:.2f} s, vmap(jacrev) {off:.2f} s, speed-up {off / on:.2f}x; "
        f"max |difference| / max |K| = {np.abs(kernels['1'] - kernels['0']).max() / scale:.1e}"
    )


if __name__ == "__main__":
    main()

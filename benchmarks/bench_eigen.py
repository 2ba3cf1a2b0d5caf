"""Eigensolver benchmark: top-k eigenpairs of a LeNet eNTK by LAPACK (evr, evd), Chebyshev-filtered
and plain subspace iteration (float32 or float64 products), side by side on one kernel, after
computing the kernel; and the BLAS thread policy of the solvers.

Dimensions: N examples, k eigenpairs.

    python benchmarks/bench_eigen.py --num 6102 --k 1000 --solvers evr,evd,subspace:float32
    python benchmarks/bench_eigen.py --num 20000 --random --k 1000 --solvers subspace:float32
    python benchmarks/bench_eigen.py --kernel kernel.npy --k 1000 --solvers evr@float64,chebyshev
    python benchmarks/bench_eigen.py --kernel kernel.npy --threads --k-list 200,1000 --busy 2

A solver is ``name[:product_dtype][@dtype]`` (``@float64``: the solve's working precision,
``top_eigenpairs(..., dtype="float64")``). ``--threads`` times ``solver="auto"`` under the default
thread policy (``ntklab.threads.host_only``) against ``OPENBLAS_NUM_THREADS=1`` and ``=2``: one
worker process per setting (the variables must be set before NumPy loads), each holding the kernel,
asked in turn (interleaved repeats); ``--busy n`` starts n busy-looping processes beside them for
the whole run (killed at the end); ``--pause`` seconds separate the solves (OpenBLAS workers spin
for a while after a product, and the idle-CPU measurement of the next solve would count them).
Prints the medians per setting and the load average.

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
import os
import subprocess
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
        help="comma-separated name[:product_dtype][@dtype], e.g. evr, evd@float64, chebyshev, "
        "lanczos, subspace:float32, subspace:float64",
    )
    parser.add_argument("--threads", action="store_true", help="time the BLAS thread policy")
    parser.add_argument("--k-list", default="200,1000", help="--threads: the k values")
    parser.add_argument("--repeats", type=int, default=3, help="--threads: rounds")
    parser.add_argument("--busy", type=int, default=0, help="--threads: busy processes beside")
    parser.add_argument("--settings", default="auto,1,2", help="--threads: auto and/or counts")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="--threads: seconds between solves (lets the last worker's BLAS threads stop "
        "spinning, as between the stages of one run)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--random", action="store_true", help="random normal inputs")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tol", type=float, default=None, help="subspace tolerance")
    parser.add_argument("--oversampling", type=int, default=None)
    parser.add_argument("--out-of-core", action="store_true", help="kernel as a .npy memmap")
    parser.add_argument("--kernel", default=None, help="reuse a saved kernel.npy (memmapped)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    if args.worker is not None:
        return thread_worker(args.kernel)
    if args.threads:
        return thread_policy(args)
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
            name_products, _, precision = name.partition("@")
            solver, _, dtype = name_products.partition(":")
            common.reset_peak_rss()
            tic = time.perf_counter()
            pairs = top_eigenpairs(
                kernel,
                args.k,
                solver=solver,
                dtype=precision or "auto",
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
                    "num_unresolved": pairs.num_unresolved,
                    "first_unresolved": pairs.first_unresolved,
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
                row["num_unresolved"],
                row["first_unresolved"],
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
        "unresolved",
        "first unresolved",
        "peak RSS GB",
    ]
    print(common.markdown_table(columns, table))
    if args.json:
        payload = {"machine": header, "inputs": source, "n": int(kernel.shape[0]), "k": args.k}
        Path(args.json).write_text(
            json.dumps({**payload, "stages": stages, "rows": rows}, indent=1)
        )


def thread_worker(kernel_path: str) -> None:
    """``--worker``: loads the kernel, then for each k read from stdin runs ``top_eigenpairs``
    (solver auto) and prints one JSON line: seconds, BLAS threads chosen, solver, residual."""
    chosen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            chosen.append(record.getMessage())

    threads_logger = logging.getLogger("ntklab.threads")
    threads_logger.setLevel(logging.INFO)
    threads_logger.addHandler(Capture())
    kernel = np.load(kernel_path)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        chosen.clear()
        tic = time.perf_counter()
        pairs = top_eigenpairs(kernel, int(line))
        seconds = time.perf_counter() - tic
        row = {"seconds": seconds, "solver": pairs.solver, "max_residual": pairs.max_residual}
        print(json.dumps({**row, "threads": " / ".join(chosen)}), flush=True)


def thread_policy(args: argparse.Namespace) -> None:
    """``--threads``: solver auto under each thread setting, interleaved, with --busy loops."""
    if not args.kernel:
        raise SystemExit("--threads needs --kernel kernel.npy")
    ks = [int(k) for k in args.k_list.split(",")]
    settings = args.settings.split(",")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    workers = {}
    try:
        for setting in settings:
            env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARIABLES}
            if setting != "auto":
                env["OPENBLAS_NUM_THREADS"] = setting
            workers[setting] = subprocess.Popen(
                [sys.executable, __file__, "--worker", "1", "--kernel", args.kernel],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            json.loads(workers[setting].stdout.readline())
        print(f"load average before: {os.getloadavg()}; busy processes beside: {args.busy}")
        times = {(s, k): [] for s in settings for k in ks}
        notes = {(s, k): set() for s in settings for k in ks}
        for repeat in range(args.repeats):
            for k in ks:
                order = settings if repeat % 2 == 0 else settings[::-1]
                for setting in order:
                    worker = workers[setting]
                    time.sleep(args.pause)
                    worker.stdin.write(f"{k}\n")
                    worker.stdin.flush()
                    row = json.loads(worker.stdout.readline())
                    times[setting, k].append(row["seconds"])
                    notes[setting, k].add(f"{row['solver']} {row['threads']}".strip())
                    print(f"round {repeat} k={k} {setting}: {row}", flush=True)
        load = os.getloadavg()
    finally:
        for process in [*workers.values(), *busy]:
            process.kill()
            process.wait()
    print(f"load average after: {load}")
    table = []
    for k in ks:
        best = min(np.median(times[s, k]) for s in settings if s != "auto")
        for setting in settings:
            median = float(np.median(times[setting, k]))
            label = "default (auto)" if setting == "auto" else f"OPENBLAS_NUM_THREADS={setting}"
            values = ", ".join(f"{t:.2f}" for t in times[setting, k])
            table.append(
                [k, label, f"{median:.2f}", f"{median / best:.2f}", values,
                 "; ".join(sorted(notes[setting, k]))]
            )  # fmt: skip
    columns = ["k", "setting", "median s", "÷ best fixed", "all s", "solver, threads"]
    print(f"busy processes beside: {args.busy}, {args.repeats} rounds")
    print(common.markdown_table(columns, table))


_BLAS_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NTKLAB_BLAS_THREADS",
)


if __name__ == "__main__":
    main()

"""The BLAS thread policy under load: the LeNet CIFAR compute job and the LeNet + MLP kernels.

For each load (0, 1, 2 busy processes beside the measurement, started and stopped here) and each
policy (ntklab's ``auto``; ``OPENBLAS_NUM_THREADS=1``; ``OPENBLAS_NUM_THREADS=2``) a fresh child
process runs either

- ``compute``: ``compute_ntk`` with ``model=lenet data.dataset=cifar10`` on the real CIFAR-10
  subset (6,102 images, top-200 eigenpairs), timings from its ``meta.json``; or
- ``kernels``: the LeNet kernel, then the MLP kernel, in the same process (the order the
  slowdown was seen in), N = 2,000 real CIFAR-10 images, each compiled first.

Cases are interleaved over repeats (policy innermost) and the table gives medians, the ratio to
``OPENBLAS_NUM_THREADS=1`` at the same load, and the 1-minute load average before each load.

    python benchmarks/bench_threads.py --loads 0,2 --repeats 3
    python benchmarks/bench_threads.py --jobs kernels --loads 0 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
POLICIES = {
    "auto": {},
    "blas=1": {"OPENBLAS_NUM_THREADS": "1"},
    "blas=2": {"OPENBLAS_NUM_THREADS": "2"},
}
RESULT = "BENCH_THREADS "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="compute,kernels", help="compute,kernels")
    parser.add_argument("--loads", default="0,2", help="busy processes beside each case")
    parser.add_argument("--policies", default=",".join(POLICIES), help=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000, help="examples of the kernels job")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- children ------------------------------------------------------------------------------------


def child_compute() -> dict:
    from hydra import compose, initialize_config_dir

    import ntklab.experiments.schema  # noqa: F401  (registers the schemas)
    from ntklab.experiments import compute_ntk

    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            "model=lenet", "data.dataset=cifar10", f"data.root={DATA}", f"paths.artifacts={folder}",
        ]  # fmt: skip
        with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
            cfg = compose(config_name="compute_ntk", overrides=overrides)
        tic = time.perf_counter()
        run_dir = compute_ntk.run(cfg)
        wall = time.perf_counter() - tic
        timings = json.loads((run_dir / "meta.json").read_text())["timings"]
    return {
        "kernel_s": timings["kernel_s"],
        "eigen_s": timings["eigen_s"],
        "readouts_s": timings.get("quotients_s", 0) + timings.get("kernel_regression_s", 0),
        "wall_s": wall,
    }


def child_kernels(n: int) -> dict:
    import jax

    from ntklab.data import load_dataset
    from ntklab.models import build_model, inference_apply_fn, init_variables
    from ntklab.ntk import empirical_ntk

    data = load_dataset("cifar10", root=DATA, num_train=min(n, 5085), seed=0)
    x = data.train.images[:n]
    found = {}
    for name in ("lenet", "mlp"):  # one after the other in this process
        model = build_model(name)
        variables = init_variables(model, jax.random.PRNGKey(0), x.shape[1:])
        apply_fn = inference_apply_fn(model, variables)
        empirical_ntk(apply_fn, variables["params"], x[:512])  # compiles the block shapes
        tic = time.perf_counter()
        empirical_ntk(apply_fn, variables["params"], x)
        found[f"{name}_s"] = time.perf_counter() - tic
    return found


# --- the parent ----------------------------------------------------------------------------------


def run_case(job: str, policy: str, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS",
                                                             "OMP_NUM_THREADS")}  # fmt: skip
    env.update(POLICIES[policy])
    command = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--n", str(n)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        result = child_compute() if args.child == "compute" else child_kernels(args.n)
        print(RESULT + json.dumps(result), flush=True)
        return
    jobs = args.jobs.split(",")
    loads = [int(v) for v in args.loads.split(",")]
    policies = args.policies.split(",")
    results: dict[tuple, list[dict]] = {}
    load_average: dict[int, float] = {}
    for load in loads:
        load_average[load] = os.getloadavg()[0]
        workers = busy(load)
        try:
            time.sleep(2)
            for _ in range(args.repeats):
                for job in jobs:
                    for policy in policies:
                        result = run_case(job, policy, args.n)
                        results.setdefault((job, load, policy), []).append(result)
                        print(f"# {job} load={load} {policy}: {result}", flush=True)
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
    print_table(results, jobs, loads, policies, load_average, args)
    if args.json:
        serial = [
            {"job": j, "load": lo, "policy": p, "runs": r} for (j, lo, p), r in results.items()
        ]
        Path(args.json).write_text(json.dumps(serial, indent=1))


def print_table(results, jobs, loads, policies, load_average, args) -> None:
    print(
        f"\n{os.cpu_count()} CPUs; medians of {args.repeats} runs; ratio = time / the same "
        "case with OPENBLAS_NUM_THREADS=1 at the same load\n"
    )
    for job in jobs:
        keys = ["kernel_s", "eigen_s", "wall_s"] if job == "compute" else ["lenet_s", "mlp_s"]
        header = " | ".join(f"{k} (ratio)" for k in keys)
        print(f"| {job} | busy | load avg | policy | {header} |")
        print("|---|--:|--:|---|" + "--:|" * len(keys))
        for load in loads:
            base = _medians(results.get((job, load, "blas=1"), []), keys)
            for policy in policies:
                medians = _medians(results.get((job, load, policy), []), keys)
                cells = " | ".join(
                    f"{medians[k]:.2f} ({medians[k] / base[k]:.2f}x)" if base.get(k) else
                    f"{medians.get(k, float('nan')):.2f}" for k in keys
                )  # fmt: skip
                print(f"| {job} | {load} | {load_average[load]:.2f} | {policy} | {cells} |")
        print()


def _medians(runs: list[dict], keys: list[str]) -> dict[str, float]:
    good = [run for run in runs if "error" not in run]
    return {k: statistics.median(run[k] for run in good) for k in keys if good}


if __name__ == "__main__":
    main()

"""The GPU measurements of issue #11 in one call: matmul floor, ResNet-18 eNTK against plain JAX and
torch.func, LeNet N = 60,000 kernel + top-1,000 eigenpairs; one JSON and one Markdown table.

    pip install -e ".[bench,cuda]"          # from wheels carried along: no network needed
    python benchmarks/gpu_suite.py --out artifacts/gpu_suite          # < 8 min on one H100/H200
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_suite_smoke # tiny sizes, any CPU

Every stage runs as its own subprocess under its own wall-clock cap (``--caps`` seconds, scaled
down by ``--smoke``) and is killed when over, so the whole suite stays under the sum of the caps
(7.5 min by default); a stage that fails or times out is recorded as such and the suite goes on.
Stages (each one's JSON is kept under ``<out>/stages``):

1. ``matmul``: the device's float32 and TF32 matmul rates (the FLOP floor of the contraction).
2. ``resnet18_float32`` / ``resnet18_tf32``: ``bench_ntk.py`` ResNet-18 scalar eNTK at N = 2,000
   and 5,000 (``--smoke``: LeNet at 32, 64, which only checks the plumbing) for ntklab, ``jax_jacrev`` and (where torch sees the GPU)
   ``torch_jac``, with its own projection-based skipping (``--time-limit``).
3. ``lenet60k``: ``bench_eigen.py`` LeNet on N = 60,000 CIFAR-shaped random normal inputs
   (``--smoke``: 300), kernel then top-1,000 (``--smoke``: 20) eigenpairs by ``solver=auto``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CAPS = {"matmul": 30, "resnet18_float32": 120, "resnet18_tf32": 120, "lenet60k": 180}
"""Default wall-clock cap per stage, seconds (sum 450 s = 7.5 min)."""

MATMUL_SNIPPET = """
import json, sys
sys.path.insert(0, {here!r})
import common
rates = {{}}
for precision in ("float32", "tf32"):
    rate, shape = common.matmul_rate({m}, {m}, {m}, precision=precision)
    rates[precision] = {{"flops_per_s": rate, "shape": list(shape)}}
json.dump({{"header": common.machine_header(), "rates": rates}}, open({path!r}, "w"), indent=1)
"""


def stages(args: argparse.Namespace, stage_dir: Path) -> dict[str, list[str]]:
    """Stage name -> command line."""
    smoke = args.smoke
    sizes = "32,64" if smoke else "2000,5000"
    batch = "32" if smoke else "256"
    model = "lenet" if smoke else "resnet18"  # ResNet-18 alone compiles > 2 min on a busy CPU
    torch_device = "cpu" if smoke else "cuda"
    commands = {
        "matmul": [
            sys.executable,
            "-c",
            MATMUL_SNIPPET.format(
                here=str(HERE), m=256 if smoke else 8192, path=str(stage_dir / "matmul.json")
            ),
        ]
    }
    for precision in ("float32", "tf32"):
        name = f"resnet18_{precision}"
        commands[name] = [
            sys.executable,
            str(HERE / "bench_ntk.py"),
            f"--models={model}",
            f"--sizes={sizes}",
            "--impls=ntklab,jax_jacrev,torch_jac",
            f"--batch-size={batch}",
            f"--precision={precision}",
            f"--torch-device={torch_device}",
            "--data=normal",
            "--no-breakdown",
            f"--time-limit={0.4 * args.caps[name]:.0f}",
            f"--json={stage_dir / (name + '.json')}",
        ]
    commands["lenet60k"] = [
        sys.executable,
        str(HERE / "bench_eigen.py"),
        "--random",
        f"--num={300 if smoke else 60000}",
        f"--k={20 if smoke else 1000}",
        "--solvers=auto",
        f"--batch-size={64 if smoke else 1024}",
        f"--json={stage_dir / 'lenet60k.json'}",
    ]
    return commands


def run_stage(name: str, command: list[str], cap: float, log_dir: Path) -> dict:
    """Runs one stage under its cap; returns status, seconds and the log's tail."""
    tic = time.perf_counter()
    log = log_dir / f"{name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=HERE.parent,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=cap)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            status = f"timed out after {cap:.0f} s"
    seconds = time.perf_counter() - tic
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] {status} in {seconds:.1f} s", flush=True)
    return {"status": status, "seconds": seconds, "log": str(log), "log_tail": tail}


def summarize(results: dict[str, dict], stage_dir: Path) -> list[list[str]]:
    """Markdown rows (stage, what, value) from the stages' JSON files."""
    import common

    rows = []
    for name, result in results.items():
        rows.append([name, "status", f"{result['status']} ({result['seconds']:.0f} s)"])
        path = stage_dir / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if name == "matmul":
            for precision, rate in data["rates"].items():
                rows.append(
                    [name, f"{precision} matmul", f"{rate['flops_per_s'] / 1e12:.1f} TFLOP/s"]
                )
        elif name.startswith("resnet18"):
            for case in data.get("results", []):
                label = f"{case['model']} {case['impl']} N={case['n']}"
                if "seconds" in case:
                    per_entry = case["seconds"] / case["n"] ** 2
                    rows.append([name, label, f"{case['seconds']:.2f} s ({per_entry:.2e} s/entry)"])
                else:
                    rows.append([name, label, str(case.get("skipped", case.get("error", "—")))])
        elif name == "lenet60k":
            stages_ = data.get("stages", {})
            rows.append([name, "kernel", f"{stages_.get('kernel_s', float('nan')):.1f} s"])
            for row in data.get("rows", []):
                rows.append(
                    [
                        name,
                        f"eigenpairs ({row['solver']})",
                        f"{row['seconds']:.1f} s, max residual {row['max_residual']:.1e}, "
                        f"peak RSS {common.fmt(row['peak_rss_gb'], '.1f')} GB",
                    ]
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="artifacts/gpu_suite", help="folder for JSON, table, logs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and caps (CPU check)")
    parser.add_argument("--only", default=None, help="comma list of stages to run")
    args = parser.parse_args()
    args.caps = dict(CAPS)
    if args.smoke:
        args.caps = {name: 120 for name in CAPS}  # a loaded 2-core CPU compiles ResNet-18 slowly
    out = Path(args.out)
    stage_dir = out / "stages"
    stage_dir.mkdir(parents=True, exist_ok=True)
    commands = stages(args, stage_dir)
    wanted = args.only.split(",") if args.only else list(commands)
    unknown = sorted(set(wanted) - set(commands))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; valid: {', '.join(commands)}")
    results = {}
    tic = time.perf_counter()
    for name in wanted:
        results[name] = run_stage(name, commands[name], args.caps[name], stage_dir)
    total = time.perf_counter() - tic
    import common

    rows = summarize(results, stage_dir)
    table = common.markdown_table(["stage", "measurement", "value"], rows)
    header = f"GPU suite{' (smoke)' if args.smoke else ''}: {total:.0f} s in all\n\n"
    (out / "gpu_suite.md").write_text(header + table + "\n")
    payload = {"smoke": args.smoke, "total_seconds": total, "caps": args.caps, "stages": results}
    for name in results:
        path = stage_dir / f"{name}.json"
        if path.exists():
            payload["stages"][name]["data"] = json.loads(path.read_text())
    (out / "gpu_suite.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(header + table)


if __name__ == "__main__":
    main()

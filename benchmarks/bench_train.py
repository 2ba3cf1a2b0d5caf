"""Train-step benchmark: the network's jitted SGD step against its linearization's.

Dimensions: B examples per batch, P parameters, F forward FLOPs of the network on one batch.

For each model it builds the two train steps exactly as ``ntklab.train.fit`` runs them
(``train_step_fn``: BatchNorm in training mode for the network; ``linearize(...)`` at θ0 in
inference mode for the linear model, one JVP inside the VJP), compiles them on one batch, times
them with ``block_until_ready`` (best of several runs after the warm-up) and prints a Markdown
table: seconds per step, the linear/network ratio (the issue asks for at most 3x), XLA's FLOP count
of each compiled step, the achieved FLOP/s against the FLOP floor 3F (one forward and one backward
pass, the least any gradient step costs) and against the matmul rate measured at startup.

    python benchmarks/bench_train.py                          # mlp, lenet, resnet18, B=128, 32x32x3
    python benchmarks/bench_train.py --models resnet18 --batch-size 256
    python benchmarks/bench_train.py --tiny                   # small shapes: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import common

from ntklab.linearize import linearize
from ntklab.models import (
    build_model,
    count_params,
    inference_apply_fn,
    init_variables,
    train_apply_fn,
)
from ntklab.train import TrainConfig, init_train_state, train_step_fn

MODELS = ("mlp", "lenet", "resnet18")
TINY_KWARGS = {"mlp": {"widths": [32]}, "lenet": {}, "resnet18": {"stage_sizes": [1], "width": 8}}
TOTAL_STEPS = 10_000


def xla_flops(step, state, batch) -> float | None:
    """FLOPs of one compiled step by XLA's cost analysis (None where the backend has none)."""
    jitted, model = step.func, step.args[0]
    try:
        analysis = jitted.lower(model, state, batch).compile().cost_analysis()
    except Exception:  # cost analysis is optional: the timings are the point
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def forward_flops(apply_fn, params, x) -> float | None:
    try:
        analysis = jax.jit(apply_fn).lower(params, x).compile().cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def time_step(step, state, batch) -> float:
    """Best seconds per step; the state is donated, so each call feeds the next."""
    holder = [state]

    def one_step():
        holder[0], metrics = step(holder[0], batch)
        return holder[0], metrics

    return common.best_time(one_step, repeats=5, min_seconds=1.0)


def bench_model(name: str, *, batch_size: int, input_shape: tuple[int, int, int], tiny: bool):
    model = build_model(name, **(TINY_KWARGS[name] if tiny else {}))
    variables = init_variables(model, jax.random.PRNGKey(0), input_shape)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    rng = np.random.default_rng(0)
    batch = {
        "x": jax.device_put(rng.normal(size=(batch_size, *input_shape)).astype(np.float32)),
        "y": jax.device_put((rng.random(batch_size) > 0.5).astype(np.float32)),
    }
    config = TrainConfig()
    apply_fn = inference_apply_fn(model, variables)
    options = {"config": config, "total_steps": TOTAL_STEPS}
    steps = {
        "network": train_step_fn(train_apply_fn=train_apply_fn(model), **options),
        "linearized": train_step_fn(apply_fn=linearize(apply_fn, params), **options),
    }
    forward = forward_flops(apply_fn, params, batch["x"])
    results = {}
    for kind, step in steps.items():
        state = init_train_state(params, batch_stats, config=config, total_steps=TOTAL_STEPS)
        flops = xla_flops(step, state, batch)
        seconds = time_step(step, state, batch)
        results[kind] = (seconds, flops)
    return count_params(params), forward, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-shape", default="32,32,3", help="H,W,C")
    parser.add_argument("--tiny", action="store_true", help="narrow models on 8x8x1 inputs")
    args = parser.parse_args()
    input_shape = (8, 8, 1) if args.tiny else tuple(int(d) for d in args.input_shape.split(","))
    for key, value in common.machine_header().items():
        print(f"- {key}: {value}")
    peak, _ = common.matmul_rate(1024, 1024, 1024)
    print(f"- measured float32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    print(f"- command: python {' '.join(sys.argv)}\n")

    rows = []
    for name in args.models.split(","):
        num_params, forward, results = bench_model(
            name, batch_size=args.batch_size, input_shape=input_shape, tiny=args.tiny
        )
        network_seconds = results["network"][0]
        for kind, (seconds, flops) in results.items():
            floor = 3 * forward if forward else None
            rows.append(
                [
                    name,
                    f"{num_params:,}",
                    args.batch_size,
                    kind,
                    common.fmt(seconds * 1e3, ".3g"),
                    common.fmt(seconds / network_seconds, ".2f") + "x",
                    common.fmt(flops / 1e9 if flops else None, ".3g"),
                    common.fmt(floor / 1e9 if floor else None, ".3g"),
                    common.fmt(floor / seconds / peak if floor else None, ".1%"),
                    common.fmt(flops / seconds / 1e9 if flops else None, ".3g"),
                ]
            )
    columns = [
        "model", "P", "B", "step", "ms/step", "vs network", "XLA GFLOP/step",
        "floor 3F GFLOP", "floor/s vs matmul peak", "XLA GFLOP/s",
    ]  # fmt: skip
    print(common.markdown_table(columns, rows))


if __name__ == "__main__":
    main()

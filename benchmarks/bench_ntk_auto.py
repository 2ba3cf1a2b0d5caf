"""Does ``implementation="auto"`` pick (nearly) the fastest implementation? Side by side per row.

Dimensions: N examples, C outputs, P parameters, B examples per block.

For each model, output mode and N it times ``empirical_ntk`` with every implementation (after a
warm-up on one block of the same shapes, which compiles everything) in one process, and prints a
Markdown table of seconds, the implementation ``auto`` chose and auto's time over the fastest.
An implementation whose time projected from the warm-up (× (N/B)²) exceeds ``--time-limit`` is
skipped and shown as ``> limit``.

    python benchmarks/bench_ntk_auto.py --models mlp,lenet,resnet18 --sizes 500 --outputs trace,full
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

IMPLEMENTATIONS = ("auto", "jacobian", "structured", "ntk_vector_products")
INPUT_SHAPE = (32, 32, 3)


class _Choice(logging.Handler):
    """Captures the implementation the engine ran (from its start-of-run log line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.choice = None

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"output=\w+, (\w+),", record.getMessage())
        if match:
            self.choice = match.group(1)


def timed(apply_fn, params, x, *, output: str, implementation: str, batch_size: int) -> float:
    start = time.perf_counter()
    kernel = empirical_ntk(
        apply_fn, params, x, output=output, implementation=implementation, batch_size=batch_size
    )
    np.asarray(kernel).sum()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,lenet,resnet18")
    parser.add_argument("--sizes", default="500,1000,2000")
    parser.add_argument("--outputs", default="trace,full")
    parser.add_argument("--num-outputs", type=int, default=10, help="C for output=full")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="best of this many runs for cases under 30 s"
    )
    args = parser.parse_args(argv)
    choice = _Choice()
    logging.getLogger("ntklab.ntk").addHandler(choice)
    logging.getLogger("ntklab.ntk").setLevel(logging.INFO)
    print(f"# bench_ntk_auto: {' '.join(sys.argv)}")
    print(f"# {common.machine_header()}")
    print(f"# jax {jax.__version__}, devices {jax.devices()}")
    rows = []
    rng = np.random.default_rng(0)
    for model_name in args.models.split(","):
        for output in args.outputs.split(","):
            num_outputs = 1 if output == "trace" else args.num_outputs
            model = build_model(model_name, num_outputs=num_outputs)
            variables = init_variables(model, jax.random.PRNGKey(0), INPUT_SHAPE)
            apply_fn = inference_apply_fn(model, variables)
            params = variables["params"]
            for n in (int(s) for s in args.sizes.split(",")):
                x = rng.standard_normal((n, *INPUT_SHAPE)).astype(np.float32)
                block = min(args.batch_size, n)
                times: dict[str, float | None] = {}
                chosen = None
                for implementation in IMPLEMENTATIONS:
                    options = {"output": output, "implementation": implementation,
                               "batch_size": block}  # fmt: skip
                    warm = timed(apply_fn, params, x[:block], **options)
                    # a second small run without compilation estimates the per-block-pair cost
                    pair = timed(apply_fn, params, x[:block], **options)
                    projected = pair * (n / block) ** 2 / 2
                    if projected > args.time_limit:
                        times[implementation] = None
                        print(f"  {model_name} {output} N={n} {implementation}: skipped "
                              f"(projected {projected:.0f} s; warm-up {warm:.1f} s)", flush=True)  # fmt: skip
                        continue
                    choice.choice = None
                    times[implementation] = timed(apply_fn, params, x, **options)
                    if implementation == "auto":
                        chosen = choice.choice
                    print(f"  {model_name} {output} N={n} {implementation}: "
                          f"{times[implementation]:.2f} s", flush=True)  # fmt: skip
                # Short cases: best of --repeats runs (at least 5 under 2 s, where the noise of a
                # shared machine is as large as the differences between rows), in rounds over
                # the implementations so that none is favoured by running first.
                short = [k for k, v in times.items() if v is not None and v < 30]
                rounds = max(args.repeats, 5) if any(times[k] < 2 for k in short) else args.repeats
                for _ in range(rounds - 1):
                    for implementation in short:
                        options = {"output": output, "implementation": implementation,
                                   "batch_size": block}  # fmt: skip
                        seconds = timed(apply_fn, params, x, **options)
                        times[implementation] = min(times[implementation], seconds)
                if short:
                    print(f"  {model_name} {output} N={n} best of {rounds}: " + ", ".join(
                        f"{k} {times[k]:.2f} s" for k in short), flush=True)  # fmt: skip
                rows.append(
                    (model_name, count_params(params), output, num_outputs, n, times, chosen)
                )
    print()
    print("| model | P | output | C | N | auto (chose) | jacobian | structured | "
          "ntk_vector_products | auto / fastest |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name, p, output, c, n, times, chosen in rows:
        measured = {k: v for k, v in times.items() if v is not None and k != "auto"}
        fastest = min(measured.values()) if measured else None
        auto = times.get("auto")
        ratio = f"{auto / fastest:.2f}" if auto and fastest else "n/a"

        def cell(value, limit=args.time_limit):
            return f"{value:.2f}" if value is not None else f"> {limit:.0f}"

        print(f"| {model_name} | {p:,} | {output} | {c} | {n} | {cell(auto)} ({chosen}) | "
              f"{cell(times['jacobian'])} | {cell(times['structured'])} | "
              f"{cell(times['ntk_vector_products'])} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()

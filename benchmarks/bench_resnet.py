"""ResNet-18 eNTK benchmark: layerwise Jacobians vs vmap(jacrev) vs torch.func, per phase.

Dimensions: N examples, B examples per block, P parameters.

CIFAR ResNet-18 (11,169,345 parameters, BatchNorm in inference mode), scalar output, float32, on
random normal images [N, 32, 32, 3] (``--data random``, the default) or the first N CIFAR-10
training images (``--data cifar``, from ``--data-root``). Side by side in one process, each
competitor computes the symmetric kernel [N, N] in blocks of B examples (upper triangle, Jacobians
of all N cached when they fit in ``--cache-bytes``, else column blocks recomputed per row block):

- ``layerwise``: ``ntklab.ntk._layerwise.layerwise_features`` (one backward pass to the layer
  outputs, per-layer weight-gradient formulas), plus the leaf-wise GEMM contraction;
- ``jax_jacrev``: plain JAX ``vmap(jacrev)`` per block (the engine's previous Jacobian step),
  same contraction;
- ``ntklab``: the public ``empirical_ntk(..., implementation="jacobian")`` end to end;
- ``torch_jac``: torch.func ``vmap(jacrev)`` per block + einsum per leaf (PyTorch's NTK tutorial,
  method 1, as in ``torch_peers.jacobian_contraction_ntk``, but upper triangle and phase-timed).

Also measured: one batched forward + backward of B examples (gradient of the summed outputs wrt
all parameters) in JAX and torch, JAX's backward to the inputs only (no weight gradients), and
the matmul rate of a [B, P] x [P, B] product. Every time is the median of ``--repeats`` runs after
a warm-up (compilation). Prints a Markdown table.

    python benchmarks/bench_resnet.py --sizes 128 --batch-size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk
from ntklab.ntk._layerwise import layerwise_features
from ntklab.ntk._layerwise_plan import layerwise_plan

try:
    import torch
    import torch_peers
except ImportError:  # the optional ``bench`` extra
    torch = torch_peers = None

IMPLS = ("layerwise", "jax_jacrev", "ntklab", "torch_jac")
INPUT_SHAPE = (32, 32, 3)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (results blocked on); no warm-up."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def blocks(n: int, b: int) -> list[slice]:
    return [slice(s, min(s + b, n)) for s in range(0, n, b)]


def padded(x: np.ndarray, b: int) -> np.ndarray:
    missing = b - len(x)
    return x if not missing else np.pad(x, [(0, missing)] + [(0, 0)] * (x.ndim - 1), mode="edge")


def blocked_kernel(
    features: Callable, contract: Callable, x: np.ndarray, b: int, cache: bool
) -> tuple[np.ndarray, float, float]:
    """Symmetric kernel [N, N] from per-block features; returns (kernel, jacobian s, contract s)."""
    n = len(x)
    slices = blocks(n, b)
    kernel = np.zeros((n, n), np.float32)
    jac_time = con_time = 0.0

    def feats(s: slice):
        nonlocal jac_time
        start = time.perf_counter()
        out = jax.block_until_ready(features(jnp.asarray(padded(x[s], b))))
        jac_time += time.perf_counter() - start
        return out

    def put(i: int, j: int, rows, cols) -> None:
        nonlocal con_time
        start = time.perf_counter()
        block = np.asarray(jax.block_until_ready(contract(rows, cols)))
        con_time += time.perf_counter() - start
        ri, rj = slices[i], slices[j]
        kernel[ri, rj] = block[: ri.stop - ri.start, : rj.stop - rj.start]
        kernel[rj, ri] = kernel[ri, rj].T

    if cache:
        cached = [feats(s) for s in slices]
        for i in range(len(slices)):
            for j in range(i, len(slices)):
                put(i, j, cached[i], cached[j])
        del cached
    else:
        for i, s in enumerate(slices):
            rows = feats(s)
            for j in range(i, len(slices)):
                cols = rows if j == i else feats(slices[j])
                put(i, j, rows, cols)
                del cols
            del rows
    return kernel, jac_time, con_time


def jax_contract_fn() -> Callable:
    @jax.jit
    def contract(rows: tuple, cols: tuple) -> jax.Array:
        parts = [
            jnp.matmul(
                r.reshape(r.shape[0], -1),
                c.reshape(c.shape[0], -1).T,
                precision=jax.lax.Precision.HIGHEST,
            )
            for r, c in zip(rows, cols, strict=True)
        ]
        return sum(parts[1:], parts[0])

    return contract


def torch_phase_kernel(model, x: np.ndarray, b: int, cache: bool):
    """torch.func vmap(jacrev) + per-leaf einsum, upper triangle; (kernel, jac s, contract s)."""
    params, _, fnet_single = torch_peers._functional(model)
    jac_fn = torch.func.vmap(torch.func.jacrev(fnet_single), (None, 0))
    xt = torch_peers.to_torch_images(x)

    def features(xb):
        with torch.no_grad():
            return [j.flatten(2) for j in jac_fn(params, xb).values()]

    def contract(rows, cols):
        with torch.no_grad():
            parts = [torch.einsum("Naf,Maf->NM", a, c) for a, c in zip(rows, cols, strict=True)]
            return torch.stack(parts).sum(0).numpy()

    n = len(x)
    slices = blocks(n, b)
    kernel = np.zeros((n, n), np.float32)
    jac_time = con_time = 0.0

    def feats(s):
        nonlocal jac_time
        start = time.perf_counter()
        out = features(xt[s])
        jac_time += time.perf_counter() - start
        return out

    def put(i, j, rows, cols):
        nonlocal con_time
        start = time.perf_counter()
        block = contract(rows, cols)
        con_time += time.perf_counter() - start
        kernel[slices[i], slices[j]] = block
        kernel[slices[j], slices[i]] = block.T

    if cache:
        cached = [feats(s) for s in slices]
        for i in range(len(slices)):
            for j in range(i, len(slices)):
                put(i, j, cached[i], cached[j])
        del cached
    else:
        for i, s in enumerate(slices):
            rows = feats(s)
            for j in range(i, len(slices)):
                cols = rows if j == i else feats(slices[j])
                put(i, j, rows, cols)
                del cols
            del rows
    return kernel, jac_time, con_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="128", help="comma-separated N")
    parser.add_argument("--batch-size", type=int, default=64, help="B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--data", choices=("random", "cifar"), default="random")
    parser.add_argument(
        "--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser.add_argument("--cache-bytes", type=float, default=8e9, help="cache all Jacobians up to")
    args = parser.parse_args()
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown impls {unknown}; valid choices: {', '.join(IMPLS)}")
    if "torch_jac" in impls and torch is None:
        print("torch not installed: torch_jac skipped (`pip install -e .[bench]`)")
        impls.remove("torch_jac")
    b = args.batch_size

    for key, value in common.machine_header().items():
        print(f"{key}: {value}")
    model = build_model("resnet18")
    variables = init_variables(model, jax.random.PRNGKey(0), INPUT_SHAPE)
    apply_fn = inference_apply_fn(model, variables)
    params = variables["params"]
    leaves, treedef = jax.tree.flatten(params)
    num_params = count_params(params)
    print(f"ResNet-18: P = {num_params:,}, B = {b}, data = {args.data}, float32, scalar output")

    start = time.perf_counter()
    plan = layerwise_plan(apply_fn, treedef, leaves, INPUT_SHAPE)
    print(
        f"layerwise plan: {len(plan.layers)} layers, {len(plan.covered)}/{len(leaves)} leaves "
        f"covered, {len(plan.refused)} refused, {time.perf_counter() - start:.1f} s"
    )
    group = tuple(range(len(leaves)))
    layerwise = jax.jit(
        lambda lv, xb: layerwise_features(apply_fn, treedef, lv, group, xb, 1, plan=plan)
    )

    def single(lv, example):
        return apply_fn(jax.tree.unflatten(treedef, lv), example[None])[0]

    jacrev = jax.jit(
        lambda lv, xb: tuple(
            j.reshape(xb.shape[0], 1, -1) for j in jax.vmap(jax.jacrev(single), (None, 0))(lv, xb)
        )
    )
    contract = jax_contract_fn()

    rate, shape = common.matmul_rate(b, num_params, b)
    print(f"matmul rate [B, P] x [P, B] (P capped at {shape[1]:,}): {rate / 1e9:.1f} GFLOP/s")

    ctx = {
        "apply_fn": apply_fn, "params": params, "leaves": leaves, "treedef": treedef,
        "variables": variables, "num_params": num_params, "rate": rate,
        "layerwise": layerwise, "jacrev": jacrev, "contract": contract,
    }  # fmt: skip
    for n in map(int, args.sizes.split(",")):
        bench_size(n, args, impls, ctx)


def bench_size(n: int, args: argparse.Namespace, impls: list[str], ctx: dict) -> None:
    """Times every competitor on N = ``n`` examples and prints the table."""
    b, apply_fn, params, leaves, treedef = (
        args.batch_size, ctx["apply_fn"], ctx["params"], ctx["leaves"], ctx["treedef"]
    )  # fmt: skip
    variables, num_params, rate = ctx["variables"], ctx["num_params"], ctx["rate"]
    layerwise, jacrev, contract = ctx["layerwise"], ctx["jacrev"], ctx["contract"]
    if args.data == "cifar":
        from ntklab.data import load_dataset

        data = load_dataset("cifar10", root=args.data_root, num_train=n, num_test=1)
        x = data.train.images[:n]
    else:
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, *INPUT_SHAPE)), np.float32)
    xb = jnp.asarray(padded(x[:b], b))
    cache = n * num_params * 4 <= args.cache_bytes
    rows: dict[str, dict] = {}

    # Floors: one batched forward + backward of B examples.
    grad_params = jax.jit(
        jax.grad(lambda lv, xs: apply_fn(jax.tree.unflatten(treedef, lv), xs).sum())
    )
    grad_inputs = jax.jit(
        jax.grad(lambda xs, lv: apply_fn(jax.tree.unflatten(treedef, lv), xs).sum())
    )
    jax.block_until_ready(grad_params(leaves, xb))
    jax.block_until_ready(grad_inputs(xb, leaves))
    floor = median_time(lambda: grad_params(leaves, xb), args.repeats)
    floor_inputs = median_time(lambda: grad_inputs(xb, leaves), args.repeats)
    torch_floor = None
    if "torch_jac" in impls:
        tmodel = torch_peers.mirror_model("resnet18", variables, INPUT_SHAPE)
        xt = torch_peers.to_torch_images(np.asarray(xb))

        def torch_step():
            tmodel.zero_grad()
            tmodel(xt).sum().backward()

        torch_step()
        torch_floor = median_time(torch_step, args.repeats)

    kernels: dict[str, np.ndarray] = {}
    for impl in impls:
        gc.collect()
        totals, jacs, cons = [], [], []
        for repeat in range(args.repeats + 1):
            # The first run is the warm-up: one block (compiles the same block shapes).
            xs = x[:b] if repeat == 0 else x
            start = time.perf_counter()
            if impl in ("layerwise", "jax_jacrev"):
                fn = layerwise if impl == "layerwise" else jacrev
                kernel, jac_s, con_s = blocked_kernel(
                    lambda xs, fn=fn: fn(leaves, xs), contract, xs, b, cache
                )
            elif impl == "ntklab":
                kernel = empirical_ntk(
                    apply_fn, params, xs, batch_size=b, implementation="jacobian",
                    memory_bytes=int(args.cache_bytes), progress=False,
                )  # fmt: skip
                jac_s = con_s = None
            else:
                kernel, jac_s, con_s = torch_phase_kernel(tmodel, xs, b, cache)
            total = time.perf_counter() - start
            if repeat:
                totals.append(total)
                jacs.append(jac_s)
                cons.append(con_s)
        kernels[impl] = np.asarray(kernel)
        med = statistics.median
        rows[impl] = {
            "total": med(totals),
            "jac": med(jacs) if jacs[0] is not None else None,
            "con": med(cons) if cons[0] is not None else None,
        }
        print(f"N={n} {impl}: {rows[impl]}", flush=True)

    reference = kernels[impls[0]]
    print(f"\nN = {n}, B = {b}, Jacobians {'cached' if cache else 'recomputed'}, "
          f"medians of {args.repeats} runs; floors per block of B: JAX batched fwd+bwd "
          f"{floor:.2f} s (inputs only {floor_inputs:.2f} s)"
          + (f", torch {torch_floor:.2f} s" if torch_floor else ""))  # fmt: skip
    num_blocks = len(blocks(n, b))
    flops = num_params * n * (n + 1)  # 2·P per entry of the upper triangle
    peer = rows.get("torch_jac", {}).get("total")
    table = []
    for impl in impls:
        r = rows[impl]
        jac_per_block = (
            r["jac"] / (num_blocks if cache else num_blocks * (num_blocks + 1) / 2)
            if r["jac"]
            else None
        )
        table.append([
            impl,
            common.fmt(r["total"], ".1f"),
            common.fmt(r["jac"], ".1f"),
            common.fmt(r["con"], ".1f"),
            common.fmt(jac_per_block / floor if jac_per_block else None, ".2f") + "x",
            common.fmt(flops / r["con"] / rate * 100 if r["con"] else None, ".0f") + "%",
            common.fmt(peer / r["total"] if peer else None, ".2f") + "x",
            common.fmt(float(np.max(np.abs(kernels[impl] - reference)) / np.max(np.abs(reference))), ".1e"),
        ])  # fmt: skip
    print(common.markdown_table(
        ["impl", "total s", "Jacobian s", "contraction s", "Jacobian/block ÷ JAX fwd+bwd",
         "contraction % matmul rate", "speed-up vs torch_jac", f"max rel diff vs {impls[0]}"],
        table,
    ))  # fmt: skip
    del kernels


if __name__ == "__main__":
    main()

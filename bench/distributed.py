"""Distributed Scion at scale, from shapes alone: bytes per step against the lower
bound, and Newton-Schulz work per rank against total / world size.

No GPU and no processes: the plan is the one ``disco_kernels.distributed`` makes
(owners, rounds, all_to_all splits), replayed for every rank of GPT-2-small and
Llama-3.2-1B parameter lists (bf16 LMO results, fp32 gradients).

    replicated (DDP)  each owner broadcasts its results: every rank receives each
                      result it does not own once. Bound: every result reaches the
                      world - 1 other ranks once.
    fsdp2             row shards go to the owner and come back (all_to_all), plus one
                      all-reduce of per-column sums for the reduce-route norms.
                      Bound: every shard but the owner's moves twice.

``python -m bench.distributed [--full]`` prints the table; ``run(quick)`` returns the rows.
"""
from __future__ import annotations

import argparse
import math

from disco_kernels import distributed as ddist
from disco_kernels.lmo import make_norm

from .shapes import GPT2_124M, LLAMA3_1B

GRAD_BYTES, LMO_BYTES, SUM_BYTES = 4, 2, 8   # fp32 gradients, bf16 Spectral results, fp64 column sums
BYTES_TARGET, BALANCE_TARGET = 1.1, 1.2


def _params(model):
    """(owner-route items in plan order, sizes of the all-reduced sums on row shards)."""
    items, sums = [], []
    for _, norm, kwargs, params in model.groups():
        concrete = make_norm(norm, kwargs)
        for j, (_, shape) in enumerate(params):
            c = concrete.resolve(shape)
            route = ddist.route(c, ddist.Layout("sharded"), shape)
            if route == "owner":
                items.append(ddist.Item(0, len(items), tuple(shape), ddist.ns_flops(shape, c.steps)))
            elif route == "reduce":  # (one sum per line; the lines run along dim 0)
                sums.append(math.prod(shape[1:]))
    return ddist.order_items(items), sums


def _replicated_bytes(items, owners, rounds, world) -> int:
    total = 0
    for rnd in rounds:  # one broadcast per owner and round, received by the world - 1 others
        total += sum(math.prod(items[i].shape) for i in rnd) * LMO_BYTES * (world - 1)
    return total


def _sharded_bytes(items, owners, rounds, world, sums) -> int:
    total = 0
    for rnd in rounds:
        for rank in range(world):
            to_owner, from_ranks = ddist.sharded_splits(items, owners, rnd, rank, world)
            total += (sum(from_ranks) - from_ranks[rank]) * GRAD_BYTES   # shards in
            total += (sum(to_owner) - to_owner[rank]) * LMO_BYTES        # result rows back
    return total + world * round(2 * (world - 1) / world * SUM_BYTES * sum(sums))


def _sharded_bound(items, owners, world, sums) -> int:
    moved = sum(math.prod(it.shape) - ddist.row_splits(it.shape[0], world)[o] * math.prod(it.shape[1:])
                for it, o in zip(items, owners))
    return moved * (GRAD_BYTES + LMO_BYTES) + world * round(2 * (world - 1) / world * SUM_BYTES * sum(sums))


def _max_load(costs, owners, world) -> int:
    load = [0] * world
    for c, o in zip(costs, owners):
        load[o] += c
    return max(load)


def rows_for(model, world: int) -> list[dict]:
    items, sums = _params(model)
    owners, rounds = ddist.schedule(items, world, LMO_BYTES)
    costs = [it.cost for it in items]
    mean = sum(costs) / world
    greedy = _max_load(costs, owners, world)
    by_index = sorted(range(len(items)), key=lambda i: items[i].pos)  # model order, as round-robin sees it
    rr = [0] * len(items)
    for k, i in enumerate(by_index):
        rr[i] = k % world
    numel = sum(math.prod(it.shape) for it in items)
    common = {"suite": "distributed", "model": model.name, "world": world, "matrices": len(items),
              "rounds": len(rounds),
              "ns_max_over_mean": round(greedy / mean, 4),
              "ns_max_over_achievable": round(greedy / max(mean, max(costs)), 4),
              "round_robin_max_over_mean": round(_max_load(costs, rr, world) / mean, 4),
              "balance_target": BALANCE_TARGET, "bytes_target": BYTES_TARGET, "status": "ok"}
    replicated = _replicated_bytes(items, owners, rounds, world)
    sharded = _sharded_bytes(items, owners, rounds, world, sums)
    bounds = {"replicated": numel * LMO_BYTES * (world - 1), "fsdp2": _sharded_bound(items, owners, world, sums)}
    out = []
    for path, got in (("replicated", replicated), ("fsdp2", sharded)):
        out.append({**common, "path": path, "bytes_per_step": got, "lower_bound_bytes": bounds[path],
                    "bytes_ratio": round(got / bounds[path], 4) if bounds[path] else 1.0})
    return out


def run(quick: bool = True) -> list[dict]:
    """Rows for GPT-2-small and Llama-3.2-1B at world sizes 8, 64, 256 (and 16, 1024 unless quick)."""
    worlds = (8, 64, 256) if quick else (8, 16, 64, 256, 1024)
    return [row for model in (GPT2_124M, LLAMA3_1B) for world in worlds for row in rows_for(model, world)]


def table(rows: list[dict]) -> str:
    head = f"{'model':<11} {'world':>5} {'path':<10} {'GB/step':>9} {'vs bound':>8} {'NS max/mean':>11} " \
           f"{'max/achiev.':>11} {'round-robin':>11}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['model']:<11} {r['world']:>5} {r['path']:<10} {r['bytes_per_step'] / 1e9:>9.3f} "
                     f"{r['bytes_ratio']:>8.3f} {r['ns_max_over_mean']:>11.3f} {r['ns_max_over_achievable']:>11.3f} "
                     f"{r['round_robin_max_over_mean']:>11.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also world sizes 16 and 1024")
    print(table(run(quick=not ap.parse_args(argv).full)))


if __name__ == "__main__":
    main()

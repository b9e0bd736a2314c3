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
import itertools
import math

import torch

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
            route = ddist.route(c, ddist.ROW_SHARDS, shape)
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


# -- every layout, from shapes: the pieces each rank holds follow from the placements ----------------

COLWISE = ("c_attn", "c_fc", "attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up", "head")  # TP: output dim cut


def _placements(layout: str, tp: int):
    """(mesh dims, placements of a param by name and rank) of a layout as torchtitan makes it."""
    from torch.distributed.tensor import Replicate as R
    from torch.distributed.tensor import Shard as S
    from torch.distributed.tensor.placement_types import _StridedShard

    def tp_of(name, ndim):  # colwise Shard(0), rowwise Shard(1), vectors and embeddings replicated
        if ndim == 2 and name != "embed" and name != "pos_embed":
            return S(0) if any(c in name for c in COLWISE) else S(1)
        return R()

    if layout == "hsdp":
        return lambda name, ndim: (R(), S(0))
    if layout == "tp":
        return lambda name, ndim: (tp_of(name, ndim),)
    if layout == "fsdp_tp":  # FSDP2 over TP: dim 0 cut by both is a strided shard
        return lambda name, ndim: ((_StridedShard(0, split_factor=tp), S(0)) if tp_of(name, ndim) == S(0)
                                   else (S(0), tp_of(name, ndim)))
    raise ValueError(layout)


def layout_rows(model, layout: str, mesh_shape: tuple) -> dict:
    """Bytes received over all ranks per step against the bound, and the largest rank's Newton-Schulz
    FLOPs against total / world, for ``model`` on ``layout`` over a mesh of ``mesh_shape``."""
    world = math.prod(mesh_shape)
    place = _placements(layout, mesh_shape[-1])
    ranks = torch.arange(world).view(mesh_shape)
    keyed, cosets, reduce_bytes = {}, {}, 0
    for _, norm, kwargs, params in model.groups():
        concrete = make_norm(norm, kwargs)
        for name, shape in params:
            c = concrete.resolve(shape)
            pls = place(name, len(shape))
            cut = [i for i, pl in enumerate(pls) if ddist._cut(pl) is not None]
            lay = ddist.Layout("sharded" if cut else "replicated", split_dims=frozenset(ddist._cut(pls[i]) for i in cut))
            r = ddist.route(c, lay, shape)
            dims = cut or list(range(len(mesh_shape)))
            rest = [i for i in range(len(mesh_shape)) if i not in dims]
            grid = ranks.permute(*rest, *dims).reshape(-1, math.prod(mesh_shape[i] for i in dims))
            if r == "reduce":  # one fp64 ring all-reduce of the local sums per mesh dim cutting the lines
                axis = len(shape) + c.line_dim(shape)
                for coord in itertools.product(*map(range, mesh_shape)):
                    local = ddist.piece_shape(ddist.piece(shape, mesh_shape, coord, pls))
                    sums = math.prod(local) // max(1, local[axis])
                    for i, pl in enumerate(pls):
                        if ddist._cut(pl) == axis:
                            w = mesh_shape[i]
                            reduce_bytes += round(2 * (w - 1) / w * SUM_BYTES * sums)
            if r != "owner":
                continue
            key = (lay.kind, tuple(dims), pls)
            first = grid[0].tolist()
            coords = [tuple(int(x) for x in torch.nonzero(ranks == g)[0]) for g in first]
            pieces = tuple(ddist.piece(shape, mesh_shape, co, pls) for co in coords) if cut else None
            keyed.setdefault(key, (lay, []))[1].append(ddist.Item(0, 0, tuple(shape), ddist.ns_cost(c, shape), pieces))
            cosets[key] = tuple(tuple(row) for row in grid.tolist())
    keys = list(keyed)
    keyed_items = [(keyed[k][0], ddist.order_items(keyed[k][1])) for k in keys]
    owners = ddist.assign_all(keyed_items, [cosets[k] for k in keys])
    got = bound = reduce_bytes
    loads = [0] * world
    for (lay, items), k, per_coset in zip(keyed_items, keys, owners):
        for coset, own in zip(cosets[k], per_coset):
            n = len(coset)
            for it, o in zip(items, own):
                loads[coset[o]] += it.cost
            _, rounds = ddist.schedule(items, n, LMO_BYTES, owners=own)
            if lay.kind == "replicated":
                moved = sum(math.prod(it.shape) for it in items) * (n - 1) * LMO_BYTES
                got, bound = got + moved, bound + moved
                continue
            for rnd in rounds:
                for me in range(n):
                    to_owner, from_members = ddist.sharded_splits(items, own, rnd, me, n)
                    got += (sum(from_members) - from_members[me]) * GRAD_BYTES + (sum(to_owner) - to_owner[me]) * LMO_BYTES
            bound += sum((math.prod(it.shape) - it.counts(n)[o]) * (GRAD_BYTES + LMO_BYTES) for it, o in zip(items, own))
    mean = sum(loads) / world
    biggest = max((it.cost for _, items in keyed_items for it in items), default=0)
    return {"suite": "distributed", "model": model.name, "world": world, "path": layout,
            "mesh": "x".join(map(str, mesh_shape)), "bytes_per_step": got, "lower_bound_bytes": bound,
            "bytes_ratio": round(got / bound, 4) if bound else 1.0,
            "ns_max_over_mean": round(max(loads) / mean, 4) if mean else 1.0,
            "ns_max_over_achievable": round(max(loads) / max(mean, biggest), 4) if mean else 1.0,
            "round_robin_max_over_mean": None, "balance_target": BALANCE_TARGET, "bytes_target": BYTES_TARGET, "status": "ok"}


LAYOUTS = [("hsdp", (2, 4)), ("tp", (8,)), ("fsdp_tp", (4, 2)), ("hsdp", (8, 8)), ("fsdp_tp", (8, 8))]


def run(quick: bool = True) -> list[dict]:
    """Rows for GPT-2-small and Llama-3.2-1B at world sizes 8, 64, 256 (and 16, 1024 unless quick), and
    for each model on every layout of ``LAYOUTS``."""
    worlds = (8, 64, 256) if quick else (8, 16, 64, 256, 1024)
    rows = [row for model in (GPT2_124M, LLAMA3_1B) for world in worlds for row in rows_for(model, world)]
    return rows + [layout_rows(model, lay, mesh) for model in (GPT2_124M, LLAMA3_1B) for lay, mesh in LAYOUTS]


def table(rows: list[dict]) -> str:
    head = f"{'model':<11} {'world':>5} {'path':<14} {'GB/step':>9} {'vs bound':>8} {'NS max/mean':>11} " \
           f"{'max/achiev.':>11} {'round-robin':>11}"
    lines = [head]
    for r in rows:
        path = r["path"] + (f" {r['mesh']}" if "mesh" in r else "")
        lines.append(f"{r['model']:<11} {r['world']:>5} {path:<14} {r['bytes_per_step'] / 1e9:>9.3f} "
                     f"{r['bytes_ratio']:>8.3f} {r['ns_max_over_mean']:>11.3f} {r['ns_max_over_achievable']:>11.3f} "
                     f"{'-' if r['round_robin_max_over_mean'] is None else format(r['round_robin_max_over_mean'], '.3f'):>11}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also world sizes 16 and 1024")
    print(table(run(quick=not ap.parse_args(argv).full)))


if __name__ == "__main__":
    main()

"""The distributed step's plan, without processes: layouts, routes, reductions, owners, rounds, splits.

These are pure functions of shapes and norms (plus, for ``layout``, a DTensor's placement, made here
on a one-rank gloo group), so every expected value below is worked out by hand from the docstrings of
``disco_kernels.distributed``; the reductions are checked against the independent oracle.
"""
from __future__ import annotations

import math

import pytest
import torch

import oracle
from disco_kernels import distributed as ddist
from disco_kernels import lmo as L
from disco_kernels import reference as ref
from tolerances import assert_oracle

# -- layout (a one-rank process group, so that DTensors exist in this process) ------------------




def test_layout_of_plain_tensors():
    p = torch.randn(3, 4)
    assert ddist.layout(p) == ddist.LOCAL == ddist.Layout("local", None)
    group = object()  # layout never looks inside the group of a plain tensor
    lay = ddist.layout(p, group)
    assert lay.kind == "replicated" and lay.group is group


def test_layout_of_dtensors(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    t = torch.randn(4, 3)
    sharded = ddist.layout(distribute_tensor(t, mesh, [Shard(0)]))
    assert sharded.kind == "sharded" and sharded.group is mesh.get_group()
    replicated = ddist.layout(distribute_tensor(t, mesh, [Replicate()]), process_group="ignored for DTensors")
    assert replicated.kind == "replicated" and replicated.group is mesh.get_group()
    cols = ddist.layout(distribute_tensor(t, mesh, [Shard(1)]))
    assert cols.kind == "sharded" and cols.split_dims == {1} and cols.members == (0,)
    assert ddist.layout(distribute_tensor(t, mesh, [Shard(0)])) is sharded  # (cached per mesh object, placements)
    mesh2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    hsdp = ddist.layout(distribute_tensor(t, mesh2, [Replicate(), Shard(0)]))
    assert hsdp.kind == "sharded" and hsdp.group is mesh2.get_group(1) and hsdp.split_dims == {0}
    assert len(hsdp.agree) == 2
    assert ddist.layout(distribute_tensor(t, mesh2, [Replicate(), Replicate()])).kind == "replicated"
    with pytest.raises(NotImplementedError, match=r"Partial.*1-D mesh.*shape \(4, 3\)"):
        ddist.layout(DTensor.from_local(t, mesh, [Partial()]))


# -- routes and the line norms' declarations -------------------------------------------------------

SHARDED, REPLICATED = ddist.ROW_SHARDS, ddist.Layout("replicated")

# (norm, local route on row shards of a matrix?) for every flag of every fused norm: local exactly when the
# lines are rows (a row shard holds whole lines; alpha comes from the full shape)
SHARD_LOCAL = [
    (L.Sign(), True), (L.Sign(normalized=False), True),
    (L.RowNorm(), True), (L.RowNorm(normalized=False), True),
    (L.RowNorm(transpose=True), False), (L.RowNorm(normalized=False, transpose=True), False),
    (L.ColNorm(), False), (L.ColNorm(normalized=True), False),
    (L.ColNorm(transpose=True), True), (L.ColNorm(normalized=True, transpose=True), True),
]


@pytest.mark.parametrize("norm,shard_local", SHARD_LOCAL, ids=lambda x: repr(getattr(x, "__dict__", x)))
def test_routes_of_fused_norms(norm, shard_local):
    """A fused LMO is local on row shards exactly when each row's result needs only that row."""
    assert ddist.route(norm, ddist.LOCAL, (6, 10)) == "local"
    assert ddist.route(norm, REPLICATED, (6, 10)) == "local"  # the full gradient is on every rank
    assert ddist.route(norm, SHARDED, (6, 10)) == ("local" if shard_local else "reduce")


def test_routes_of_bias_rms():
    """A vector is one line, which row shards cut; a scalar cannot be sharded."""
    assert ddist.route(L.BiasRMS(), SHARDED, (9,)) == "reduce"
    assert ddist.route(L.BiasRMS(), REPLICATED, (9,)) == "local"


@pytest.mark.parametrize("norm", [L.Spectral(), L.SpectralConv(), L.Auto().resolve((3, 4))])
def test_routes_of_newton_schulz_norms(norm):
    assert ddist.route(norm, ddist.LOCAL, (3, 4, 2)) == "local"
    assert ddist.route(norm, REPLICATED, (3, 4, 2)) == "owner"
    assert ddist.route(norm, SHARDED, (3, 4, 2)) == "owner"


@pytest.mark.parametrize("norm,shard_local", SHARD_LOCAL[2:], ids=lambda x: repr(getattr(x, "__dict__", x)))
def test_local_row_shards_really_are_local(norm, shard_local):
    """The claim behind the local route: the line LMO of a row block, with alpha of the full shape, equals
    those rows of the full LMO (bitwise: each row's own sums, in the same order)."""
    g = torch.randn(7, 5, dtype=torch.float64)
    kwargs = {k: v for k, v in vars(norm).items() if k in ("normalized", "transpose")}
    dim, alpha = norm.line_dim(g.shape), norm.alpha(g.shape)
    rows = torch.cat([ref.line_lmo(g[:3], dim, alpha), ref.line_lmo(g[3:], dim, alpha)])
    assert torch.equal(rows, ref.line_lmo(g, dim, alpha)) is shard_local, kwargs
    assert_oracle(ref.line_lmo(g, dim, alpha), oracle.lmo, type(norm).__name__, g, **kwargs)


# (norm, (line dim, alpha)) on a (6, 10) g: m = 6 rows (d_out), n = 10 columns (d_in), worked out from the
# reference's formulas (DESIGN.md): ColNorm divides by ||col|| / sqrt(d_out) (times d_in if normalized), ...
M, N = 6, 10
DECLARATIONS = [
    (L.ColNorm(), (-2, 1 / math.sqrt(M))),
    (L.ColNorm(normalized=True), (-2, N / math.sqrt(M))),
    (L.ColNorm(transpose=True), (-1, 1 / math.sqrt(N))),
    (L.ColNorm(normalized=True, transpose=True), (-1, M / math.sqrt(N))),
    (L.RowNorm(), (-1, math.sqrt(N))),
    (L.RowNorm(normalized=False), (-1, 1.0)),
    (L.RowNorm(transpose=True), (-2, math.sqrt(M))),
    (L.RowNorm(normalized=False, transpose=True), (-2, 1.0)),
]


@pytest.mark.parametrize("norm,want", DECLARATIONS, ids=lambda x: repr(getattr(x, "__dict__", x)))
def test_line_declarations(norm, want):
    assert norm.kind == "line"
    assert norm.line_dim((M, N)) == want[0]
    assert norm.alpha((M, N)) == pytest.approx(want[1], rel=1e-15)


@pytest.mark.parametrize("norm,_", DECLARATIONS, ids=lambda x: repr(getattr(x, "__dict__", x)))
def test_declaration_is_the_lmo(norm, _):
    """g / (sqrt(sum of g² along the line dim) * alpha + 1e-8) is the oracle's LMO, zero lines included."""
    g = torch.randn(M, N, dtype=torch.float64)
    g[2] = 0
    g[:, 7] = 0
    dim, alpha = norm.line_dim(g.shape), norm.alpha(g.shape)
    got = g / (g.square().sum(dim, keepdim=True).sqrt() * alpha + 1e-8)
    assert_oracle(got, oracle.lmo, type(norm).__name__, g, normalized=norm.normalized, transpose=norm.transpose)
    assert_oracle(norm.lmo(g), oracle.lmo, type(norm).__name__, g, normalized=norm.normalized,
                  transpose=norm.transpose)


@pytest.mark.parametrize("n", [1, 9, 16])
def test_declaration_of_bias_rms(n):
    norm = L.BiasRMS()
    assert norm.kind == "line" and norm.line_dim((n,)) == -1 and norm.alpha((n,)) == 1 / math.sqrt(n)
    g = torch.randn(n, dtype=torch.float64)
    assert_oracle(g / (g.square().sum().sqrt() * norm.alpha(g.shape) + 1e-8), oracle.bias_rms, g)


@pytest.mark.parametrize("normalized", [True, False])
def test_declaration_of_sign(normalized):
    norm = L.Sign(normalized=normalized)
    assert norm.kind == "sign" and norm.alpha((3, 8)) == (1 / 8 if normalized else 1.0)


# -- Newton-Schulz cost and owners -------------------------------------------------------------------

@pytest.mark.parametrize("shape,steps,want", [
    ((3, 5), 5, 5 * (4 * 9 * 5 + 2 * 27)),      # m <= n
    ((5, 3), 5, 5 * (4 * 9 * 5 + 2 * 27)),      # tall: the same as its transpose
    ((4, 4), 1, 4 * 64 + 2 * 64),
    ((2, 3, 4), 2, 2 * (4 * 4 * 12 + 2 * 8)),   # conv (c_out, c_in, k): (2, 12)
    ((6, 1, 2, 2), 3, 3 * (4 * 16 * 6 + 2 * 64)),  # (c_out, c_in, k, k) -> (6, 4): m = 4, n = 6
    ((1, 7), 0, 0),
])
def test_ns_flops(shape, steps, want):
    assert ddist.ns_flops(shape, steps) == want


def test_ns_flops_default_is_five_steps():
    assert ddist.ns_flops((3, 5)) == ddist.ns_flops((3, 5), 5) == 5 * 234


@pytest.mark.parametrize("costs,world,want", [
    ([], 3, []),
    ([5], 1, [0]),
    ([5, 5, 5, 5], 2, [0, 1, 0, 1]),        # ties: lower index first, onto the lower rank
    ([1, 3, 2], 2, [1, 0, 1]),              # 3 -> r0, 2 -> r1, 1 -> r1 (load 2 < 3)
    ([2, 9, 4, 4, 1], 3, [1, 0, 1, 2, 2]),  # 9 -> r0, 4 -> r1, 4 -> r2, 2 -> r1 (4, 4: lower rank), 1 -> r2
    ([7, 1], 4, [0, 1]),                    # more ranks than items
    ([0, 0, 0], 2, [0, 0, 0]),              # zero costs leave rank 0 the least loaded (ties: lower rank)
])
def test_assign_owners_exact(costs, world, want):
    assert ddist.assign_owners(costs, world) == want


def test_assign_owners_is_largest_first_greedy():
    """Against a plain restatement of the rule: largest cost first onto the least-loaded rank."""
    g = torch.Generator().manual_seed(5)
    for world in (1, 2, 3, 7):
        costs = torch.randint(1, 1000, (40,), generator=g).tolist()
        load, want = [0] * world, [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(world), key=lambda r: (load[r], r))
            want[i] = r
            load[r] += costs[i]
        assert ddist.assign_owners(costs, world) == want


# -- rounds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("owners,nbytes,world,bucket,want", [
    ([], [], 2, 40, []),
    ([0, 1, 0, 0, 1], [10, 10, 10, 10, 30], 2, 40, [[0, 2, 1], [3, 4]]),  # cap 20 per owner
    ([0, 0, 0], [20, 20, 20], 2, 40, [[0], [1], [2]]),                    # exactly the cap: one per chunk
    ([0, 0, 0], [19, 1, 1], 2, 40, [[0, 1], [2]]),                        # 19 + 1 fills the cap of 20
    ([0, 0], [50, 1], 2, 40, [[0], [1]]),                                 # larger than a chunk: alone
    ([1, 1, 0], [5, 5, 5], 2, 40, [[2, 0, 1]]),                           # owner by owner in a round
    ([0, 1, 2], [1, 1, 1], 3, 2, [[0, 1, 2]]),                            # cap max(1, 2 // 3) = 1
    ([0, 0], [1, 1], 3, 2, [[0], [1]]),                                   # cap 1: one byte per chunk
    ([0, 0, 0], [1, 0, 0], 1, 1, [[0, 1, 2]]),                            # empty items join the open chunk
    ([0, 0, 0], [1, 1, 1], 1, 1, [[0], [1], [2]]),
])
def test_plan_rounds_exact(owners, nbytes, world, bucket, want):
    assert ddist.plan_rounds(owners, nbytes, world, bucket) == want


def test_plan_rounds_empty_first_item():
    assert ddist.plan_rounds([0, 0], [0, 4], 1, 8) == [[0, 1]]


def test_plan_rounds_default_bucket():
    assert ddist.BUCKET_BYTES == 64 << 20
    half = (64 << 20) // 2
    assert ddist.plan_rounds([0, 0, 1], [half, 1, 1], 2) == [[0, 2], [1]]
    assert ddist.plan_rounds([0, 0], [half - 1, 1], 2) == [[0, 1]]


# -- row splits, items, schedule ----------------------------------------------------------------------

@pytest.mark.parametrize("rows", [0, 1, 3, 5, 13, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_row_splits_are_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world) if rows else []
    want = [len(c) for c in chunks] + [0] * (world - len(chunks))
    assert list(ddist.row_splits(rows, world)) == want


def _item(shape, part=0, pos=0):
    return ddist.Item(part, pos, tuple(shape), ddist.ns_flops(shape))


def test_order_items_sorts_by_shape_then_discovery():
    items = [_item((4, 8), 0, 0), _item((2, 9), 0, 1), _item((4, 8), 1, 0), _item((2, 3, 3), 1, 1),
             _item((2, 9), 2, 0)]
    got = ddist.order_items(items)
    assert [(it.part, it.pos) for it in got] == [(1, 1), (0, 1), (2, 0), (0, 0), (1, 0)]
    assert ddist.order_items([]) == []


def test_schedule():
    items = [_item((8, 4)), _item((2, 2)), _item((8, 4)), _item((1, 3))]
    owners, rounds = ddist.schedule(items, world=2, itemsize=2, bucket_bytes=128)  # cap 64 bytes per owner
    assert owners == ddist.assign_owners([it.cost for it in items], 2) == [0, 0, 1, 1]
    # bytes 64, 8, 64, 6: owner 0 holds [0] then [1], owner 1 holds [2] then [3]
    assert rounds == [[0, 2], [1, 3]]
    owners, rounds = ddist.schedule(items, world=2, itemsize=4, bucket_bytes=1 << 20)
    assert rounds == [[0, 1, 2, 3]]
    assert ddist.schedule(items, 2, 2) == ddist.schedule(items, 2, 2, ddist.BUCKET_BYTES)


def test_sharded_splits():
    """Each rank sends its rows of every item to the item's owner; the owner receives every rank's rows."""
    items = [_item((5, 3)), _item((2, 4)), _item((4, 2, 2))]  # row splits over 3 ranks: 2 2 1 / 1 1 0 / 2 2 0
    owners = [1, 0, 1]
    rnd = [0, 1, 2]
    cols = [3, 4, 4]
    splits = [ddist.row_splits(it.shape[0], 3) for it in items]
    for rank in range(3):
        to_owner, from_ranks = ddist.sharded_splits(items, owners, rnd, rank, 3)
        want_to = [0, 0, 0]
        for i in rnd:
            want_to[owners[i]] += splits[i][rank] * cols[i]
        want_from = [sum(splits[i][s] * cols[i] for i in rnd if owners[i] == rank) for s in range(3)]
        assert to_owner == want_to and from_ranks == want_from, rank
    # worked by hand for rank 1: sends 2*3 + 2*4 to rank 1 and 1*4 to rank 0; receives items 0 and 2
    assert ddist.sharded_splits(items, owners, rnd, 1, 3) == ([4, 14, 0], [6 + 8, 6 + 8, 3 + 0])
    assert ddist.sharded_splits(items, owners, [1], 0, 3) == ([4, 0, 0], [4, 4, 0])
    assert ddist.sharded_splits(items, owners, [], 2, 3) == ([0, 0, 0], [0, 0, 0])

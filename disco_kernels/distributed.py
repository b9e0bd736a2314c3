"""Sharded Scion step over torch.distributed: every Newton-Schulz matrix gets one owner rank.

Each parameter has a layout, found from the tensor itself (``layout``):

    local       a plain tensor and no ``process_group``: the single-process step.
    replicated  a plain tensor with ``process_group=`` (DDP, or the same model on every rank), or a
                DTensor placed Replicate() on every mesh dim: every rank holds the full gradient.
                The owner computes the LMO and broadcasts it.
    sharded     a DTensor with Shard placements on some mesh dims (FSDP2 Shard(0), tensor parallel
                Shard(0) / Shard(1), FSDP2 over TP's strided shards, expert parallel, HSDP's
                (Replicate(), Shard(0))): each rank's piece travels to the owner with ``all_to_all``,
                the owner assembles and orthogonalises the full tensor, and each rank gets its piece
                of the result back. Replicate dims are independent copies (HSDP replicas): each runs
                the same step, with no communication across them.

and each (norm, layout) a route:

    local   no communication: element-wise norms (Sign) always, every norm of a replicated param
            but the Newton-Schulz ones, line norms whose lines no placement cuts, and Newton-Schulz
            norms of batched matrices (``batch_dims``: MoE experts) cut only along the batch.
    owner   Newton-Schulz norms (Spectral, SpectralConv) of replicated or sharded params; a param's
            blocks (experts, ``splits``, ``heads``) are orthogonalised on its owner, batched.
    reduce  line norms whose lines a placement cuts: sums of squares all-reduced over the mesh dims
            that cut them (one fp64 all-reduce per dim).

Routes follow from the norm's declaration (``kind``, ``line_dim``, ``batch_dims``; see lmo.py), and a
line norm's factor ``alpha`` from the param's full shape, so no norm is named here.

Owners are balanced by Newton-Schulz FLOPs over every layout of the step (``assign_all``: largest
first onto the least-loaded rank, computed alike on every rank). Each owner's matrices, sorted by shape
so that equal shapes batch, are cut into rounds of about ``BUCKET_BYTES / world`` bytes; round k's
transfer runs while round k + 1 computes. Pieces travel in the gradient's dtype and results in the
dtype the LMO produces, so the step equals the single-process step.

Before anything is modified, every rank agrees with one all-reduce per mesh dim on: did any rank
fail validation, which params have gradients, and which are non-finite.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ._backend import on_device
from ._finite import finite_mask
from .engine import local
from .reference import line_lmo, norm2

BUCKET_BYTES = 64 << 20
_SAME_ERRORS = (ValueError, TypeError, FloatingPointError, NotImplementedError)


# -- layouts and routes ---------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How a parameter is spread over ranks.

    kind      "local", "replicated" or "sharded"
    group     a process group holding ``members`` (and maybe other cosets: they exchange nothing)
    members   the group ranks that share this rank's work: those holding the full tensor (replicated)
              or the pieces of this rank's copy (sharded), in piece order; () for a plain group: all
    coords    sharded: each member's mesh coordinate (its piece follows from it: ``piece``)
    mesh, placements   a DTensor's (None, () for plain tensors)
    split_dims  tensor dims cut by the placements
    agree     process groups whose successive MAX all-reduces span every rank holding the param
    cosets    the global ranks of every set of members across the mesh (this rank's among them), in
              member order: owners are balanced over all of them (``assign_all``)
    """
    kind: str
    group: object = None
    members: tuple = ()
    coords: tuple = ()
    mesh: object = None
    placements: tuple = ()
    split_dims: frozenset = frozenset()
    agree: tuple = ()
    cosets: tuple = ()

    def line_groups(self, dim: int) -> tuple:
        """The mesh dims' process groups whose placements cut tensor dim ``dim`` (lines along it are
        summed over them, one all-reduce each)."""
        return tuple(self.mesh.get_group(i) for i, pl in enumerate(self.placements) if _cut(pl) == dim)


LOCAL = Layout("local")
ROW_SHARDS = Layout("sharded", split_dims=frozenset({0}))  # FSDP2's Shard(0), as plans from shapes alone see it


def _cut(pl) -> int | None:
    """The tensor dim a placement cuts (Shard, or FSDP2's _StridedShard), None for Replicate."""
    return pl.dim if isinstance(pl, (Shard, _StridedShard)) else None


def resolve_group(process_group):
    """None, a ProcessGroup, or "default" (the world group, which must be initialised)."""
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return process_group
    if isinstance(process_group, str) and process_group == "default":
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError('process_group="default" needs torch.distributed.init_process_group() first')
        return dist.group.WORLD
    raise TypeError(f'process_group must be None, "default" or a ProcessGroup, got {process_group!r}')


def layout(p: torch.Tensor, process_group=None) -> Layout:
    """The layout of ``p``: a DTensor's from its mesh and placements (``mesh_layout``), a plain tensor's
    "replicated" over ``process_group`` or "local" without one."""
    if isinstance(p, DTensor):
        try:
            return mesh_layout(p.device_mesh, tuple(p.placements))
        except NotImplementedError as e:
            raise NotImplementedError(f"{e} (a param of shape {tuple(p.shape)})") from None
    return LOCAL if process_group is None else Layout("replicated", process_group, agree=(process_group,))


_MESH_LAYOUTS: dict = {}  # id(mesh) -> (mesh, {placements: layout}); by identity: meshes compare by value,
# and an equal mesh of an older process group (before a re-init, or in a forked parent) has dead groups


def mesh_layout(mesh, placements: tuple) -> Layout:
    """``_mesh_layout``, cached per mesh object and placements."""
    _, by_placements = _MESH_LAYOUTS.setdefault(id(mesh), (mesh, {}))  # (held: its id is not reused)
    if placements not in by_placements:
        by_placements[placements] = _mesh_layout(mesh, placements)
    return by_placements[placements]


def _mesh_layout(mesh, placements: tuple) -> Layout:
    """The layout of DTensors placed ``placements`` on ``mesh``: Replicate() dims hold copies, Shard(d)
    dims (and FSDP2's strided shards over tensor parallel) cut tensor dim d. With no Shard the tensor is
    "replicated" over the whole mesh; otherwise "sharded" over the Shard dims, each replica (a coordinate
    of the Replicate dims) on its own, with no communication across replicas."""
    bad = [pl for pl in placements if _cut(pl) is None and not isinstance(pl, Replicate)]
    if bad:
        raise NotImplementedError(f"Scion supports DTensors placed Shard / Replicate on each mesh dim, got "
                                  f"{placements} on a {mesh.ndim}-D mesh {mesh.mesh.tolist()}: {bad[0]} holds "
                                  "partial values (reduce the gradient first)")
    agree = tuple(mesh.get_group(i) for i in range(mesh.ndim))
    cut = [i for i, pl in enumerate(placements) if _cut(pl) is not None]
    dims = cut or list(range(mesh.ndim))  # the dims along which ranks exchange
    group = _group_over(mesh, dims, placements)
    rest = [i for i in range(mesh.ndim) if i not in dims]
    grid = mesh.mesh.permute(*rest, *dims).reshape(-1, math.prod(mesh.size(i) for i in dims))
    cosets = tuple(tuple(int(r) for r in row) for row in grid)  # (row-major over ``dims``, as ``coords``)
    mine = next(c for c in cosets if dist.get_rank() in c)
    members = tuple(dist.get_group_rank(group, r) for r in mine)
    if not cut:
        return Layout("replicated", group, members, mesh=mesh, placements=placements, agree=agree, cosets=cosets)
    here = mesh.get_coordinate()
    coords = []
    for pos in itertools.product(*(range(mesh.size(i)) for i in cut)):
        c = list(here)
        for i, k in zip(cut, pos):
            c[i] = k
        coords.append(tuple(c))
    return Layout("sharded", group, members, tuple(coords), mesh, placements,
                  frozenset(_cut(placements[i]) for i in cut), agree, cosets)


def _group_over(mesh, dims: list[int], placements):
    """A process group holding the ranks of ``mesh`` that differ only along ``dims``: that dim's group
    for one dim; the world when the mesh covers it (other replicas then exchange nothing with this
    rank); a flattened sub-mesh's group when the mesh has dim names."""
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    if mesh.mesh.numel() == dist.get_world_size() and len(dims) == mesh.ndim:
        return dist.group.WORLD
    names = mesh.mesh_dim_names
    if names:
        return mesh[tuple(names[i] for i in dims)]._flatten().get_group()
    raise NotImplementedError(f"Scion needs a process group over mesh dims {dims} for DTensors placed "
                              f"{placements} on the {mesh.ndim}-D mesh {mesh.mesh.tolist()}: give the mesh "
                              "dim names (init_device_mesh(..., mesh_dim_names=...)) so that it can flatten them")


def piece(shape, mesh_shape, coord, placements) -> tuple:
    """The piece of a tensor of ``shape`` that the rank at mesh ``coord`` holds, per tensor dim as runs
    (start, length) of global indices, in local order. Placements apply left to right, as DTensor's:
    Shard(d) takes chunk c of k (torch.chunk sizes: ceil(n / k), the last ones short or empty);
    _StridedShard(d, split_factor=f) cuts the indices into f chunks and takes chunk c of k of each
    (FSDP2 over tensor parallel: the later dim's shard taken first)."""
    runs = [((0, n),) for n in shape]
    for pl, k, c in zip(placements, mesh_shape, coord):
        dim = _cut(pl)
        if dim is None:
            continue
        seq = runs[dim]
        f = pl.split_factor if isinstance(pl, _StridedShard) else 1
        total = sum(n for _, n in seq)
        out = []
        for a, n in _chunks(total, f):
            sub = _chunks(n, k)[c]
            out.extend(_take(seq, a + sub[0], sub[1]))
        runs[dim] = tuple(out)
    return tuple(runs)


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """(start, length) of torch.chunk's k pieces of n items, empty ones included."""
    size = -(-n // k)
    return [(min(n, r * size), max(0, min(n, (r + 1) * size) - r * size)) for r in range(k)]


def _take(seq, start: int, length: int) -> list[tuple[int, int]]:
    """Runs covering positions [start, start + length) of the concatenation of runs ``seq``."""
    out, at = [], 0
    for a, n in seq:
        lo, hi = max(start, at), min(start + length, at + n)
        if lo < hi:
            out.append((a + lo - at, hi - lo))
        at += n
    return out


def piece_shape(runs) -> tuple:
    return tuple(sum(n for _, n in r) for r in runs)


def _boxes(runs):
    """(local index, global index) of every box of a piece: the product of its runs per dim."""
    per_dim = []
    for r in runs:
        at, pairs = 0, []
        for a, n in r:
            pairs.append((slice(at, at + n), slice(a, a + n)))
            at += n
        per_dim.append(pairs)
    for combo in itertools.product(*per_dim):
        yield tuple(lo for lo, _ in combo), tuple(g for _, g in combo)


def take_piece(full: torch.Tensor, runs) -> torch.Tensor:
    """The piece ``runs`` of ``full`` (a view when it is one box)."""
    boxes = list(_boxes(runs))
    if len(boxes) == 1:
        return full[boxes[0][1]]
    out = full.new_empty(piece_shape(runs))
    for lo, g in boxes:
        out[lo] = full[g]
    return out


def put_piece(full: torch.Tensor, runs, part: torch.Tensor) -> None:
    """Write ``part`` (the piece's local tensor) into its place in ``full``."""
    for lo, g in _boxes(runs):
        full[g] = part[lo]


def route(norm, lay: Layout, shape) -> str:
    """"local", "owner" or "reduce" (see the module docstring) for a param of ``shape``."""
    if norm.kind is None:
        if lay.kind == "local" or (lay.kind == "sharded" and max(lay.split_dims) < norm.batch_dims):
            return "local"  # (shards of whole matrices: a batch of experts cut along the experts)
        return "owner"
    if lay.kind == "sharded" and norm.kind == "line" and (len(shape) + norm.line_dim(shape)) in lay.split_dims:
        return "reduce"  # (the lines run along a dim that the shards cut)
    return "local"


# -- planning (pure functions of shapes; the benchmark uses them too) -----------

def ns_cost(norm, shape) -> int:
    """Newton-Schulz FLOPs of a param of ``shape`` under ``norm``: the sum over its independent matrices."""
    return sum(ns_flops(m, norm.steps) for m in norm.matrices(shape))


def ns_flops(shape, steps: int = 5) -> int:
    """Newton-Schulz FLOPs of a matrix ``shape`` (reshaped to (shape[0], -1)): steps * (4m²n + 2m³), m <= n."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m ** 3)


def assign_owners(costs: list[int], world: int) -> list[int]:
    """Owner rank per item: largest cost first onto the least-loaded rank (ties: lower index, lower rank)."""
    heap = [(0, r) for r in range(world)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def assign_all(keyed, cosets: list) -> list[list[list[int]]]:
    """Owners of every item of every (layout, items) in ``keyed``, for every coset of each key's layout
    (``cosets[k]``: tuples of global ranks, in member order), as positions among the members: all items by
    cost (largest first; ties: key, then index), each onto the least-loaded member of every coset (loads:
    FLOPs so far on each global rank, over every layout; ties: the first member). A pure function of
    shapes and ranks, so every rank computes every coset's choice and all agree without communication."""
    loads: dict[int, int] = defaultdict(int)
    owners = [[[0] * len(items) for _ in sets] for (_, items), sets in zip(keyed, cosets)]
    entries = sorted(((-it.cost, k, i) for k, (_, items) in enumerate(keyed) for i, it in enumerate(items)))
    for neg, k, i in entries:
        for c, coset in enumerate(cosets[k]):
            pos = min(range(len(coset)), key=lambda j: (loads[coset[j]], j))
            loads[coset[pos]] -= neg
            owners[k][c][i] = pos
    return owners


def cosets_of(lay: Layout) -> tuple:
    """A layout's cosets: a mesh layout's, or the one of a plain process group."""
    if lay.cosets:
        return lay.cosets
    return (tuple(dist.get_global_rank(lay.group, r) for r in range(dist.get_world_size(lay.group))),)


def plan_rounds(owners: list[int], nbytes: list[int], world: int, bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Cut each owner's items (in list order) into chunks of about bucket_bytes / world bytes;
    round k holds chunk k of every owner, owner by owner."""
    cap = max(1, bucket_bytes // world)
    chunks: list[list[list[int]]] = [[] for _ in range(world)]
    filled = [0] * world
    for i, r in enumerate(owners):
        if not chunks[r] or (filled[r] + nbytes[i] > cap and chunks[r][-1]):  # (an empty item opens one too)
            chunks[r].append([])
            filled[r] = 0
        chunks[r][-1].append(i)
        filled[r] += nbytes[i]
    depth = max((len(c) for c in chunks), default=0)
    return [[i for r in range(world) if k < len(chunks[r]) for i in chunks[r][k]] for k in range(depth)]


@functools.lru_cache(maxsize=4096)
def row_splits(rows: int, world: int) -> tuple[int, ...]:
    """Rows per rank of a Shard(0) placement (torch.chunk: ceil(rows / world) each, the last ones short or empty)."""
    size = -(-rows // world)
    return tuple(max(0, min(rows, (r + 1) * size) - r * size) for r in range(world))


@dataclass
class Item:
    """One Newton-Schulz param of the step: its sub-part, position there, full shape and cost; sharded:
    the piece each member holds (``piece`` runs; None: rows split as torch.chunk, FSDP2's Shard(0))."""
    part: int
    pos: int
    shape: tuple
    cost: int
    pieces: tuple | None = None

    def counts(self, world: int) -> tuple[int, ...]:
        """Elements each of ``world`` members holds."""
        if self.pieces is None:
            cols = math.prod(self.shape[1:])
            return tuple(n * cols for n in row_splits(self.shape[0], world))
        return tuple(math.prod(piece_shape(r)) for r in self.pieces)


def order_items(items: list[Item]) -> list[Item]:
    """Items sorted by shape (equal shapes batch on their owner), then by discovery order."""
    return [it for _, it in sorted(enumerate(items), key=lambda e: (e[1].shape, e[0]))]


def schedule(items: list[Item], world: int, itemsize: int, bucket_bytes: int = BUCKET_BYTES, owners=None):
    """(owners, rounds) for ``order_items(items)``; itemsize: bytes per element of the result; owners
    (positions) default to ``assign_owners`` over these items alone."""
    owners = assign_owners([it.cost for it in items], world) if owners is None else owners
    nbytes = [math.prod(it.shape) * itemsize for it in items]
    return owners, plan_rounds(owners, nbytes, world, bucket_bytes)


def sharded_splits(items: list[Item], owners, rnd, rank: int, world: int):
    """(to_owner, from_ranks): element counts member ``rank`` sends to each owner and receives from each
    member in the forward leg of round ``rnd`` (the return leg swaps them); members and owners are
    positions 0 .. world - 1."""
    to_owner, from_ranks = [0] * world, [0] * world
    for i in rnd:
        counts = items[i].counts(world)
        to_owner[owners[i]] += counts[rank]
        if owners[i] == rank:
            for s in range(world):
                from_ranks[s] += counts[s]
    return to_owner, from_ranks


# -- execution --------------------------------------------------------------------

@dataclass
class Stats:
    """What this rank did in the last step: payload bytes received (all-reduces counted as a
    ring's 2 (w - 1) / w of the buffer), collectives issued, Newton-Schulz FLOPs computed."""
    bytes_received: int = 0
    collectives: int = 0
    ns_flops: int = 0


class _Owned:
    """The owner-route work of one key (layout group and dtypes): items, their directions, their factors."""

    def __init__(self, subparts, dirs, items, lay, owners, backend, stats, guard):
        self.subparts, self.dirs, self.items, self.lay, self.owners = subparts, dirs, items, lay, owners
        self.backend, self.stats, self.guard = backend, stats, guard
        first = dirs[items[0].part][items[0].pos]
        self.dtype, self.device = first.dtype, first.device
        self.out_dtype = subparts[items[0].part].norm.dtype

    def direction(self, i: int) -> torch.Tensor:
        """This rank's tensor of item i's direction (its piece, when sharded)."""
        return self.dirs[self.items[i].part][self.items[i].pos]

    def lmo(self, idx: list[int], fill) -> dict[int, torch.Tensor]:
        """Newton-Schulz factors (the LMOs before their factor alpha) of items ``idx``: per sub-part, one
        (b, *shape) batch that ``fill(i, slot)`` writes item i's full direction into, orthogonalised in one
        call (zeros stand in for the results of a failed compute: ``guard`` raises it on every rank
        before any write)."""
        by_part = defaultdict(list)
        for i in idx:
            by_part[self.items[i].part].append(i)
        out = {}
        for part, ids in by_part.items():
            norm, shape = self.subparts[part].norm, self.items[ids[0]].shape
            batch = torch.empty((len(ids), *shape), dtype=self.dtype, device=self.device)
            for i, slot in zip(ids, batch.unbind(0)):
                fill(i, slot)
            xs = self.guard.run(lambda: norm.orthogonalise_param(batch, backend=self.backend),
                                lambda: batch.new_zeros(batch.shape, dtype=self.out_dtype))
            for i, x in zip(ids, xs.unbind(0)):
                out[i] = x
                self.stats.ns_flops += self.items[i].cost
        return out


def _replicated(work: _Owned, updates) -> None:
    """Owners compute their LMOs round by round; each round is broadcast from its owners while the next computes."""
    group = work.lay.group
    members = work.lay.members or tuple(range(dist.get_world_size(group)))
    me = members.index(dist.get_rank(group))
    items, dtype = work.items, work.out_dtype
    owners, rounds = schedule(items, len(members), dtype.itemsize, owners=work.owners)
    pending = []
    for rnd in rounds:
        mine = [i for i in rnd if owners[i] == me]
        results = work.lmo(mine, lambda i, slot: slot.copy_(work.direction(i)))
        by_owner = defaultdict(list)
        for i in rnd:
            by_owner[owners[i]].append(i)
        for o, idx in by_owner.items():
            numel = sum(math.prod(items[i].shape) for i in idx)
            if o == me:
                buf = torch.cat([results[i].reshape(-1) for i in idx])
            else:
                buf = torch.empty(numel, dtype=dtype, device=work.device)
                work.stats.bytes_received += numel * dtype.itemsize
            handle = dist.broadcast(buf, src=dist.get_global_rank(group, members[o]), group=group, async_op=True)
            work.stats.collectives += 1
            pending.append((handle, buf, idx))
    for handle, buf, idx in pending:
        handle.wait()
        for i, flat in zip(idx, buf.split([math.prod(items[i].shape) for i in idx])):
            updates[items[i].part][items[i].pos] = flat.view(items[i].shape)


def _sharded(work: _Owned, updates) -> None:
    """Pieces go to owners (all_to_all), owners orthogonalise, the result's pieces come back (all_to_all);
    round k + 1's pieces travel while round k computes, round k's results while round k + 1 computes.
    Owners and senders are positions among ``lay.members`` (the holders of this rank's copy); other
    ranks of the group (other replicas) exchange nothing with this one."""
    lay, items = work.lay, work.items
    group, members = lay.group, lay.members
    n, size = len(members), dist.get_world_size(group)
    me = members.index(dist.get_rank(group))
    owners, rounds = schedule(items, n, work.out_dtype.itemsize, owners=work.owners)
    for i, it in enumerate(items):
        got, want = tuple(work.direction(i).shape), piece_shape(it.pieces[me])
        if got != want:
            raise RuntimeError(f"rank {dist.get_rank()} holds a piece of shape {got} of a param of shape "
                               f"{it.shape} placed {lay.placements}, expected {want}")

    def by_rank(counts):  # member positions -> group ranks
        out = [0] * size
        for j, c in zip(members, counts):
            out[j] = c
        return out

    def a2a(send, send_counts, recv_counts, dtype):  # counts: elements per member
        send_counts, recv = by_rank(send_counts), by_rank(recv_counts)
        out = torch.empty(sum(recv), dtype=dtype, device=work.device)
        handle = dist.all_to_all_single(out, send, recv, send_counts, group=group, async_op=True)
        work.stats.collectives += 1
        work.stats.bytes_received += (sum(recv) - recv[members[me]]) * dtype.itemsize
        return handle, out

    order = sorted(range(n), key=members.__getitem__)  # member positions in group rank order (the a2a's)

    def forward(rnd):
        to_owner, from_members = sharded_splits(items, owners, rnd, me, n)
        send = [work.direction(i).reshape(-1) for o in order for i in rnd if owners[i] == o]
        return a2a(torch.cat(send) if send else work.direction(0).new_empty(0), to_owner, from_members, work.dtype)

    def backward(rnd, out):
        mine = [i for i in rnd if owners[i] == me]
        sizes = [items[i].counts(n)[j] for j in order for i in mine]
        got = dict(zip([(i, j) for j in order for i in mine], out.split(sizes)))

        def fill(i, slot):
            for j, runs in enumerate(items[i].pieces):
                put_piece(slot, runs, got[i, j].view(piece_shape(runs)))
        results = work.lmo(mine, fill)
        send = [take_piece(results[i], items[i].pieces[j]).reshape(-1) for j in order for i in mine]
        to_owner, from_members = sharded_splits(items, owners, rnd, me, n)
        send = torch.cat(send) if send else out.new_empty(0, dtype=work.out_dtype)
        return a2a(send, from_members, to_owner, work.out_dtype)

    fwd = [forward(rounds[0])] if rounds else []
    back = []
    for k, rnd in enumerate(rounds):
        if k + 1 < len(rounds):
            fwd.append(forward(rounds[k + 1]))
        (handle, out), fwd[k] = fwd[k], None  # the received pieces die with this round
        handle.wait()
        back.append(backward(rnd, out))
    for rnd, (handle, out) in zip(rounds, back):
        handle.wait()
        back_ids = [i for o in order for i in rnd if owners[i] == o]
        shapes = [piece_shape(items[i].pieces[me]) for i in back_ids]
        for i, shape, flat in zip(back_ids, shapes, out.split([math.prod(s) for s in shapes])):
            updates[items[i].part][items[i].pos] = flat.view(shape)


def _line_axis(norm, shape) -> int:
    return len(shape) + norm.line_dim(shape)


def _start_reduce(subparts, dirs, stats, guard):
    """Local sums of squares of every reduce-route direction's lines (which the shards cut), and async
    all-reduces of them: one per set of mesh dims cutting the lines (for several dims, one per dim in
    turn: the first now, the others in ``_finish_reduce``). Returns (sums, pending all-reduces)."""
    sums, by_groups = [], defaultdict(list)
    for k, sub in enumerate(subparts):
        row = []
        for p, g in zip(sub.params, dirs[k]):
            axis = _line_axis(sub.norm, p.shape)
            ss = guard.run(lambda: norm2(g, axis).square(),  # fp64: a huge finite g does not overflow
                           lambda: g.new_zeros(g.sum(axis, keepdim=True).shape, dtype=torch.float64))
            row.append(ss)
            by_groups[layout(p).line_groups(axis)].append((k, len(row) - 1))
        sums.append(row)
    pending = []
    for groups, where in by_groups.items():
        flat = torch.cat([sums[k][j].reshape(-1) for k, j in where])
        pending.append((dist.all_reduce(flat, group=groups[0], async_op=True), flat, groups, where))
        for group in groups:
            stats.collectives += 1
            world = dist.get_world_size(group)
            stats.bytes_received += round(2 * (world - 1) / world * flat.numel() * flat.itemsize)  # a ring's
    return sums, pending


def _finish_reduce(subparts, dirs, sums, pending, updates) -> None:
    """The line LMO of each reduce-route direction from its lines' summed norms."""
    for handle, flat, groups, where in pending:
        handle.wait()
        for group in groups[1:]:
            dist.all_reduce(flat, group=group)
        for (k, j), total in zip(where, flat.split([sums[k][j].numel() for k, j in where])):
            sums[k][j] = total.view(sums[k][j].shape)
    for k, sub in enumerate(subparts):
        for j, (p, g) in enumerate(zip(sub.params, dirs[k])):
            axis = _line_axis(sub.norm, p.shape)
            updates[k][j] = line_lmo(g, axis, sub.norm.alpha(p.shape), sums[k][j].sqrt())


# -- agreement --------------------------------------------------------------------

# The header every rank contributes to one MAX all-reduce before a step touches anything. Its size is
# fixed, so ranks that hold different param lists still meet in the same collective (a per-param flags
# tensor of another length would abort gloo or hang NCCL); each value v travels as (v, -v) so that the
# MAX also yields the minimum and any disagreement shows.
FAILED, COUNT, PARAMS, GRADS, NONFINITE = 0, 1, 3, 5, 7
HEADER = 8


def fingerprint(items) -> int:
    """A 62-bit hash of ``items``' reprs: equal on every rank that holds the same items."""
    digest = hashlib.blake2b("\x1f".join(map(repr, items)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _header(params, err, check_finite: bool, device) -> torch.Tensor:
    """This rank's header: failed, param count, fingerprints of the param list (shapes, dtypes) and of
    which params have gradients, and whether any gradient is non-finite (found on the device, no sync)."""
    has = [p.grad is not None for p in params]
    values = {FAILED: int(err is not None), COUNT: len(params),
              PARAMS: fingerprint((tuple(p.shape), p.dtype) for p in params), GRADS: fingerprint(has)}
    header = torch.zeros(HEADER, dtype=torch.int64)
    for at, v in values.items():
        if at != FAILED:
            header[at + 1] = -v
        header[at] = v
    # non_blocking: a plain host-to-device copy synchronises the host with the device's stream
    header = header.to(device, non_blocking=True)
    grads = [params[k].grad for k in range(len(params)) if has[k] and local([params[k].grad])[0].numel()]
    if check_finite and grads and err is None:
        header[NONFINITE] = (~finite_mask(local(grads)).to(device)).any()
    return header


def _all_reduce_max(t: torch.Tensor, groups) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def _disagree(header, at) -> bool:
    return bool(header[at] != -header[at + 1])


def _first_param(params, groups, device, flag) -> int:
    """(Error path, every rank) the first param for which ``flag(p)`` holds on some rank but not on all:
    a MAX all-reduce of (flag, not flag) per param."""
    n = len(params)
    mine = torch.tensor([float(flag(p)) for p in params] + [float(not flag(p)) for p in params]).to(device)
    both = _all_reduce_max(mine, groups).cpu()
    return int((both[:n] * both[n:]).nonzero()[0])


def _first_nonfinite(params, groups, device) -> int:
    """(Error path, every rank) the first param whose gradient is non-finite on some rank."""
    bad = torch.tensor([float(p.grad is not None and not local([p.grad])[0].isfinite().all()) for p in params])
    return int(_all_reduce_max(bad.to(device), groups).cpu().nonzero()[0])


def _raise_agreed(group, err, device, changed: str = "no parameter or state was modified on any rank") -> None:
    """Raise the same exception on every rank: the first failing rank's, naming that rank."""
    world = dist.get_world_size(group)
    mine = None if err is None else (type(err).__name__, str(err))
    gathered = [None] * world
    # NCCL object collectives use the current CUDA device: make it the params' one
    with on_device(device):
        dist.all_gather_object(gathered, mine, group=group)
    src = next((r for r, e in enumerate(gathered) if e is not None), None)
    if src is None:
        raise RuntimeError(f"Scion: a rank of another process group failed; {changed}")
    name, msg = gathered[src]
    cls = next((c for c in _SAME_ERRORS if c.__name__ == name), None)
    if cls is None:  # another kind of error (a closure's KeyError, a kernel's RuntimeError): named in the message
        cls, msg = RuntimeError, f"{name}: {msg}"
    where = f"rank {src} of {world}"
    if group is not None and group is not dist.group.WORLD and dist.get_global_rank(group, src) != src:
        where += f" in its process group, global rank {dist.get_global_rank(group, src)}"
    raise cls(f"{msg} [{where}; {changed}]") from err


def agree(engine, params, names, groups, err=None):
    """Plan the step on every rank and agree on its validity with one fixed-size all-reduce (a second one
    only to name the param of an error). ``err``: this rank's failure so far (e.g. its closure's).
    Returns the parts to run, or None when the step is skipped everywhere."""
    parts = []
    if err is None:
        try:
            parts = engine.plan()
        except Exception as e:  # one rank's bad input must not leave the others in a collective
            err = e
    device = local([params[0]])[0].device if params else torch.device("cpu")
    check_finite = engine.opt.nonfinite != "ignore"
    header = _all_reduce_max(_header(params, err, check_finite, device), groups).cpu()
    if header[FAILED]:
        _raise_agreed(groups[0], err, device)
    if _disagree(header, COUNT) or _disagree(header, PARAMS):
        raise ValueError(f"the ranks' optimizers hold different param lists (this rank: {len(params)} params; "
                         "counts, shapes or dtypes differ across ranks); every rank must build the optimizer over "
                         "the same params in the same order (no parameter or state was modified)")
    if _disagree(header, GRADS):
        k = _first_param(params, groups, device, lambda p: p.grad is not None)
        raise ValueError(f"{names(k)} has a gradient on some ranks and none on others; every rank must "
                         "step the same params (no parameter or state was modified)")
    first_bad = lambda: names(_first_nonfinite(params, groups, device))  # noqa: E731 (every rank calls it)
    return parts if engine.nonfinite_verdict(bool(header[NONFINITE]), first_bad, " on at least one rank") else None


class _Guard:
    """Keeps the first exception of this rank's compute so that the rank still takes part in every
    collective of the step (with stand-in data); ``check`` then makes every rank raise it."""

    def __init__(self):
        self.err = None

    def run(self, fn, fallback):
        if self.err is not None:
            return fallback()
        try:
            return fn()
        except Exception as e:
            self.err = e
            return fallback()

    def check(self, groups, device) -> None:
        """One MAX all-reduce of 'failed'; on failure every rank raises the failing rank's error."""
        failed = _all_reduce_max(torch.tensor([int(self.err is not None)]).to(device, non_blocking=True), groups)
        if failed.item():
            _raise_agreed(groups[0], self.err, device, "no parameter was modified on any rank, but the momentum "
                          "buffers of the Newton-Schulz and row-shard routes were already updated")


# -- the step -----------------------------------------------------------------------

def step(engine, params, names, process_group=None, err=None) -> Stats:
    """One distributed Scion step of ``engine``'s optimizer over its flat ``params``; ``names(k)`` describes
    params[k]; ``err``: an exception this rank already met (its closure's), raised on every rank.

    Agreement, then the communicating compute (a failure there still takes part in every collective
    and is raised on every rank before any write), then the writes, which communicate no more: a
    failure among them leaves the other ranks' writes done, and says that replicas may differ."""
    lays = [layout(p, process_group) for p in params]
    groups = list(dict.fromkeys(g for lay in lays for g in lay.agree))
    stats = Stats(collectives=len(groups))
    parts = agree(engine, params, names, groups, err)
    if parts is None:
        return stats
    device = local([params[0]])[0].device
    subs = {"local": [], "owner": [], "reduce": []}
    for part in parts:
        for r, sub in _split(part, process_group).items():
            subs[r].append(sub)
    guard = _Guard()
    dirs_owner = [guard.run(lambda: engine.directions(sub), lambda: local(sub.grads())) for sub in subs["owner"]]
    dirs_reduce = [guard.run(lambda: engine.directions(sub), lambda: local(sub.grads())) for sub in subs["reduce"]]
    up_owner = [[None] * len(d) for d in dirs_owner]
    up_reduce = [[None] * len(d) for d in dirs_reduce]
    sums, pending = _start_reduce(subs["reduce"], dirs_reduce, stats, guard)
    keyed = _owner_items(subs["owner"], process_group)
    cosets = [cosets_of(lay) for lay, _ in keyed]
    me = dist.get_rank()
    for (lay, items), sets, all_owners in zip(keyed, cosets, _assigned(keyed, cosets)):
        owners = next(o for coset, o in zip(sets, all_owners) if me in coset)
        work = _Owned(subs["owner"], dirs_owner, items, lay, owners, engine.backend, stats, guard)
        (_sharded if lay.kind == "sharded" else _replicated)(work, up_owner)
    _finish_reduce(subs["reduce"], dirs_reduce, sums, pending, up_reduce)
    if groups and (subs["owner"] or subs["reduce"]):  # (the same on every rank: routes follow the agreed params)
        guard.check(groups, device)  # one host sync: no rank writes a step that another failed to compute
        stats.collectives += len(groups)
    stats.ns_flops += sum(ns_cost(sub.norm, q.shape) for sub in subs["local"] if sub.norm.kind is None
                          for q in local(sub.params))  # (whole matrices on this rank: expert parallel)
    try:
        for sub in subs["local"]:
            engine.run(sub)
        for sub, ups in zip(subs["owner"], up_owner):
            engine.apply(sub, ups, sub.alphas())
        for sub, ups in zip(subs["reduce"], up_reduce):
            engine.apply(sub, ups, [1.0] * len(ups))  # (the LMOs themselves)
    except Exception as e:
        raise RuntimeError(f"Scion: writing the step failed on rank {dist.get_rank()} after the ranks agreed on it: "
                           f"{type(e).__name__}: {e}. Parameters may now differ across ranks: restore them "
                           "from a checkpoint") from e
    return stats


def _split(part, process_group) -> dict:
    """The params of one part, by route, as parts of the same type."""
    idx = defaultdict(list)
    for i, p in enumerate(part.params):
        idx[route(part.norm, layout(p, process_group), p.shape)].append(i)
    return {r: replace(part, params=[part.params[i] for i in ids], where=[part.where[i] for i in ids])
            for r, ids in idx.items()}


def _owner_items(subparts, process_group) -> list:
    """(layout, items) of the owner route, one per (layout kind, group, members, NS dtype, direction dtype),
    each list in ``order_items`` order."""
    keyed, lays = defaultdict(list), {}
    for k, sub in enumerate(subparts):
        norm = sub.norm
        for j, p in enumerate(sub.params):
            lay = layout(p, process_group)
            key = (lay.kind, lay.group, lay.members, norm.dtype, p.grad.dtype)
            lays.setdefault(key, lay)
            pieces = _pieces(lay, tuple(p.shape)) if lay.kind == "sharded" else None
            keyed[key].append(Item(k, j, tuple(p.shape), ns_cost(norm, p.shape), pieces))
    return [(lays[key], order_items(items)) for key, items in keyed.items()]


@functools.lru_cache(maxsize=4096)
def _pieces(lay: Layout, shape: tuple) -> tuple:
    """Each member's piece of a param of ``shape`` (a pure function of the layout: computed once, not per step)."""
    return tuple(piece(shape, lay.mesh.shape, c, lay.placements) for c in lay.coords)


_ASSIGNED: dict = {}  # assign_all's answers by (layouts, shapes and costs, cosets): the same every step


def _assigned(keyed, cosets) -> list:
    """``assign_all``, computed once per configuration of the owner route (it loops over every coset)."""
    key = (tuple((lay, tuple((it.shape, it.cost) for it in items)) for lay, items in keyed), tuple(cosets))
    if key not in _ASSIGNED:
        if len(_ASSIGNED) > 64:  # (param sets that come and go: keep the cache small)
            _ASSIGNED.clear()
        _ASSIGNED[key] = assign_all(keyed, cosets)
    return _ASSIGNED[key]


# -- full tensors of DTensors (init) --------------------------------------------------

def set_from_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the part of ``full`` (p's global shape) that this rank holds into p."""
    if not isinstance(p, DTensor):
        p.copy_(full)
        return
    mesh = p.device_mesh
    runs = piece(full.shape, mesh.shape, mesh.get_coordinate(), tuple(p.placements))
    p.to_local().copy_(take_piece(full, runs))

"""Sharded Scion step over torch.distributed: every Newton-Schulz matrix gets one owner rank.

Each parameter has a layout, found from the tensor itself:

    local       a plain tensor and no ``process_group``: the single-process step.
    replicated  a plain tensor with ``process_group=`` (DDP, or the same model on
                every rank), or a DTensor placed ``Replicate()``: every rank holds
                the full gradient. The owner computes the LMO and broadcasts it.
    sharded     a DTensor placed ``Shard(0)`` on a 1-D mesh (FSDP2 ``fully_shard``):
                row shards travel to the owner with ``all_to_all``, the owner
                orthogonalises the full matrix, and the rows of the result go back.

and each (norm, layout) a route:

    local   no communication: element-wise norms (Sign) always, every norm of a
            replicated param but the Newton-Schulz ones, line norms whose lines are
            rows (RowNorm, ColNorm(transpose=True)) on row shards.
    owner   Newton-Schulz norms (Spectral, SpectralConv) of replicated or sharded params.
    reduce  line norms whose lines run across row shards (ColNorm, RowNorm(transpose=True),
            BiasRMS): one all-reduce of sums of squares.

Routes follow from the norm's declaration (``kind``, ``line_dim``; see lmo.py), and a line
norm's factor ``alpha`` from the param's full shape, so no norm is named here.

Owners are balanced by Newton-Schulz FLOPs (largest first onto the least-loaded
rank), the same on every rank. Each owner's matrices, sorted by shape so that
equal shapes batch, are cut into rounds of about ``BUCKET_BYTES / world`` bytes;
round k's transfer runs while round k + 1 computes. Results travel in the dtype
the LMO produces, so the step equals the single-process step.

Before anything is modified, every rank agrees with one all-reduce on: did any
rank fail validation, which params have gradients, and which are non-finite.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from ._backend import on_device
from ._finite import finite_mask
from .engine import local
from .reference import line_lmo, norm2

BUCKET_BYTES = 64 << 20
_SAME_ERRORS = (ValueError, TypeError, FloatingPointError, NotImplementedError)


# -- layouts and routes ---------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How a parameter is spread: kind is "local", "replicated" or "sharded"."""
    kind: str
    group: object = None


LOCAL = Layout("local")


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
    """The layout of ``p`` (see the module docstring)."""
    if isinstance(p, DTensor):
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim == 1 and type(placements[0]) is Shard and placements[0].dim == 0:
            return Layout("sharded", mesh.get_group())
        if mesh.ndim == 1 and isinstance(placements[0], Replicate):
            return Layout("replicated", mesh.get_group())
        raise NotImplementedError(f"Scion supports DTensors placed Shard(0) or Replicate() on a 1-D mesh, got "
                                  f"{placements} on a {mesh.ndim}-D mesh for a param of shape {tuple(p.shape)}")
    return LOCAL if process_group is None else Layout("replicated", process_group)


def route(norm, lay: Layout, shape) -> str:
    """"local", "owner" or "reduce" (see the module docstring) for a param of ``shape``."""
    if norm.kind is None:
        return "local" if lay.kind == "local" else "owner"
    if lay.kind == "sharded" and norm.kind == "line" and len(shape) + norm.line_dim(shape) == 0:
        return "reduce"  # (the lines run along dim 0, which the shards cut)
    return "local"


# -- planning (pure functions of shapes; the benchmark uses them too) -----------

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
    """One Newton-Schulz matrix of the step: its sub-part, position there, full shape and cost."""
    part: int
    pos: int
    shape: tuple
    cost: int


def order_items(items: list[Item]) -> list[Item]:
    """Items sorted by shape (equal shapes batch on their owner), then by discovery order."""
    return [it for _, it in sorted(enumerate(items), key=lambda e: (e[1].shape, e[0]))]


def schedule(items: list[Item], world: int, itemsize: int, bucket_bytes: int = BUCKET_BYTES):
    """(owners, rounds) for ``order_items(items)``; itemsize: bytes per element of the result."""
    owners = assign_owners([it.cost for it in items], world)
    nbytes = [math.prod(it.shape) * itemsize for it in items]
    return owners, plan_rounds(owners, nbytes, world, bucket_bytes)


def sharded_splits(items: list[Item], owners, rnd, rank: int, world: int):
    """(to_owner, from_ranks): element counts this rank sends to each owner and receives from each rank
    in the forward leg of round ``rnd`` (the return leg swaps them)."""
    to_owner, from_ranks = [0] * world, [0] * world
    for i in rnd:
        shape = items[i].shape
        cols = math.prod(shape[1:])
        splits = row_splits(shape[0], world)
        to_owner[owners[i]] += splits[rank] * cols
        if owners[i] == rank:
            for s in range(world):
                from_ranks[s] += splits[s] * cols
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
    """The owner-route work of one process group: items, their directions and orthogonal factors."""

    def __init__(self, subparts, dirs, items, backend, stats, guard):
        self.subparts, self.dirs, self.items, self.backend, self.stats = subparts, dirs, items, backend, stats
        self.guard = guard

    def lmo(self, idx: list[int], fulls: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Newton-Schulz factors (the LMOs before their factor alpha) of items ``idx`` (full directions in
        ``fulls``), batched per sub-part (zeros stand in for the results of a failed compute: ``guard``
        raises it on every rank before any write)."""
        by_part = defaultdict(list)
        for i in idx:
            by_part[self.items[i].part].append(i)
        out = {}
        for part, ids in by_part.items():
            norm = self.subparts[part].norm
            gs = [fulls[i] for i in ids]
            us = self.guard.run(lambda: norm.orthogonalise_many(gs, backend=self.backend),
                                lambda: [g.new_zeros(g.shape, dtype=norm.dtype) for g in gs])
            for i, u in zip(ids, us):
                out[i] = u
                self.stats.ns_flops += self.items[i].cost
        return out


def _out_dtype(subparts, items) -> torch.dtype:
    return subparts[items[0].part].norm.dtype


def _replicated(work: _Owned, group, updates) -> None:
    """Owners compute their LMOs round by round; each round is broadcast from its owners while the next computes."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    items, dirs = work.items, work.dirs
    dtype = _out_dtype(work.subparts, items)
    owners, rounds = schedule(items, world, dtype.itemsize)
    device = dirs[items[0].part][items[0].pos].device
    pending = []
    for rnd in rounds:
        mine = [i for i in rnd if owners[i] == rank]
        results = work.lmo(mine, {i: dirs[items[i].part][items[i].pos] for i in mine})
        by_owner = defaultdict(list)
        for i in rnd:
            by_owner[owners[i]].append(i)
        for o, idx in by_owner.items():
            numel = sum(math.prod(items[i].shape) for i in idx)
            if o == rank:
                buf = torch.cat([results[i].reshape(-1) for i in idx])
            else:
                buf = torch.empty(numel, dtype=dtype, device=device)
                work.stats.bytes_received += numel * dtype.itemsize
            handle = dist.broadcast(buf, src=dist.get_global_rank(group, o), group=group, async_op=True)
            work.stats.collectives += 1
            pending.append((handle, buf, idx))
    for handle, buf, idx in pending:
        handle.wait()
        for i, flat in zip(idx, buf.split([math.prod(items[i].shape) for i in idx])):
            updates[items[i].part][items[i].pos] = flat.view(items[i].shape)


def _sharded(work: _Owned, group, updates) -> None:
    """Row shards go to owners (all_to_all), owners orthogonalise, result rows come back (all_to_all);
    round k + 1's shards travel while round k computes, round k's results while round k + 1 computes."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    items, dirs = work.items, work.dirs
    out_dtype = _out_dtype(work.subparts, items)
    first = dirs[items[0].part][items[0].pos]
    owners, rounds = schedule(items, world, out_dtype.itemsize)
    splits = [row_splits(it.shape[0], world) for it in items]
    cols = [math.prod(it.shape[1:]) for it in items]
    for it, sp in zip(items, splits):
        got = dirs[it.part][it.pos].shape[0]
        if got != sp[rank]:
            raise RuntimeError(f"rank {rank} holds {got} rows of a param of shape {it.shape}, "
                               f"expected {sp[rank]} (torch.chunk layout)")

    def a2a(out_numel, send, out_splits, in_splits, dtype):
        out = torch.empty(out_numel, dtype=dtype, device=first.device)
        handle = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=True)
        work.stats.collectives += 1
        work.stats.bytes_received += (out_numel - out_splits[rank]) * dtype.itemsize
        return handle, out

    def forward(rnd):
        to_owner, from_ranks = sharded_splits(items, owners, rnd, rank, world)
        by_dest = sorted(rnd, key=lambda i: owners[i])
        send = torch.cat([dirs[items[i].part][items[i].pos].reshape(-1) for i in by_dest])
        return a2a(sum(from_ranks), send, from_ranks, to_owner, first.dtype)

    def backward(rnd, out):
        mine = [i for i in rnd if owners[i] == rank]
        send = out.new_empty(0, dtype=out_dtype)
        if mine:
            pieces = out.split([splits[i][s] * cols[i] for s in range(world) for i in mine])
            fulls = {i: torch.cat(pieces[j::len(mine)]).view(items[i].shape) for j, i in enumerate(mine)}
            results = work.lmo(mine, fulls)
            rows = {i: results[i].reshape(-1).split([n * cols[i] for n in splits[i]]) for i in mine}
            send = torch.cat([rows[i][s] for s in range(world) for i in mine])
        to_owner, from_ranks = sharded_splits(items, owners, rnd, rank, world)
        return a2a(sum(to_owner), send, to_owner, from_ranks, out_dtype)

    fwd = [forward(rounds[0])] if rounds else []
    back = []
    for k, rnd in enumerate(rounds):
        if k + 1 < len(rounds):
            fwd.append(forward(rounds[k + 1]))
        (handle, out), fwd[k] = fwd[k], None  # the received shards die with this round
        handle.wait()
        back.append(backward(rnd, out))
    for rnd, (handle, out) in zip(rounds, back):
        handle.wait()
        by_owner = sorted(rnd, key=lambda i: owners[i])
        for i, flat in zip(by_owner, out.split([splits[i][rank] * cols[i] for i in by_owner])):
            updates[items[i].part][items[i].pos] = flat.view(splits[i][rank], *items[i].shape[1:])


def _start_reduce(subparts, dirs, stats, guard):
    """Local sums of squares of every reduce-route direction (its lines run along dim 0, which the shards
    cut), and one async all-reduce of them per process group. Returns (sums, pending all-reduces)."""
    sums, by_group = [], defaultdict(list)
    for k, sub in enumerate(subparts):
        row = []
        for p, g in zip(sub.params, dirs[k]):
            ss = guard.run(lambda: norm2(g, 0).square(),  # fp64: a huge finite g does not overflow
                           lambda: g.new_zeros(g.sum(0, keepdim=True).shape, dtype=torch.float64))
            row.append(ss)
            by_group[layout(p).group].append((k, len(row) - 1))
        sums.append(row)
    pending = []
    for group, where in by_group.items():
        flat = torch.cat([sums[k][j].reshape(-1) for k, j in where])
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, where))
        stats.collectives += 1
        world = dist.get_world_size(group)
        stats.bytes_received += round(2 * (world - 1) / world * flat.numel() * flat.itemsize)  # as a ring all-reduce
    return sums, pending


def _finish_reduce(subparts, dirs, sums, pending, updates) -> None:
    """The line LMO of each reduce-route direction from its lines' summed norms."""
    for handle, flat, where in pending:
        handle.wait()
        for (k, j), total in zip(where, flat.split([sums[k][j].numel() for k, j in where])):
            sums[k][j] = total.view(sums[k][j].shape)
    for k, sub in enumerate(subparts):
        for j, (p, g) in enumerate(zip(sub.params, dirs[k])):
            updates[k][j] = line_lmo(g, 0, sub.norm.alpha(p.shape), sums[k][j].sqrt())


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
    groups = list(dict.fromkeys(lay.group for lay in lays if lay.group is not None))
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
    for (kind, group, *_), items in _owner_items(subs["owner"], process_group).items():
        work = _Owned(subs["owner"], dirs_owner, items, engine.backend, stats, guard)
        (_sharded if kind == "sharded" else _replicated)(work, group, up_owner)
    _finish_reduce(subs["reduce"], dirs_reduce, sums, pending, up_reduce)
    if groups and (subs["owner"] or subs["reduce"]):  # (the same on every rank: routes follow the agreed params)
        guard.check(groups, device)  # one host sync: no rank writes a step that another failed to compute
        stats.collectives += len(groups)
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


def _owner_items(subparts, process_group) -> dict:
    """Items of the owner route keyed by (layout kind, group, NS dtype, direction dtype),
    each list in ``order_items`` order."""
    keyed = defaultdict(list)
    for k, sub in enumerate(subparts):
        for j, p in enumerate(sub.params):
            lay = layout(p, process_group)
            key = (lay.kind, lay.group, sub.norm.dtype, p.grad.dtype)
            keyed[key].append(Item(k, j, tuple(p.shape), ns_flops(p.shape, sub.norm.steps)))
    return {key: order_items(items) for key, items in keyed.items()}


# -- full tensors of DTensors (init) --------------------------------------------------

def set_from_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the part of ``full`` (p's global shape) that this rank holds into p."""
    if not isinstance(p, DTensor):
        p.copy_(full)
        return
    lay = layout(p)
    if lay.kind == "sharded":
        rank, world = dist.get_rank(lay.group), dist.get_world_size(lay.group)
        splits = row_splits(full.shape[0], world)
        full = full.narrow(0, sum(splits[:rank]), splits[rank])
    p.to_local().copy_(full)

"""Distributed Scion: owner-sharded LMOs for replicated (DDP) and FSDP2 (DTensor) params.

Each world size (1, 2, 3, 4) runs once per module, in one job of that many
processes (gloo on CPU, NCCL when there is a GPU per rank) that runs every
scenario and saves what it saw; the tests compare that with single-process runs
here. Gradients are set by hand, the same full gradient on every rank, so any
difference comes from the optimizer alone. The 4-process job also steps on a
process group that is not the world: ranks 1..3 (``dist.new_group([1, 2, 3])``),
replicated and on a DeviceMesh over that group, while rank 0 takes no part.

Comparisons: replicated params, and sharded params on the local and owner routes,
must equal the single-process run bit for bit. On row shards the ColNorm /
RowNorm(transpose) / BiasRMS sums run in another order (local sums plus an
all-reduce), so those params are held to the tolerance rule (tests/tolerances.py)
against the oracle's run (tests/oracle.py), line by line for the zero and tiny
lines of the reduce route (the helpers of test_lines.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections import defaultdict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import disco_kernels as dk
import oracle
from multiproc import results, run_world
from disco_kernels import distributed as ddist
from test_lines import assert_lines_close, line_dim, lined, lined_biases, oracle_step, tiny
from tolerances import assert_close, plain_dtype

pytestmark = pytest.mark.distributed

WORLDS = (1, 2, 3, 4)
STEPS = 3          # steps of the plain runs
SAVE_AT = 2        # the DCP runs save after this many steps and continue to STEPS after a reload
LR, SCALE, MOMENTUM = 0.05, 2.0, 0.1
JOB_TIMEOUT_S = 150
USE_CUDA = torch.cuda.is_available() and torch.cuda.device_count() >= max(WORLDS)
SUB_WORLD, SUB_RANKS = 4, [1, 2, 3]  # the job of world 4 also steps on the process group of ranks 1..3


class Net(nn.Module):
    """Uneven shapes for every route: equal shapes that batch, fewer rows than ranks,
    a tall matrix, a conv, reduce-route norms, and a layer that never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 3, bias=False)
        self.c = nn.Linear(10, 10)
        self.d = nn.Linear(10, 10, bias=False)
        self.conv = nn.Conv1d(5, 7, 3)
        self.tall = nn.Parameter(torch.randn(13, 4))
        self.wide32 = nn.Parameter(torch.randn(2, 9))
        self.col = nn.Parameter(torch.randn(9, 5))
        self.row_t = nn.Parameter(torch.randn(6, 9))
        self.col_tn = nn.Parameter(torch.randn(7, 5))
        self.head = nn.Linear(10, 11, bias=False)
        self.sgn = nn.Parameter(torch.randn(5, 4))
        self.unused = nn.Linear(4, 4)


GROUPS = [  # (param names, norm, norm_kwargs)
    (["emb.weight"], "ColNorm", {"transpose": True}),
    (["a.weight", "b.weight", "c.weight", "d.weight", "tall", "unused.weight"], "Spectral", {}),
    (["wide32"], "Spectral", {"dtype": "float32"}),
    (["conv.weight"], "SpectralConv", {}),
    (["col"], "ColNorm", {"normalized": True}),
    (["row_t"], "RowNorm", {"transpose": True}),
    (["col_tn"], "ColNorm", {"transpose": True, "normalized": True}),
    (["head.weight"], "RowNorm", {}),
    (["sgn"], "Sign", {}),
    (["a.bias", "c.bias", "conv.bias", "unused.bias"], "Auto", {}),
]
REDUCE = {"col", "row_t", "col_tn", "a.bias", "c.bias", "conv.bias"}  # sums across row shards
ELEMENTWISE = [g for g in GROUPS if g[1] in ("ColNorm", "RowNorm", "Sign", "Auto")]


def build(device="cpu") -> Net:
    torch.manual_seed(0)
    return Net().to(device)


def make_opt(model, cls=dk.Scion, groups=GROUPS, **kw):
    named = dict(model.named_parameters())
    spec = [{"params": [named[n] for n in names], "norm": norm, "norm_kwargs": nk} for names, norm, nk in groups]
    momentum = 0.5 if cls is dk.ScionLight else MOMENTUM
    return cls(spec, lr=LR, momentum=momentum, scale=SCALE, backend="torch", **kw)


def full_grads(model, t: int) -> dict:
    """The step-t gradient of every param but the unused layer's, the same on every rank."""
    gen = torch.Generator().manual_seed(100 + t)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if not n.startswith("unused")}


def set_grads(model, t: int, light: bool = False) -> None:
    """Set (or, for ScionLight, accumulate into) p.grad: the local part of the full gradient."""
    grads = full_grads(model, t)
    for n, p in model.named_parameters():
        g = grads.get(n)
        if g is None:
            continue
        g = g.to(ddist.local([p])[0].device)
        if light and p.grad is not None:
            ddist.local([p.grad])[0].add_(ddist.local([_like(p, g)])[0])
        else:
            p.grad = _like(p, g)


def _like(p, full):
    out = torch.zeros_like(p)
    ddist.set_from_full(out, full)
    return out


def snapshot(model) -> dict:
    """Full params on CPU (a collective for DTensors: every rank calls it)."""
    return {n: (p.full_tensor() if isinstance(p, ddist.DTensor) else p).detach().cpu().clone()
            for n, p in model.named_parameters()}


def train(model, opt, steps, start=0, light=False):
    for t in range(start, start + steps):
        set_grads(model, t, light)
        opt.step()
        if not light:
            opt.zero_grad()
    return snapshot(model)


def single_run(steps=STEPS, cls=dk.Scion) -> dict:
    """Single-process params after ``steps``."""
    model = build()
    return train(model, make_opt(model, cls), steps, light=cls is dk.ScionLight)


def oracle_run(steps=STEPS, cls=dk.Scion) -> tuple[dict, dict]:
    """(exact, plain fp32) params of the oracle's run of ``cls`` for the REDUCE params (each param's
    steps depend on its own gradients alone)."""
    named = dict(build().named_parameters())
    names = sorted(REDUCE)
    grads = [full_grads(build(), t) for t in range(steps)]
    groups = [dict(lr=LR, momentum=0.5 if cls is dk.ScionLight else MOMENTUM, scale=SCALE, norm=_norm_of(n)[0],
                   norm_kwargs=_norm_of(n)[1]) for n in names]
    runs = [oracle.scion_run([named[n].detach().to(d) for n in names], [[g[n].to(d) for n in names] for g in grads],
                             groups, light=cls is dk.ScionLight) for d in (torch.float64, torch.float32)]
    return tuple(dict(zip(names, run)) for run in runs)


# -- the job each world size runs --------------------------------------------------

def _mesh(world, device, group=None):
    """A 1-D DeviceMesh over the world, or over ``group`` (init_device_mesh makes world meshes only)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    return init_device_mesh(device.type, (world,)) if group is None else DeviceMesh.from_group(group, device.type)


def _sharded_model(world, device, group=None):
    from torch.distributed.fsdp import fully_shard
    model = build(device)
    fully_shard(model, mesh=_mesh(world, device, group))
    return model


def _replicated_model(world, device, group=None):
    return build(device)


MODELS = {"replicated": _replicated_model, "fsdp": _sharded_model}


def _pg(kind, group=None):
    """Scion's process_group: the world ("default") or ``group`` for replicated params, none for DTensors."""
    if kind != "replicated":
        return None
    return "default" if group is None else group


def _scenario_train(kind, world, device, cls, group=None):
    model = MODELS[kind](world, device, group)
    opt = make_opt(model, cls, process_group=_pg(kind, group))
    params = train(model, opt, STEPS, light=cls is dk.ScionLight)
    return {"params": params, "stats": vars(opt.comm_stats)}


# Reduce-route norms on Shard(0) params, with zero and tiny lines (test_lines.lined): (name, norm, kwargs, shapes)
LINE_GROUPS = [
    ("col", "ColNorm", {}, [(7, 5)]),
    ("col_n", "ColNorm", {"normalized": True}, [(7, 5)]),
    ("row_t", "RowNorm", {"transpose": True}, [(7, 5)]),
    ("row_tu", "RowNorm", {"transpose": True, "normalized": False}, [(2, 6)]),  # fewer rows than ranks
    ("col_tn", "ColNorm", {"transpose": True, "normalized": True}, [(7, 5)]),  # reduce route, sums within rows
    ("bias", "BiasRMS", {}, None),  # zero, tiny, one tiny entry on the last shard, Gaussian; 2 tiny entries
]
LINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def line_grads() -> dict:
    """The full fp64 gradients of LINE_GROUPS, the same in every process."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    for name, norm, kw, shapes in LINE_GROUPS:
        if shapes is None:
            out[name] = [g for g in lined_biases(gen) if g.dim() == 1] + [tiny(2)]
        else:
            out[name] = [lined(s, line_dim(norm, kw), gen) for s in shapes]
    return out


def line_step(dtype, device=torch.device("cpu"), mesh=None) -> dict:
    """One Scion step from zero params and buffers along line_grads() in ``dtype``, on Shard(0) DTensors
    over ``mesh`` (plain tensors without one); the full params after it."""
    from torch.distributed.tensor import Shard, distribute_tensor
    grads = line_grads()

    def place(t):
        t = t.to(device)
        return t if mesh is None else distribute_tensor(t, mesh, [Shard(0)])

    groups, params = [], {}
    for name, norm, kw, _ in LINE_GROUPS:
        params[name] = [nn.Parameter(place(torch.zeros(g.shape, dtype=dtype))) for g in grads[name]]
        for p, g in zip(params[name], grads[name]):
            p.grad = place(g.to(dtype))
        groups.append({"params": params[name], "norm": norm, "norm_kwargs": kw})
    dk.Scion(groups, lr=LR, momentum=MOMENTUM, scale=SCALE, backend="torch").step()
    return {name: [(p.full_tensor() if mesh is not None else p).detach().cpu().clone() for p in ps]
            for name, ps in params.items()}


def _scenario_lines(world, device, group=None):
    mesh = _mesh(world, device, group)
    return {dtype: line_step(dtype, device, mesh) for dtype in LINE_DTYPES}


def _scenario_local_only(kind, world, device):
    model = MODELS[kind](world, device)
    opt = make_opt(model, groups=[g for g in ELEMENTWISE if kind == "replicated" or not set(g[0]) & REDUCE],
                   process_group=_pg(kind))
    train(model, opt, 1)
    return vars(opt.comm_stats)


def _catch(fn):
    """(exception type name, message) raised by fn(), or None."""
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def _scenario_faults(kind, world, device, group=None):
    """One rank misbehaves; every rank must raise the same error (or skip) and change nothing."""
    rank = dist.get_rank(group)
    bad = world - 1
    out = {}
    model = MODELS[kind](world, device, group)
    opt = make_opt(model, process_group=_pg(kind, group))
    train(model, opt, 1)
    before = snapshot(model)

    set_grads(model, 1)
    if rank == bad:
        ddist.local([model.c.weight.grad])[0][-1, -1] = float("inf")  # c has rows on every rank
    out["nonfinite"] = _catch(opt.step)
    opt.nonfinite = "skip"
    out["skip"] = _catch(opt.step)
    opt.nonfinite = "raise"

    set_grads(model, 1)
    if rank == bad:
        opt.param_groups[1]["lr"] = float("nan")
    out["bad_lr"] = _catch(opt.step)
    opt.param_groups[1]["lr"] = LR

    set_grads(model, 1)
    if rank == bad:
        model.sgn.grad = None
    out["missing_grad"] = _catch(opt.step)

    after = snapshot(model)
    out["unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    set_grads(model, 1)
    opt.step()  # a good step still works afterwards (no rank was left in a collective)
    out["recovered"] = snapshot(model)
    return out


def _scenario_monitor(kind, world, device):
    """NormMonitor records of one step; FSDP2 weights are DTensors (gathered whole by the monitor)."""
    from disco_kernels.models import NormEverywhereLM
    torch.manual_seed(0)
    model = NormEverywhereLM("tiny").to(device)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    opt = dk.Scion(dk.param_groups(model, lr=LR), lr=LR, unconstrained=True, backend="torch",
                   process_group=_pg(kind))
    mon = dk.norms.NormMonitor(model, opt, every=1)
    set_grads(model, 0)
    opt.step()
    return {"record": {**mon.latest, "output_norm": mon.output_norm()}, "weights": snapshot(model)}


def _state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _scenario_dcp(kind, world, device, save_dir, load_dir):
    """Save after SAVE_AT steps; load what the previous world size saved and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    model = MODELS[kind](world, device)
    opt = make_opt(model, process_group=_pg(kind))
    train(model, opt, SAVE_AT)
    dcp.save(_state_dicts(model, opt), checkpoint_id=save_dir)
    if load_dir is None:
        return None
    model = MODELS[kind](world, device)
    opt = make_opt(model, process_group=_pg(kind))
    state = _state_dicts(model, opt)
    # a fresh optimizer's state dict has buffers for every param (DCP initialises the state with a
    # zero-gradient step); the unused layer has none in the checkpoint, so the load is partial
    dcp.load(state, checkpoint_id=load_dir, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return train(model, opt, STEPS - SAVE_AT, start=SAVE_AT)


def _job(rank, world, root):
    torch.set_num_threads(1)
    backend = "nccl" if USE_CUDA else "gloo"
    device = torch.device(f"cuda:{rank}" if USE_CUDA else "cpu")
    if USE_CUDA:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{root}/store{world}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    sub = dist.new_group(SUB_RANKS) if world == SUB_WORLD else None  # every rank must call new_group
    with results(world, rank, root) as out:
        for kind in MODELS:
            for cls in (dk.Scion, dk.ScionLight):
                out[kind, cls.__name__] = _scenario_train(kind, world, device, cls)
            out[kind, "local_only"] = _scenario_local_only(kind, world, device)
            out[kind, "faults"] = _scenario_faults(kind, world, device)
            out[kind, "monitor"] = _scenario_monitor(kind, world, device)
            prev = f"{root}/dcp_{kind}_{world - 1}" if world > 1 else None
            out[kind, "dcp"] = _scenario_dcp(kind, world, device, f"{root}/dcp_{kind}_{world}", prev)
        out["lines"] = _scenario_lines(world, device)
        if sub is not None and rank in SUB_RANKS:  # rank 0 takes no part in these steps
            out["sub"] = {(kind, cls.__name__): _scenario_train(kind, len(SUB_RANKS), device, cls, sub)
                          for kind in MODELS for cls in (dk.Scion, dk.ScionLight)}
            out["sub"].update({(kind, "faults"): _scenario_faults(kind, len(SUB_RANKS), device, sub)
                               for kind in MODELS})
            out["sub"]["lines"] = _scenario_lines(len(SUB_RANKS), device, sub)
        if sub is not None:
            dist.barrier()


@pytest.fixture(scope="module")
def jobs():
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as root:
        # in order: world w reloads world w - 1's checkpoint
        yield {w: run_world(_job, w, root, JOB_TIMEOUT_S, spawn=USE_CUDA) for w in WORLDS}


@pytest.fixture(scope="module")
def singles():
    return {cls.__name__: single_run(STEPS, cls) for cls in (dk.Scion, dk.ScionLight)}


@pytest.fixture(scope="module")
def oracles():
    return {cls.__name__: oracle_run(STEPS, cls) for cls in (dk.Scion, dk.ScionLight)}


def _ok(jobs, world):
    for r, out in enumerate(jobs[world]):
        assert "error" not in out, f"rank {r} of {world}:\n{out['error']}"
    return jobs[world]


def _assert_close(got, want, exact, plain, kind):
    """Every param equal to the single-process run's (``want``), but for the row-shard sums of the reduce
    route (fsdp, REDUCE): those within the rule against the oracle's run (``exact``, ``plain``)."""
    assert got.keys() == want.keys()
    for n in want:
        if kind == "fsdp" and n in REDUCE:
            assert_close(got[n], exact[n], plain[n], torch.float32, what=n)
        else:
            assert torch.equal(got[n], want[n]), f"{n}: max diff {(got[n] - want[n]).abs().max().item()}"


def _norm_of(name):
    return next((norm, nk) for names, norm, nk in GROUPS if name in names)


# -- tests -------------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
@pytest.mark.parametrize("cls", ["Scion", "ScionLight"])
def test_matches_single_process(jobs, singles, oracles, world, kind, cls):
    """After several steps every rank's params equal the single-process run (but the reduce route's
    row-shard sums: within the rule of the oracle's run)."""
    want = singles[cls]
    for out in _ok(jobs, world):
        _assert_close(out[kind, cls]["params"], want, *oracles[cls], kind)
    assert not torch.equal(want["a.weight"], build().a.weight.detach())  # the run did move


@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
@pytest.mark.parametrize("cls", ["Scion", "ScionLight"])
def test_subgroup_matches_single_process(jobs, singles, oracles, kind, cls):
    """On the process group of ranks 1..3 of 4 (replicated params with process_group=group, or FSDP2 on a
    DeviceMesh over that group) ranks 1..3 end as the single-process run; rank 0 takes no part. Owners are
    group ranks: a broadcast from src=<group rank> instead of its global rank fails here."""
    outs = _ok(jobs, SUB_WORLD)
    assert "sub" not in outs[0] and all("sub" in outs[r] for r in SUB_RANKS)
    for r in SUB_RANKS:
        _assert_close(outs[r]["sub"][kind, cls]["params"], singles[cls], *oracles[cls], kind)


def test_oracle_run_holds_single_process(singles, oracles):
    """The single-process run of the REDUCE params is within the rule of the oracle's run too (the rule
    that the sharded runs are held to), and the oracle's run moved them."""
    for cls, (exact, plain) in oracles.items():
        for n in REDUCE:
            assert_close(singles[cls][n], exact[n], plain[n], torch.float32, what=f"{cls} {n}")
            assert not torch.equal(exact[n].float(), dict(build().named_parameters())[n].detach())


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_bytes_and_work(jobs, world, kind):
    """Payload bytes equal the lower bound; the NS work is split, not repeated."""
    _check_bytes_and_work([out[kind, "Scion"]["stats"] for out in _ok(jobs, world)], world, kind)


@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_subgroup_bytes_and_work(jobs, kind):
    """As test_bytes_and_work for the 3 ranks of the process group 1..3: each owner does its share."""
    outs = _ok(jobs, SUB_WORLD)
    _check_bytes_and_work([outs[r]["sub"][kind, "Scion"]["stats"] for r in SUB_RANKS], len(SUB_RANKS), kind)


def _check_bytes_and_work(stats, world, kind):
    """Payload bytes received over the ranks' ``stats`` equal the lower bound; the NS work is split, not repeated."""
    model = build()
    named = dict(model.named_parameters())
    bound, work = 0, 0
    for names, norm, nk in GROUPS:
        concrete = dk.lmo.make_norm(norm, nk)
        for n in names:
            shape, c = named[n].shape, concrete.resolve(named[n].shape)
            if n.startswith("unused") or c.kind is not None:
                continue
            work += ddist.ns_flops(shape, c.steps)
            numel = math.prod(shape)
            if kind == "replicated":
                bound += numel * (world - 1) * c.dtype.itemsize
            else:  # each row shard but the owner's goes there and back (fp32 there, the LMO dtype back)
                bound += (numel - _owner_rows(n, named, world) * numel // shape[0]) * (4 + c.dtype.itemsize)
    if kind == "fsdp":
        ring = round(2 * (world - 1) / world * 8 * sum(_reduce_numel(n, named) for n in REDUCE))
        bound += world * ring  # one fp64 all-reduce of the sums; a ring all-reduce receives 2 (w - 1) / w of it
    assert sum(s["bytes_received"] for s in stats) == bound
    assert sum(s["ns_flops"] for s in stats) == work
    assert max(s["ns_flops"] for s in stats) < work or world == 1


def _owner_rows(name, named, world):
    """Rows the owner of ``name`` holds itself. The plan, restated: items keyed by LMO dtype (keys in order
    of appearance, each sorted by shape), all of them by cost (largest first; ties: key, position), each
    onto the least-loaded rank over every key (ties: the lowest rank)."""
    keyed = defaultdict(list)
    for names, norm, nk in GROUPS:
        for n in names:
            shape, c = tuple(named[n].shape), dk.lmo.make_norm(norm, nk).resolve(named[n].shape)
            if not n.startswith("unused") and c.kind is None:
                keyed[c.dtype].append((shape, len(keyed[c.dtype]), n, ddist.ns_flops(shape, c.steps)))
    entries = sorted((-cost, k, i, n) for k, items in enumerate(keyed.values())
                     for i, (_, _, n, cost) in enumerate(sorted(items)))
    loads = [0] * world
    for neg, _, _, n in entries:
        owner = loads.index(min(loads))
        loads[owner] -= neg
        if n == name:
            return ddist.row_splits(named[name].shape[0], world)[owner]


def _reduce_numel(name, named):
    """Sums of squares all-reduced for ``name`` on row shards: one per line, when its lines run along dim 0."""
    p = named[name]
    norm = dk.lmo.make_norm(*_norm_of(name)).resolve(p.shape)
    return math.prod(p.shape[1:]) if p.dim() + norm.line_dim(p.shape) == 0 else 0


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_local_norms_send_nothing(jobs, world, kind):
    """Sign, RowNorm, ColNorm (replicated, or transposed on row shards) and BiasRMS move no payload:
    the only collective is the agreement all-reduce."""
    for out in _ok(jobs, world):
        assert out[kind, "local_only"]["bytes_received"] == 0
        assert out[kind, "local_only"]["collectives"] == 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_faults_agree(jobs, world, kind):
    """Bad input or a non-finite gradient on one rank: the same error on every rank, nothing modified."""
    _check_faults([out[kind, "faults"] for out in _ok(jobs, world)])


@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_subgroup_faults_agree(jobs, kind):
    """As test_faults_agree on the process group of ranks 1..3 (the agreement runs on that group alone)."""
    outs = _ok(jobs, SUB_WORLD)
    _check_faults([outs[r]["sub"][kind, "faults"] for r in SUB_RANKS])


def _check_faults(faults):
    for key, cls in [("nonfinite", "FloatingPointError"), ("bad_lr", "ValueError"), ("missing_grad", "ValueError")]:
        assert all(f[key] == faults[0][key] for f in faults), key
        assert faults[0][key] is not None and faults[0][key][0] == cls, faults[0][key]
    assert "rank" in faults[0]["bad_lr"][1] and "lr" in faults[0]["bad_lr"][1]
    assert "sgn" in faults[0]["missing_grad"][1] or "(shape (5, 4))" in faults[0]["missing_grad"][1]
    assert all(f["skip"] is None and f["unchanged"] for f in faults)
    for f in faults[1:]:
        assert all(torch.equal(f["recovered"][n], faults[0]["recovered"][n]) for n in f["recovered"])


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_dcp_reload_other_world_size(jobs, singles, oracles, world, kind):
    """Saved by world - 1 ranks after SAVE_AT steps, loaded by ``world`` ranks: the run ends as the single one."""
    for out in _ok(jobs, world):
        _assert_close(out[kind, "dcp"], singles["Scion"], *oracles["Scion"], kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("where", [*WORLDS, "sub"])
def test_reduce_route_zero_and_tiny_lines(jobs, where, dtype):
    """ColNorm, RowNorm(transpose), BiasRMS on Shard(0) params with zero and tiny lines (one whose only
    non-zero entry sits on the last shard; a param with an empty shard): one step from zero params and
    buffers, line by line within the rule of the oracle, on every rank as in the single-process step.
    A zero line must take no step: the reduce route's own 1e-8 is what keeps 0 / 0 away."""
    grads, single = line_grads(), line_step(dtype)
    outs = ({r: _ok(jobs, SUB_WORLD)[r]["sub"] for r in SUB_RANKS} if where == "sub"
            else dict(enumerate(_ok(jobs, where))))
    for name, norm, kw, _ in LINE_GROUPS:
        for k, g in enumerate(grads[name]):
            g = g.to(dtype)
            zero = torch.zeros_like(g)
            exact = oracle_step(zero.double(), g.double(), norm, kw, MOMENTUM, False, lr=LR, scale=SCALE)[0]
            plain = oracle_step(zero, g, norm, kw, MOMENTUM, False, plain_dtype(dtype), lr=LR, scale=SCALE)[0]
            what = f"{name}[{k}] {tuple(g.shape)} {dtype}"
            assert_lines_close(single[name][k], exact, plain, dtype, line_dim(norm, kw), f"single process, {what}")
            for r, out in outs.items():
                got = out["lines"][dtype][name][k]
                assert got.dtype == dtype
                assert_lines_close(got, exact, plain, dtype, line_dim(norm, kw), f"rank {r} ({where}), {what}")


# -- planning, without processes -----------------------------------------------------

def test_assign_owners_balances_flops():
    """Largest-first greedy: within 4/3 of the best possible, far better than round-robin, deterministic."""
    shapes = [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12 + [(64, 64)] * 7
    costs = [ddist.ns_flops(s) for s in shapes]
    for world in (2, 3, 8, 64):
        owners = ddist.assign_owners(costs, world)
        load = [0] * world
        for c, o in zip(costs, owners):
            load[o] += c
        best = max(sum(costs) / world, max(costs))
        assert max(load) <= 4 / 3 * best
        assert owners == ddist.assign_owners(costs, world)
    rr = [0] * 8
    for i, c in enumerate(costs):
        rr[i % 8] += c
    owners = ddist.assign_owners(costs, 8)
    assert max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(8)) < max(rr)


def test_plan_rounds_and_row_splits():
    owners = [0, 1, 0, 0, 1]
    rounds = ddist.plan_rounds(owners, [10, 10, 10, 10, 30], world=2, bucket_bytes=40)  # cap 20 per owner
    assert rounds == [[0, 2, 1], [3, 4]]
    assert sorted(i for r in rounds for i in r) == list(range(5))
    for rows in (1, 3, 5, 13):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world)
            want = [len(c) for c in chunks] + [0] * (world - len(chunks))
            assert list(ddist.row_splits(rows, world)) == want


def test_process_group_argument():
    with pytest.raises(TypeError, match="process_group"):
        dk.Scion([nn.Parameter(torch.randn(3, 3))], process_group=3)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            dk.ScionLight([nn.Parameter(torch.randn(3, 3))], process_group="default")


def test_bench_plan_meets_targets():
    """The benchmark's replay of the plan: bytes at the lower bound; NS work within 1.2x of what
    whole-matrix owners can reach (total / world, or the largest matrix when that is more)."""
    from bench import distributed as bench
    rows = bench.run(quick=True)
    assert {r["world"] for r in rows} == {8, 64, 256}
    assert {r["path"] for r in rows} == {"replicated", "fsdp2", "hsdp", "tp", "fsdp_tp"}
    for r in rows:
        assert r["bytes_ratio"] <= bench.BYTES_TARGET, r
        assert r["ns_max_over_achievable"] <= bench.BALANCE_TARGET, r
        if r["round_robin_max_over_mean"] is not None:
            assert r["ns_max_over_mean"] <= r["round_robin_max_over_mean"], r


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_norm_monitor_on_every_rank_sees_the_whole_weights(jobs, world, kind):
    """Each rank's record is exactly the record of a single-process monitor on the whole weights that the
    step left (gathered after it), from the same weights before it; those weights are the single-process
    step's, bit for bit (this model has no reduce-route params)."""
    torch.manual_seed(0)
    single = dk.models.NormEverywhereLM("tiny")
    opt = dk.Scion(dk.param_groups(single, lr=LR), lr=LR, unconstrained=True, backend="torch")
    set_grads(single, 0)
    opt.step()
    for out in _ok(jobs, world):
        assert all(torch.equal(w, single.get_parameter(n).detach()) for n, w in out[kind, "monitor"]["weights"].items())
        torch.manual_seed(0)
        model = dk.models.NormEverywhereLM("tiny")
        mon = dk.norms.NormMonitor(model, every=1)
        mon.before_step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(out[kind, "monitor"]["weights"][n])
        mon.step()
        want = {**mon.latest, "output_norm": mon.output_norm()}
        got = out[kind, "monitor"]["record"]
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in want), {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert any(k.startswith("update/") and v > 0 for k, v in got.items())  # the step moved the weights


def test_agreed_error_gathers_on_the_params_cuda_device(monkeypatch):
    """NCCL object collectives run on the current CUDA device: it must be this rank's, not cuda:0."""
    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(("enter", d))
        yield
        seen.append("exit")

    def gather(out, obj, group=None):
        seen.append("gather")
        out[:] = [obj]

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    with pytest.raises(ValueError, match=r"lr is bad \[rank 0 of 1"):
        ddist._raise_agreed(None, ValueError("lr is bad"), torch.device("cuda", 1))
    assert seen == [("enter", torch.device("cuda", 1)), "gather", "exit"]


@pytest.mark.gpu
def test_replicated_step_syncs_the_host_once(tmp_path):
    """Two device-to-host copies per step (the agreement header, and the check that no rank failed its
    Newton-Schulz compute before anyone writes); no blocking host-to-device copies."""
    import warnings
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        model = build("cuda")
        opt = make_opt(model, process_group="default")
        set_grads(model, 0)
        opt.step()  # warm-up: first-call allocations and compilation
        set_grads(model, 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 2, syncs
    finally:
        dist.destroy_process_group()

"""Every parallel layout: HSDP and 2-D meshes, tensor parallel, expert parallel, fused projections.

Two jobs (gloo on CPU, NCCL with 4 GPUs; a hard timeout each): world 4 as a 2x2 mesh ("dp", "tp") and world 2 as a 1-D mesh.
Each rank builds the same params (``SPECS``) as DTensors with a scenario's placements, sets the same full
gradients by hand, and steps; the tests compare the full params after ``STEPS`` with a single-process
run of the same params, in which every block / expert / head is orthogonalised separately by the
single-process step. Owner routes must match bit for bit, reduce routes (sums re-associated across
shards) within the tolerance rule.

The pieces DTensor really gives each rank (``distribute_tensor``, ``parallelize_module``, ``fully_shard``
over tensor parallel) are checked against ``distributed.piece``, and a checkpoint saved on one layout
is loaded on another.
"""
from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import disco_kernels as dk
from disco_kernels import distributed as ddist
import oracle
from multiproc import results, run_world
from tolerances import assert_close

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT = 3, 2
LR, SCALE, MOMENTUM = 0.05, 2.0, 0.1
JOB_TIMEOUT_S = 240
USE_CUDA = torch.cuda.is_available() and torch.cuda.device_count() >= 4  # NCCL then, gloo otherwise
DEVICE = "cuda" if USE_CUDA else "cpu"

# name: (shape, norm, norm_kwargs); odd sizes so that shards are uneven on 2 and 4 ranks
SPECS = {
    "wq": ((10, 9), "Spectral", {}),
    "wk": ((10, 9), "Spectral", {}),                       # batches with wq
    "qkv": ((16, 9), "Spectral", {"splits": [8, 4, 4]}),    # fused GQA projection
    "heads": ((12, 9), "Spectral", {"heads": 3}),
    "c_attn": ((9, 27), "Spectral", {"transpose": True, "splits": [9, 9, 9]}),  # GPT-2's Conv1D: (in, out)
    "wo": ((9, 13), "Spectral", {"dtype": "float32"}),
    "experts": ((4, 6, 5), "Spectral", {"batch_dims": 1}),
    "emb": ((11, 6), "ColNorm", {"transpose": True}),
    "col": ((9, 7), "ColNorm", {}),
    "head": ((7, 10), "RowNorm", {}),
    "bias": ((10,), "BiasRMS", {}),
    "sgn": ((5, 4), "Sign", {}),
}
REDUCE_NORMS = ("ColNorm", "RowNorm", "BiasRMS")  # sums may run across shards: re-associated


def _strided(dim, factor):
    from torch.distributed.tensor.placement_types import _StridedShard
    return _StridedShard(dim, split_factor=factor)


def scenarios(world: int) -> dict:
    """{scenario: {name: placements}} for the job of ``world`` ranks (2: a 1-D mesh; 4: a 2x2 mesh)."""
    from torch.distributed.tensor import Replicate as R
    from torch.distributed.tensor import Shard as S
    if world == 2:
        return {
            "tp_colwise": {n: (S(0),) for n in SPECS},
            "tp_rowwise": {n: (S(len(SPECS[n][0]) - 1),) for n in SPECS},
            "ep": {n: (S(0),) if n == "experts" else (R(),) for n in SPECS},
        }
    col, row = (_strided(0, 2), S(0)), (S(0), S(1))  # FSDP2 over colwise / rowwise tensor parallel
    fsdp_tp = {n: (col if n in ("wq", "wk", "qkv", "heads", "head", "bias") else row) for n in SPECS}
    fsdp_tp.update(experts=(S(1), S(0)), emb=(S(0), R()), sgn=(R(), S(1)))  # EP on tp, FSDP over rows
    return {
        "hsdp": {n: (R(), S(0)) for n in SPECS},
        "fsdp_tp": fsdp_tp,
        "both_dims": {n: (S(0), S(1)) if len(SPECS[n][0]) == 2 else (S(0), S(0)) for n in SPECS},
        "replicated": {n: (R(), R()) for n in SPECS},
    }


# -- the params, their gradients and the runs ---------------------------------------------------

def full_params(device="cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=gen).to(device) for n, (shape, _, _) in SPECS.items()}


def full_grads(t: int, device="cpu") -> dict:
    gen = torch.Generator().manual_seed(100 + t)
    return {n: torch.randn(shape, generator=gen).to(device) for n, (shape, _, _) in SPECS.items()}


def make_opt(params: dict):
    groups = [{"params": [params[n]], "norm": norm, "norm_kwargs": kw, "param_names": [n]}
              for n, (_, norm, kw) in SPECS.items()]
    return dk.Scion(groups, lr=LR, momentum=MOMENTUM, scale=SCALE, backend="torch")


def train(params: dict, opt, steps: int, start: int = 0, place=lambda n, t: t, device="cpu") -> None:
    for t in range(start, start + steps):
        for n, g in full_grads(t, device).items():
            params[n].grad = place(n, g)
        opt.step()
        opt.zero_grad()


def single_run() -> dict:
    """On the jobs' device type: the same kernels as theirs."""
    params = {n: nn.Parameter(t) for n, t in full_params(DEVICE).items()}
    train(params, make_opt(params), STEPS, device=DEVICE)
    return {n: p.detach().cpu() for n, p in params.items()}


# -- the jobs --------------------------------------------------------------------------------------

def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(DEVICE, (2, 2) if world == 4 else (2,), mesh_dim_names=("dp", "tp")[-(world // 2):])


def _scenario(mesh, placements: dict) -> dict:
    from torch.distributed.tensor import distribute_tensor

    def place(n, t):
        return distribute_tensor(t, mesh, placements[n], src_data_rank=None)  # (every rank has t)
    params = {n: nn.Parameter(place(n, t)) for n, t in full_params(DEVICE).items()}
    opt = make_opt(params)
    train(params, opt, STEPS, place=place, device=DEVICE)
    routes = {n: ddist.route(opt.engine.norm_of(opt.param_groups[k]).resolve(p.shape), ddist.layout(p), p.shape)
              for k, (n, p) in enumerate(params.items())}
    return {"params": {n: p.full_tensor().detach().cpu() for n, p in params.items()}, "stats": vars(opt.comm_stats),
            "routes": routes}


def _pieces(mesh, placements: dict) -> dict:
    """{name: (what distribute_tensor gives this rank, what ``piece`` says it holds)} of index tensors."""
    from torch.distributed.tensor import distribute_tensor
    out = {}
    for n, (shape, _, _) in SPECS.items():
        index = torch.arange(torch.Size(shape).numel(), device=DEVICE).view(shape)
        got = distribute_tensor(index, mesh, placements[n], src_data_rank=None).to_local()
        runs = ddist.piece(shape, mesh.shape, mesh.get_coordinate(), tuple(placements[n]))
        out[n] = (got.cpu(), ddist.take_piece(index, runs).cpu())
    return out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(9, 14)
        self.down = nn.Linear(14, 9, bias=False)


def _torch_apis(mesh) -> dict:
    """Placements and pieces of params that parallelize_module (+ fully_shard over dp) really makes."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(0)
    block = Block().to(DEVICE)
    full = {n: p.detach().clone() for n, p in block.named_parameters()}
    tp = mesh["tp"] if mesh.ndim == 2 else mesh
    parallelize_module(block, tp, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if mesh.ndim == 2:
        fully_shard(block, mesh=mesh["dp"])
    out = {}
    for n, p in block.named_parameters():
        runs = ddist.piece(p.shape, p.device_mesh.shape, p.device_mesh.get_coordinate(), tuple(p.placements))
        out[n] = (repr(tuple(p.placements)), p.to_local().detach().cpu(), ddist.take_piece(full[n], runs).cpu())
    return out


def _dcp(mesh, save_dir, scenes) -> dict:
    """Steps SAVE_AT on the first layout, saves, loads into the second layout, finishes the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor
    (_, first), (_, second) = list(scenes.items())[:2]

    def build(placements):
        def place(n, t):
            return distribute_tensor(t, mesh, placements[n], src_data_rank=None)  # (every rank has t)
        params = {n: nn.Parameter(place(n, t)) for n, t in full_params(DEVICE).items()}
        return params, make_opt(params), place

    params, opt, place = build(first)
    train(params, opt, SAVE_AT, place=place, device=DEVICE)
    dcp.save({"params": params, "optim": opt.state_dict()}, checkpoint_id=save_dir)
    params, opt, place = build(second)
    train(params, opt, 1, place=place, device=DEVICE)  # (creates the momentum buffers in the second layout)
    state = {"params": params, "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=save_dir)
    opt.load_state_dict(state["optim"])
    train(params, opt, STEPS - SAVE_AT, start=SAVE_AT, place=place, device=DEVICE)
    return {n: p.full_tensor().detach().cpu() for n, p in params.items()}


def _job(rank, world, root):
    torch.set_num_threads(1)
    if USE_CUDA:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if USE_CUDA else "gloo", init_method=f"file://{root}/store{world}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    with results(world, rank, root) as out:
        mesh = _mesh(world)
        scenes = scenarios(world)
        for name, placements in scenes.items():
            out[name] = _scenario(mesh, placements)
            out[name, "pieces"] = _pieces(mesh, placements)
        out["torch_apis"] = _torch_apis(mesh)
        out["dcp"] = _dcp(mesh, f"{root}/dcp{world}", scenes)


@pytest.fixture(scope="module")
def jobs():
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as root:
        yield {w: run_world(_job, w, root, JOB_TIMEOUT_S, spawn=USE_CUDA) for w in (2, 4)}


@pytest.fixture(scope="module")
def single():
    return single_run()


@pytest.fixture(scope="module")
def oracles():
    """(exact fp64, plain fp32) oracle runs of the line-norm params (each steps on its own gradients)."""
    names = [n for n in SPECS if SPECS[n][1] in REDUCE_NORMS]
    start, grads = full_params(), [full_grads(t) for t in range(STEPS)]
    groups = [dict(lr=LR, momentum=MOMENTUM, scale=SCALE, norm=SPECS[n][1], norm_kwargs=SPECS[n][2]) for n in names]
    runs = [oracle.scion_run([start[n].to(d) for n in names], [[g[n].to(d) for n in names] for g in grads], groups)
            for d in (torch.float64, torch.float32)]
    return tuple(dict(zip(names, run)) for run in runs)


def _outs(jobs, world):
    outs = jobs[world]
    for r, out in enumerate(outs):
        assert "error" not in out, f"world {world} rank {r}:\n{out['error']}"
    return outs


SCENES = [(2, s) for s in ("tp_colwise", "tp_rowwise", "ep")] + \
         [(4, s) for s in ("hsdp", "fsdp_tp", "both_dims", "replicated")]


def _assert_params(got: dict, want: dict, oracles, where: str) -> None:
    exact, plain = oracles
    for n, w in want.items():
        if n in exact:
            assert_close(got[n], exact[n], plain[n], what=f"{where}: {n}")
        else:
            assert torch.equal(got[n], w), f"{where}: {n} differs by {(got[n] - w).abs().max().item():.3g}"


@pytest.mark.parametrize("world,scene", SCENES)
def test_layout_matches_single_process(jobs, single, oracles, world, scene):
    for r, out in enumerate(_outs(jobs, world)):
        _assert_params(out[scene]["params"], single, oracles, f"world {world} {scene} rank {r}")


@pytest.mark.parametrize("world,scene", SCENES)
def test_pieces_are_what_dtensor_holds(jobs, world, scene):
    for r, out in enumerate(_outs(jobs, world)):
        for n, (got, want) in out[scene, "pieces"].items():
            assert torch.equal(got, want), f"world {world} {scene} rank {r}: {n}"


@pytest.mark.parametrize("world", [2, 4])
def test_pieces_of_tensor_parallel_and_fsdp_modules(jobs, world):
    outs = _outs(jobs, world)
    placements = {n: p for n, (p, _, _) in outs[0]["torch_apis"].items()}
    if world == 4:  # FSDP2 over colwise tensor parallel shards dim 0 right to left: a strided shard
        assert "_StridedShard" in placements["up.weight"] and "Shard(dim=1)" in placements["down.weight"]
    for r, out in enumerate(outs):
        for n, (_, got, want) in out["torch_apis"].items():
            assert torch.equal(got, want), f"world {world} rank {r}: {n} placed {placements[n]}"


def test_expert_parallel_sends_nothing(jobs):
    for out in _outs(jobs, 2):
        assert out["ep"]["routes"]["experts"] == "local"
    for scene in ("tp_colwise", "ep"):  # experts cut along the experts: whole matrices on each rank
        assert all(out[scene]["routes"]["experts"] == "local" for out in _outs(jobs, 2))


def test_routes(jobs):
    out = _outs(jobs, 4)[0]
    assert out["hsdp"]["routes"]["wq"] == "owner" and out["hsdp"]["routes"]["col"] == "reduce"
    assert out["hsdp"]["routes"]["head"] == "local"  # RowNorm's lines are rows: whole on row shards
    assert out["fsdp_tp"]["routes"]["experts"] == "owner"  # (FSDP cut the experts' rows)
    assert out["fsdp_tp"]["routes"]["head"] == "local" and out["both_dims"]["routes"]["head"] == "reduce"
    assert out["replicated"]["routes"]["wq"] == "owner" and out["replicated"]["routes"]["col"] == "local"


def _costs(scene_routes) -> list[int]:
    """Newton-Schulz FLOPs of every Newton-Schulz param (owner route, or local: experts cut along the experts),
    restated: 5 steps of 4 m^2 n + 2 m^3 (m <= n) for each independent matrix (expert, split block, head)."""
    costs = []
    for n, (shape, norm, kw) in SPECS.items():
        if norm != "Spectral":
            continue
        mats = math.prod(shape[:kw.get("batch_dims", 0)])
        rows, cols = shape[kw.get("batch_dims", 0)], math.prod(shape[kw.get("batch_dims", 0) + 1:])
        if kw.get("transpose"):  # (blocks cut the output dim, stored last)
            rows, cols = cols, rows
        blocks = kw.get("splits") or [rows // kw.get("heads", 1)] * kw.get("heads", 1)
        for b in blocks:
            m, k = min(b, cols), max(b, cols)
            costs.append(mats * 5 * (4 * m * m * k + 2 * m ** 3))
    return costs


@pytest.mark.parametrize("world,scene", SCENES)
def test_each_matrix_once_per_copy_and_balanced(jobs, world, scene):
    """Every replica's ranks together orthogonalise each matrix once; no rank does more than its share plus
    one param (the greedy's bound; local experts add their own share)."""
    outs = _outs(jobs, world)
    costs = _costs(outs[0][scene]["routes"])
    flops = [out[scene]["stats"]["ns_flops"] for out in outs]
    replicas = 2 if scene == "hsdp" else 1
    assert sum(flops) == replicas * sum(costs)
    share = sum(costs) / (world // replicas)
    assert max(flops) <= share + max(costs), (flops, share)


def test_replicated_bytes_are_the_bound(jobs):
    """On a replicated 2x2 mesh each result reaches the 3 other ranks once (bf16, fp32 for wo)."""
    outs = _outs(jobs, 4)
    bound = sum(math.prod(SPECS[n][0]) * 3 * (4 if n == "wo" else 2)
                for n in SPECS if outs[0]["replicated"]["routes"][n] == "owner")
    assert sum(out["replicated"]["stats"]["bytes_received"] for out in outs) == bound


@pytest.mark.parametrize("world", [2, 4])
def test_checkpoint_loads_on_another_layout(jobs, single, oracles, world):
    for r, out in enumerate(_outs(jobs, world)):
        _assert_params(out["dcp"], single, oracles, f"world {world} dcp rank {r}")


def test_unsupported_placement_names_param_and_mesh(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    mesh = init_device_mesh("cpu", (1,))
    p = nn.Parameter(DTensor.from_local(torch.randn(3, 4), mesh, [Partial()]))
    opt = dk.Scion([p], lr=0.1)
    p.grad = DTensor.from_local(torch.randn(3, 4), mesh, [Partial()])
    with pytest.raises(NotImplementedError, match=r"Partial.*1-D mesh.*shape \(3, 4\)"):
        opt.step()

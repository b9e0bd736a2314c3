"""One rank's fault, every rank's error: a 3-rank gloo world where one rank misbehaves in each way a
step can go wrong. Every rank must raise (the same error, naming the rank), none may hang (a hard
timeout turns a hang into a failure), nothing may change, and the next good step must run everywhere."""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import disco_kernels as dk
from multiproc import results, run_world
from disco_kernels import distributed as ddist

pytestmark = pytest.mark.distributed

WORLD, BAD = 3, 1
TIMEOUT_S = 120  # the whole job; a hang anywhere fails the test instead of stalling CI


def _model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 10, bias=False), nn.Linear(10, 7))
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model


def _opt(model, kind, params=None):
    params = list(model.parameters()) if params is None else params
    matrices, vectors = [p for p in params if p.dim() == 2], [p for p in params if p.dim() < 2]
    return dk.Scion([{"params": matrices, "norm": "Spectral"}, {"params": vectors, "norm": "BiasRMS"}], lr=0.1,
                    momentum=0.5, process_group="default" if kind == "replicated" else None)


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=gen)
        g = torch.zeros_like(p)
        ddist.set_from_full(g, full)
        p.grad = g


def _snapshot(model, opt):
    params = [ddist.local([p])[0].detach().clone() for p in model.parameters()]
    bufs = [ddist.local([s["momentum_buffer"]])[0].clone() for s in opt.state.values()]
    return params, bufs


def _same(a, b):
    return all(torch.equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _attempt(kind, fault):
    """Set up, make ``fault`` happen on rank BAD, step; returns (error or None, params unchanged, state
    unchanged, the next good step ran)."""
    rank = dist.get_rank()
    model = _model(kind)
    opt = _opt(model, kind)
    _grads(model, 0)
    opt.step()  # momentum buffers exist
    _grads(model, 1)
    closure = None
    if rank == BAD:
        if fault == "grad shape":
            w = model[0].weight
            if kind == "fsdp":  # a gradient whose global shape is right but whose shard here is not
                from torch.distributed.tensor import DTensor
                w.grad = DTensor.from_local(torch.randn(3, 3), w.device_mesh, w.placements, run_check=False,
                                            shape=w.shape, stride=w.stride())
            else:
                w.grad.data = torch.randn(3, 3)
        elif fault == "closure":
            def broken_loader():
                raise KeyError("the data loader broke")
            closure = broken_loader
        elif fault == "param list":
            extra = nn.Parameter(torch.randn(4, 4))
            extra.grad = torch.randn(4, 4)
            opt = _opt(model, kind, list(model.parameters()) + [extra])
        elif fault == "compute":
            real = dk.lmo.Spectral.orthogonalise_param  # (the owner's Newton-Schulz)
            dk.lmo.Spectral.orthogonalise_param = lambda self, G, **kw: (_ for _ in ()).throw(RuntimeError("kernel died"))
    before = _snapshot(model, opt)
    error = None
    try:
        opt.step(closure)
    except Exception as e:
        error = (type(e).__name__, str(e))
    finally:
        if rank == BAD and fault == "compute":
            dk.lmo.Spectral.orthogonalise_param = real
    params_same = _same([before[0]], [_snapshot(model, opt)[0]])
    state_same = _same([before[1]], [_snapshot(model, opt)[1]])
    if fault == "param list" and rank == BAD:
        opt = _opt(model, kind)  # back to the list the others hold
    _grads(model, 2)
    opt.step()  # the good step: every rank must be back in step
    return error, params_same, state_same, True


FAULTS = ("grad shape", "closure", "param list", "compute")


def _job(rank, world, root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    with results(world, rank, root) as out:
        for kind in ("replicated", "fsdp"):
            for fault in FAULTS:
                out[kind, fault] = _attempt(kind, fault)


@pytest.fixture(scope="module")
def outs():
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as root:
        try:
            outs = run_world(_job, WORLD, root, TIMEOUT_S)
        except TimeoutError as e:
            pytest.fail(f"the fault job hung: {e}")
        yield outs


EXPECTED = {  # fault -> (error type on every rank, words of the message)
    "grad shape": ("ValueError", ["gradient of", "shape and device", f"rank {BAD} of {WORLD}", "no parameter or state"]),
    "closure": ("RuntimeError", ["KeyError", "the data loader broke", f"rank {BAD} of {WORLD}"]),
    "param list": ("ValueError", ["different param lists"]),
    "compute": ("RuntimeError", ["kernel died", f"rank {BAD} of {WORLD}", "no parameter was modified",
                                 "momentum buffers"]),
}


@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
@pytest.mark.parametrize("fault", FAULTS)
def test_one_rank_fault_raises_everywhere(outs, kind, fault):
    for out in outs:
        assert "error" not in out, out.get("error")
    cls, words = EXPECTED[fault]
    for rank, out in enumerate(outs):
        error, params_same, state_same, recovered = out[kind, fault]
        assert error is not None, f"rank {rank} did not raise"
        assert error[0] == cls, (rank, error)
        for w in words:
            assert w in error[1], (rank, w, error[1])
        assert params_same, f"rank {rank}: parameters changed"
        if fault != "compute":
            assert state_same, f"rank {rank}: optimizer state changed"
        assert recovered

"""Expert-parallel MoE with Scion: each expert orthogonalised on its own, on the rank that holds it.

    torchrun --nproc_per_node 2 examples/moe.py --steps 5 --experts 4

The expert weights are one 3-D param (experts, d_out, d_in) placed Shard(0) over the ranks (expert
parallel: each rank holds whole experts). ``disco_kernels.param_groups`` gives such weights
``Spectral(batch_dims=1)``: each expert is a matrix of its own, scaled by one expert's shape. Since the
shards cut only the expert dim, every rank orthogonalises its own experts with no communication; the
router (replicated) is stepped like a DDP param.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).parent))
import disco_kernels as dk  # noqa: E402
from _common import regress, setup  # noqa: E402


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's tensor. Backward: the gradient as it is (every rank computes the
    same loss from the sum, so each rank's part gets that loss's gradient once)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad


class MoE(nn.Module):
    """A dense-routed MoE layer: out = x + sum_e softmax(router x)_e * (W_e x), experts spread over ``mesh``."""

    def __init__(self, d: int, experts: int, mesh):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        w = torch.randn(experts, d, d) / d ** 0.5
        self.experts = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))

    def forward(self, x):
        mine = self.experts.to_local()  # (local experts, d, d): whole experts on this rank
        first = dist.get_rank() * -(-self.experts.shape[0] // dist.get_world_size())
        gates = self.router(x).softmax(-1)[:, first:first + mine.shape[0]]
        local = torch.einsum("bd,eod,be->bo", x, mine, gates)
        return x + _SumOverRanks.apply(local)  # (the experts of every rank)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    device = setup()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    model = MoE(args.dim, args.experts, mesh).to(device)
    groups = dk.param_groups(model, lr=args.lr)
    if dist.get_rank() == 0:
        for g in groups:
            print(f"{[n for n in g.get('param_names', [])]}: {g['norm']} {g['norm_kwargs']}")
    opt = dk.Scion(groups, lr=args.lr, momentum=0.1, process_group="default")
    # the same batch on every rank (the experts are what is split); each rank's router gradient saw the paths
    # through its own experts only: summed over ranks, as DDP would
    regress(model, opt, args.steps, args.dim, seed=0, device=device, batch=64,
            after_backward=lambda: dist.all_reduce(model.router.weight.grad))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Tensor parallel (and FSDP2 over it) with owner-sharded Scion.

    torchrun --nproc_per_node 2 examples/tp.py --steps 5            # TP over 2 ranks
    torchrun --nproc_per_node 4 examples/tp.py --steps 5 --tp 2     # FSDP over 2 x TP over 2

A residual MLP whose ``up`` projections are colwise parallel (Shard(0)) and ``down`` projections
rowwise (Shard(1)), as ``parallelize_module`` makes them; with ``--tp`` smaller than the world,
``fully_shard`` then shards every param over the data-parallel mesh dim too (a colwise weight becomes
(_StridedShard(0), Shard(0)), a rowwise one (Shard(0), Shard(1))). Scion finds all of that from the
params: each rank's block of a matrix goes to the matrix's owner (only that block: the fewest bytes),
the owner orthogonalises the whole matrix, and the blocks go back.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).parent))
import disco_kernels as dk  # noqa: E402
from _common import regress, setup  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp", type=int, default=0, help="tensor-parallel ranks (default: the whole world)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    device = setup()
    world = dist.get_world_size()
    tp = args.tp or world
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(args.dim, 4 * args.dim) for _ in range(2))).to(device)
    for block in model:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        if world > tp:
            fully_shard(block, mesh=mesh["dp"])
    if dist.get_rank() == 0:
        for name, p in model.named_parameters():
            print(f"{name}: {tuple(p.shape)} placed {tuple(p.placements)} on mesh {tuple(p.device_mesh.shape)}")
    opt = dk.Scion(model.parameters(), lr=args.lr, norm="Spectral", momentum=0.1)
    # the same data across TP ranks, not across DP ranks
    regress(model, opt, args.steps, args.dim, seed=mesh.get_coordinate()[0], device=device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

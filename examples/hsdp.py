"""HSDP (hybrid sharding) training of the norm-everywhere model with owner-sharded Scion.

    torchrun --nproc_per_node 4 examples/hsdp.py --steps 5

``fully_shard`` on a 2-D mesh (replicate, shard) places every param (Replicate(), Shard(0)): each
replica group holds a full copy, sharded over its ranks. Scion finds that from the params: owners
are picked among the ranks of each replica group, every replica group runs the same step, and
nothing crosses replica groups beyond the gradient reduction FSDP already did.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
import disco_kernels as dk  # noqa: E402
from _common import parse, setup, train  # noqa: E402
from disco_kernels.models import NormEverywhereLM  # noqa: E402


def main():
    args = parse(__doc__.splitlines()[0])
    device = setup()
    world = dist.get_world_size()
    replicas = 2 if world % 2 == 0 else 1
    mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = NormEverywhereLM(args.preset).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.get_rank() == 0:
        print(f"mesh {tuple(mesh.shape)} (replicate, shard); params placed {model.head.weight.placements}")
    opt = dk.Scion(dk.param_groups(model, lr=args.lr), lr=args.lr, momentum=1.0, unconstrained=True)
    train(model, opt, args, model.cfg.vocab_size, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

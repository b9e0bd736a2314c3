"""FSDP2 (``fully_shard``) training of the norm-everywhere model with owner-sharded Scion.

    torchrun --nproc_per_node 2 examples/fsdp.py --steps 5 --save /tmp/ckpt
    torchrun --nproc_per_node 3 examples/fsdp.py --steps 5 --load /tmp/ckpt

The parameters are DTensors placed Shard(0); Scion finds that by itself. Row
shards of each hidden matrix travel to its owner rank (all_to_all), which
orthogonalises the whole matrix and sends the result's rows back; the embedding
(ColNorm(transpose=True)) and output (RowNorm) LMOs act on the local rows.
Momentum buffers, if any, are sharded like the params, and the checkpoint
(torch.distributed.checkpoint) loads on any number of ranks.
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
    torch.manual_seed(0)
    model = NormEverywhereLM(args.preset).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = dk.Scion(dk.param_groups(model, lr=args.lr), lr=args.lr, momentum=1.0, unconstrained=True)
    train(model, opt, args, model.cfg.vocab_size, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Data-parallel (DDP) training of the norm-everywhere model with owner-sharded Scion.

    torchrun --nproc_per_node 2 examples/ddp.py --steps 5

Every rank holds the same gradient after DDP's all-reduce. With
``process_group="default"`` each hidden matrix gets one owner rank (balanced by
Newton-Schulz FLOPs) that orthogonalises it and broadcasts the result; the
embedding (ColNorm) and output (RowNorm) LMOs stay local. Replicas stay
bit-identical, which the script checks at the end.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parent))
import disco_kernels as dk  # noqa: E402
from _common import parse, setup, train  # noqa: E402
from disco_kernels.models import NormEverywhereLM  # noqa: E402


def main():
    args = parse(__doc__.splitlines()[0])
    device = setup()
    torch.manual_seed(0)
    model = NormEverywhereLM(args.preset).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # the paper's setup: unconstrained, no momentum, per-layer learning rates
    opt = dk.Scion(dk.param_groups(model, lr=args.lr), lr=args.lr, momentum=1.0, unconstrained=True,
                   process_group="default")
    train(ddp, opt, args, model.cfg.vocab_size, device)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"replicas identical on {dist.get_world_size()} ranks: {torch.equal(low, high)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

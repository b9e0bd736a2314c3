"""Shared by the torchrun examples: process group, device, data and the training loop."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def parse(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--preset", default="tiny", help="NormEverywhereLM preset: tiny, small or proxy")
    ap.add_argument("--lr", type=float, default=2 ** -4)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--save", help="directory for a torch.distributed.checkpoint of model and optimizer")
    ap.add_argument("--load", help="resume from such a directory (any number of ranks may have saved it)")
    return ap.parse_args()


def setup() -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # binds NCCL to this rank's GPU
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def batch(step: int, args, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, different on every rank (data parallel); targets are the next token."""
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    tokens = torch.randint(vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def checkpoint_state(model, opt):
    """state() -> the DCP state dict of model and optimizer; state(sd) loads one."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    def state(sd=None):
        if sd is None:
            return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    return state


def train(model, opt, args, vocab: int, device) -> None:
    """The loop, with an optional DCP load before and save after it."""
    import torch.distributed.checkpoint as dcp
    state = checkpoint_state(model, opt)
    if args.load:
        sd = state()
        # partial: a fresh optimizer has a momentum buffer for every param, a checkpoint none for a param
        # that never had a gradient
        dcp.load(sd, checkpoint_id=args.load, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        state(sd)
    for step in range(args.steps):
        inputs, targets = batch(step, args, vocab, device)
        loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)  # a sum (gloo has no average)
        loss /= dist.get_world_size()
        s = opt.comm_stats
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}  bytes in {s.bytes_received}  collectives {s.collectives}  "
                  f"NS GFLOP on rank 0 {s.ns_flops / 1e9:.3f}", flush=True)
    if args.save:
        dcp.save(state(), checkpoint_id=args.save)
        if dist.get_rank() == 0:
            print(f"saved to {args.save}")


def regress(model, opt, steps: int, dim: int, seed: int, device, batch: int = 32, after_backward=None) -> None:
    """Fit ``model`` to a fixed random linear map x -> x A (inputs drawn from ``seed``), printing the loss
    and the optimizer's communication per step on rank 0; ``after_backward()`` runs before each step."""
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, dim, generator=gen).to(device) / dim ** 0.5
    for step in range(steps):
        x = torch.randn(batch, dim, generator=gen).to(device)
        loss = F.mse_loss(model(x), x @ target)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad()
        s = opt.comm_stats
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}  bytes in {s.bytes_received}  collectives {s.collectives}  "
                  f"NS MFLOP on rank 0 {s.ns_flops / 1e6:.2f}", flush=True)

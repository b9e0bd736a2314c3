"""Training with a graph-captured Scion step (dk.CapturedStep).

    python examples/captured_step.py --steps 100
    python examples/captured_step.py --bench --depth 24     # ms per optimizer step: eager vs captured

On a GPU the optimizer step is captured once in a CUDA graph (after two eager warm-up steps) and replayed
on every later step, while a LambdaLR warm-up + cosine schedule keeps writing float learning rates into
the param groups: each replay reads them. The gradients are zeroed in place (set_to_none=False), so they
stay where the graph reads them. On the CPU every step runs eagerly (CapturedStep says so once).
"""
import argparse
import math
import time
import warnings

import torch
from torch import nn

import disco_kernels as dk
from disco_kernels.capture import CapturedStep  # (also dk.CapturedStep)


def make_model(width: int, depth: int, d_in: int = 32) -> nn.Module:
    layers = [nn.Linear(d_in, width), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def batch(step: int, size: int, device, d_in: int = 32):
    """A fixed smooth target of random inputs."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, d_in, generator=gen)
    y = torch.tanh(x[:, :4].sum(1, keepdim=True) / 2) + 0.3 * x[:, 4:5]
    return x.to(device), y.to(device)


def setup(args, device):
    torch.manual_seed(0)
    model = make_model(args.width, args.depth).to(device)
    # per-layer norms and learning rates (dk.param_groups); Newton-Schulz in bf16 on a GPU, in fp32 on the CPU
    # (where bf16 matmuls are slow); nonfinite="ignore": the non-finite check is a host sync, which a CUDA
    # graph cannot hold
    ns = {"dtype": "bfloat16" if device.type == "cuda" else "float32"}
    opt = dk.Scion(dk.param_groups(model, lr=args.lr, settings={"hidden": {"norm_kwargs": ns}}), lr=args.lr,
                   momentum=0.1, unconstrained=True, nonfinite="ignore")
    return model, opt


def train(args, device) -> None:
    model, opt = setup(args, device)
    warm = max(1, args.steps // 10)

    def schedule(t):
        return (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, args.steps - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # schedules drive the optimizer itself
    step = CapturedStep(opt)
    t0 = time.perf_counter()
    for t in range(args.steps):
        x, y = batch(t, args.batch, device)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        step.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
        if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
            print(f"step {t:4d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    print(f"{args.steps} steps in {time.perf_counter() - t0:.2f} s on {device}: {step.eager_steps} eager, "
          f"{step.captures} capture(s), {step.replays} replays")


def bench(args, device) -> None:
    """Time the optimizer step alone on fixed gradients: eager Scion.step() against CapturedStep replays."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n):
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n * 1e3

    model, opt = setup(args, device)
    x, y = batch(0, args.batch, device)
    nn.functional.mse_loss(model(x), y).backward()
    n = sum(1 for _ in model.parameters())
    eager = timed(opt.step, args.bench_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the CPU notice)
        captured = CapturedStep(opt)
        replay = timed(captured.step, args.bench_steps)
    how = "graph replays" if captured.replays else "eager (no CUDA device)"
    print(f"{n} params on {device}: eager step {eager:.3f} ms, CapturedStep {replay:.3f} ms ({how}), "
          f"{eager / replay:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2, help="hidden layers")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2 ** -2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bench", action="store_true", help="time the optimizer step, eager vs captured")
    ap.add_argument("--bench-steps", type=int, default=50)
    args = ap.parse_args()
    device = torch.device(args.device)
    (bench if args.bench else train)(args, device)


if __name__ == "__main__":
    main()

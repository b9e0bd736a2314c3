"""``python -m disco_kernels.train``: train a norm-everywhere LM with Scion and watch its output norm.

The corpus is the Python standard library's own source, read as bytes (offline on
every machine). Training follows the paper (arXiv 2510.03871): unconstrained Scion,
no momentum, constant lr, input : hidden : output lr = 1 : 1/8 : 1, the norms' init.
Writes into ``--out``: ``train.csv`` (step, tokens, lr, loss, output norm),
``norms.csv`` (NormMonitor records), ``summary.json`` and ``train.png``.
``--sweep`` trains a grid of (lr, batch size) at the token budget of --steps x
--batch-size (``--sweep-lrs``, ``--sweep-batch-sizes``) and writes
``sweep.csv`` / ``sweep.png``: final loss against log2 ‖W_out‖_{RMS→∞}.

Under torchrun (WORLD_SIZE > 1) the process group is initialised, the model is
wrapped in DDP, rank 0 writes the outputs, and Scion gets ``process_group="default"``
(each matrix orthogonalised once, on its owner rank).

    python -m disco_kernels.train --quick                 # seconds: a smoke run
    python -m disco_kernels.train                         # the paper's proxy shape, a few minutes on CPU
    python -m disco_kernels.train --sweep --steps 150     # the norm-transfer picture
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch

from .models import PRESETS, NormEverywhereLM
from .norms import NormMonitor
from .optim import Scion
from .param_groups import param_groups
from .scaling import OUTPUT_NORM_LOG2

SWEEP_LR_FACTORS = (1 / 4, 1 / 2, 1, 2, 4)  # default sweep grid, relative to --lr and --batch-size
SWEEP_BATCH_FACTORS = (1 / 2, 1, 2)


def load_corpus(max_bytes: int = 1 << 24) -> torch.Tensor:
    """The standard library's .py files (sorted by path, no site-packages), concatenated as uint8, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total < 1 << 16:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator, device):
    """Random windows: (inputs, next-byte targets), each (batch_size, seq_len) int64 on ``device``."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long().to(device, non_blocking=True)  # a blocking copy would wait for the device
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, data, batch_size, seq_len, device, batches: int = 8) -> float:
    """Mean loss on ``batches`` fixed windows of ``data``."""
    gen = torch.Generator().manual_seed(1234)
    was_training = model.training
    model.eval()
    loss = sum(model(*get_batch(data, batch_size, seq_len, gen, device)) for _ in range(batches)).item() / batches
    model.train(was_training)
    return loss


def _distributed(device: str):
    """(rank, world size, device); initialises the default process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return 0, 1, torch.device(device)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if device == "cuda" else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # binds NCCL to this rank's GPU
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), world, device


def _progress(steps: int, enabled: bool):
    """A tqdm bar, or None when tqdm is missing or progress is off."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", dynamic_ncols=True)


def train(preset: str = "proxy", *, steps: int = 300, lr: float = 2 ** -3, batch_size: int = 16, seq_len: int = 128,
          device="cpu", seed: int = 0, data=None, monitor_every: int = 10, progress: bool = True,
          rank: int = 0, world_size: int = 1, log=print) -> dict:
    """Train once; returns {"rows": per-step dicts, "norms": NormMonitor history, "summary": dict}."""
    device = torch.device(device)
    data = load_corpus() if data is None else data
    split = data.numel() * 15 // 16
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = NormEverywhereLM(PRESETS[preset]).to(device)
    opt = Scion(param_groups(model, lr=lr), lr=lr, momentum=1.0, unconstrained=True,
                process_group="default" if world_size > 1 else None)
    monitor = NormMonitor(model, opt, every=monitor_every)
    net = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    rows, bar, step_seconds = [], _progress(steps, progress and rank == 0), 0.0
    every_print = max(1, steps // 20)
    for step in range(1, steps + 1):
        x, y = get_batch(train_data, batch_size, seq_len, gen, device)
        start = time.perf_counter()
        loss = net(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the device
        step_seconds += time.perf_counter() - start
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} (lr {lr} too large?)")
        norm = monitor.latest.get("output/log2_rms_to_inf", math.nan)
        shown = "-" if math.isnan(norm) else f"{norm:.2f}"  # (no record yet)
        rows.append({"step": step, "tokens": step * batch_size * seq_len * world_size, "lr": lr, "loss": loss,
                     "log2_output_norm": norm, "seconds": step_seconds})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", tokens=rows[-1]["tokens"], log2_out=shown)
        elif rank == 0 and progress and (step % every_print == 0 or step == steps):
            log(f"step {step}/{steps}  loss {loss:.3f}  lr {lr:.3g}  tokens {rows[-1]['tokens']}  "
                f"log2|W_out| {shown}")
    if bar is not None:
        bar.close()
    summary = {"preset": preset, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
               "tokens": rows[-1]["tokens"], "device": str(device), "world_size": world_size,
               "first_loss": rows[0]["loss"], "final_train_loss": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
               "val_loss": evaluate(model, val_data, batch_size, seq_len, device),
               "log2_output_norm": math.log2(monitor.output_norm()), "target_log2_output_norm": OUTPUT_NORM_LOG2,
               "seconds_per_step": step_seconds / steps,
               "monitor_share": monitor.seconds / step_seconds}
    return {"rows": rows, "norms": monitor.history, "summary": summary}


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(run: dict, path: Path) -> None:
    """Loss and log2 output norm against tokens."""
    plt = _pyplot()
    rows = run["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1)
    s = run["summary"]
    a.set(xlabel="tokens", ylabel="train loss (nats/byte)",
          title=f"{s['preset']}, lr {s['lr']:.3g}, batch {s['batch_size']}")
    per_step_tokens = rows[0]["tokens"]
    b.plot([r["step"] * per_step_tokens for r in run["norms"]], [r["output/log2_rms_to_inf"] for r in run["norms"]],
           marker=".", label="log2 ‖W_out‖ RMS→∞")
    b.axhline(OUTPUT_NORM_LOG2, color="gray", ls="--", label=f"paper's optimum ({OUTPUT_NORM_LOG2})")
    b.set(xlabel="tokens", ylabel="log2 output norm")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: list[dict], path: Path) -> None:
    """Final validation loss against log2 output norm, one curve per batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for bs in sorted({r["batch_size"] for r in results}):
        pts = sorted((r["log2_output_norm"], r["val_loss"], r["lr"]) for r in results if r["batch_size"] == bs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {bs}")
        for x, y, lr in pts:
            ax.annotate(f"{lr:.2g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="log2 ‖W_out‖ RMS→∞ (final)", ylabel="validation loss",
           title="loss vs output norm (labels: lr)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _list_of(kind):
    def parse(text: str):
        values = [kind(v) for v in text.split(",")]
        if not values or any(not v > 0 or not math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of numbers > 0, got {text}")
        return values
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m disco_kernels.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model shape (default proxy; tiny with --quick)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 300; 40 with --quick)")
    p.add_argument("--lr", type=_positive_float, default=2 ** -3, help="input/output lr; hidden gets lr/8")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per step (default 16; 8 with --quick)")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help="bytes per sequence (default 128; 64 with --quick)")
    p.add_argument("--out", default="disco_train_out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--monitor-every", type=_positive_int, default=10, help="steps between norm records")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, small corpus: a smoke run")
    p.add_argument("--sweep", action="store_true", help="grid of lr x batch size at a fixed token budget")
    p.add_argument("--sweep-lrs", type=_list_of(float), default=None,
                   help="comma-separated (default: --lr x 1/4 ... 4)")
    p.add_argument("--sweep-batch-sizes", type=_list_of(int), default=None,
                   help="comma-separated (default: --batch-size x 1/2, 1, 2)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "proxy")
    args.steps = args.steps or (40 if args.quick else 300)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.sweep_lrs = args.sweep_lrs or [args.lr * f for f in SWEEP_LR_FACTORS]
    args.sweep_batch_sizes = args.sweep_batch_sizes or [max(1, round(args.batch_size * f)) for f in SWEEP_BATCH_FACTORS]
    if args.seq_len > PRESETS[args.preset].max_seq_len:
        p.error(f"--seq-len {args.seq_len} exceeds the {args.preset} preset's "
                f"max_seq_len {PRESETS[args.preset].max_seq_len}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = _distributed(args.device)
    try:
        return _run(args, rank, world, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> int:
    if args.sweep and world > 1:
        raise SystemExit("--sweep runs in a single process; launch it without torchrun")
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = load_corpus(1 << 21 if args.quick else 1 << 24)
    common = dict(seq_len=args.seq_len, device=device, seed=args.seed, data=data, monitor_every=args.monitor_every)
    if args.sweep:
        return _sweep(args, out, common)
    run = train(args.preset, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                progress=not args.no_progress, rank=rank, world_size=world, **common)
    if rank == 0:
        write_csv(run["rows"], out / "train.csv")
        write_csv(run["norms"], out / "norms.csv")
        (out / "summary.json").write_text(json.dumps(run["summary"], indent=2))
        plot_run(run, out / "train.png")
        s = run["summary"]
        print(f"loss {s['first_loss']:.3f} -> {s['final_train_loss']:.3f} (mean of the last 10 steps; "
              f"val {s['val_loss']:.3f}); "
              f"log2 |W_out|_(RMS->inf) {s['log2_output_norm']:.2f}; {s['seconds_per_step'] * 1e3:.0f} ms/step, "
              f"monitor {100 * s['monitor_share']:.2f}% of step time; outputs in {out}")
    return 0


def _sweep(args, out: Path, common: dict) -> int:
    results = []
    tokens = args.steps * args.batch_size
    for bs in args.sweep_batch_sizes:
        for lr in args.sweep_lrs:
            run = train(args.preset, steps=max(1, tokens // bs), lr=lr, batch_size=bs, progress=False, **common)
            results.append(run["summary"])
            s = run["summary"]
            print(f"batch {bs:4d}  lr {s['lr']:.4g}  steps {s['steps']:5d}  val loss {s['val_loss']:.3f}  "
                  f"log2 |W_out| {s['log2_output_norm']:.2f}", flush=True)
    write_csv(results, out / "sweep.csv")
    plot_sweep(results, out / "sweep.png")
    best = min(results, key=lambda r: r["val_loss"])
    print(f"best: batch {best['batch_size']}, lr {best['lr']:.4g}, val loss {best['val_loss']:.3f} at log2 |W_out| "
          f"{best['log2_output_norm']:.2f}; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

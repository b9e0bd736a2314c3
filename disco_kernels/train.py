"""``python -m disco_kernels.train``: train a norm-everywhere LM with Scion and watch its output norm.

The corpus is the Python standard library's own source, read as bytes (offline on
every machine). Training follows the paper (arXiv 2510.03871): unconstrained Scion,
no momentum, constant lr, input : hidden : output lr = 1 : 1/8 : 1, the norms' init.
Writes into ``--out``: ``train.csv`` (step, tokens, lr, loss, output norm; a row per step as it
is done), ``norms.csv`` (NormMonitor records), ``summary.json`` and ``train.png``. Ctrl-C ends the
run early and still writes them, from the steps done (a sweep keeps its finished runs for --resume).

``--sweep`` trains the (lr, batch size) grid at each token budget of ``--sweep-tokens``
(steps = tokens / (batch size · seq len)) and writes ``sweep.csv`` (one row per run,
diverged runs included), ``sweep.png`` (validation loss against log2 ‖W_out‖_{RMS→∞},
one colour per budget) and ``sweep_summary.json`` (the optimum per budget, the spread of
the optimal norms, η* and B* exponents against D beside the paper's, and how well tuning
by norm does on the sweep). ``--resume`` skips the runs already in ``sweep.csv``. Its
defaults are sized per machine (``SWEEP_DEFAULTS``): on CPU the tiny model at 64-byte
sequences, 3 budgets x 5 lrs x 3 batch sizes in well under 30 minutes on 2 cores; on a
GPU the paper's proxy shape.

``--tune-by-norm`` trains at guessed lrs (``--tune-lrs``), fits log2 ‖W_out‖ against
log2 lr, trains at the lr predicted to end at ``--target-norm`` (``scaling.lr_for_norm``)
and writes ``tune.json`` beside that run's outputs.

Under torchrun (WORLD_SIZE > 1) the process group is initialised, the model is
wrapped in DDP, rank 0 writes the outputs, and Scion gets ``process_group="default"``
(each matrix orthogonalised once, on its owner rank).

    python -m disco_kernels.train --quick                 # seconds: a smoke run
    python -m disco_kernels.train                         # the paper's proxy shape, a few minutes on CPU
    python -m disco_kernels.train --sweep                 # the norm-transfer picture (CPU: ~15 minutes)
    python -m disco_kernels.train --tune-by-norm --target-norm results/norm_transfer/sweep_summary.json
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

from . import norms, scaling
from .models import PRESETS, NormEverywhereLM
from .norms import NormMonitor
from .optim import Scion
from .param_groups import assign, param_groups
from .scaling import OUTPUT_NORM_LOG2

SWEEP_LR_FACTORS = (1 / 4, 1 / 2, 1, 2, 4)  # default sweep grid, relative to --lr and --batch-size
SWEEP_BATCH_FACTORS = (1 / 2, 1, 2)
TUNE_LR_FACTORS = (1 / 2, 2)  # default --tune-lrs, relative to --lr

# Defaults per mode where a flag is not given. A plain run: the paper's proxy shape (--quick: the
# tiny model). A sweep (tokens = the budgets D): on CPU the tiny model (dim 32, 2 layers) at
# 64-byte sequences, so that 3 budgets x 5 lrs x 3 batch sizes take about 15 minutes on 2 cores
# (the lr grid 2^-3 ... 2^1 brackets its optimum); on a GPU the proxy shape (dim 256, 4 layers) at
# 256-byte sequences and 32x larger budgets.
# A run on a CPU takes 120 steps: on the 2-core AVX2 machine a proxy step takes ~1.7 s (the model's own
# forward and backward), and the main job (benchmark + demo) must stay under 10 minutes there.
RUN_DEFAULTS = {"quick": dict(preset="tiny", steps=40, batch_size=8, seq_len=64, lr=2 ** -3),
                "cpu": dict(preset="proxy", steps=120, batch_size=16, seq_len=128, lr=2 ** -3),
                "cuda": dict(preset="proxy", steps=300, batch_size=16, seq_len=128, lr=2 ** -3)}
SWEEP_DEFAULTS = {"quick": dict(RUN_DEFAULTS["quick"], tokens=(2 ** 13, 2 ** 14)),
                  "cpu": dict(preset="tiny", steps=256, batch_size=16, seq_len=64, lr=2 ** -1,
                              tokens=(2 ** 17, 2 ** 18, 2 ** 19)),
                  "cuda": dict(preset="proxy", steps=1024, batch_size=32, seq_len=256, lr=2 ** -3,
                               tokens=(2 ** 22, 2 ** 23, 2 ** 24))}
EVAL_WINDOWS = 256  # validation windows, the same for every run whatever its batch size


class Diverged(FloatingPointError):
    """A run went non-finite (its loss, or a gradient that Scion refused); ``step`` is where."""

    def __init__(self, step: int, what: str, lr: float):
        super().__init__(f"step {step}: {what} (lr {lr} too large?)")
        self.step = step


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
def evaluate(model, data, seq_len, device, windows: int = EVAL_WINDOWS, chunk: int = 32) -> float:
    """Mean loss on ``windows`` fixed windows of ``data`` (the same ones for every model), ``chunk`` at a time."""
    gen = torch.Generator().manual_seed(1234)
    was_training = model.training
    model.eval()
    sizes = [min(chunk, windows - i) for i in range(0, windows, chunk)]
    loss = sum(n * model(*get_batch(data, n, seq_len, gen, device)) for n in sizes).item() / windows
    model.train(was_training)
    return loss


@torch.no_grad()
def layer_log2_norms(model) -> dict[str, float]:
    """log2 of each weight's norm in the paper's geometry, exact: input l1_to_rms(Wᵀ), hidden
    rms_to_rms (fp64 SVD), output rms_to_inf; keyed "<param name>/<norm>"."""
    params = dict(model.named_parameters())
    out = {}
    for name, (role, kwargs) in assign(model).items():
        if role in norms.ROLE_NORM:
            key = norms.ROLE_NORM[role]
            value = getattr(norms, key)(norms.oriented(params[name].detach(), role, kwargs)).max()
            out[f"{name}/{key}"] = math.log2(value.item())
    return out


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


EXIT_INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C (SIGINT)


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
          rank: int = 0, world_size: int = 1, log=print, ns_dtype: str = "bfloat16",
          live_csv: Path | None = None) -> dict:
    """Train once; returns {"rows": per-step dicts, "norms": NormMonitor history, "summary": dict}.
    ``ns_dtype``: the hidden layers' Newton-Schulz iteration dtype. ``progress``: a tqdm bar (else a
    line every ``steps // 20`` steps). ``live_csv``: each step's row is appended there as it is done,
    and Ctrl-C ends the run early with what was done (``summary["interrupted"]``) instead of raising."""
    device = torch.device(device)
    data = load_corpus() if data is None else data
    split = data.numel() * 15 // 16
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = NormEverywhereLM(PRESETS[preset]).to(device)
    groups = param_groups(model, lr=lr, settings={"hidden": {"norm_kwargs": {"dtype": ns_dtype}}})
    opt = Scion(groups, lr=lr, momentum=1.0, unconstrained=True,
                process_group="default" if world_size > 1 else None)
    monitor = NormMonitor(model, opt, every=monitor_every)
    net = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    rows, bar, step_seconds = [], _progress(steps, progress and rank == 0), 0.0
    every_print = max(1, steps // 20)
    live = _LiveCSV(live_csv) if live_csv is not None and rank == 0 else None
    interrupted = False
    for step in range(1, steps + 1):
        if interrupted:
            break
        x, y = get_batch(train_data, batch_size, seq_len, gen, device)
        start = time.perf_counter()
        try:
            loss = net(x, y)
            loss.backward()
            opt.step()  # raises FloatingPointError on a non-finite gradient, changing nothing
            opt.zero_grad(set_to_none=True)
            loss = loss.item()  # waits for the device
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss}")
        except FloatingPointError as e:
            if bar is not None:
                bar.close()
            raise Diverged(step, str(e), lr) from e
        except KeyboardInterrupt:
            if live_csv is None or not rows:
                raise
            interrupted = True  # (this step's update may be half done: it is not recorded)
            log(f"interrupted: stopping after step {step - 1}; {live_csv} holds the steps done")
            break
        step_seconds += time.perf_counter() - start
        norm = monitor.latest.get("output/log2_rms_to_inf", math.nan)
        shown = "-" if math.isnan(norm) else f"{norm:.2f}"  # (no record yet)
        rows.append({"step": step, "tokens": step * batch_size * seq_len * world_size, "lr": lr, "loss": loss,
                     "log2_output_norm": norm, "seconds": step_seconds})
        if live is not None:
            live.write(rows[-1])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", tokens=f"{rows[-1]['tokens']:,}", log2_out=shown)
        elif rank == 0 and (step % every_print == 0 or step == steps):
            log(f"step {step}/{steps}  loss {loss:.3f}  lr {lr:.3g}  tokens {rows[-1]['tokens']}  "
                f"log2|W_out| {shown}")
    if bar is not None:
        bar.close()
    if live is not None:
        live.close()
    steps = len(rows)
    summary = {"preset": preset, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
               "interrupted": interrupted,
               "tokens": rows[-1]["tokens"], "device": str(device), "world_size": world_size,
               "first_loss": rows[0]["loss"], "final_train_loss": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
               "val_loss": evaluate(model, val_data, seq_len, device),
               "log2_output_norm": math.log2(monitor.output_norm()), "target_log2_output_norm": OUTPUT_NORM_LOG2,
               "seconds_per_step": step_seconds / steps,
               "monitor_share": monitor.seconds / step_seconds,
               "layer_log2_norms": layer_log2_norms(model)}
    return {"rows": rows, "norms": monitor.history, "summary": summary}


class _LiveCSV:
    """A CSV written a row at a time (flushed: a killed run keeps its rows)."""

    def __init__(self, path: Path):
        self.file, self.writer = open(path, "w", newline=""), None

    def write(self, row: dict) -> None:
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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


def plot_sweep(rows: list[dict], summary: dict, path: Path) -> None:
    """Validation loss against final log2 output norm (the paper's Figure 1): one colour per token
    budget, one marker per batch size, lines joining the lrs of a (budget, batch size); a star on
    each budget's best run; the band of those runs' norms and the paper's 2^7. Diverged runs are left
    out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    sizes = summary["sizes"]
    batches = sorted({r["batch_size"] for r in rows})
    colours = plt.cm.viridis([i / max(1, len(sizes) - 1) * 0.85 for i in range(len(sizes))])
    for s, colour in zip(sizes, colours):
        for B, marker in zip(batches, "os^Dvp<>h*"):
            pts = sorted((r["log2_output_norm"], r["val_loss"]) for r in rows
                         if r["tokens"] == s["tokens"] and r["batch_size"] == B and math.isfinite(r["val_loss"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=4, lw=1, color=colour, alpha=0.8)
        best = s["best"]
        ax.plot(best["log2_output_norm"], best["val_loss"], marker="*", ms=16, color=colour, mec="black",
                label=f"D = 2^{math.log2(s['tokens']):g}: best lr {best['lr']:.3g}, batch {best['batch_size']}")
    opt = [s["best"]["log2_output_norm"] for s in sizes]
    ax.axvspan(min(opt), max(opt), color="gray", alpha=0.2,
               label=f"best runs' norms (spread {max(opt) - min(opt):.2f})")
    ax.axvline(OUTPUT_NORM_LOG2, color="gray", ls="--", lw=1, label=f"paper's optimum {OUTPUT_NORM_LOG2:g}")
    for B, marker in zip(batches, "os^Dvp<>h*"):
        ax.plot([], [], marker=marker, color="gray", lw=0, label=f"batch {B}")
    finite = [r["val_loss"] for r in rows if math.isfinite(r["val_loss"])]
    worst_best = max(s["best"]["val_loss"] for s in sizes)
    ax.set_ylim(min(finite) - 0.02, min(max(finite), worst_best + 2 * (worst_best - min(finite)) + 0.1) + 0.02)
    ax.set(xlabel="final log2 ‖W_out‖ RMS→∞", ylabel="validation loss (nats/byte)",
           title="loss vs output norm per token budget D (lines: lr sweeps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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


def _token_budgets(text: str) -> list:
    """Comma-separated budgets: "2^18", "262144" or "1e6" are tokens (int); "2x" is that multiple of
    the base run's steps x batch size x seq len (kept as ("x", 2.0) until the base is known)."""
    budgets = []
    for item in text.split(","):
        try:
            if item.endswith("x"):
                budgets.append(("x", _positive_float(item[:-1])))
                continue
            base, _, exp = item.partition("^")
            value = float(base) ** float(exp) if exp else float(base)
        except (ValueError, OverflowError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"token budgets are like 2^18, 262144 or 2x, got {item}") from None
        if not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise argparse.ArgumentTypeError(f"a token budget must be a whole number >= 1, got {item}")
        budgets.append(int(value))
    return budgets


def _target_norm(text: str):
    """A log2 norm, or the path of a sweep_summary.json (its mean optimal log2 norm at lr*)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return json.loads(Path(text).read_text())["optimal_log2_output_norm"]["at_lr_opt"]["mean"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"not a number nor a readable sweep_summary.json: {text} ({e})") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m disco_kernels.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ns-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="Newton-Schulz iteration dtype (auto: bfloat16 on a GPU as the paper, float32 on a CPU, "
                        "where bf16 matmuls without native support run tens of times slower)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model shape (default proxy; tiny with --quick or a CPU sweep)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 300 on a GPU, 120 on a CPU; 40 with --quick)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="input/output lr; hidden gets lr/8 (default 2^-3; 2^-1 for a CPU sweep)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per step (default 16; 8 with --quick; 32 for a GPU sweep)")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help="bytes per sequence (default 128; 64 with --quick or a CPU sweep; 256 for a GPU sweep)")
    p.add_argument("--out", default="disco_train_out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--monitor-every", type=_positive_int, default=10, help="steps between norm records")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, small corpus: a smoke run")
    p.add_argument("--sweep", action="store_true", help="grid of lr x batch size at each token budget")
    p.add_argument("--sweep-tokens", type=_token_budgets, default=None,
                   help="comma-separated token budgets, e.g. 2^17,2^18,2^19 or 1x,2x,4x of --steps x --batch-size "
                        "x --seq-len (default: 2^17..2^19 on CPU, 2^22..2^24 on GPU)")
    p.add_argument("--sweep-lrs", type=_list_of(float), default=None,
                   help="comma-separated (default: --lr x 1/4 ... 4)")
    p.add_argument("--sweep-batch-sizes", type=_list_of(int), default=None,
                   help="comma-separated (default: --batch-size x 1/2, 1, 2)")
    p.add_argument("--resume", action="store_true", help="--sweep: keep the runs already in sweep.csv")
    p.add_argument("--tune-by-norm", action="store_true",
                   help="train at --tune-lrs, then at the lr predicted to end at --target-norm")
    p.add_argument("--tune-lrs", type=_list_of(float), default=None,
                   help="comma-separated guesses, one or more (default: --lr x 1/2, 2)")
    p.add_argument("--target-norm", type=_target_norm, default=OUTPUT_NORM_LOG2,
                   help="log2 output norm to aim at, or a sweep_summary.json (default: the paper's 7.0)")
    p.add_argument("--tune-slope", type=_positive_float, default=None,
                   help="slope of log2 norm vs log2 lr for a single guess (default: fitted; needs 2 guesses)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.sweep and args.tune_by_norm:
        p.error("--sweep and --tune-by-norm are separate modes")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    mode = "quick" if args.quick else args.device
    defaults = (SWEEP_DEFAULTS if args.sweep else RUN_DEFAULTS)[mode]
    for key in ("preset", "steps", "batch_size", "seq_len", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    base = args.steps * args.batch_size * args.seq_len
    tokens = args.sweep_tokens or defaults.get("tokens", (base,))
    args.sweep_tokens = [round(t[1] * base) if isinstance(t, tuple) else t for t in tokens]
    args.sweep_lrs = args.sweep_lrs or [args.lr * f for f in SWEEP_LR_FACTORS]
    args.sweep_batch_sizes = args.sweep_batch_sizes or [max(1, round(args.batch_size * f)) for f in SWEEP_BATCH_FACTORS]
    args.tune_lrs = args.tune_lrs or [args.lr * f for f in TUNE_LR_FACTORS]
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
    if (args.sweep or args.tune_by_norm) and world > 1:
        raise SystemExit("--sweep and --tune-by-norm run in a single process; launch them without torchrun")
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = load_corpus(1 << 21 if args.quick else 1 << 24)
    ns_dtype = args.ns_dtype if args.ns_dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    common = dict(seq_len=args.seq_len, device=device, seed=args.seed, data=data, monitor_every=args.monitor_every,
                  ns_dtype=ns_dtype)
    if args.sweep:
        return _sweep(args, out, common)
    tune = _tune(args, common) if args.tune_by_norm else None
    lr = tune["lr"] if tune else args.lr
    run = train(args.preset, steps=args.steps, lr=lr, batch_size=args.batch_size,
                progress=not args.no_progress, rank=rank, world_size=world, live_csv=out / "train.csv", **common)
    if rank == 0:
        write_csv(run["norms"], out / "norms.csv")
        (out / "summary.json").write_text(json.dumps(run["summary"], indent=2))
        plot_run(run, out / "train.png")
        s = run["summary"]
        print(("interrupted after %d steps: " % s["steps"] if s["interrupted"] else "") +
              f"loss {s['first_loss']:.3f} -> {s['final_train_loss']:.3f} (mean of the last 10 steps; "
              f"val {s['val_loss']:.3f}); "
              f"log2 |W_out|_(RMS->inf) {s['log2_output_norm']:.2f}; {s['seconds_per_step'] * 1e3:.0f} ms/step, "
              f"monitor {100 * s['monitor_share']:.2f}% of step time; outputs in {out}")
    if tune:
        tune["result"] = {k: s[k] for k in ("val_loss", "final_train_loss", "log2_output_norm")}
        (out / "tune.json").write_text(json.dumps(tune, indent=2))
        print(f"tuned lr {lr:.4g} aimed at log2 |W_out| {tune['target_log2_norm']:.2f}, "
              f"ended at {s['log2_output_norm']:.2f}; guesses: " +
              ", ".join(f"lr {g['lr']:.4g} -> {g['log2_output_norm']:.2f} (val {g['val_loss']:.3f})"
                        for g in tune["guesses"]))
    return EXIT_INTERRUPTED if run["summary"]["interrupted"] else 0


def _tune(args, common: dict) -> dict:
    """Train at each guessed lr (same steps and batch size as the final run) and predict, with
    ``scaling.lr_for_norm``, the lr whose run ends at ``--target-norm``."""
    guesses = []
    for lr in args.tune_lrs:
        s = train(args.preset, steps=args.steps, lr=lr, batch_size=args.batch_size, progress=False, **common)["summary"]
        guesses.append({"lr": lr, "log2_output_norm": s["log2_output_norm"], "val_loss": s["val_loss"]})
        print(f"guess lr {lr:.4g}: log2 |W_out| {s['log2_output_norm']:.2f}, val loss {s['val_loss']:.3f}", flush=True)
    lrs, log2_norms = [g["lr"] for g in guesses], [g["log2_output_norm"] for g in guesses]
    slope, intercept = scaling.norm_vs_lr_fit(lrs, log2_norms, slope=args.tune_slope)
    return {"target_log2_norm": args.target_norm, "guesses": guesses, "slope": slope, "intercept": intercept,
            "lr": scaling.lr_for_norm(lrs, log2_norms, args.target_norm, slope=args.tune_slope),
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "preset": args.preset}


# -- the sweep --------------------------------------------------------------------------------

SWEEP_KEY = ("preset", "seq_len", "seed", "tokens", "batch_size", "lr")  # what makes two rows the same run


def _parse_cell(text: str):
    """A CSV cell back to int, float (empty: NaN) or str."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return math.nan if text == "" else text


def read_sweep(path: Path) -> list[dict]:
    """The rows of a sweep.csv, cells parsed (missing values NaN)."""
    with open(path, newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def sweep_run(args, common: dict, tokens: int, batch_size: int, lr: float) -> dict:
    """One run of the grid as a sweep.csv row; a diverged run is a row with NaN results."""
    steps = max(1, round(tokens / (batch_size * args.seq_len)))
    row = {"preset": args.preset, "seq_len": args.seq_len, "seed": args.seed, "tokens": tokens,
           "batch_size": batch_size, "lr": lr, "steps": steps, "tokens_trained": steps * batch_size * args.seq_len}
    start = time.perf_counter()
    try:
        s = train(args.preset, steps=steps, lr=lr, batch_size=batch_size, progress=False, **common)["summary"]
    except Diverged as e:
        row.update(status=f"diverged at step {e.step}", final_train_loss=math.nan, val_loss=math.nan,
                   log2_output_norm=math.nan)
    else:
        row.update(status="ok", final_train_loss=s["final_train_loss"], val_loss=s["val_loss"],
                   log2_output_norm=s["log2_output_norm"])
        row.update({f"log2:{k}": v for k, v in s["layer_log2_norms"].items()})
    row["seconds"] = time.perf_counter() - start
    return row


def _sweep(args, out: Path, common: dict) -> int:
    """Run the grid (skipping, with --resume, runs already in sweep.csv), rewriting sweep.csv after
    every run; then write sweep_summary.json and sweep.png."""
    path = out / "sweep.csv"
    rows = read_sweep(path) if args.resume and path.exists() else []
    done = {tuple(r[k] for k in SWEEP_KEY) for r in rows}
    todo = [(D, B, lr) for D in args.sweep_tokens for B in args.sweep_batch_sizes for lr in args.sweep_lrs
            if (args.preset, args.seq_len, args.seed, D, B, lr) not in done]
    print(f"sweep: {len(todo)} runs to do ({len(rows)} already in {path}); {args.preset}, seq len {args.seq_len}",
          flush=True)
    steps = [max(1, round(D / (B * args.seq_len))) for D, B, _ in todo]
    bar = _progress(sum(steps), not args.no_progress and bool(todo))
    for (D, B, lr), n in zip(todo, steps):
        try:
            row = sweep_run(args, common, D, B, lr)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            print(f"interrupted: {len(rows)} runs in {path}; --resume goes on from there", flush=True)
            return EXIT_INTERRUPTED
        rows.append(row)
        write_csv(rows, path)
        line = (f"D {D}  batch {B}  lr {lr:.4g}  steps {n}  val loss {row['val_loss']:.3f}  "
                f"log2 |W_out| {row['log2_output_norm']:.2f}  {row['status']}")
        if bar is None:
            print(line, flush=True)
        else:
            bar.update(n)
            bar.write(line)
    if bar is not None:
        bar.close()
    mine = [r for r in rows if (r["preset"], r["seq_len"], r["seed"]) == (args.preset, args.seq_len, args.seed)]
    summary = scaling.summarize_sweep(mine)
    summary["tuning_by_norm"] = scaling.tuning_on_sweep(mine, summary)
    summary["setup"] = {"preset": args.preset, "seq_len": args.seq_len, "seed": args.seed,
                        "device": str(common["device"]), "runs": len(mine),
                        "seconds": sum(r["seconds"] for r in mine)}
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    plot_sweep(mine, summary, out / "sweep.png")
    for s in summary["sizes"]:
        b = s["best"]
        print(f"D {s['tokens']}: best lr {b['lr']:.4g}, batch {b['batch_size']}, val loss {b['val_loss']:.3f}, "
              f"log2 |W_out| {b['log2_output_norm']:.2f} (at lr* {s['log2_output_norm_at_lr_opt']:.2f})")
    o, e = summary["optimal_log2_output_norm"], summary["exponents"]
    b, a = o["best_runs"], o["at_lr_opt"]
    print(f"optimal log2 |W_out| across budgets: best runs {b['mean']:.2f} (spread {b['spread']:.2f}), "
          f"at lr* {a['mean']:.2f} (spread {a['spread']:.2f})")
    print("exponents vs D: "
          f"lr* {_fmt(e['lr_opt_vs_tokens']['fit'])} (paper {e['lr_opt_vs_tokens']['paper']}), "
          f"B* {_fmt(e['batch_opt_vs_tokens']['fit'])} (paper {e['batch_opt_vs_tokens']['paper']})")
    for t in summary["tuning_by_norm"]:
        two = t["two_runs"]
        print(f"tuning by norm at D {t['tokens']} (target {t['target_log2_norm']:.2f}): median loss regret "
              f"{_fmt(two['median_regret'], 3)} from two runs ({two['inside_grid']}/{two['trials']} inside the grid), "
              f"{_fmt(two['median_baseline_regret'], 3)} for the better of the two")
    print(f"outputs in {out}")
    return 0


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())

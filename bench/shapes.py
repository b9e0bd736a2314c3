"""Real transformer shapes, and Scion parameter lists built from them (no model code).

Weights are stored (d_out, d_in) as nn.Linear stores them. Param groups follow
the paper (DESIGN.md): embedding ColNorm(transpose=True), hidden Spectral,
output RowNorm(normalized=True), 1-D gains and biases BiasRMS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Model:
    name: str
    kind: str          # "gpt2" (fused qkv, biases, LayerNorm) or "llama" (GQA, SwiGLU, RMSNorm)
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    ctx: int = 0       # learned position embedding (GPT-2)
    gains: bool = True  # False: parameter-free norms (the paper's "norm everywhere")
    scaled_by: int = 1

    @property
    def head_dim(self) -> int:
        return max(1, self.d // self.heads)

    def scaled(self, div: int) -> "Model":
        """Widths, vocab and depth divided by ``div`` (for CPU runs); heads kept."""
        if div == 1:
            return self
        return replace(self, d=max(8, self.d // div), layers=max(1, self.layers // div), ffn=max(8, self.ffn // div),
                       vocab=max(8, self.vocab // div), ctx=self.ctx // div, scaled_by=self.scaled_by * div)

    @property
    def label(self) -> str:
        return self.name if self.scaled_by == 1 else f"{self.name}/{self.scaled_by}"

    def hidden(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, (d_out, d_in)) of one layer's hidden matrices."""
        d, f, hd = self.d, self.ffn, self.head_dim
        if self.kind == "gpt2":
            return [("attn.c_attn", (3 * d, d)), ("attn.c_proj", (d, d)), ("mlp.c_fc", (f, d)), ("mlp.c_proj", (d, f))]
        return [("attn.q", (self.heads * hd, d)), ("attn.k", (self.kv_heads * hd, d)),
                ("attn.v", (self.kv_heads * hd, d)), ("attn.o", (d, self.heads * hd)),
                ("mlp.gate", (f, d)), ("mlp.up", (f, d)), ("mlp.down", (d, f))]

    def matrices(self) -> list[tuple[str, tuple[int, ...]]]:
        """Newton-Schulz inputs: each distinct hidden shape, the query split per head
        (heads, head_dim, d), and the MLP input matrix stacked over all layers."""
        seen, out = set(), []
        for name, shape in self.hidden():
            if shape not in seen:
                seen.add(shape)
                out.append((name, shape))
        out.append(("attn.q per head", (self.heads, self.head_dim, self.d)))
        name, shape = self.hidden()[2 if self.kind == "gpt2" else 5]
        out.append((f"{name} x{self.layers} layers", (self.layers, *shape)))
        return out

    def groups(self) -> list[tuple[str, str, dict, list[tuple[str, tuple[int, ...]]]]]:
        """(group, norm, norm_kwargs, [(param name, shape)]) of the whole model, as the paper groups them."""
        d = self.d
        embed = [("embed", (self.vocab, d))] + ([("pos_embed", (self.ctx, d))] if self.ctx else [])
        hidden = [(f"h{i}.{n}", s) for i in range(self.layers) for n, s in self.hidden()]
        vectors = []
        if self.gains:
            per_layer = [("norm1", d), ("norm2", d)]
            if self.kind == "gpt2":
                per_layer += [("norm1.bias", d), ("norm2.bias", d), ("attn.c_attn.bias", 3 * d),
                              ("attn.c_proj.bias", d), ("mlp.c_fc.bias", self.ffn), ("mlp.c_proj.bias", d)]
            vectors = [(f"h{i}.{n}", (k,)) for i in range(self.layers) for n, k in per_layer] + [("norm_f", (d,))]
        groups = [("input", "ColNorm", {"transpose": True}, embed),
                  ("hidden", "Spectral", {}, hidden),
                  ("output", "RowNorm", {"normalized": True}, [("head", (self.vocab, d))])]
        if vectors:
            groups.append(("vectors", "BiasRMS", {}, vectors))
        return groups

    def n_params(self) -> int:
        return sum(math.prod(s) for *_, params in self.groups() for _, s in params)


GPT2_124M = Model("gpt2-124m", "gpt2", d=768, layers=12, heads=12, kv_heads=12, ffn=3072, vocab=50257, ctx=1024)
# The paper's proxy: Llama-3 style, 4 layers, width 256, Llama-3 vocabulary, parameter-free norms (69.8M params).
PROXY = Model("proxy-4x256", "llama", d=256, layers=4, heads=4, kv_heads=4, ffn=1024, vocab=128256, gains=False)
LLAMA3_1B = Model("llama3-1b", "llama", d=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256)
LLAMA3_8B = Model("llama3-8b", "llama", d=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256)

OP_MODELS = (GPT2_124M, LLAMA3_1B, LLAMA3_8B)      # op benchmarks: layer shapes
STEP_MODELS = (GPT2_124M, PROXY, LLAMA3_1B)         # whole optimizer step

# Divisors of widths, vocab and depth per preset on CPU (GPU presets use real shapes);
# the smoke preset runs only the models it lists.
CPU_SCALE = {
    "smoke": {"gpt2-124m": 24, "proxy-4x256": 8},
    "quick": {"gpt2-124m": 4, "proxy-4x256": 4, "llama3-1b": 8, "llama3-8b": 16},
    "full": {"llama3-1b": 2, "llama3-8b": 4},  # fits 24 GB of RAM
}


def for_preset(models, preset: str, device: torch.device) -> list[Model]:
    """``models`` scaled down as the preset asks on CPU."""
    if preset == "smoke":
        return [m.scaled(CPU_SCALE[preset][m.name]) for m in models if m.name in CPU_SCALE[preset]]
    if device.type == "cuda":
        return list(models)
    return [m.scaled(CPU_SCALE[preset].get(m.name, 1)) for m in models]


def ns_sweep(preset: str, device: torch.device) -> list[int]:
    """Sizes n of the (n, 4n) Newton-Schulz sweep behind the time-vs-size plot."""
    if device.type == "cuda" and preset != "smoke":
        return [256, 512, 1024, 2048, 4096] + ([8192] if preset == "full" else [])
    return {"smoke": [16, 32], "quick": [64, 128, 256], "full": [128, 256, 512, 1024, 2048]}[preset]


def ns_aspects(preset: str, device: torch.device) -> list[tuple[int, int]]:
    """(m, r) of the aspect sweep: (m, r m) matrices at r = 1, 2, 4, 8, where the Gram form's gain shows
    (on a CPU --quick takes one m, to stay within its time)."""
    if device.type == "cuda" and preset != "smoke":
        sizes = [256, 512, 1024, 2048, 4096] if preset == "full" else [256, 1024, 4096]
    else:
        sizes = {"smoke": [16], "quick": [128], "full": [64, 128, 256, 512]}[preset]
    return [(m, r) for m in sizes for r in (1, 2, 4, 8)]


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> float:
    """FLOPs of plain Newton-Schulz, the count TFLOP/s is reported in for every implementation:
    per step 2 m² n (A = X Xᵀ) + 2 m³ (A A) + 2 m² n (B X) with m <= n, times the batch."""
    *batch, a, b = shape
    m, n = min(a, b), max(a, b)
    return math.prod(batch) * steps * (4 * m * m * n + 2 * m ** 3)


def ns_floor_flops(shape: tuple[int, ...], steps: int = 5) -> float:
    """FLOP floor of Newton-Schulz (the share-of-peak floor): X Xᵀ and A A are symmetric, so a kernel
    that computes one triangle (our Triton one) needs only m² n + m³ for them: 3 m² n + m³ per step."""
    *batch, a, b = shape
    m, n = min(a, b), max(a, b)
    return math.prod(batch) * steps * (3 * m * m * n + m ** 3)


def update_bytes(numel: int, itemsize: int, momentum: float) -> int:
    """Bytes of one Scion update read + written once: p, g (and buf) in; p (and buf) out."""
    return (5 if momentum != 1 else 3) * numel * itemsize


NS_DTYPE = torch.bfloat16  # the dtype Spectral's Newton-Schulz iterates in unless norm_kwargs name one


def iteration_dtype(norm_kwargs: dict) -> torch.dtype:
    """The dtype a Spectral group with ``norm_kwargs`` iterates Newton-Schulz in (its "dtype", default bf16)."""
    name = norm_kwargs.get("dtype")
    return NS_DTYPE if name is None else name if isinstance(name, torch.dtype) else getattr(torch, name)


def ns_bytes(shape: tuple[int, ...], itemsize: int, steps: int = 5) -> int:
    """Least bytes Newton-Schulz's own iteration moves for a (b, m, n) or (m, n) input: per step it reads
    X and writes X once, in the iteration dtype (``itemsize`` bytes): 2 · steps · b·m·n · itemsize.
    Not counted (a floor): the m x m intermediates X Xᵀ and A A (m <= n; they stay on chip where m is
    small), the read of G for its norm and the write of X₀ = G / ‖G‖ (fused into the first step), and
    the read of the last X by the update (fused into the last step)."""
    return 2 * steps * math.prod(shape) * itemsize


def step_bytes(groups, itemsize: int, momentum: float) -> int:
    """Floor of the bytes one Scion step moves over ``groups`` ([(group, norm, norm_kwargs, [(name,
    shape)])], as Model.groups() gives them), params and grads of ``itemsize`` bytes:
    every param's update read + written once (``update_bytes``: read g, read + write p, and read + write
    the momentum buffer when momentum != 1), plus for each Spectral param Newton-Schulz's own traffic
    (``ns_bytes``, in the group's iteration dtype and steps). Line norms (ColNorm, RowNorm, Sign,
    BiasRMS) are counted as one fused pass: their line norms are reduced on chip."""
    numel = ns = 0
    for _, norm, kwargs, shapes in groups:
        for _, shape in shapes:
            numel += math.prod(shape)
            if norm == "Spectral":
                ns += ns_bytes(shape, iteration_dtype(kwargs).itemsize, kwargs.get("steps", 5))
    return update_bytes(numel, itemsize, momentum) + ns


def make_groups(model: Model, dtype, device, generator, ns_dtype: torch.dtype = NS_DTYPE) -> list[dict]:
    """Param groups of ``model`` with random params and grads (the keys dk.Scion and the reference loop
    take); Spectral's Newton-Schulz iterates in ``ns_dtype`` (its default, bf16, unless given)."""
    groups = []
    for _, norm, kwargs, shapes in model.groups():
        if norm == "Spectral" and ns_dtype != NS_DTYPE:
            kwargs = {**kwargs, "dtype": str(ns_dtype).removeprefix("torch.")}
        params = []
        for _, shape in shapes:
            p = torch.randn(shape, generator=generator, device=device).to(dtype)
            p.grad = torch.randn(shape, generator=generator, device=device).to(dtype)
            params.append(p)
        groups.append({"params": params, "norm": norm, "norm_kwargs": dict(kwargs), "scale": 1.0})
    return groups

"""The device under test: its name, software versions and peak compute / bandwidth.

GPU peaks come from the vendors' datasheets (table below); on a CPU, or a GPU
not in the table, the roofline is measured: the best of a few large torch.mm per
dtype, and the best of a copy and an in-place negation of a buffer the size of
the working sets benchmarked (64 MiB on a CPU, 1 GiB on a GPU), bytes read +
written. Small CPU cases that stay in cache can beat that memory roof.
"""
from __future__ import annotations

import datetime
import platform
import re
import time
from dataclasses import dataclass, field

import torch

# (name pattern, label, {dtype: dense TFLOP/s}, HBM GB/s). bf16 and fp16 are the
# dense tensor-core rate (the datasheets print it with sparsity: halved here);
# fp32 is the non-tensor-core rate that torch uses by default (TF32 off) and our
# Triton kernels use for fp32 (input_precision="ieee").
# A100: NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/content/dam/en-zz/Solutions/
#   Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
#   BF16 312 TFLOPS, FP32 19.5 TFLOPS; 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
# H100: NVIDIA H100 Tensor Core GPU datasheet (resources.nvidia.com/en-us-tensor-core/
#   nvidia-tensor-core-gpu-datasheet): SXM BF16 1,979 TFLOPS sparse, FP32 67 TFLOPS, 3.35 TB/s;
#   PCIe 1,513 sparse, FP32 51, 2 TB/s; NVL 1,671 sparse, FP32 60, 3.9 TB/s.
# H200: NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/):
#   SXM BF16 1,979 TFLOPS sparse, FP32 67 TFLOPS, 4.8 TB/s; NVL 1,671 sparse, FP32 60, 4.8 TB/s.
# Patterns start at a word boundary: "NVIDIA GH200 480GB" (other memory) is no H200 and gets measured.
GPU_PEAKS = (
    (r"\bH200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}, 4800.0),
    (r"\bH200", "H200 SXM", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}, 4800.0),
    (r"\bH100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}, 3900.0),
    (r"\bH100 PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}, 2000.0),
    (r"\bH100", "H100 SXM", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}, 3350.0),
    (r"\bA100.*80GB.*PCIe|\bA100.*PCIe.*80GB", "A100 80GB PCIe", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
     1935.0),
    (r"\bA100.*80GB", "A100 80GB SXM", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0),
    (r"\bA100", "A100 40GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 1555.0),
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def table_peaks(name: str):
    """(label, {dtype: TFLOP/s}, GB/s) of the first GPU_PEAKS entry matching ``name``, else None."""
    for pattern, label, flops, gbps in GPU_PEAKS:
        if re.search(pattern, name):
            return label, flops, gbps
    return None


@dataclass
class Device:
    """What runs the benchmark, and the peaks its results are measured against."""
    torch_device: torch.device
    name: str
    peak_source: str                                  # "datasheet: <label>" or "measured"
    peak_tflops: dict[str, float] = field(default_factory=dict)
    peak_gbps: float = 0.0

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def slug(self) -> str:
        """Short file-system name: 'h100-sxm', 'cpu'..."""
        base = self.peak_source.split(": ", 1)[1] if self.peak_source.startswith("datasheet") else (
            self.name if self.is_cuda else "cpu")
        return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s for math in ``dtype`` (measured lazily for dtypes not in the table)."""
        key = dtype_name(dtype)
        if key not in self.peak_tflops:
            self.peak_tflops[key] = measure_matmul_tflops(self.torch_device, dtype)
        return self.peak_tflops[key] * 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, reps: int = 7) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, run_budget: float = 0.25) -> float:
    """Achieved TFLOP/s (2 n³ flops) of a large square torch.mm, the compute roof where no datasheet applies:
    n is doubled from 256 up to 4096 (GPU) or 2048 (CPU) while the next size's run (8x the flops) is
    predicted to take at most ``run_budget`` seconds, so that a dtype the CPU only emulates (bf16 without
    AVX-512 BF16 or AMX runs ~25x slower than fp32 there) is measured in about a second, not minutes."""
    n_max = 4096 if device.type == "cuda" else 2048

    def mm(n):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return lambda: torch.mm(a, b)

    n = 256
    while n < n_max and 8 * _best_time(mm(n), device, reps=1) <= run_budget:
        n *= 2
    return 2 * n ** 3 / _best_time(mm(n), device) / 1e12


def measure_stream_gbps(device: torch.device) -> float:
    """Achieved GB/s, bytes read + written, of the faster of a copy and an in-place negation (the
    access pattern of the in-place updates: no write-allocate reads); the memory roof."""
    n = (1 << 30 if device.type == "cuda" else 64 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = min(_best_time(lambda: dst.copy_(src), device), _best_time(src.neg_, device))
    return 2 * src.nbytes / best / 1e9


def detect(device: str | torch.device | None = None) -> Device:
    """The device to benchmark (CUDA when present) with its peaks: datasheet or measured."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        known = table_peaks(name)
        if known is not None:
            label, flops, gbps = known
            return Device(dev, name, f"datasheet: {label}", dict(flops), gbps)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        name = f"{name} ({torch.get_num_threads()} threads)"
    return Device(dev, name, "measured", {"fp32": measure_matmul_tflops(dev, torch.float32)}, measure_stream_gbps(dev))


def environment(device: Device) -> dict:
    """Versions and device facts recorded with every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or broken
        triton_version = None
    import disco_kernels
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "disco_kernels": disco_kernels.__version__,
        "backends": disco_kernels.available_backends(device.torch_device),
        "device": device.name,
        "device_type": device.torch_device.type,
        "peak_source": device.peak_source,
        "peak_tflops": dict(device.peak_tflops),
        "peak_gbps": device.peak_gbps,
    }

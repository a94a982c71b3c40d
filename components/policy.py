"""How training uses its device: the autocast dtype, the memory format, cuDNN's autotuner (with
fixed batch shapes) and the fused AdamW step.

Each is a `train.*` key. `auto` resolves here, from the model's family (`model.family`), the
image size and the device, by rules taken from measurements on one NVIDIA H100 (224 px batch 128
and 64 px batch 32; README, "Training on a GPU"). An explicit value always wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import TrainConfig
from .errors import VisiontuneError

SMALL_IMAGES = 128  # px: below it, a depthwise CNN's many tiny kernels run fastest in fp32 NCHW on CUDA


@dataclass(frozen=True)
class DevicePolicy:
    precision: str  # "bf16" | "fp16" | "fp32": the autocast dtype of forward passes
    memory_format: str  # "channels_last" | "contiguous"
    cudnn_benchmark: bool  # cuDNN autotuning; training then keeps every batch the same shape
    fused_optimizer: bool  # AdamW's fused CUDA kernel
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(
    cfg: TrainConfig, family: str, size: int, device: str, bf16_supported: bool = True
) -> DevicePolicy:
    """The policy for this model family ('cnn', 'depthwise', 'transformer'), image size and device
    type ('cuda', 'cpu', 'mps'): cfg's explicit values, and the measured rule where it says auto."""
    cuda = device == "cuda"
    small_depthwise = cuda and family == "depthwise" and size < SMALL_IMAGES
    why: list[str] = []

    precision = cfg.precision
    if precision == "auto":
        if not cuda:
            precision, note = "fp32", "fp32 off CUDA"
        elif small_depthwise:
            precision, note = (
                "fp32",
                f"fp32 (a depthwise CNN under {SMALL_IMAGES} px: faster than bf16 there)",
            )
        elif bf16_supported:
            precision, note = "bf16", "bf16 autocast"
        else:
            precision, note = "fp16", "fp16 autocast with loss scaling (this GPU has no bf16)"
        why.append(note)
    elif precision == "fp16" and not cuda:
        raise VisiontuneError(
            f"train.precision: fp16 needs a CUDA device (training runs on {device}); use auto, fp32 or bf16"
        )

    memory_format = cfg.memory_format
    if memory_format == "auto":
        if family == "transformer":
            memory_format, note = "contiguous", "contiguous (a transformer: no convolutions to reorder)"
        elif small_depthwise:
            memory_format, note = "contiguous", "contiguous (NCHW)"
        else:
            memory_format, note = "channels_last", "channels-last"
        why.append(note)

    benchmark = cfg.cudnn_benchmark
    if benchmark == "auto":
        benchmark = cuda and not cfg.deterministic
        if benchmark:
            why.append("cudnn.benchmark with fixed batch shapes")
    elif benchmark and not cuda:
        benchmark = False  # nothing to tune without cuDNN

    fused = cfg.fused_optimizer
    if fused == "auto":
        fused = cuda
        if fused:
            why.append("fused AdamW")
    elif fused and not cuda:
        raise VisiontuneError(
            f"train.fused_optimizer: the fused AdamW kernel needs CUDA (training runs on {device}); use auto"
        )

    reason = f"{device}, {family} at {size} px" + (f": {', '.join(why)}" if why else ": as set in train.*")
    return DevicePolicy(precision, memory_format, bool(benchmark), bool(fused), reason)

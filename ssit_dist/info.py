"""`ssit-dist info`: the environment in one screen, for bug reports."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

PACKAGES = (
    "ssit-dist",
    "torch",
    "torchvision",
    "deepspeed",
    "timm",
    "accelerate",
    "webdataset",
    "opencv-contrib-python-headless",
    "numpy",
    "safetensors",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, Any]:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return {
        "model": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        # What a training run can use in mixed precision on this CPU.
        "bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "fp16": "avx512_fp16" in flags or "amx_fp16" in flags,
    }


def cpu_runs_natively(dtype: Any) -> bool:
    """Whether this CPU has instructions for `dtype` (torch.bfloat16 / torch.float16) matmuls; without
    them torch emulates the type, several times slower than fp32."""
    import torch

    if dtype is torch.float32:
        return True
    cpu = _cpu()
    return bool(cpu["bf16"] if dtype is torch.bfloat16 else cpu["fp16"] if dtype is torch.float16 else False)


def _cuda() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    return devices


def _built_ops(names: list[str]) -> set[str]:
    """Ops that DeepSpeed already JIT-compiled into TORCH_EXTENSIONS_DIR."""
    # Importing cpp_extension warns that there is no CUDA runtime on CPU machines; that is expected.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import _get_build_directory

    base = Path(_get_build_directory("x", verbose=False)).parent
    return {n for n in names if any(base.glob(f"{n}/{n}*.so"))}


def _deepspeed() -> dict[str, Any]:
    # DeepSpeed logs at WARNING when it falls back to the CPU accelerator; that is expected here.
    # DeepSpeed logs to stdout from import on; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.ERROR)
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    from ssit_dist.runtime import use_versioned_extensions_dir

    extensions = use_versioned_extensions_dir(os.environ)  # the folder a trainer started from here builds into
    accelerator = get_accelerator()
    ops = {}
    for name, builder in ALL_OPS.items():
        if name == "deepspeed_not_implemented":
            continue
        try:
            compatible = bool(builder.is_compatible(verbose=False))
        except Exception:  # a broken toolchain makes some builders raise; report, never crash
            compatible = False
        ops[name] = {"compatible": compatible, "prebuilt": bool(installed_ops.get(name, False))}
    for name in _built_ops(list(ops)):
        ops[name]["jit_built"] = True
    return {
        "accelerator": accelerator.device_name(),
        "communication_backend": accelerator.communication_backend_name(),
        "torch_extensions_dir": extensions,
        "ops": ops,
    }


def collect() -> dict[str, Any]:
    """Everything `ssit-dist info` shows, as plain data."""
    import cv2

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "opencv": {"version": cv2.__version__, "saliency": hasattr(cv2, "saliency")},
        "cuda": _cuda(),
        "cpu": _cpu(),
        "deepspeed": _deepspeed(),
    }

"""Where a site's tensors compute (`engine.device`) and in what precision (`train.precision`).

The corpus stays memory-mapped on the host; a site's model lives on its device and each batch
is copied there (from pinned memory on CUDA, so the copy overlaps the previous step). Model
arrays always travel as host numpy buffers (federated/core/arrays.py moves them off the device),
so aggregation and the wire format do not depend on where a site trained.

Mixed precision is PyTorch's autocast: the weights and the optimiser stay fp32, matmuls run in
bf16 or fp16. fp16's narrow range needs loss scaling (torch.amp.GradScaler); bf16 has fp32's
range and needs none.

Resolution happens where the tensors are: a coordinator's config may say `cuda` and the
coordinator itself have no GPU; each site resolves the setting on its own machine (`auto`
picks what that machine has).
"""

from __future__ import annotations

import contextlib

import torch

from federated.core.config.schema import DEVICE_CHOICES, PRECISION_NAMES, valid_device_spec

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16), strict=True))


class DeviceError(ValueError):
    """`engine.device` names a device this machine does not have."""


def resolve_device(spec: str) -> torch.device:
    """The torch device `engine.device` means on this machine; auto is CUDA when present, else CPU."""
    if not valid_device_spec(spec):
        raise DeviceError(f"engine.device must be one of: {DEVICE_CHOICES} (got {spec!r})")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"engine.device={spec}: this machine has no CUDA device (use cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"engine.device={spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"engine.device={spec}: this machine has no Apple MPS device (use cpu or auto)")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (a model is never split across devices here)."""
    return next(model.parameters()).device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Autocast to the precision's dtype on the device; nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (None for fp32 and bf16, whose range needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device: a no-op on CPU; on CUDA copied from pinned memory without
    blocking the host (PyTorch's caching host allocator keeps the pinned copy alive until the
    transfer is done)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

"""What test-time adaptation (`ood.adapt`) may change in a model, and whether a model has any.

TENT updates the affine parameters (scale, shift) of the normalisation layers; bn_stats re-estimates
BatchNorm's running statistics. Here, below both the sites (clients/test_time.py, which adapts) and
the server (federated/server/preflight.py, which refuses a run whose model has nothing to adapt),
so both read one definition.
"""

from __future__ import annotations

from torch import nn

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class NothingToAdaptError(ValueError):
    """The model has no parameters or statistics the chosen adaptation changes."""


def norm_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The scale and shift of every normalisation layer: what TENT updates."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for name, p in module.named_parameters(recurse=False):
                out.append((f"{prefix}.{name}" if prefix else name, p))
    return out


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers: the only ones with running statistics for bn_stats to re-estimate."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_adaptable(model: nn.Module, method: str) -> None:
    """Refuse, with the reason, a method that would change nothing in this model."""
    if method == "tent" and not norm_affine_parameters(model):
        raise NothingToAdaptError(
            "ood.adapt=tent: the model has no normalisation layer with affine parameters "
            "(LayerNorm, GroupNorm or BatchNorm with elementwise_affine/affine) for TENT to update"
        )
    if method == "bn_stats" and not any(m.track_running_stats for m in batch_norms(model)):
        raise NothingToAdaptError(
            "ood.adapt=bn_stats: the model has no BatchNorm layer with running statistics; its "
            "LayerNorm/GroupNorm layers normalise each sample by its own statistics, so there is nothing "
            "to re-estimate (use ood.adapt=tent)"
        )

"""ResNet18Encoder: shapes, stems, parameter count, and that Opacus can take per-sample gradients."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.validators import ModuleValidator
from opacus.validators.errors import ShouldReplaceModuleError, UnsupportedModuleError
from torch import nn

from federated.core.models.resnet import ResNet18Encoder, resnet18_trunk


def _encoder(channels: int, dim: int, k: int, size: int, seed: int = 0) -> ResNet18Encoder:
    torch.manual_seed(seed)
    return ResNet18Encoder(channels, dim, k, (size, size))


@pytest.mark.parametrize(
    ("channels", "size", "grid"),
    # 32 and 64 px: CIFAR stem, /8 over three strided stages; 128 px: ImageNet stem, /32 in all
    [(1, 32, 4), (3, 32, 4), (1, 64, 8), (3, 64, 8), (1, 128, 4), (3, 128, 4)],
)
def test_forward_shapes_and_stem(channels: int, size: int, grid: int) -> None:
    enc = _encoder(channels, dim=24, k=4, size=size).eval()
    x = torch.randn(1, channels, size, size)  # one sample keeps the 64 px case cheap on 2 cores
    with torch.no_grad():
        assert enc.trunk(x).shape == (1, 512, grid, grid)
        tokens, extra = enc(x)
    assert tokens.shape == (1, 4, 24)
    assert tokens.dtype == torch.float32
    assert extra is None


def test_four_channels_smallest_and_non_square_images() -> None:
    enc = _encoder(4, dim=8, k=9, size=16).eval()
    with torch.no_grad():
        assert enc.trunk(torch.randn(1, 4, 16, 16)).shape == (1, 512, 2, 2)
        assert enc(torch.randn(1, 4, 16, 16))[0].shape == (1, 9, 8)
        wide = ResNet18Encoder(4, 8, 1, (16, 40)).eval()
        assert wide(torch.randn(1, 4, 16, 40))[0].shape == (1, 1, 8)


@pytest.mark.parametrize("k", [0, 2, 3, 8])
def test_non_square_k_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match=f"k={k}"):
        ResNet18Encoder(3, 16, k, (32, 32))


def test_too_small_or_malformed_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="16 px"):
        ResNet18Encoder(3, 16, 4, (12, 32))
    with pytest.raises(ValueError, match="height, width"):
        ResNet18Encoder(3, 16, 4, (3, 32, 32))


def test_tokens_are_a_linear_pooling_of_one_feature_map() -> None:
    """The 2x2 grid's four tokens average to the single token of a global pool (projection is affine)."""
    enc = _encoder(1, dim=8, k=4, size=16).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        grid = enc(x)[0]
        enc.pool = nn.AdaptiveAvgPool2d(1)
        whole = enc(x)[0]
    assert torch.allclose(grid.mean(1, keepdim=True), whole, atol=1e-5)


def test_a_sample_does_not_depend_on_its_batch() -> None:
    """GroupNorm normalises each sample alone: the property per-sample clipping relies on."""
    enc = _encoder(1, dim=8, k=4, size=16)  # train mode, where BatchNorm would use batch statistics
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        together = enc(x)[0]
        alone = torch.cat([enc(x[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_parameter_count() -> None:
    """Hand count: torchvision's resnet18 has 11,689,512 parameters, its fc 512*1000 + 1000 and its
    3-channel 7x7 stem 64*3*49; GroupNorm has the same 2*C affine parameters as BatchNorm. Here:
    a 1-channel 3x3 stem (64*1*9) and a 512 -> 64 projection (512*64 + 64)."""
    trunk_without_stem = 11_689_512 - (512 * 1000 + 1000) - 64 * 3 * 49
    expected = trunk_without_stem + 64 * 1 * 9 + (512 * 64 + 64)
    assert expected == 11_200_512
    enc = _encoder(1, dim=64, k=4, size=32)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == expected


def test_opacus_validator_accepts_it() -> None:
    enc = _encoder(1, dim=16, k=4, size=32).train()
    assert ModuleValidator.validate(enc, strict=True) == []


def test_opacus_validator_refuses_the_batchnorm_original() -> None:
    """Same layout with torchvision's default norm: every BatchNorm (stem 1, blocks 16, shortcuts 3)
    is refused, which is why the encoder uses GroupNorm."""
    bn = resnet18_trunk(3, small_stem=False, norm=nn.BatchNorm2d).train()
    errors = ModuleValidator.validate(bn, strict=False)
    assert len(errors) == 20
    assert all(isinstance(e, ShouldReplaceModuleError) for e in errors)
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(bn, strict=True)


# hooks mode warns that no input requires a gradient: true, and harmless (inputs are data)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_per_sample_gradients_sum_to_the_batch_gradient(mode: str) -> None:
    enc = _encoder(1, dim=8, k=4, size=16).train()
    x = torch.randn(3, 1, 16, 16)
    weights = torch.randn(3, 4, 8)  # a loss that is a sum of one term per sample

    def loss_of(module: nn.Module) -> torch.Tensor:
        return (module(x)[0] * weights).sum()

    loss_of(enc).backward()
    expected = {name: p.grad.clone() for name, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)

    gsm: nn.Module = (
        GradSampleModule(enc, batch_first=True, loss_reduction="sum")
        if mode == "hooks"
        else GradSampleModuleExpandedWeights(enc, batch_first=True, loss_reduction="sum")
    )
    loss_of(gsm).backward()
    params = [(name, p) for name, p in enc.named_parameters() if p.requires_grad]
    assert len(params) == len(expected) > 60  # every conv, norm and the projection
    for name, p in params:
        per_sample = getattr(p, "grad_sample", None)  # set by Opacus, unknown to torch's stubs
        assert per_sample is not None, name
        assert per_sample.shape == (3, *p.shape), name
        assert torch.allclose(per_sample.sum(0), expected[name], rtol=1e-5, atol=1e-5), name

"""Model architectures by name (`model.name`): which encoder each kind of input gets.

Every architecture builds its encoders for the shapes the corpus's schema declares (any image
size and channel count, any signal length and channel count, any sequence length and
vocabulary, any vector width); fusion and the per-task heads are shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from federated.core.config.schema import ModelConfig
from federated.core.corpus_schema import Modality
from federated.core.models.encoders import ImageEncoder, SignalEncoder, TokenEncoder, VectorEncoder
from federated.core.models.resnet import ResNet18Encoder
from federated.core.registry import Registry
from federated.core.targets import IMAGE, SIGNAL, TOKENS, VECTOR

EncoderBuilder = Callable[[Modality, ModelConfig], nn.Module]


@dataclass(frozen=True)
class Architecture:
    description: str
    encoders: Mapping[str, EncoderBuilder]  # input kind -> builder


ARCHITECTURES: Registry[Architecture] = Registry("model")

_SMALL: dict[str, EncoderBuilder] = {
    IMAGE: lambda m, cfg: ImageEncoder(m.shape[0], cfg.dim, cfg.tokens_per_modality),
    SIGNAL: lambda m, cfg: SignalEncoder(m.shape[0], cfg.dim, cfg.tokens_per_modality),
    TOKENS: lambda m, cfg: TokenEncoder(m.vocab_size, m.shape[0], cfg.dim, cfg.tokens_per_modality),
    VECTOR: lambda m, cfg: VectorEncoder(m.shape[0], cfg.dim, cfg.tokens_per_modality),
}

ARCHITECTURES.add(
    "default",
    Architecture("small CPU-friendly encoders per kind (3 strided convolutions for images)", _SMALL),
)
ARCHITECTURES.add(
    "resnet18",
    Architecture(
        "ResNet-18 (torchvision's layout, GroupNorm; resnet.py) for images; the default encoders for other kinds",
        {**_SMALL, IMAGE: lambda m, cfg: ResNet18Encoder(m.shape[0], cfg.dim, cfg.tokens_per_modality, m.shape[1:])},
    ),
)


def build_encoder(modality: Modality, cfg: ModelConfig) -> nn.Module:
    """The encoder `cfg.name`'s architecture gives this modality's kind, at its declared shape."""
    return ARCHITECTURES.get(cfg.name).encoders[modality.kind](modality, cfg)

"""Per-site acquisition: how each origin site's scanners, amplifiers and habits shift its data.

Every site draws standard-normal "personality" variables once from `rng_for(seed, "site",
site)`; each physical parameter is a fixed function of `origin_shift_severity * z`, so severity 0
gives every site the identity acquisition and larger severities scale the same directions
up. The draws do not depend on the severity, so corpora that differ only in severity have
the same sites, just more or less shifted. The shift is per *modality*, not per task: the
X-ray tasks of one site share that site's X-ray machine.

Images: blur, a multiplicative illumination/bias field, contrast, brightness, per-channel
(stain) gain and offset, and sensor noise level. EEG: amplifier gain, per-electrode gain,
white noise, mains interference at 50 or 60 Hz. scRNA: gene-wise log-scale batch effects and
library size. Text: synonym preferences, filler-word distribution and verbosity. Sequences:
background GC content (genomic) and residue background (protein). Tabular: per-feature
offset and scale (unit and calibration differences).

Images, EEG and tabular shifts are post-hoc transforms (`apply`); the others act while the
sample is generated, so the generators in expression.py, text.py and sequences.py read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from federated.core.multimed import IMAGE, MULTIMED
from federated.data.synthetic import vocabulary
from federated.data.synthetic.basis import CENTER, SIZE, coordinates
from federated.data.synthetic.seeding import rng_for

IMAGE_MODALITIES: tuple[str, ...] = tuple(m for m in MULTIMED.modalities if MULTIMED.modality(m).kind == IMAGE)
EEG_FS = 128.0  # Hz: the 128 samples of an EEG trial are one second


@dataclass(frozen=True)
class ImageAcquisition:
    contrast: float
    brightness: float
    noise_factor: float  # multiplies the modality's base sensor noise
    blur: float  # in [0, 1): weight of a 3x3 binomial blur
    bias_field: np.ndarray  # [32, 32], multiplicative, 1 = none
    channel_gain: np.ndarray  # [C]
    channel_offset: np.ndarray  # [C]

    def apply(self, clean: np.ndarray, rng: np.random.Generator, base_noise: float) -> np.ndarray:
        """[n, C, 32, 32] clean images -> what this site's scanner records (float32)."""
        x = clean
        if self.blur > 0.0:
            x = (1.0 - self.blur) * x + self.blur * _binomial_blur(x)
        x = self.contrast * (x * self.bias_field) + self.brightness
        x = x * self.channel_gain[:, None, None] + self.channel_offset[:, None, None]
        noise = rng.standard_normal(size=x.shape, dtype=np.float32)
        return (x + (base_noise * self.noise_factor) * noise).astype(np.float32)


@dataclass(frozen=True)
class EEGAcquisition:
    gain: float
    channel_gain: np.ndarray  # [channels]
    noise_std: float
    line_freq: float  # 50 or 60 Hz mains
    line_amp: float

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[n, channels, T] clean trials -> recorded trials (float32)."""
        n, c, t = clean.shape
        x = clean * (self.gain * self.channel_gain)[None, :, None]
        phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, 1, 1))
        time = np.arange(t) / EEG_FS
        x = x + self.line_amp * np.sin(2.0 * np.pi * self.line_freq * time[None, None, :] + phase)
        x = x + self.noise_std * rng.standard_normal(size=(n, c, t))
        return x.astype(np.float32)


@dataclass(frozen=True)
class ExpressionAcquisition:
    gene_log_shift: np.ndarray  # [genes], added to log expression rates
    library_factor: float  # multiplies the sequencing depth


@dataclass(frozen=True)
class TextAcquisition:
    synonym_probs: np.ndarray  # [concepts, synonyms]: this site's word choice per concept
    filler_probs: np.ndarray  # [fillers]
    verbosity: float  # multiplies the number of filler words


@dataclass(frozen=True)
class SequenceAcquisition:
    base_probs: np.ndarray  # [4] background A, C, G, T (GC content drift)
    residue_logit_shift: np.ndarray  # [20] added to the protein background logits


@dataclass(frozen=True)
class TabularAcquisition:
    offset: np.ndarray  # [features]
    scale: np.ndarray  # [features]

    def apply(self, clean: np.ndarray) -> np.ndarray:
        return (clean * self.scale + self.offset).astype(np.float32)


@dataclass(frozen=True)
class SiteAcquisition:
    site: str
    images: dict[str, ImageAcquisition]
    eeg: EEGAcquisition
    expression: ExpressionAcquisition
    text: TextAcquisition
    sequences: SequenceAcquisition
    tabular: TabularAcquisition


@lru_cache(maxsize=256)
def site_acquisition(seed: int, site: str, severity: float) -> SiteAcquisition:
    """The acquisition of one origin site; cached because every task of the site reads it."""
    s = float(severity)
    images = {
        m: _image_acquisition(rng_for(seed, "site", site, m), s, MULTIMED.modality(m).shape[0])
        for m in IMAGE_MODALITIES
    }
    return SiteAcquisition(
        site=site,
        images=images,
        eeg=_eeg_acquisition(rng_for(seed, "site", site, "eeg"), s),
        expression=_expression_acquisition(rng_for(seed, "site", site, "scrna"), s),
        text=_text_acquisition(rng_for(seed, "site", site, "text"), s),
        sequences=_sequence_acquisition(rng_for(seed, "site", site, "sequences"), s),
        tabular=_tabular_acquisition(rng_for(seed, "site", site, "tabular"), s),
    )


def _image_acquisition(rng: np.random.Generator, s: float, channels: int) -> ImageAcquisition:
    z = rng.standard_normal(6)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    zc = rng.standard_normal((2, channels))
    y, x = coordinates()
    ramp = ((x - CENTER) * np.cos(theta) + (y - CENTER) * np.sin(theta)) / (SIZE / 2)
    return ImageAcquisition(
        contrast=float(np.exp(0.25 * s * z[0])),
        brightness=float(0.3 * s * z[1]),
        noise_factor=float(np.exp(0.4 * s * z[2])),
        blur=float(1.0 - np.exp(-0.5 * s * abs(z[3]))),
        bias_field=1.0 + 0.15 * s * abs(z[4]) * ramp,
        channel_gain=np.exp(0.15 * s * zc[0]) if channels > 1 else np.ones(1),
        channel_offset=0.15 * s * zc[1] if channels > 1 else np.zeros(1),
    )


def _eeg_acquisition(rng: np.random.Generator, s: float) -> EEGAcquisition:
    channels = MULTIMED.modality("eeg").shape[0]
    z = rng.standard_normal(4)
    zc = rng.standard_normal(channels)
    return EEGAcquisition(
        gain=float(np.exp(0.3 * s * z[0])),
        channel_gain=np.exp(0.2 * s * zc),
        noise_std=float(0.15 * np.exp(0.5 * s * z[1])),
        line_freq=50.0 if z[2] > 0 else 60.0,
        line_amp=float(0.3 * s * abs(z[3])),
    )


def _expression_acquisition(rng: np.random.Generator, s: float) -> ExpressionAcquisition:
    genes = MULTIMED.modality("scrna").shape[0]
    z = rng.standard_normal(genes + 1)
    return ExpressionAcquisition(gene_log_shift=0.35 * s * z[:genes], library_factor=float(np.exp(0.5 * s * z[genes])))


def _text_acquisition(rng: np.random.Generator, s: float) -> TextAcquisition:
    zs = rng.standard_normal((len(vocabulary.CONCEPTS), vocabulary.N_SYNONYMS))
    zf = rng.standard_normal(vocabulary.N_FILLERS)
    zv = rng.standard_normal()
    # a Zipf-like base filler distribution ("the", "a", "of" are common everywhere)
    base = -0.6 * np.log1p(np.arange(vocabulary.N_FILLERS))
    return TextAcquisition(
        synonym_probs=_softmax(1.5 * s * zs),
        filler_probs=_softmax(base + 1.0 * s * zf),
        verbosity=float(np.exp(0.25 * s * zv)),
    )


def _sequence_acquisition(rng: np.random.Generator, s: float) -> SequenceAcquisition:
    z = rng.standard_normal(21)
    gc = float(np.clip(0.5 + 0.07 * s * z[0], 0.3, 0.7))
    return SequenceAcquisition(base_probs=np.array([1 - gc, gc, gc, 1 - gc]) / 2.0, residue_logit_shift=0.6 * s * z[1:])


def _tabular_acquisition(rng: np.random.Generator, s: float) -> TabularAcquisition:
    features = MULTIMED.modality("tabular").shape[0]
    z = rng.standard_normal((2, features))
    return TabularAcquisition(offset=0.5 * s * z[0], scale=np.exp(0.3 * s * z[1]))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _binomial_blur(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over the last two axes, edges replicated."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    rows = (p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]) / 4.0
    return (rows[..., :-2] + 2.0 * rows[..., 1:-1] + rows[..., 2:]) / 4.0

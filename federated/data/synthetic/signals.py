"""Motor-imagery EEG: sensorimotor mu rhythms over 1/f background, 8 channels x 1 s.

Three cortical sources (left motor, midline, right motor) oscillate at a per-trial mu
frequency (8.5-12.5 Hz) with random phase; a fixed lead field projects them smoothly onto
the electrodes. Imagining a movement desynchronises (weakens) the source that controls it:
left hand -> right motor cortex, right hand -> left motor cortex, feet -> midline; tongue
weakens both lateral sources and strengthens the midline one. Per-trial source amplitudes
vary log-normally, so a single trial is informative but not conclusive. The class lives in
band power, not in the raw waveform, as in real motor imagery.
"""

from __future__ import annotations

import numpy as np

from federated.core.multimed import MULTIMED
from federated.data.synthetic.acquisition import EEG_FS

CHANNELS: tuple[str, ...] = ("FC3", "FCz", "FC4", "C3", "Cz", "C4", "CP3", "CP4")
_CHANNEL_XY = np.array([[-1, 1], [0, 1], [1, 1], [-1, 0], [0, 0], [1, 0], [-1, -1], [1, -1]], dtype=np.float64)
_SOURCE_XY = np.array([[-1.0, 0.0], [0.0, 0.2], [1.0, 0.0]])  # left motor, midline, right motor
LEAD_FIELD = np.exp(-((_CHANNEL_XY[:, None] - _SOURCE_XY[None]) ** 2).sum(-1) / (2 * 0.6**2))
# source amplitude multipliers per class: left_hand, right_hand, feet, tongue
CLASS_MODULATION = np.array([[1.0, 1.0, 0.35], [0.35, 1.0, 1.0], [1.0, 0.35, 1.0], [0.6, 1.6, 0.6]])
MU_AMPLITUDE = 0.8
BACKGROUND_STD = 0.6

if len(CHANNELS) != MULTIMED.modality("eeg").shape[0]:
    raise RuntimeError("EEG channel list does not match the registry's eeg shape")


def pink_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise with a 1/f power spectrum along the last axis (FFT shaping)."""
    spectrum = np.fft.rfft(rng.standard_normal(shape), axis=-1)
    freqs = np.fft.rfftfreq(shape[-1], d=1.0 / EEG_FS)
    spectrum *= 1.0 / np.sqrt(np.maximum(freqs, 1.0))
    x = np.fft.irfft(spectrum, n=shape[-1], axis=-1)
    return x / x.std(axis=-1, keepdims=True)


def render_motor_imagery(rng: np.random.Generator, imagined: np.ndarray) -> np.ndarray:
    """Clean [n, 8, 128] trials for class indices `imagined` (before the site's amplifier)."""
    n = len(imagined)
    channels, t = MULTIMED.modality("eeg").shape
    time = np.arange(t) / EEG_FS
    freq = rng.uniform(8.5, 12.5, size=(n, 3, 1))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, 3, 1))
    amp = MU_AMPLITUDE * CLASS_MODULATION[imagined] * np.exp(rng.normal(0.0, 0.35, (n, 3)))
    sources = amp[..., None] * np.sin(2.0 * np.pi * freq * time + phase)
    mu = np.einsum("cs,nst->nct", LEAD_FIELD, sources)
    own = pink_noise(rng, (n, channels, t))
    common = pink_noise(rng, (n, 1, t))
    background = BACKGROUND_STD * (0.8 * own + 0.6 * common)
    return mu + background

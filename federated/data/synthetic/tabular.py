"""Clinical tabular features for breast cancer: a noisy linear view of a latent risk factor.

16 features (Wisconsin-style nuclear morphology plus patient history) are linear in three
latent variables -- `risk` (the tabular half of malignancy, see tasks.py), `size` (overall
lesion size, a nuisance shared by radius/perimeter/area) and `age` -- plus independent
N(0, 0.5) noise, then scaled to unit variance. Some features carry no signal at all. The
site's units and calibration (offset, scale per feature) are applied afterwards.
"""

from __future__ import annotations

import numpy as np

from federated.core.multimed import MULTIMED

FEATURES: tuple[str, ...] = (
    "tumor_radius",
    "tumor_texture",
    "tumor_perimeter",
    "tumor_area",
    "smoothness",
    "compactness",
    "concavity",
    "concave_points",
    "symmetry",
    "fractal_dimension",
    "age",
    "bmi",
    "breast_density",
    "family_history",
    "prior_biopsies",
    "hormone_receptor",
)
# loadings of each feature on (risk, size, age)
LOADINGS = np.array(
    [
        [0.5, 0.8, 0.0],
        [0.3, 0.0, 0.0],
        [0.5, 0.8, 0.0],
        [0.5, 0.8, 0.0],
        [0.2, 0.0, 0.0],
        [0.6, 0.0, 0.0],
        [0.8, 0.0, 0.0],
        [0.9, 0.0, 0.0],
        [0.1, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.3, 0.0, 1.0],
        [0.0, 0.0, 0.2],
        [0.0, 0.0, -0.4],
        [0.2, 0.0, 0.0],
        [0.2, 0.0, 0.3],
        [0.0, 0.0, 0.0],
    ]
)
FEATURE_NOISE = 0.5

if len(FEATURES) != MULTIMED.modality("tabular").shape[0]:
    raise RuntimeError("tabular feature list does not match the registry's tabular shape")


def sample_clinical(rng: np.random.Generator, risk: np.ndarray) -> np.ndarray:
    """[n, 16] float64 standardised clinical features for latent `risk` (~N(0, 1))."""
    n = len(risk)
    latent = np.stack([risk, rng.normal(size=n), rng.normal(size=n)], axis=1)
    x = latent @ LOADINGS.T + FEATURE_NOISE * rng.normal(size=(n, len(FEATURES)))
    return x / np.sqrt((LOADINGS**2).sum(axis=1) + FEATURE_NOISE**2)

"""Clean image renderers, one per image modality, all built from the shared basis bank.

Each renderer turns latent variables (findings, tumour type, lesion load, malignancy,
skeletal maturity) into a noiseless [n, C, 32, 32] image: fixed anatomy + per-sample
anatomical variation (random mixtures of the basis bank) + lesion blobs/rings whose
position, size and amplitude vary per sample. The site's scanner (acquisition.py) is applied
afterwards. All X-ray tasks use `render_radiograph`, so an X-ray encoder learnt on one
transfers to the others; medical VQA images are radiographs with the same finding patterns.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from federated.data.synthetic.basis import (
    CENTER,
    basis_bank,
    coordinates,
    gaussian,
    render_blobs,
    render_rings,
    ring,
)

# sensor noise of each modality before the site's noise factor (OCT speckle is the worst)
BASE_NOISE: dict[str, float] = {"oct": 0.3, "xray": 0.2, "ct": 0.25, "mri": 0.25, "pathology": 0.15}
TEXTURE = 0.012  # scale of the per-sample random mixture of basis patterns (anatomical variety)
LUNG_X = np.array([9.5, 21.5])  # left/right lung centres on radiographs


def _lognormal(rng: np.random.Generator, n: int, sd: float) -> np.ndarray:
    return np.exp(rng.normal(0.0, sd, size=n))


def _stack_blobs(blobs: Sequence[tuple[np.ndarray, ...]]) -> np.ndarray:
    """Render a list of per-sample (cx, cy, sigma, amp) blob parameter arrays in one pass."""
    cx, cy, sigma, amp = (np.stack([np.broadcast_to(b[i], b[3].shape) for b in blobs], axis=1) for i in range(4))
    return render_blobs(cx, cy, sigma, amp)


def _frozen(image: np.ndarray) -> np.ndarray:
    """A cached anatomy image: zero-mean (so values stay order 1) and read-only (shared)."""
    out = image - image.mean()
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------- radiographs
@lru_cache(maxsize=1)
def _chest_anatomy() -> tuple[np.ndarray, np.ndarray]:
    """(fixed anatomy, lung fields): body, spine and heart bright; aerated lungs dark."""
    body = 0.6 * gaussian(CENTER, 16.0, 12.0, 14.0) + 0.5 * gaussian(CENTER, 16.0, 1.5, 14.0)
    heart = 0.5 * gaussian(17.0, 21.0, 4.0, 3.5)
    lungs = gaussian(LUNG_X[0], 14.0, 4.0, 7.0) + gaussian(LUNG_X[1], 14.0, 4.0, 7.0)
    return _frozen(body + heart - 0.9 * lungs), _frozen(lungs)


FINDING_AMPLITUDE = np.array([0.75, 0.55, 0.8, 1.0, -0.75])  # per radiographic finding
OSSIFICATION = np.array(
    [[3.0, 28.0], [28.0, 28.0], [3.0, 12.0], [28.0, 12.0], [9.0, 30.0], [22.0, 30.0]]
)  # (x, y) of the growth centres
OSSIFICATION_ONSET = np.linspace(0.1, 0.9, len(OSSIFICATION))  # maturity at which each appears


def render_radiograph(rng: np.random.Generator, findings: np.ndarray, maturity: np.ndarray) -> np.ndarray:
    """Radiographs showing 5 binary findings and a skeletal maturity in [0, 1].

    findings[:, k] adds the k-th finding pattern (atelectasis: dense lower zone; cardiomegaly:
    enlarged heart shadow; effusion: dense costophrenic angle; nodule: small dense spot
    anywhere in a lung; pneumothorax: dark apex), on a random side and with random strength.
    Maturity switches on ossification centres one after another and widens the clavicles.
    """
    n = len(findings)
    anatomy, lungs = _chest_anatomy()
    img = anatomy[None] + 0.15 * rng.normal(size=(n, 1, 1)) * lungs[None]
    img = img + basis_bank().texture(rng, n, TEXTURE)
    side = rng.integers(0, 2, size=(n, 5))
    strength = findings * FINDING_AMPLITUDE * np.exp(rng.normal(0.0, 0.25, size=(n, 5)))
    blobs = [
        (LUNG_X[side[:, 0]], 21.0 + rng.normal(0.0, 1.0, n), np.full(n, 3.0), strength[:, 0]),
        (np.full(n, 17.0), np.full(n, 21.0), np.full(n, 5.5), strength[:, 1]),
        (LUNG_X[side[:, 2]], np.full(n, 26.5), np.full(n, 3.0), strength[:, 2]),
        (LUNG_X[side[:, 3]] + rng.uniform(-3.0, 3.0, n), rng.uniform(8.0, 22.0, n), np.full(n, 1.6), strength[:, 3]),
        (LUNG_X[side[:, 4]], np.full(n, 7.0), np.full(n, 3.5), strength[:, 4]),
    ]
    m = maturity[:, None]
    centres = 0.7 / (1.0 + np.exp(-(m - OSSIFICATION_ONSET[None]) / 0.07))  # [n, 6]
    for j, (x, y) in enumerate(OSSIFICATION):
        blobs.append((np.full(n, x), np.full(n, y), np.full(n, 1.5), centres[:, j]))
    for x in (8.0, 23.0):  # clavicles thicken with age
        blobs.append((np.full(n, x), np.full(n, 4.0), 1.5 + 2.0 * maturity, np.full(n, 0.5)))
    img = img + _stack_blobs(blobs)
    return img[:, None].astype(np.float32)


# ------------------------------------------------------------------------------- chest CT
@lru_cache(maxsize=1)
def _ct_anatomy() -> tuple[np.ndarray, np.ndarray]:
    """(fixed anatomy, lung fields) of an axial chest slice."""
    body = 0.4 * gaussian(CENTER, 16.0, 12.0, 10.0) + 0.6 * ring(CENTER, 16.0, 13.0, 1.0)
    lungs = gaussian(10.0, 15.0, 4.5, 6.0) + gaussian(21.0, 15.0, 4.5, 6.0)
    mediastinum = 0.4 * gaussian(CENTER, 16.0, 2.0, 5.0) + 0.8 * gaussian(CENTER, 26.0, 2.0)
    return _frozen(body - 0.9 * lungs + mediastinum), _frozen(lungs)


def render_chest_ct(rng: np.random.Generator, pneumonia: np.ndarray) -> np.ndarray:
    """Axial chest CT; `pneumonia` (bool) raises lung density diffusely and adds 1-4 opacities.

    Lung aeration varies between patients, and healthy scans sometimes show one small faint
    scar, so neither a slightly dense lung nor a bright spot alone is proof.
    """
    n = len(pneumonia)
    anatomy, lungs = _ct_anatomy()
    density = 0.15 * rng.normal(size=n) + pneumonia * 0.3 * _lognormal(rng, n, 0.3)
    img = anatomy[None] + density[:, None, None] * lungs[None]
    img = img + basis_bank().texture(rng, n, TEXTURE)
    n_lesions = np.where(pneumonia, np.minimum(1 + rng.poisson(1.5, n), 4), 0)
    scar = ~pneumonia & (rng.random(n) < 0.2)
    blobs = []
    for j in range(4):
        side = rng.integers(0, 2, n)
        amp = 0.6 * _lognormal(rng, n, 0.35) * (j < n_lesions)
        if j == 0:
            amp = np.where(scar, 0.25, amp)
        blobs.append(
            (
                np.array([10.0, 21.0])[side] + rng.uniform(-2.5, 2.5, n),
                rng.uniform(10.0, 21.0, n),
                rng.uniform(1.8, 3.2, n),
                amp,
            )
        )
    return (img + _stack_blobs(blobs))[:, None].astype(np.float32)


# ------------------------------------------------------------------------------ brain MRI
@lru_cache(maxsize=1)
def _brain_anatomy() -> np.ndarray:
    head = 0.8 * ring(CENTER, CENTER, 13.0, 1.0) + 0.5 * gaussian(CENTER, CENTER, 9.0)
    return _frozen(head)


def render_brain_mri(rng: np.random.Generator, tumour: np.ndarray) -> np.ndarray:
    """Brain MRI for classes 0 glioma, 1 meningioma, 2 pituitary, 3 no tumour.

    Glioma: an intra-axial mass anywhere in a hemisphere with a dark oedema rim; meningioma:
    an extra-axial mass touching the skull at a random angle; pituitary: a small mass at the
    sella (bottom centre). Ventricle size varies per patient (a nuisance).
    """
    n = len(tumour)
    img = _brain_anatomy()[None] + basis_bank().texture(rng, n, TEXTURE)
    vent = 1.2 + 0.5 * rng.random(n)
    amp = 0.75 * _lognormal(rng, n, 0.3)
    ang = rng.uniform(0.0, 2.0 * np.pi, n)
    rad = np.where(tumour == 0, rng.uniform(3.0, 7.0, n), 11.0)
    cx = np.where(tumour == 2, CENTER + rng.normal(0.0, 0.7, n), CENTER + rad * np.cos(ang))
    cy = np.where(tumour == 2, 23.0 + rng.normal(0.0, 0.7, n), CENTER + rad * np.sin(ang))
    sigma = np.select([tumour == 0, tumour == 1], [2.2, 2.6], 1.5)
    blobs = [
        (np.full(n, 13.0), np.full(n, 14.0), vent, np.full(n, -0.5)),  # ventricles
        (np.full(n, 18.0), np.full(n, 14.0), vent, np.full(n, -0.5)),
        (cx, cy, sigma, amp * (tumour != 3)),
        (
            cx + rng.normal(0.0, 1.5, n),
            cy + rng.normal(0.0, 1.5, n),
            np.full(n, 1.5),
            0.5 * amp * (tumour == 0),
        ),  # gliomas are irregular: a second lobe
    ]
    oedema = render_rings(cx, cy, np.full(n, 4.5), 1.0, -0.35 * amp * (tumour == 0))
    return (img + _stack_blobs(blobs) + oedema)[:, None].astype(np.float32)


# ------------------------------------------------------------------------------ retinal OCT
RETINA_LAYERS = ((11.0, 0.6, 1.0), (14.0, -0.3, 1.2), (17.0, 0.3, 1.0), (22.0, 0.9, 0.9))
# (depth, brightness, thickness) of: nerve fibre layer, nuclear layer, plexiform layer, RPE


def render_retina_oct(rng: np.random.Generator, disease: np.ndarray) -> np.ndarray:
    """Retinal OCT B-scans for classes 0 normal, 1 drusen, 2 DME, 3 CNV.

    Layers are horizontal bands with a per-scan tilt and depth. Drusen: small bright bumps
    under the RPE; DME: dark intraretinal cysts and a thickened inner retina; CNV: a larger
    bright lesion at the RPE with dark subretinal fluid above it.
    """
    n = len(disease)
    y, x = coordinates()
    depth = rng.normal(0.0, 1.0, n)
    tilt = rng.normal(0.0, 0.06, n)
    thick = np.where(disease == 2, 1.5, 0.0) * _lognormal(rng, n, 0.3)
    yy = y[None] - depth[:, None, None] - tilt[:, None, None] * (x[None] - CENTER)
    img = basis_bank().texture(rng, n, TEXTURE)
    for d, bright, width in RETINA_LAYERS:
        shift = thick[:, None, None] if d < 20 else 0.0
        img = img + bright * np.exp(-0.5 * ((yy - d + shift) / width) ** 2)
    rpe = 22.0 + depth  # lesions sit relative to the RPE at the scan's centre column
    blobs = []
    for j in range(3):
        bx = rng.uniform(6.0, 26.0, n)
        by = rpe + tilt * (bx - CENTER)
        blobs.append((bx, by + 1.5, np.full(n, 1.3), 0.9 * (disease == 1)))
        blobs.append(
            (bx, by - 7.0 + rng.normal(0.0, 1.0, n), rng.uniform(1.3, 2.3, n), -0.8 * ((disease == 2) & (j < 2)))
        )
    cnv_x = rng.uniform(10.0, 22.0, n)
    cnv_y = rpe + tilt * (cnv_x - CENTER)
    on = disease == 3
    blobs.append((cnv_x, cnv_y - 1.0, np.full(n, 2.5), 0.8 * on * _lognormal(rng, n, 0.3)))
    blobs.append((cnv_x, cnv_y - 4.5, np.full(n, 1.8), -0.45 * on))
    return (img + _stack_blobs(blobs) - 0.25)[:, None].astype(np.float32)


# ------------------------------------------------------------------------------- pathology
HEMATOXYLIN = np.array([0.55, 0.75, 0.30])  # RGB absorbance of the nuclear stain
EOSIN = np.array([0.10, 0.65, 0.25])  # RGB absorbance of the stromal stain
N_NUCLEI = 28
RGB_MEAN = np.array([0.87, 0.54, 0.82])  # measured over many patches: standardises channels
RGB_STD = np.array([0.12, 0.27, 0.11])


def render_pathology(rng: np.random.Generator, malignancy: np.ndarray) -> np.ndarray:
    """H&E patches whose nuclei grow denser, larger and darker with `malignancy` (~N(0, 1)).

    Nuclei sit at random positions; each candidate nucleus is present with probability
    sigmoid(1.3 a - 0.3). Stroma is a fibrous texture from the bank's gratings.
    """
    n = len(malignancy)
    a = malignancy[:, None]
    present = rng.random((n, N_NUCLEI)) < 1.0 / (1.0 + np.exp(-(1.3 * a - 0.3)))
    sigma = np.clip(1.2 + 0.3 * a + 0.15 * rng.normal(size=(n, N_NUCLEI)), 0.6, 2.5)
    amp = present * np.clip(0.8 + 0.2 * a, 0.3, None)
    density = render_blobs(rng.uniform(1.0, 30.0, (n, N_NUCLEI)), rng.uniform(1.0, 30.0, (n, N_NUCLEI)), sigma, amp)
    nuclei = 1.0 - np.exp(-1.5 * density)  # stain uptake saturates where nuclei overlap
    bank = basis_bank()
    fibres_idx = bank.indices("grating")
    weights = rng.normal(0.0, 0.05, size=(n, len(fibres_idx)))
    fibres = np.einsum("nk,kyx->nyx", weights, bank.patterns[fibres_idx])
    stroma = np.clip(0.6 + fibres - 0.5 * nuclei, 0.0, None)
    rgb = 1.0 - HEMATOXYLIN[None, :, None, None] * nuclei[:, None] - EOSIN[None, :, None, None] * stroma[:, None]
    standardised = (rgb - RGB_MEAN[None, :, None, None]) / RGB_STD[None, :, None, None]
    return standardised.astype(np.float32)

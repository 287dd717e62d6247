"""Acquisition shift: each site's scanners, protocols and assays distort its data its own way.

A planner step. Every site (training and held-out alike) gets, per modality it holds, a
severity s = sites.load_shift_severity * U(0.5, 1.5) (SitePlan.shift). The distortion itself is
applied when the site loads its data (shift_array), never stored as a copy, so 1,000 sites
cost no memory. Its parameters are a pure function of (seed, site, modality, s), drawn from
unit-scale random values that do not depend on s, so s = 0 is the identity and a larger s
moves the same site further in the same direction. Units are those of the stored data,
which is roughly standardised. u~U(a,b) below is drawn once per (site, modality):

  kind    component             parameter at severity s
  image   blur (optics)         Gaussian sigma = min(1.0 s u, 3) px, u~U(0.25,1)
          contrast, offset      x * exp(0.4 s u) + 0.5 s u', u,u'~U(-1,1)
          sensor noise          Gaussian std 0.3 s u, u~U(0.25,1)
  signal  gain                  x * exp(0.4 s u), u~U(-1,1)
          noise                 Gaussian std 0.2 s u, u~U(0.25,1)
          dead channels         each (sample, channel) zeroed w.p. min(0.15 s u, 0.9), u~U(0.25,1)
  vector  batch effect          per feature j: x_j * exp(0.3 s z_j) + 0.5 s z'_j, z,z'~N(0,1)
          (scrna; tabular calibration alike)
  tokens  token drift           each non-pad token replaced w.p. min(0.1 s u, 0.5), u~U(0.25,1),
                                by a token from q ~ Dirichlet(0.5) over 1..vocab-1 (the
                                site's skew); padding never changes

Components apply in the order listed (images: blur, then contrast about 0 and offset, then
noise; signals: gain, noise, dead channels), so the noise is never blurred or rescaled.

Per-sample randomness (noise, dead channels, which tokens drift) comes from a stream named
by (seed, site, modality, key), so loading the same rows with the same key repeats exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.core.corpus_schema import Modality
from federated.core.targets import IMAGE, PAD_TOKEN, SIGNAL, TOKENS, VECTOR
from partitions.site_plan import STEPS, PlanError, SitePlan, Step
from partitions.steps import step_rng

MAX_BLUR_SIGMA = 3.0  # px; keeps the kernel radius (3 sigma) inside a 32-px image
MAX_DROP, MAX_DRIFT = 0.9, 0.5


def site_severities(plans: list[SitePlan], severity: float, seed: int) -> list[SitePlan]:
    """Each (site, modality) its own severity, severity * U(0.5, 1.5)."""
    if not severity >= 0:
        raise PlanError(f"sites.load_shift_severity must be >= 0, got {severity}")

    def draw(site: str, m: str) -> float:
        return float(severity * step_rng(seed, "shift", site, m).uniform(0.5, 1.5))

    return [dataclasses.replace(p, shift={m: draw(p.site, m) for m in p.modalities}, shift_seed=seed) for p in plans]


def shift_params(spec: Modality, severity: float, site: str, seed: int) -> dict:
    """The transform of (site, modality) at this severity: floats, and per-feature arrays
    ("offset", "scale" for vectors; "probs" over tokens 1..vocab-1 for tokens)."""
    rng, s = step_rng(seed, "shift-params", site, spec.name), float(severity)
    if spec.kind == IMAGE:
        sigma, contrast, offset = rng.uniform(0.25, 1), rng.uniform(-1, 1), rng.uniform(-1, 1)
        noise = rng.uniform(0.25, 1)
        return {
            "blur_sigma": min(1.0 * s * sigma, MAX_BLUR_SIGMA),
            "contrast": float(np.exp(0.4 * s * contrast)),
            "offset": 0.5 * s * offset,
            "noise_std": 0.3 * s * noise,
        }
    if spec.kind == SIGNAL:
        gain, noise, drop = rng.uniform(-1, 1), rng.uniform(0.25, 1), rng.uniform(0.25, 1)
        return {
            "gain": float(np.exp(0.4 * s * gain)),
            "noise_std": 0.2 * s * noise,
            "drop_prob": min(0.15 * s * drop, MAX_DROP),
        }
    if spec.kind == VECTOR:
        z_scale, z_offset = rng.standard_normal(spec.shape), rng.standard_normal(spec.shape)
        return {"scale": np.exp(0.3 * s * z_scale), "offset": 0.5 * s * z_offset}
    if spec.kind == TOKENS:
        rate, probs = rng.uniform(0.25, 1), rng.dirichlet(np.full(spec.vocab_size - 1, 0.5))
        return {"rate": min(0.1 * s * rate, MAX_DRIFT), "probs": probs}
    raise ValueError(f"no acquisition shift for modality kind {spec.kind!r} ({spec.name})")


def shift_array(spec: Modality, x: np.ndarray, severity: float, site: str, seed: int, key: str = "") -> np.ndarray:
    """The batch x (n, *shape) as this site acquires it: a new array, same dtype and shape."""
    if not severity:
        return x.copy()
    p = shift_params(spec, severity, site, seed)
    rng = step_rng(seed, "shift-draw", site, spec.name, key)
    if spec.kind == IMAGE:
        y = _affine(_blur(x, p["blur_sigma"]), p["contrast"], p["offset"])
        return _noise(y, p["noise_std"], rng)
    if spec.kind == SIGNAL:
        y = _noise(_affine(x, p["gain"], 0.0), p["noise_std"], rng)
        return _channel_drop(y, p["drop_prob"], rng)
    if spec.kind == VECTOR:
        return _affine(x, p["scale"], p["offset"])
    return _token_drift(x, p["rate"], p["probs"], rng)


def _affine(x: np.ndarray, scale, offset) -> np.ndarray:
    """x * scale + offset (scalars, or per-feature arrays broadcast on the last axis)."""
    y = x * np.asarray(scale, dtype=x.dtype) + np.asarray(offset, dtype=x.dtype)
    return y.astype(x.dtype, copy=False)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps over +-ceil(3 sigma) (at least +-1)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes, edges reflected. Written by hand (a few
    lines of shifted sums, vectorised over the batch) because scipy is not a dependency."""
    if sigma <= 0:
        return x.copy()
    w = gaussian_kernel(sigma).astype(x.dtype)
    return _convolve(_convolve(x, w, x.ndim - 1), w, x.ndim - 2)


def _convolve(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Sum of len(w) shifted slices of x, reflect-padded along one axis."""
    r, n = len(w) // 2, x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="reflect")
    window = [slice(None)] * x.ndim

    def tap(k: int) -> np.ndarray:
        window[axis] = slice(k, k + n)
        return w[k] * padded[tuple(window)]

    out = tap(0)
    for k in range(1, len(w)):
        out += tap(k)
    return out


def _noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    if std <= 0:
        return x.copy()
    return x + np.asarray(std, dtype=x.dtype) * rng.standard_normal(x.shape, dtype=x.dtype)


def _channel_drop(x: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Dead electrodes: each (sample, channel) of an (n, channels, time) batch zeroed w.p. prob."""
    dead = rng.random(x.shape[:2]) < prob
    return np.where(dead[..., None], np.zeros((), dtype=x.dtype), x)


def _token_drift(x: np.ndarray, rate: float, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each non-pad token replaced w.p. rate by a draw from probs over tokens 1..len(probs)."""
    y = x.copy()
    drift = (x != PAD_TOKEN) & (rng.random(x.shape) < rate)
    y[drift] = 1 + rng.choice(len(probs), size=int(drift.sum()), p=probs)
    return y


STEPS.add(
    "acquisition_shift",
    Step(
        lambda plans, corpus, cfg: site_severities(plans, cfg.sites.load_shift_severity, cfg.corpus.seed),
        lambda cfg: bool(cfg.sites.load_shift_severity),
    ),
)

"""Repeat-factor sampling: patches that hold a rare class are seen more often in each epoch.

A tissue class that few patches hold (sclerotic glomeruli, dilated tubuli) gives the denoiser few chances to
learn it; repeat-factor sampling (Gupta et al. 2019, "LVIS: A Dataset for Large Vocabulary Instance
Segmentation") visits each patch as often as its rarest class asks, so an epoch holds more of them without
dropping any other patch.
"""

from __future__ import annotations

import numpy as np

#: the RNG stream of the whole-repeat draws (apart from the batch, noise and order streams of training)
REPEAT_STREAM = 3


def repeat_factors(fractions: np.ndarray, threshold: float) -> np.ndarray:
    """Repeat-factor sampling (Gupta et al. 2019, LVIS): per patch, max(1, max over the classes it holds of
    sqrt(threshold / f_c)), where f_c is the share of patches holding class c. ``fractions`` (N, K) are the
    patches' class fractions (the manifest's ``frac_<id>`` columns); a class held by at least ``threshold``
    of the patches, and a patch holding only such classes, keep the factor 1."""
    held = np.asarray(fractions) > 0
    share = held.mean(axis=0)
    per_class = np.sqrt(threshold / np.maximum(share, np.finfo(float).tiny)).clip(min=1.0)
    return np.where(held, per_class, 1.0).max(axis=1, initial=1.0).astype(np.float32)


def repeat_counts(factors: np.ndarray, seed: int) -> np.ndarray:
    """Whole repeats per patch with the factors' expectation: floor(r), plus one with probability r - floor(r),
    drawn once per run from ``seed`` (so every epoch has the same length and a resume the same orders)."""
    whole = np.floor(factors)
    extra = np.random.default_rng((seed, REPEAT_STREAM)).random(len(factors)) < factors - whole
    return (whole + extra).astype(np.int64)

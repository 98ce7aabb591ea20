"""Realism without a survey: can a classifier tell synthetic patches from real ones, how far apart
are the two sets in a feature space (FID, KID), and are synthetic patches copies of training ones?

* Classifier two-sample test: a standardised logistic regression on image features, stratified
  k-fold; the ROC AUC of the out-of-fold scores (0.5: indistinguishable, 1.0: always told apart)
  with a stratified bootstrap confidence interval.
* FID and KID (torchmetrics' implementations) in the feature space of a feature extractor the user
  supplies — an Inception network or a pathology encoder they have locally. None is downloaded.
* Memorisation: each synthetic patch's distance to its nearest training patch, against the same
  distance for held-out real patches. Copies sit far below the real-vs-real distances.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.progress import track
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from .. import validation
from ..devices import pick_device
from ..errors import ConfigError, DataError
from ..models.saved_modules import load_saved_module
from .images import check_one_size
from .report import Report

FeatureFn = Callable[[Sequence[np.ndarray]], np.ndarray]

NO_EXTRACTOR = (
    "FID and KID need a feature extractor: pass a torch module, or the path of a saved torch.export "
    "program (.pt2) or TorchScript module, that maps uint8 images (B, 3, H, W) to features (B, D) — "
    "e.g. an Inception network or a pathology encoder you have locally (in eval mode). "
    "The toolkit never downloads one."
)


# --- feature spaces ------------------------------------------------------------------------------
def colour_texture_features(images: Sequence[np.ndarray], bins: int = 16, bands: int = 8) -> np.ndarray:
    """Per image: RGB means, spreads and histograms, gradient-magnitude statistics and histogram,
    and the share of spectral power in `bands` log-spaced frequency bands — what stain, blur,
    noise and texture differences show up in."""
    return np.stack([_colour_texture(img, bins, bands) for img in images])


def _colour_texture(image: np.ndarray, bins: int, bands: int) -> np.ndarray:
    pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
    histograms = [np.histogram(pixels[:, c], bins=bins, range=(0, 1))[0] / len(pixels) for c in range(3)]
    grey = image.astype(np.float64).mean(axis=2) / 255.0
    gy, gx = np.gradient(grey)
    gradient = np.hypot(gx, gy)
    gradient_hist = np.histogram(gradient, bins=bins, range=(0, 0.5))[0] / gradient.size
    return np.concatenate([pixels.mean(0), pixels.std(0), *histograms, [gradient.mean(), gradient.std()],
                           gradient_hist, _band_power(grey, bands)])


def _band_power(grey: np.ndarray, bands: int) -> np.ndarray:
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    fy = np.fft.fftfreq(grey.shape[0])[:, None]
    fx = np.fft.fftfreq(grey.shape[1])[None, :]
    radius = np.hypot(fy, fx)
    edges = np.geomspace(1.0 / max(grey.shape), np.sqrt(0.5) + 1e-9, bands + 1)
    shares = np.array([power[(radius >= lo) & (radius < hi)].sum()
                       for lo, hi in zip(edges[:-1], edges[1:], strict=True)])
    return shares / max(shares.sum(), 1e-12)


def thumbnail_features(images: Sequence[np.ndarray], size: int = 16) -> np.ndarray:
    """Box-downsampled RGB thumbnails: near-copies of an image land next to it."""
    return np.stack([
        np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel() / 255.0
        for img in images
    ])


def load_feature_extractor(spec: nn.Module | str | Path | None) -> nn.Module:
    """A torch module as given, or one loaded from a local file: a torch.export program (.pt2,
    saved with ``torch.export.save``) or a TorchScript module (saved with ``torch.jit.save``)."""
    if spec is None:
        raise ConfigError(NO_EXTRACTOR)
    if isinstance(spec, nn.Module):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"feature extractor {path} does not exist. {NO_EXTRACTOR}")
    return load_saved_module(path, "a feature extractor", "extractor.pt2")


def extractor_features(extractor: nn.Module, images: Sequence[np.ndarray], batch_size: int = 16,
                       device: str = "auto", progress: bool = False) -> np.ndarray:
    """Features (N, D) of a torch extractor that takes uint8 (B, 3, H, W) images."""
    device = pick_device(device)
    extractor = extractor.to(device)
    starts = range(0, len(images), batch_size)
    chunks = []
    with torch.inference_mode():
        for start in (track(starts, description="features") if progress else starts):
            batch = torch.from_numpy(np.stack(images[start:start + batch_size])).permute(0, 3, 1, 2)
            chunks.append(extractor(batch.to(device)).float().flatten(1).cpu().numpy())
    return np.concatenate(chunks)


# --- classifier two-sample test -------------------------------------------------------------------
@dataclass
class TwoSampleResult:
    auc: float
    ci_low: float
    ci_high: float
    confidence: float
    fold_aucs: list[float]
    labels: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)

    def verdict(self) -> str:
        if self.ci_low <= 0.5 <= self.ci_high:
            return "indistinguishable (0.5 lies in the confidence interval)"
        return f"distinguishable (AUC {'above' if self.auc > 0.5 else 'below'} 0.5)"


def classifier_two_sample_test(real: np.ndarray, synthetic: np.ndarray, folds: int = 5, seed: int = 0,
                               bootstrap: int = 1000, confidence: float = 0.95) -> TwoSampleResult:
    """ROC AUC of a real-vs-synthetic classifier, cross-validated (label 1 = synthetic)."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    smallest = min(len(real), len(synthetic))
    if smallest < folds:
        raise DataError(f"a {folds}-fold two-sample test needs at least {folds} images per set; the smaller has "
                        f"{smallest}")
    features = np.vstack([real, synthetic])
    labels = np.r_[np.zeros(len(real), dtype=int), np.ones(len(synthetic), dtype=int)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, features, labels, cv=cv, method="predict_proba")[:, 1]
    fold_aucs = [float(roc_auc_score(labels[test], scores[test])) for _, test in cv.split(features, labels)]
    low, high = bootstrap_auc_interval(labels, scores, bootstrap, confidence, seed)
    return TwoSampleResult(auc=float(roc_auc_score(labels, scores)), ci_low=low, ci_high=high,
                           confidence=confidence, fold_aucs=fold_aucs, labels=labels, scores=scores)


def bootstrap_auc_interval(labels: np.ndarray, scores: np.ndarray, rounds: int, confidence: float,
                           seed: int) -> tuple[float, float]:
    """Percentile interval of the AUC over resamples drawn with replacement within each class."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    aucs = np.empty(rounds)
    for r in range(rounds):
        picked = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        aucs[r] = roc_auc_score(labels[picked], scores[picked])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


# --- FID / KID -------------------------------------------------------------------------------------
class _GivenFeatures(nn.Module):
    """Lets torchmetrics' FID/KID take features computed beforehand (so they are computed once)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_and_kernel_distance(real: np.ndarray, synthetic: np.ndarray, kid_subsets: int = 100,
                                kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, sd over subsets) between two feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(synthetic), dtype=torch.float64)
    if min(len(real_t), len(fake_t)) < 2:
        raise DataError("FID and KID need at least 2 images per set")
    fid = FrechetInceptionDistance(feature=_GivenFeatures(real_t.shape[1]))
    fid.update(real_t, real=True)
    fid.update(fake_t, real=False)
    subset = min(kid_subset_size, len(real_t), len(fake_t))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(feature=_GivenFeatures(real_t.shape[1]), subsets=kid_subsets,
                                          subset_size=subset)
        kid.update(real_t, real=True)
        kid.update(fake_t, real=False)
        kid_mean, kid_sd = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_sd": float(kid_sd),
            "kid_subset_size": subset}


# --- memorisation ----------------------------------------------------------------------------------
@dataclass
class MemorisationResult:
    """Nearest-training-neighbour distances of synthetic and of held-out real patches."""

    synthetic: np.ndarray
    real: np.ndarray
    nearest_training: np.ndarray
    quantile: float = 0.05

    @property
    def threshold(self) -> float:
        """The real-vs-training distance only `quantile` of real patches come closer than."""
        return float(np.quantile(self.real, self.quantile))

    @property
    def share_closer(self) -> float:
        """Share of synthetic patches closer to training than the threshold (about `quantile` when
        nothing is copied; near 1 when the training set is reproduced)."""
        return float(np.mean(self.synthetic < self.threshold))

    def summary(self) -> dict[str, float]:
        return {
            "synthetic median distance": float(np.median(self.synthetic)),
            "real median distance": float(np.median(self.real)),
            "median ratio (synthetic / real)": float(np.median(self.synthetic) / max(np.median(self.real), 1e-12)),
            f"real {self.quantile:.0%} quantile": self.threshold,
            f"synthetic closer than it (expected {self.quantile:.0%})": self.share_closer,
        }


def memorisation_check(training: np.ndarray, synthetic: np.ndarray, real: np.ndarray,
                       quantile: float = 0.05) -> MemorisationResult:
    """Distances in a feature space standardised on the training set."""
    scaler = StandardScaler().fit(training)
    index = NearestNeighbors(n_neighbors=1).fit(scaler.transform(training))
    synthetic_distance, nearest = index.kneighbors(scaler.transform(synthetic))
    real_distance, _ = index.kneighbors(scaler.transform(real))
    return MemorisationResult(synthetic=synthetic_distance[:, 0], real=real_distance[:, 0],
                              nearest_training=nearest[:, 0], quantile=quantile)


# --- everything together ----------------------------------------------------------------------------
@dataclass
class RealismResult:
    n_real: int
    n_synthetic: int
    size: tuple[int, int]
    two_sample: TwoSampleResult
    two_sample_extractor: TwoSampleResult | None = None
    distances: dict[str, float] | None = None
    memorisation: MemorisationResult | None = None
    memorisation_space: str = ""
    notes: list[str] = field(default_factory=list)


def check_realism_options(folds: int, seed: int, bootstrap: int) -> None:
    """At least 2 folds, a usable seed and at least one bootstrap round (before any image is read)."""
    validation.int_at_least(folds, "--folds", 2)
    validation.seed(seed)
    validation.positive_int(bootstrap, "--bootstrap")


def evaluate_realism(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray],
                     training: Sequence[np.ndarray] | None = None, extractor: nn.Module | None = None,
                     folds: int = 5, seed: int = 0, bootstrap: int = 1000, device: str = "auto",
                     progress: bool = False) -> RealismResult:
    """The two-sample test on colour/texture features (and on extractor features when given), FID
    and KID when an extractor is given, and the memorisation check when training images are given."""
    check_realism_options(folds, seed, bootstrap)
    size = check_one_size(list(real) + list(synthetic), "the real and synthetic images together")
    result = RealismResult(n_real=len(real), n_synthetic=len(synthetic), size=size,
                           two_sample=classifier_two_sample_test(colour_texture_features(real),
                                                                 colour_texture_features(synthetic),
                                                                 folds, seed, bootstrap))
    embed: FeatureFn | None = None
    if extractor is not None:
        embed = partial(extractor_features, extractor, device=device, progress=progress)
        real_features, synthetic_features = embed(real), embed(synthetic)
        result.two_sample_extractor = classifier_two_sample_test(real_features, synthetic_features, folds, seed,
                                                                 bootstrap)
        result.distances = frechet_and_kernel_distance(real_features, synthetic_features, seed=seed)
    else:
        result.notes.append(f"FID/KID not computed. {NO_EXTRACTOR}")
    if training is not None:
        space = embed or thumbnail_features
        result.memorisation_space = "extractor features" if embed else "16x16 RGB thumbnails"
        result.memorisation = memorisation_check(space(training), space(synthetic), space(real))
    else:
        result.notes.append("memorisation not checked: no training images given (--train)")
    return result


def write_realism_report(result: RealismResult, out: str | Path, sources: dict[str, str]) -> Path:
    report = Report(Path(out), "Realism")
    report.bullets([f"{name}: {where}" for name, where in sources.items()]
                   + [f"images: {result.n_real} real, {result.n_synthetic} synthetic, "
                      f"{result.size[0]}x{result.size[1]} px"])
    report.heading("Classifier two-sample test")
    rows = [_two_sample_row("colour/texture features", result.two_sample)]
    if result.two_sample_extractor is not None:
        rows.append(_two_sample_row("extractor features", result.two_sample_extractor))
    report.table("two_sample", pd.DataFrame(rows),
                 "logistic regression, stratified k-fold; ROC AUC of out-of-fold scores (0.5 = indistinguishable)")
    report.figure("roc", _roc_figure(result), "ROC curve of the real-vs-synthetic classifier")
    if result.distances is not None:
        report.heading("FID and KID (extractor features)")
        report.table("fid_kid", pd.DataFrame([result.distances]), digits=4)
    if result.memorisation is not None:
        report.heading("Memorisation")
        report.text(f"Distance to the nearest training patch ({result.memorisation_space}, standardised on "
                    "the training set): synthetic patches against held-out real ones.")
        report.table("memorisation", pd.DataFrame([result.memorisation.summary()]), digits=4)
        report.figure("memorisation", _distance_figure(result.memorisation), "Nearest-training-patch distances")
    if result.notes:
        report.heading("Not computed")
        report.bullets(result.notes)
    return report.write()


def _two_sample_row(space: str, test: TwoSampleResult) -> dict[str, object]:
    return {"features": space, "ROC AUC": test.auc,
            f"{test.confidence:.0%} CI": f"{test.ci_low:.3f} – {test.ci_high:.3f}",
            "fold AUCs": ", ".join(f"{a:.2f}" for a in test.fold_aucs), "verdict": test.verdict()}


def _roc_figure(result: RealismResult) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4, 4))
    tests = [("colour/texture", result.two_sample)]
    if result.two_sample_extractor is not None:
        tests.append(("extractor", result.two_sample_extractor))
    for name, test in tests:
        fpr, tpr, _ = roc_curve(test.labels, test.scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {test.auc:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    return fig


def _distance_figure(memorisation: MemorisationResult) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    top = max(memorisation.synthetic.max(), memorisation.real.max())
    bins = np.linspace(0, top if top > 0 else 1, 30)
    ax.hist(memorisation.real, bins=bins, alpha=0.6, label="held-out real")
    ax.hist(memorisation.synthetic, bins=bins, alpha=0.6, label="synthetic")
    ax.axvline(memorisation.threshold, color="k", lw=0.8, ls="--", label=f"real {memorisation.quantile:.0%} quantile")
    ax.set_xlabel("distance to nearest training patch")
    ax.set_ylabel("patches")
    ax.legend(fontsize=8)
    return fig

"""The statistics of a reader study: intervals, tests, agreement, ROC and sample size.

- :func:`accuracy_test`: a share correct with its Wilson score 95 % interval and the exact two-sided
  binomial test against chance (50 %).
- :func:`fleiss_kappa`: agreement between many readers beyond chance (Fleiss, 1971), from a table of
  counts (images x categories) with every image judged by the same number of readers.
- :func:`reader_auc`: a reader's ROC AUC from their ratings, with the Hanley & McNeil (1982) interval.
- :func:`reader_icc` and :func:`design_effect`: how alike one reader's answers are (the intraclass
  correlation of correctness within readers, one-way ANOVA estimator) and what that does to the
  information in pooled answers (Kish's design effect 1 + (m - 1) ICC for m answers per reader).
- :func:`trend_test`: the Cochran-Armitage test for a trend of correctness with question position.
- :func:`plan_study`: readers x images for a wanted power (see its docstring for the method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from ..errors import ConfigError

CHANCE = 0.5
LEVEL = 0.95


@dataclass(frozen=True)
class ShareTest:
    """A share of successes: estimate, Wilson interval and exact two-sided binomial p against chance."""

    successes: int
    trials: int
    share: float
    low: float
    high: float
    p_value: float

    def as_dict(self, prefix: str = "accuracy") -> dict:
        return {prefix: self.share, f"{prefix}_low": self.low, f"{prefix}_high": self.high, "p_value": self.p_value}


def accuracy_test(successes: int, trials: int, effective_trials: float | None = None) -> ShareTest:
    """Share correct, its Wilson 95 % interval and the exact binomial test against 50 %.

    `effective_trials` (< `trials`) widens the interval to what that many independent answers give
    (answers clustered within readers; see :func:`design_effect`); the test then runs on the
    correspondingly scaled, rounded counts.
    """
    if trials == 0:
        return ShareTest(0, 0, math.nan, math.nan, math.nan, math.nan)
    share = successes / trials
    n = trials if effective_trials is None else max(1, round(effective_trials))
    k = successes if effective_trials is None else round(share * n)
    test = stats.binomtest(k, n, CHANCE)
    interval = wilson_interval(share, n)
    return ShareTest(successes, trials, share, interval[0], interval[1], float(test.pvalue))


def wilson_interval(share: float, trials: float, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a share observed over `trials` independent trials."""
    if trials <= 0:
        return math.nan, math.nan
    z = stats.norm.ppf(0.5 + level / 2)
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a table of counts: rows are subjects, columns categories, every row summing
    to the same number of raters (at least 2). NaN when chance agreement is perfect."""
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or np.any(raters != raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs every subject judged by the same number (>= 2) of raters")
    n = raters[0]
    agreement = ((counts * (counts - 1)).sum(axis=1) / (n * (n - 1))).mean()
    category_shares = counts.sum(axis=0) / counts.sum()
    chance = float((category_shares ** 2).sum())
    return math.nan if chance == 1 else float((agreement - chance) / (1 - chance))


def reader_auc(positive: np.ndarray, scores: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """ROC AUC of `scores` for telling `positive` cases (True) from the rest, with the Hanley & McNeil
    (1982) normal interval clipped to [0, 1]; NaNs when either class is missing. (That interval has
    no width at an AUC of exactly 0 or 1: read it as "few cases" there.)"""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan, math.nan
    auc = float(roc_auc_score(positive, scores))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = stats.norm.ppf(0.5 + level / 2) * math.sqrt(max(variance, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def reader_icc(correct_by_reader: list[np.ndarray]) -> float:
    """Intraclass correlation of correctness within readers (one-way ANOVA estimator, floored at 0);
    NaN with fewer than two readers."""
    groups = [np.asarray(g, dtype=float) for g in correct_by_reader if len(g)]
    if len(groups) < 2:
        return math.nan
    sizes = np.array([len(g) for g in groups], dtype=float)
    total = sizes.sum()
    grand = np.concatenate(groups).mean()
    between = sum(len(g) * (g.mean() - grand) ** 2 for g in groups) / (len(groups) - 1)
    within_df = total - len(groups)
    within = sum(((g - g.mean()) ** 2).sum() for g in groups) / within_df if within_df > 0 else 0.0
    m0 = (total - (sizes ** 2).sum() / total) / (len(groups) - 1)
    denominator = between + (m0 - 1) * within
    return 0.0 if denominator <= 0 else float(max(0.0, (between - within) / denominator))


def design_effect(answers_per_reader: float, icc: float) -> float:
    """Kish's design effect of clustered answers: 1 + (m - 1) ICC."""
    return 1.0 + max(answers_per_reader - 1.0, 0.0) * (0.0 if math.isnan(icc) else icc)


def trend_test(positions: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Cochran-Armitage test for a linear trend of correctness with position: (z, two-sided p).
    A positive z: later questions are answered correctly more often. NaNs where undefined."""
    positions = np.asarray(positions, dtype=float)
    correct = np.asarray(correct, dtype=float)
    share = correct.mean() if len(correct) else math.nan
    spread = ((positions - positions.mean()) ** 2).sum() if len(positions) else 0.0
    if not len(correct) or share in (0.0, 1.0) or spread == 0:
        return math.nan, math.nan
    z = float((positions * (correct - share)).sum() / math.sqrt(share * (1 - share) * spread))
    return z, float(2 * stats.norm.sf(abs(z)))


# --- planning -----------------------------------------------------------------------------------


def binomial_power(n: int, accuracy: float, alpha: float) -> float:
    """Power of the exact two-sided binomial test of n independent answers against 50 %."""
    k = np.arange(n + 1)
    p_values = np.minimum(1.0, 2 * np.minimum(stats.binom.cdf(k, n, CHANCE), stats.binom.sf(k - 1, n, CHANCE)))
    return float(stats.binom.pmf(k[p_values <= alpha], n, accuracy).sum())


def independent_answers_needed(accuracy: float, alpha: float, power: float) -> int:
    """The smallest n of independent answers whose exact binomial test reaches `power`.

    The search starts a little below the normal approximation (the exact power is a sawtooth in n,
    so the first n that reaches the target is reported)."""
    z_alpha, z_beta = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    approx = ((z_alpha * 0.5 + z_beta * math.sqrt(accuracy * (1 - accuracy))) / (accuracy - CHANCE)) ** 2
    n = max(1, int(approx * 0.8))
    while binomial_power(n, accuracy, alpha) < power:
        n += 1
    return n


DEFAULT_IMAGES = (16, 20, 40, 60, 80, 100)


def plan_study(expected_accuracy: float, alpha: float = 0.05, power: float = 0.8, icc: float = 0.05,
               images: tuple[int, ...] = DEFAULT_IMAGES) -> dict:
    """Readers x images that give `power` to tell `expected_accuracy` from 50 % at level `alpha`.

    Method: the exact two-sided binomial test on the pooled answers (the test ``survey analyze``
    reports), whose n of independent answers is found by exact power; answers of one reader are
    correlated (intraclass correlation `icc` of correctness within readers), so m images per reader
    need n x (1 + (m - 1) icc) answers in all (Kish's design effect), i.e. that divided by m readers.
    Images are treated as fixed: variation of difficulty between images is not modelled, so use
    at least as many images as a pilot suggests for stable per-image shares. ``survey analyze``
    reports the ICC of collected answers, to re-plan with.
    """
    check_plan(expected_accuracy, alpha, power, icc, images)
    n_independent = independent_answers_needed(expected_accuracy, alpha, power)
    rows = []
    for m in sorted(set(images)):
        total = math.ceil(n_independent * design_effect(m, icc))
        rows.append({"images": m, "readers": math.ceil(total / m), "answers": math.ceil(total / m) * m,
                     "design_effect": design_effect(m, icc)})
    return {"expected_accuracy": expected_accuracy, "alpha": alpha, "power": power, "icc": icc,
            "independent_answers": n_independent,
            "achieved_power": binomial_power(n_independent, expected_accuracy, alpha),
            "min_readers": None if icc == 0 else math.ceil(n_independent * icc), "designs": rows}


def check_plan(expected_accuracy: float, alpha: float, power: float, icc: float, images: tuple[int, ...]) -> None:
    if not (0 < expected_accuracy < 1) or abs(expected_accuracy - CHANCE) < 0.005:
        raise ConfigError(f"--expected-accuracy {expected_accuracy} must lie in (0, 1) and differ from 0.5 "
                          "by at least 0.005")
    if not 0 < alpha < 0.5:
        raise ConfigError(f"--alpha {alpha} must lie between 0 and 0.5 (e.g. 0.05)")
    if not alpha < power < 1:
        raise ConfigError(f"--power {power} must lie between --alpha and 1 (e.g. 0.8)")
    if not 0 <= icc < 1:
        raise ConfigError(f"--icc {icc} must lie in [0, 1) (0: readers' answers independent)")
    if not images or min(images) < 1:
        raise ConfigError("--images must be whole numbers of at least 1")

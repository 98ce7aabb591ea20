"""The reader-study statistics: simulated readers recovered, kappas against references, planning."""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from histosynth.survey.analyze import analyze_responses
from histosynth.survey.build import REAL, SYNTHETIC, Question, Survey, participant_order
from histosynth.survey.responses import ParticipantAnswers, Responses, stored_responses
from histosynth.survey.stats import (
    accuracy_test,
    binomial_power,
    design_effect,
    fleiss_kappa,
    plan_study,
    reader_auc,
    reader_icc,
)
from histosynth.survey.store import SurveyStore

# Fleiss (1971), Table 1: 30 patients, each diagnosed by 6 psychiatrists into depression, personality
# disorder, schizophrenia, neurosis or other (counts per category). Published kappa: 0.430.
FLEISS_1971 = [
    [0, 0, 0, 6, 0], [0, 3, 0, 0, 3], [0, 1, 4, 0, 1], [0, 0, 0, 0, 6], [0, 3, 0, 3, 0], [2, 0, 4, 0, 0],
    [0, 0, 4, 0, 2], [2, 0, 3, 1, 0], [2, 0, 0, 4, 0], [0, 0, 0, 0, 6], [1, 0, 0, 5, 0], [1, 1, 0, 4, 0],
    [0, 3, 3, 0, 0], [1, 0, 0, 5, 0], [0, 2, 0, 3, 1], [0, 0, 5, 0, 1], [3, 0, 0, 1, 2], [5, 1, 0, 0, 0],
    [0, 2, 0, 4, 0], [1, 0, 2, 0, 3], [0, 0, 0, 0, 6], [0, 1, 0, 5, 0], [0, 2, 0, 1, 3], [2, 0, 0, 4, 0],
    [1, 0, 0, 4, 1], [0, 5, 0, 1, 0], [4, 0, 0, 0, 2], [0, 2, 0, 4, 0], [1, 0, 5, 0, 0], [0, 0, 0, 0, 6],
]

# Simulated readers: confidence 1-5 drawn from one distribution when right, another when wrong.
CONFIDENT_WHEN_RIGHT = np.array([0.05, 0.10, 0.20, 0.30, 0.35])
CONFIDENT_WHEN_WRONG = np.array([0.30, 0.30, 0.20, 0.15, 0.05])


def true_auc(accuracy: float) -> float:
    """The ROC AUC a simulated reader has in the limit: the signed confidence (-5 surely real ...
    +5 surely synthetic) of a synthetic image beats a real image's with this probability (ties half)."""
    levels = np.arange(1, 6)
    score_distribution = {}  # score -> probability, same for either truth by symmetry (sign flipped)
    for level, right, wrong in zip(levels, CONFIDENT_WHEN_RIGHT, CONFIDENT_WHEN_WRONG, strict=True):
        score_distribution[level] = score_distribution.get(level, 0) + accuracy * right
        score_distribution[-level] = score_distribution.get(-level, 0) + (1 - accuracy) * wrong
    auc = 0.0
    for (synthetic_score, p), (real_score, q) in itertools.product(score_distribution.items(), repeat=2):
        real_score = -real_score  # a real image's score is the mirror image of a synthetic one's
        auc += p * q * (1.0 if synthetic_score > real_score else 0.5 if synthetic_score == real_score else 0.0)
    return auc


def simulated_survey(tmp_path: Path, truth: list[str]) -> Survey:
    """A survey description (no images needed) asking for confidence, with per-participant orders."""
    questions = tuple(Question(n, f"{n:032x}") for n in range(1, len(truth) + 1))
    return Survey(root=tmp_path, title="simulated", image_size=64, image_format="png", questions=questions,
                  order="per-participant", rating="confidence")


@pytest.fixture
def memory_dir():
    """A folder in memory where there is one (each stored answer is a committed transaction: on a
    disk, its flush makes hundreds of answers slow)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as folder:
        yield Path(folder)


def test_simulated_readers_are_recovered_within_the_reported_intervals(memory_dir):
    rng = np.random.default_rng(2024)
    truth = [REAL, SYNTHETIC] * 50
    survey = simulated_survey(memory_dir, truth)
    store = SurveyStore(memory_dir / "responses.sqlite")
    accuracies = {1: 0.5, 2: 0.62, 3: 0.7, 4: 0.85}  # experience level -> the reader's true accuracy
    for experience, accuracy in accuracies.items():
        person = store.create_participant(experience, participant_order(survey))
        for question in person.order:
            right = rng.random() < accuracy
            answer = truth[question - 1] if right else ({REAL, SYNTHETIC} - {truth[question - 1]}).pop()
            confidence = rng.choice(np.arange(1, 6), p=CONFIDENT_WHEN_RIGHT if right else CONFIDENT_WHEN_WRONG)
            store.record_answer(person.id, question, answer, int(confidence))
    analysis = analyze_responses(stored_responses(truth, store, survey))
    people = analysis.participants.set_index("experience")
    for experience, accuracy in accuracies.items():
        reader = people.loc[experience]
        assert reader["answered"] == 100
        assert reader["accuracy_low"] <= accuracy <= reader["accuracy_high"]
        assert reader["auc_low"] <= true_auc(accuracy) <= reader["auc_high"]
        assert reader["accuracy"] == reader["correct"] / 100
    assert people.loc[1, "p_value"] > 0.05 and people.loc[4, "p_value"] < 1e-6  # chance vs. a good reader
    study = analysis.summary["reader_study"]
    pooled = float(np.mean(list(accuracies.values())))
    assert study["accuracy_low_clustered"] <= pooled <= study["accuracy_high_clustered"]
    assert study["accuracy_high_clustered"] - study["accuracy_low_clustered"] > \
        study["accuracy_high"] - study["accuracy_low"], "readers differ: the clustered interval is wider"
    assert study["auc_readers"] == 4 and study["auc_mean"] == pytest.approx(people["auc"].mean())
    # every reader saw the questions in their own order, and the positions add up to every answer
    orders = [tuple(p.order) for p in store.participants()]
    assert len(set(orders)) == 4 and all(sorted(o) == list(range(1, 101)) for o in orders)
    assert analysis.positions["answers"].sum() == 400 and list(analysis.positions["positions"])[:2] == ["1-10", "11-20"]
    by_experience = analysis.experience.set_index("group")
    assert by_experience.loc["3-5", "answers"] == 200 and by_experience.loc["1", "readers"] == 1
    assert by_experience.loc["4", "accuracy_low"] <= 0.85 <= by_experience.loc["4", "accuracy_high"]


def test_true_auc_of_the_simulation_is_right_at_the_ends():
    assert true_auc(1.0) == pytest.approx(1.0) and true_auc(0.0) == pytest.approx(0.0)
    # at chance accuracy the confidence alone still separates: sure answers are more often right
    assert 0.6 < true_auc(0.5) < 0.7


def test_fleiss_kappa_reproduces_fleiss_1971():
    assert fleiss_kappa(np.array(FLEISS_1971)) == pytest.approx(0.430, abs=5e-4)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_fleiss_kappa_of_two_readers_equals_scotts_pi_and_is_near_cohens():
    # With two raters Fleiss' kappa is Scott's pi: agreement beyond chance from the pooled marginals.
    rng = np.random.default_rng(3)
    truth = tuple(rng.permutation([REAL] * 10 + [SYNTHETIC] * 10))
    a = tuple(t if rng.random() < 0.7 else (REAL if t == SYNTHETIC else SYNTHETIC) for t in truth)
    b = tuple(t if rng.random() < 0.8 else (REAL if t == SYNTHETIC else SYNTHETIC) for t in truth)
    analysis = analyze_responses(Responses(truth=truth, participants=(
        ParticipantAnswers("A", 2, a), ParticipantAnswers("B", 4, b))))
    observed = np.mean([x == y for x, y in zip(a, b, strict=True)])
    share_real = (a.count(REAL) + b.count(REAL)) / 40
    chance = share_real ** 2 + (1 - share_real) ** 2
    assert analysis.summary["reader_study"]["fleiss_kappa"] == pytest.approx((observed - chance) / (1 - chance))
    assert analysis.summary["reader_study"]["fleiss_readers"] == 2
    assert analysis.participants["kappa"].tolist() == [cohen_kappa_score(truth, a), cohen_kappa_score(truth, b)]


def test_accuracy_interval_and_test_equal_scipy():
    for correct, n in [(0, 10), (7, 10), (31, 40), (200, 400)]:
        result = accuracy_test(correct, n)
        reference = stats.binomtest(correct, n, 0.5)
        interval = reference.proportion_ci(0.95, method="wilson")
        assert (result.low, result.high) == pytest.approx((interval.low, interval.high))
        assert result.p_value == pytest.approx(reference.pvalue)
    assert math.isnan(accuracy_test(0, 0).share)


def test_reader_auc_is_the_mann_whitney_share():
    rng = np.random.default_rng(8)
    positive = rng.random(60) < 0.5
    scores = rng.integers(-5, 6, 60) + positive * 2
    auc, low, high = reader_auc(positive, scores)
    u = stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert auc == pytest.approx(u / (positive.sum() * (~positive).sum()))
    assert low < auc < high
    assert all(math.isnan(v) for v in reader_auc(np.ones(3, bool), np.arange(3)))


def test_reader_icc_is_zero_for_identical_readers_and_large_for_different_ones():
    same = [np.array([1, 0, 1, 0, 1, 0, 1, 0])] * 5
    assert reader_icc(same) == 0.0
    apart = [np.ones(20), np.zeros(20), np.ones(20), np.zeros(20)]
    assert reader_icc(apart) == pytest.approx(1.0)
    assert math.isnan(reader_icc([np.ones(4)]))


def test_plan_finds_the_smallest_exact_binomial_sample_and_spreads_it_over_readers():
    plan = plan_study(0.6, alpha=0.05, power=0.8, icc=0.05, images=(20, 40))
    n = plan["independent_answers"]
    assert n == 199 and binomial_power(n, 0.6, 0.05) >= 0.8
    assert all(binomial_power(m, 0.6, 0.05) < 0.8 for m in range(150, n))
    assert plan["designs"] == [
        {"images": 20, "readers": 20, "answers": 400, "design_effect": pytest.approx(1.95)},
        {"images": 40, "readers": 15, "answers": 600, "design_effect": pytest.approx(2.95)},
    ]
    assert plan["min_readers"] == 10
    independent = plan_study(0.6, icc=0.0, images=(40,))
    assert independent["designs"][0]["readers"] == math.ceil(199 / 40) and independent["min_readers"] is None
    # the pathologists' 55 % of the PCam study needs far more
    assert plan_study(0.55, icc=0.0, images=(40,))["independent_answers"] > 700


@pytest.mark.slow
def test_the_planned_design_reaches_its_power_in_simulation():
    """Readers whose accuracies scatter around 60 % with ICC 0.05 (beta-binomial): the planned
    20 readers x 20 images give the analysis' clustered test about 80 % power, and at 50 % it keeps
    its 5 % level, where treating answers as independent would reject about three times as often."""
    rng = np.random.default_rng(0)
    plan = plan_study(0.6, icc=0.05, images=(20,))
    readers, images = plan["designs"][0]["readers"], plan["designs"][0]["images"]

    def rejections(accuracy: float, clustered: bool, sims: int = 1000) -> float:
        spread = 1 / 0.05 - 1
        hits = 0
        for _ in range(sims):
            answers = [(rng.random(images) < p).astype(float)
                       for p in rng.beta(accuracy * spread, (1 - accuracy) * spread, readers)]
            correct, total = int(sum(a.sum() for a in answers)), readers * images
            effective = total / design_effect(images, reader_icc(answers)) if clustered else None
            hits += accuracy_test(correct, total, effective_trials=effective).p_value <= 0.05
        return hits / sims

    assert (readers, images) == (20, 20)
    assert 0.75 <= rejections(0.6, clustered=True) <= 0.85
    assert rejections(0.5, clustered=True) <= 0.075
    assert rejections(0.5, clustered=False) >= 0.1

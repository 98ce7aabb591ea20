"""Analysis of a realism survey, as in the thesis' human-perception study (§4.2.2, results §5.2).

Input: a survey folder (its stored answers and answer key) or a CSV in the layout documented in
:mod:`histosynth.survey.responses` (one row per participant: ``participant, experience, q1..qN,
comment``, plus one ``truth`` row).

Per participant (reader): Cohen's kappa between the truth and their answers (the truth is one rater,
the participant the other; computed by :func:`sklearn.metrics.cohen_kappa_score` over the questions
they answered), correct count, accuracy with its Wilson 95 % interval and the exact binomial test
against 50 %, sensitivity / specificity for "synthetic" (the share of synthetic images called
synthetic / of real images called real) and, where the survey asked for ratings, the reader's ROC AUC
(the ratings ordered from surely real to surely synthetic). Over participants: mean, min and max
kappa, mean kappa by experience group (1–2 and 3–5, as in the thesis), mean correct count.

Pooled over readers (the reader-study numbers, see :mod:`.stats`): accuracy of all answers with its
interval and test, both as if answers were independent and widened by the design effect of answers
clustered within readers; sensitivity and specificity; Fleiss' kappa between the readers who answered
every question; mean and pooled ROC AUC; accuracy by experience (levels and groups) and by question
position (with a trend test). Over questions: correct counts, the share of readers calling each
image real, the majority vote (a tie is no majority, so not correct), the images fooling people most
and least, and a gallery of the synthetic images that fooled most readers.

Written out as CSV/JSON tables, PNG plots (the answers grid of the thesis' Appendix B, kappa against
experience, accuracy per reader, accuracy by position, share called real per image, ROC curves) and a
self-contained ``report.html`` plus a ``report.md`` beside its plots and gallery images.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from ..errors import DataError
from ..io import atomic_path, write_json_atomic, write_text_atomic
from .build import KEY_FILE, LABELS, RATING_WORDS, REAL, SYNTHETIC, open_survey
from .responses import (
    ParticipantAnswers,
    Responses,
    answer_rows,
    is_answers_csv,
    read_answers_csv,
    read_responses_csv,
    spreadsheet_safe,
    survey_responses,
)
from .stats import accuracy_test, design_effect, fleiss_kappa, reader_auc, reader_icc, trend_test

EXPERIENCE_GROUPS = {"1-2": (1, 2), "3-5": (3, 4, 5)}
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class SurveyAnalysis:
    """Tables and numbers of one survey's responses."""

    responses: Responses
    participants: pd.DataFrame
    questions: pd.DataFrame
    summary: dict
    answers: pd.DataFrame
    experience: pd.DataFrame
    positions: pd.DataFrame


def participant_scores(truth: tuple[str, ...], person: ParticipantAnswers, rating: str | None = None) -> dict:
    """Kappa, correct count, accuracy (interval, test), sensitivity and specificity for "synthetic"
    over the answered questions; with ratings also the reader's ROC AUC and "unsure" count."""
    pairs = [(t, a) for t, a in zip(truth, person.answers, strict=True) if a is not None]
    true_labels = [t for t, _ in pairs]
    given = [a for _, a in pairs]
    with warnings.catch_warnings():
        # When the answered questions and the answers all carry one label, kappa is 0/0: NaN.
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(true_labels, given, labels=list(LABELS))) if pairs else math.nan
    (real_as_real, real_as_synth), (synth_as_real, synth_as_synth) = confusion_matrix(
        true_labels, given, labels=list(LABELS)) if pairs else np.zeros((2, 2), dtype=int)
    correct = int(real_as_real + synth_as_synth)
    test = accuracy_test(correct, len(pairs))
    scored = [(truth[i] == SYNTHETIC, synthetic_score(person.answers[i], person.rating(i), rating))
              for i in range(len(truth)) if person.answered(i)]
    scored = [(positive, score) for positive, score in scored if score is not None]
    auc = reader_auc(np.array([p for p, _ in scored]), np.array([s for _, s in scored])) if scored \
        else (math.nan,) * 3
    return {
        "participant": person.label, "experience": person.experience,
        "group": experience_group(person.experience), "answered": len(pairs),
        "correct": correct, "kappa": kappa,
        "sensitivity": _share(synth_as_synth, synth_as_synth + synth_as_real),
        "specificity": _share(real_as_real, real_as_real + real_as_synth),
        "accuracy": test.share, "accuracy_low": test.low, "accuracy_high": test.high, "p_value": test.p_value,
        "unsure": sum(person.answered(i) and person.answers[i] is None for i in range(len(truth))),
        "auc": auc[0], "auc_low": auc[1], "auc_high": auc[2],
    }


def synthetic_score(answer: str | None, rating: int | None, mode: str | None) -> float | None:
    """How surely an answer calls its image synthetic, for ROC analysis (None: no rating to order by).

    On the real-to-synthetic scale it is the rating itself; with a confidence rating it is the
    confidence, signed by the answer (-5 surely real ... +5 surely synthetic)."""
    if rating is None or mode is None:
        return None
    if mode == "scale":
        return float(rating)
    return None if answer is None else float(rating if answer == SYNTHETIC else -rating)


def _share(part: int, whole: int) -> float:
    return float(part / whole) if whole else math.nan


def experience_group(experience: int) -> str:
    return next(name for name, levels in EXPERIENCE_GROUPS.items() if experience in levels)


def question_scores(responses: Responses) -> pd.DataFrame:
    """Per question: answers, correct answers and the majority vote."""
    rows = []
    for index, truth in enumerate(responses.truth):
        given = [p.answers[index] for p in responses.participants if p.answers[index] is not None]
        votes = {label: given.count(label) for label in LABELS}
        majority = "tie" if votes[REAL] == votes[SYNTHETIC] else max(votes, key=votes.get)
        rows.append({
            "question": index + 1, "truth": truth, "answered": len(given), "correct": votes[truth],
            "called_real": votes[REAL], "called_synthetic": votes[SYNTHETIC],
            "share_correct": _share(votes[truth], len(given)), "majority": majority,
            "majority_correct": majority == truth, "share_called_real": _share(votes[REAL], len(given)),
        })
    return pd.DataFrame(rows)


def analyze_responses(responses: Responses) -> SurveyAnalysis:
    """All numbers of the thesis' analysis for one set of responses."""
    if not responses.participants:
        raise DataError("no participant has answered a question yet; there is nothing to analyse")
    people = pd.DataFrame([participant_scores(responses.truth, p, responses.rating) for p in responses.participants],
                          columns=["participant", "experience", "group", "answered", "correct", "kappa",
                                   "sensitivity", "specificity", "accuracy", "accuracy_low", "accuracy_high",
                                   "p_value", "unsure", "auc", "auc_low", "auc_high"])
    questions = question_scores(responses)
    answers = answer_frame(responses)
    summary = _summary(people, questions)
    summary["reader_study"] = pooled_scores(responses, answers, people)
    return SurveyAnalysis(responses=responses, participants=people, questions=questions, summary=summary,
                          answers=answers, experience=experience_scores(answers), positions=position_scores(answers))


def answer_frame(responses: Responses) -> pd.DataFrame:
    """One row per answer (the tidy export's rows), with its correctness (NaN when unsure) and score."""
    frame = pd.DataFrame(answer_rows(responses), columns=[
        "reader", "experience", "image_id", "question", "truth", "answer", "confidence", "scale", "position",
        "answered_at", "seconds"])
    decided = frame["answer"].isin(LABELS)
    frame["correct"] = (frame["answer"] == frame["truth"]).where(decided).astype(float)
    rating = frame["confidence"].fillna(frame["scale"])
    frame["score"] = [synthetic_score(a if a in LABELS else None, None if pd.isna(r) else int(r), responses.rating)
                      for a, r in zip(frame["answer"], rating, strict=True)]
    frame["score"] = frame["score"].astype(float)
    return frame


def pooled_scores(responses: Responses, answers: pd.DataFrame, people: pd.DataFrame) -> dict:
    """The reader-study numbers over all readers (see this module's docstring)."""
    decided = answers.dropna(subset=["correct"])
    by_reader = [group["correct"].to_numpy() for _, group in decided.groupby("reader", sort=False)]
    icc = reader_icc(by_reader)
    per_reader = len(decided) / len(by_reader) if by_reader else 0.0
    effect = design_effect(per_reader, icc)
    naive = accuracy_test(int(decided["correct"].sum()), len(decided))
    clustered = accuracy_test(int(decided["correct"].sum()), len(decided), effective_trials=len(decided) / effect)
    synthetic, real = decided[decided["truth"] == SYNTHETIC], decided[decided["truth"] == REAL]
    scored = answers.dropna(subset=["score"])
    pooled_auc = reader_auc((scored["truth"] == SYNTHETIC).to_numpy(), scored["score"].to_numpy()) \
        if len(scored) else (math.nan,) * 3
    fleiss, fleiss_readers = readers_fleiss_kappa(responses)
    return {
        "answers": len(decided), "correct": int(decided["correct"].sum()),
        "unsure": int(answers["correct"].isna().sum()),
        **{key: _number(value) for key, value in naive.as_dict().items()},
        "icc": _number(icc), "design_effect": effect, "effective_answers": len(decided) / effect,
        "accuracy_low_clustered": _number(clustered.low), "accuracy_high_clustered": _number(clustered.high),
        "p_value_clustered": _number(clustered.p_value),
        "sensitivity": _number(_share(int(synthetic["correct"].sum()), len(synthetic))),
        "specificity": _number(_share(int(real["correct"].sum()), len(real))),
        "fleiss_kappa": _number(fleiss), "fleiss_readers": fleiss_readers,
        "rating": responses.rating,
        "auc_mean": _number(people["auc"].mean()), "auc_readers": int(people["auc"].notna().sum()),
        "auc_pooled": _number(pooled_auc[0]), "auc_pooled_low": _number(pooled_auc[1]),
        "auc_pooled_high": _number(pooled_auc[2]),
        "position_trend": dict(zip(("z", "p_value"), map(_number, trend_test(decided["position"], decided["correct"])),
                                   strict=True)),
    }


def readers_fleiss_kappa(responses: Responses) -> tuple[float, int]:
    """Fleiss' kappa between the readers who gave every question a real/synthetic answer, and their count
    (NaN with fewer than two such readers)."""
    complete = [p for p in responses.participants if None not in p.answers]
    if len(complete) < 2:
        return math.nan, len(complete)
    counts = np.array([[sum(p.answers[i] == label for p in complete) for label in LABELS]
                       for i in range(responses.n_questions)])
    return fleiss_kappa(counts), len(complete)


def _accuracy_rows(groups: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    rows = []
    for name, group in groups:
        decided = group.dropna(subset=["correct"])
        test = accuracy_test(int(decided["correct"].sum()), len(decided))
        rows.append({"group": name, "readers": group["reader"].nunique(), "answers": len(decided),
                     "correct": int(decided["correct"].sum()), **test.as_dict()})
    return pd.DataFrame(rows, columns=["group", "readers", "answers", "correct", "accuracy", "accuracy_low",
                                       "accuracy_high", "p_value"])


def experience_scores(answers: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (interval, test) per experience level 1-5 and per group of the thesis."""
    levels = [(str(level), answers[answers["experience"] == level]) for level in range(1, 6)]
    groups = [(name, answers[answers["experience"].isin(members)]) for name, members in EXPERIENCE_GROUPS.items()]
    return _accuracy_rows(levels + groups)


MAX_POSITION_BINS = 10


def position_scores(answers: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (interval, test) by question position, in at most 10 equal blocks of positions."""
    if answers.empty:
        return _accuracy_rows([])
    last = int(answers["position"].max())
    blocks = np.array_split(np.arange(1, last + 1), min(last, MAX_POSITION_BINS))
    rows = _accuracy_rows([(f"{block[0]}" if len(block) == 1 else f"{block[0]}-{block[-1]}",
                            answers[answers["position"].between(block[0], block[-1])]) for block in blocks])
    return rows.rename(columns={"group": "positions"})


def _summary(people: pd.DataFrame, questions: pd.DataFrame) -> dict:
    kappa = people["kappa"]
    best = people.loc[kappa.idxmax()] if kappa.notna().any() else None
    worst = people.loc[kappa.idxmin()] if kappa.notna().any() else None
    return {
        "participants": len(people),
        "questions": len(questions),
        "real_questions": int((questions["truth"] == REAL).sum()),
        "synthetic_questions": int((questions["truth"] == SYNTHETIC).sum()),
        "kappa_mean": _number(kappa.mean()),
        "kappa_min": _number(kappa.min()),
        "kappa_max": _number(kappa.max()),
        "correct_at_kappa_min": None if worst is None else int(worst["correct"]),
        "correct_at_kappa_max": None if best is None else int(best["correct"]),
        "correct_mean": _number(people["correct"].mean()),
        "sensitivity_mean": _number(people["sensitivity"].mean()),
        "specificity_mean": _number(people["specificity"].mean()),
        "groups": {name: {"participants": int((people["group"] == name).sum()),
                          "kappa_mean": _number(people.loc[people["group"] == name, "kappa"].mean())}
                   for name in EXPERIENCE_GROUPS},
        "majority_correct": int(questions["majority_correct"].sum()),
        "majority_ties": int((questions["majority"] == "tie").sum()),
        "correct_per_question_mean": _number(questions["correct"].mean()),
        "highlights": _highlights(questions),
    }


def _number(value: float) -> float | None:
    """JSON-safe: NaN (nothing to average) becomes None."""
    return None if value is None or pd.isna(value) else float(value)


def _highlights(questions: pd.DataFrame) -> dict[str, int | None]:
    """The questions of Figures 5.1 and 5.2: per truth, the image judged worst and best.

    Ranked by share correct (then by question number, so ties resolve the same way every time).
    """
    picks: dict[str, int | None] = {}
    for truth in LABELS:
        rated = questions[(questions["truth"] == truth) & (questions["answered"] > 0)]
        rated = rated.sort_values(["share_correct", "question"], kind="stable")
        most_fooled = None if rated.empty else int(rated.iloc[0]["question"])
        best_rated = rated.sort_values(["share_correct", "question"], ascending=[False, True], kind="stable")
        least_fooled = None if rated.empty else int(best_rated.iloc[0]["question"])
        picks[f"{truth}_most_fooled"] = most_fooled
        picks[f"{truth}_least_fooled"] = least_fooled
    return picks


# --- plots --------------------------------------------------------------------------------------

GRID_COLOURS = ["#d9534f", "#4caf50", "#e4e6eb"]  # wrong, correct, not answered
GRID_WRONG, GRID_CORRECT, GRID_OPEN = 0, 1, 2


def answers_grid(responses: Responses) -> tuple[np.ndarray, list[ParticipantAnswers]]:
    """Questions x participants (ordered by experience): GRID_CORRECT, GRID_WRONG or GRID_OPEN."""
    people = sorted(responses.participants, key=lambda person: person.experience)
    grid = np.full((responses.n_questions, len(people)), GRID_OPEN)
    for column, person in enumerate(people):
        for row, (truth, answer) in enumerate(zip(responses.truth, person.answers, strict=True)):
            if answer is not None:
                grid[row, column] = GRID_CORRECT if answer == truth else GRID_WRONG
    return grid, people


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of the report (inches at 110 dpi) and its one plot."""
    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.add_subplot()


def answers_grid_figure(analysis: SurveyAnalysis) -> Figure:
    """The thesis' Appendix B figure: questions in rows, participants in columns (by experience),
    green for a correct answer, red for a wrong one; the first column shows the truth."""
    responses = analysis.responses
    grid, people = answers_grid(responses)
    width = 1.6 + 0.32 * (len(people) + 1)
    height = 1.4 + 0.22 * responses.n_questions
    fig, ax = _figure(max(width, 3.5), height)
    ax.imshow(grid, cmap=ListedColormap(GRID_COLOURS), vmin=0, vmax=2, aspect="auto",
              extent=(0.5, len(people) + 0.5, responses.n_questions + 0.5, 0.5), interpolation="nearest")
    for row, truth in enumerate(responses.truth, start=1):
        ax.text(0, row, "S" if truth == SYNTHETIC else "R", ha="center", va="center", fontsize=8,
                fontweight="bold", color="#7a2e5c" if truth == SYNTHETIC else "#1f4e79")
    ax.set_xlim(-0.5, len(people) + 0.5)
    ax.set_xticks(range(0, len(people) + 1), ["truth", *(p.label for p in people)], rotation=90, fontsize=7)
    ax.set_yticks(range(1, responses.n_questions + 1), [str(n) for n in range(1, responses.n_questions + 1)],
                  fontsize=7)
    ax.set_ylabel("question")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(0, len(people) + 1), ["exp.", *(str(p.experience) for p in people)], fontsize=7)
    ax.set_xticks(np.arange(0.5, len(people) + 1), minor=True)
    ax.set_yticks(np.arange(0.5, responses.n_questions + 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_title("answers (green correct, red wrong, grey not answered)", fontsize=9)
    fig.tight_layout()
    return fig


def kappa_experience_figure(analysis: SurveyAnalysis) -> Figure:
    """Kappa of every participant against their experience, with the group means of the thesis."""
    people = analysis.participants
    fig, ax = _figure(5.5, 4)
    ax.axhline(0, color="#888", linewidth=0.8, linestyle=":")
    for level in range(1, 6):
        kappas = people.loc[people["experience"] == level, "kappa"].dropna().to_numpy()
        # Participants at one level are spread sideways, evenly, so no point hides another.
        offsets = np.linspace(-0.15, 0.15, len(kappas)) if len(kappas) > 1 else np.zeros(len(kappas))
        ax.scatter(level + offsets, kappas, color="#7a2e5c", alpha=0.8, zorder=3)
    for name, levels in EXPERIENCE_GROUPS.items():
        mean = analysis.summary["groups"][name]["kappa_mean"]
        if mean is not None:
            ax.hlines(mean, min(levels) - 0.3, max(levels) + 0.3, color="#1f4e79", linestyle="--")
            ax.text(max(levels) + 0.3, mean, f" mean {name}: {mean:+.2f}", va="bottom", ha="right",
                    fontsize=8, color="#1f4e79")
    ax.set_xlim(0.5, 5.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(range(1, 6), ["1\nbarely any", "2", "3", "4", "5\npathologist"])
    ax.set_xlabel("experience with renal histopathology")
    ax.set_ylabel("Cohen's kappa vs truth")
    fig.tight_layout()
    return fig


READER_COLOUR, POOLED_COLOUR = "#7a2e5c", "#1f4e79"
TRUTH_COLOURS = {REAL: "#1f4e79", SYNTHETIC: "#7a2e5c"}


def _chance_line(ax, vertical: bool = False) -> None:
    (ax.axvline if vertical else ax.axhline)(0.5, color="#888", linewidth=0.8, linestyle=":")


def accuracy_figure(analysis: SurveyAnalysis) -> Figure:
    """Accuracy of every reader with its Wilson 95 % interval, and the pooled accuracy with the
    interval widened for answers clustered within readers (a forest plot)."""
    people = analysis.participants
    pooled = analysis.summary["reader_study"]
    labels = [*people["participant"], "pooled"]
    fig, ax = _figure(4.6, 1.3 + 0.24 * len(labels))
    _chance_line(ax, vertical=True)
    rows = np.arange(len(labels))[::-1]
    for row, (_, person) in zip(rows, people.iterrows(), strict=False):
        if not math.isnan(person["accuracy"]):
            ax.errorbar(person["accuracy"], row, xerr=[[person["accuracy"] - person["accuracy_low"]],
                                                       [person["accuracy_high"] - person["accuracy"]]],
                        fmt="o", color=READER_COLOUR, markersize=4, capsize=2)
    if pooled["accuracy"] is not None:
        ax.errorbar(pooled["accuracy"], 0, fmt="D", color=POOLED_COLOUR, markersize=6, capsize=3,
                    xerr=[[pooled["accuracy"] - pooled["accuracy_low_clustered"]],
                          [pooled["accuracy_high_clustered"] - pooled["accuracy"]]])
    ax.set_yticks(rows, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (Wilson 95 % interval; dotted: chance)")
    fig.tight_layout()
    return fig


def position_figure(analysis: SurveyAnalysis) -> Figure:
    """Accuracy by question position (blocks of positions), with the trend test in the title."""
    table = analysis.positions
    fig, ax = _figure(5.5, 3.6)
    _chance_line(ax)
    x = np.arange(len(table))
    shown = table["answers"] > 0
    ax.errorbar(x[shown], table.loc[shown, "accuracy"],
                yerr=[table.loc[shown, "accuracy"] - table.loc[shown, "accuracy_low"],
                      table.loc[shown, "accuracy_high"] - table.loc[shown, "accuracy"]],
                fmt="o-", color=READER_COLOUR, capsize=3)
    ax.set_xticks(x, table["positions"], fontsize=8, rotation=45 if len(table) > 6 else 0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("question position (as shown to the reader)")
    ax.set_ylabel("accuracy")
    trend = analysis.summary["reader_study"]["position_trend"]
    described = "undefined" if trend["z"] is None else f"z = {trend['z']:+.2f}, p = {trend['p_value']:.3f}"
    ax.set_title(f"trend: {described}", fontsize=9)
    fig.tight_layout()
    return fig


def called_real_figure(analysis: SurveyAnalysis) -> Figure:
    """Every image's share of readers calling it real, sorted, coloured by its truth."""
    questions = analysis.questions.sort_values(["share_called_real", "question"], ascending=[False, True])
    fig, ax = _figure(max(4.5, 1.2 + 0.16 * len(questions)), 3.6)
    _chance_line(ax)
    x = np.arange(len(questions))
    ax.bar(x, questions["share_called_real"].fillna(0), color=[TRUTH_COLOURS[t] for t in questions["truth"]])
    ax.set_xticks(x, questions["question"].astype(str), fontsize=6, rotation=90)
    ax.set_ylim(0, 1)
    ax.set_xlabel("question")
    ax.set_ylabel("share of readers calling it real")
    ax.legend(handles=[Patch(color=colour, label=truth) for truth, colour in TRUTH_COLOURS.items()],
              fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def roc_figure(analysis: SurveyAnalysis) -> Figure:
    """Every reader's ROC curve for telling synthetic from real by their ratings."""
    from sklearn.metrics import roc_curve

    fig, ax = _figure(3.9, 3.8)
    ax.plot([0, 1], [0, 1], color="#888", linewidth=0.8, linestyle=":")
    scored = analysis.answers.dropna(subset=["score"])
    for _, group in scored.groupby("reader", sort=False):
        positive = group["truth"] == SYNTHETIC
        if positive.any() and (~positive).any():
            fpr, tpr, _ = roc_curve(positive, group["score"])
            ax.plot(fpr, tpr, color=READER_COLOUR, alpha=0.45, linewidth=1)
    if len(scored) and scored["truth"].nunique() == 2:
        fpr, tpr, _ = roc_curve(scored["truth"] == SYNTHETIC, scored["score"])
        ax.plot(fpr, tpr, color=POOLED_COLOUR, linewidth=2, label="pooled answers")
        ax.legend(fontsize=8, loc="lower right")
    mean = analysis.summary["reader_study"]["auc_mean"]
    ax.set_title("readers' ROC curves" + ("" if mean is None else f" (mean AUC {mean:.2f})"), fontsize=9)
    ax.set_xlabel("real images called synthetic (1 - specificity)")
    ax.set_ylabel("synthetic images called synthetic")
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --- sources and the report ---------------------------------------------------------------------


def load_source(source: str | Path) -> tuple[Responses, dict[int, tuple[bytes, str]]]:
    """Responses from a survey folder or a CSV (either layout); with a folder also each question's
    image and media type."""
    source = Path(source)
    if source.is_dir() and (source / KEY_FILE).is_file():
        survey = open_survey(source)
        images = {q.number: (survey.image_path(q).read_bytes(), survey.media_type)
                  for q in survey.questions if survey.image_path(q).is_file()}
        return survey_responses(source), images
    if source.is_file() and is_answers_csv(source):
        return read_answers_csv(source), {}
    return read_responses_csv(source), {}


def default_report_dir(source: str | Path) -> Path:
    source = Path(source)
    return source / "report" if source.is_dir() else source.with_name(f"{source.stem}-report")


GALLERY_MAX = 12
GALLERY_FALLBACK = 4


def fooling_images(analysis: SurveyAnalysis) -> list[int]:
    """The synthetic images most readers called real (most fooling first, at most 12); when none
    fooled a majority, the 4 most often called real."""
    synthetic = analysis.questions[(analysis.questions["truth"] == SYNTHETIC) & (analysis.questions["answered"] > 0)]
    ranked = synthetic.sort_values(["share_called_real", "question"], ascending=[False, True], kind="stable")
    fooling = ranked[ranked["share_called_real"] > 0.5]
    return [int(n) for n in (fooling.head(GALLERY_MAX) if len(fooling) else ranked.head(GALLERY_FALLBACK))["question"]]


def report_figures(analysis: SurveyAnalysis) -> dict[str, Figure]:
    figures = {"answers-grid.png": answers_grid_figure(analysis),
               "kappa-vs-experience.png": kappa_experience_figure(analysis),
               "accuracy-per-reader.png": accuracy_figure(analysis),
               "accuracy-by-position.png": position_figure(analysis),
               "called-real-per-image.png": called_real_figure(analysis)}
    if analysis.summary["reader_study"]["auc_readers"]:
        figures["reader-roc.png"] = roc_figure(analysis)
    return figures


TABLES = ("participants", "questions", "answers", "experience", "positions")
GALLERY_DIR = "gallery"


def write_report(analysis: SurveyAnalysis, out: str | Path,
                 images: dict[int, tuple[bytes, str]] | None = None) -> Path:
    """Tables, plots, ``report.html`` (self-contained: plots and images embedded) and ``report.md``
    (beside its plots and, from a survey folder, the gallery's images in ``gallery/``) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = images or {}
    encoded = {name: _png_bytes(fig) for name, fig in report_figures(analysis).items()}
    for name, content in encoded.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(content)
    for name in TABLES:
        with atomic_path(out / f"{name}.csv") as tmp:
            # Participant labels come from the responses file: none may run as a spreadsheet formula.
            getattr(analysis, name).map(spreadsheet_safe).to_csv(tmp, index=False)
    write_json_atomic(out / "summary.json", analysis.summary)
    gallery = _gallery(analysis, images)
    for item in gallery:
        if item["file"]:
            (out / GALLERY_DIR).mkdir(exist_ok=True)
            with atomic_path(out / item["file"]) as tmp:
                tmp.write_bytes(images[item["question"]][0])
    write_text_atomic(out / "report.md", _render(analysis, "report.md", {name: name for name in encoded},
                                                 gallery, images, markdown=True))
    html = _render(analysis, "report.html", {name: _data_uri(content) for name, content in encoded.items()},
                   gallery, images)
    write_text_atomic(out / "report.html", html)
    return out / "report.html"


def _data_uri(content: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(content).decode('ascii')}"


def _gallery(analysis: SurveyAnalysis, images: dict[int, tuple[bytes, str]]) -> list[dict]:
    questions = analysis.questions.set_index("question")
    items = []
    for number in fooling_images(analysis):
        row = questions.loc[number]
        image = images.get(number)
        suffix = ".jpg" if image and image[1] == "image/jpeg" else ".png"
        items.append({"question": number, "called_real": int(row["called_real"]), "answered": int(row["answered"]),
                      "share": float(row["share_called_real"]),
                      "file": f"{GALLERY_DIR}/question-{number}{suffix}" if image else None,
                      "image": _data_uri(*image) if image else None})
    return items


def _render(analysis: SurveyAnalysis, template: str, plots: dict[str, str], gallery: list[dict],
            images: dict[int, tuple[bytes, str]], markdown: bool = False) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=not markdown,
                             trim_blocks=markdown, lstrip_blocks=markdown)
    questions = analysis.questions.set_index("question")
    highlights = []
    captions = {
        "synthetic_most_fooled": "Synthetic image most often called real",
        "real_most_fooled": "Real image most often called synthetic",
        "synthetic_least_fooled": "Synthetic image most often called synthetic",
        "real_least_fooled": "Real image most often called real",
    }
    for key, caption in captions.items():
        number = analysis.summary["highlights"][key]
        if number is None:
            continue
        row = questions.loc[number]
        image = images.get(number)
        highlights.append({"caption": caption, "question": number, "correct": int(row["correct"]),
                           "answered": int(row["answered"]),
                           "image": _data_uri(*image) if image else None})
    rating = analysis.responses.rating
    return env.get_template(template).render(
        summary=analysis.summary, study=analysis.summary["reader_study"],
        participants=analysis.participants.to_dict("records"),
        questions=analysis.questions.to_dict("records"),
        experience=analysis.experience.to_dict("records"),
        positions=analysis.positions.to_dict("records"),
        comments=[(p.label, p.experience, p.comment) for p in analysis.responses.participants if p.comment],
        plots=plots, highlights=highlights, gallery=gallery, rating=rating,
        rating_words=RATING_WORDS.get(rating or "", {}), fmt=_format, pct=format_percent, pval=format_p_value,
        cell=_markdown_cell,
    )


def format_percent(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f} %"
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        text += f" ({100 * low:.1f}–{100 * high:.1f})"
    return text


def format_p_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _markdown_cell(value: object) -> str:
    """Text safe in a Markdown table cell (no pipes or line breaks; HTML escaped)."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _format(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def analyze_survey(source: str | Path, out: str | Path | None = None) -> tuple[SurveyAnalysis, Path]:
    """Analyse a survey folder or responses CSV and write the report; returns it and its path."""
    responses, images = load_source(source)
    analysis = analyze_responses(responses)
    report = write_report(analysis, out if out is not None else default_report_dir(source), images)
    return analysis, report


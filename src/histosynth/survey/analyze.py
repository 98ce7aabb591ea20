"""Analysis of a realism survey, as in the thesis' human-perception study (§4.2.2, results §5.2).

Input: a survey folder (its stored answers and answer key) or a CSV in the layout documented in
:mod:`histosynth.survey.responses` (one row per participant: ``participant, experience, q1..qN,
comment``, plus one ``truth`` row).

Per participant: Cohen's kappa between the truth and their answers (the truth is one rater, the
participant the other; computed by :func:`sklearn.metrics.cohen_kappa_score` over the questions they
answered), correct count, and sensitivity / specificity for "synthetic" (the share of synthetic images
called synthetic / of real images called real). Over participants: mean, min and max kappa, mean
kappa by experience group (1–2 and 3–5, as in the thesis), mean correct count. Over questions: correct
counts, the majority vote (a tie is no majority, so not correct), and the images fooling people most
and least. Written out as CSV/JSON tables, two PNG plots (the answers grid of the thesis' Appendix B
and kappa against experience) and one self-contained HTML report.
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
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from ..errors import DataError
from ..io import atomic_path, write_json_atomic, write_text_atomic
from .build import KEY_FILE, LABELS, REAL, SYNTHETIC, open_survey
from .responses import ParticipantAnswers, Responses, read_responses_csv, spreadsheet_safe, survey_responses

EXPERIENCE_GROUPS = {"1-2": (1, 2), "3-5": (3, 4, 5)}
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class SurveyAnalysis:
    """Tables and numbers of one survey's responses."""

    responses: Responses
    participants: pd.DataFrame
    questions: pd.DataFrame
    summary: dict


def participant_scores(truth: tuple[str, ...], person: ParticipantAnswers) -> dict:
    """Kappa, correct count, sensitivity and specificity for "synthetic" over the answered questions."""
    pairs = [(t, a) for t, a in zip(truth, person.answers, strict=True) if a is not None]
    true_labels = [t for t, _ in pairs]
    given = [a for _, a in pairs]
    with warnings.catch_warnings():
        # When the answered questions and the answers all carry one label, kappa is 0/0: NaN.
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(true_labels, given, labels=list(LABELS))) if pairs else math.nan
    (real_as_real, real_as_synth), (synth_as_real, synth_as_synth) = confusion_matrix(
        true_labels, given, labels=list(LABELS)) if pairs else np.zeros((2, 2), dtype=int)
    return {
        "participant": person.label, "experience": person.experience,
        "group": experience_group(person.experience), "answered": len(pairs),
        "correct": int(real_as_real + synth_as_synth), "kappa": kappa,
        "sensitivity": _share(synth_as_synth, synth_as_synth + synth_as_real),
        "specificity": _share(real_as_real, real_as_real + real_as_synth),
    }


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
            "majority_correct": majority == truth,
        })
    return pd.DataFrame(rows)


def analyze_responses(responses: Responses) -> SurveyAnalysis:
    """All numbers of the thesis' analysis for one set of responses."""
    if not responses.participants:
        raise DataError("no participant has answered a question yet; there is nothing to analyse")
    people = pd.DataFrame([participant_scores(responses.truth, p) for p in responses.participants],
                          columns=["participant", "experience", "group", "answered", "correct", "kappa",
                                   "sensitivity", "specificity"])
    questions = question_scores(responses)
    return SurveyAnalysis(responses=responses, participants=people, questions=questions,
                          summary=_summary(people, questions))


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


def answers_grid_figure(analysis: SurveyAnalysis) -> Figure:
    """The thesis' Appendix B figure: questions in rows, participants in columns (by experience),
    green for a correct answer, red for a wrong one; the first column shows the truth."""
    responses = analysis.responses
    grid, people = answers_grid(responses)
    width = 1.6 + 0.32 * (len(people) + 1)
    height = 1.4 + 0.22 * responses.n_questions
    fig = Figure(figsize=(max(width, 3.5), height), dpi=110)
    ax = fig.add_subplot()
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
    fig = Figure(figsize=(5.5, 4), dpi=110)
    ax = fig.add_subplot()
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


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --- sources and the report ---------------------------------------------------------------------


def load_source(source: str | Path) -> tuple[Responses, dict[int, tuple[bytes, str]]]:
    """Responses from a survey folder or a CSV; with a folder also each question's image and type."""
    source = Path(source)
    if source.is_dir() and (source / KEY_FILE).is_file():
        survey = open_survey(source)
        images = {q.number: (survey.image_path(q).read_bytes(), survey.media_type)
                  for q in survey.questions if survey.image_path(q).is_file()}
        return survey_responses(source), images
    return read_responses_csv(source), {}


def default_report_dir(source: str | Path) -> Path:
    source = Path(source)
    return source / "report" if source.is_dir() else source.with_name(f"{source.stem}-report")


def write_report(analysis: SurveyAnalysis, out: str | Path,
                 images: dict[int, tuple[bytes, str]] | None = None) -> Path:
    """Tables, plots and ``report.html`` (self-contained: plots and images embedded) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"answers-grid.png": answers_grid_figure(analysis),
             "kappa-vs-experience.png": kappa_experience_figure(analysis)}
    encoded = {name: _png_bytes(fig) for name, fig in plots.items()}
    for name, content in encoded.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(content)
    for name, table in (("participants.csv", analysis.participants), ("questions.csv", analysis.questions)):
        with atomic_path(out / name) as tmp:
            # Participant labels come from the responses file: none may run as a spreadsheet formula.
            table.map(spreadsheet_safe).to_csv(tmp, index=False)
    write_json_atomic(out / "summary.json", analysis.summary)
    html = _render_html(analysis, encoded, images or {})
    write_text_atomic(out / "report.html", html)
    return out / "report.html"


def _data_uri(content: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(content).decode('ascii')}"


def _render_html(analysis: SurveyAnalysis, plots: dict[str, bytes], images: dict[int, tuple[bytes, str]]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
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
    return env.get_template("report.html").render(
        summary=analysis.summary,
        participants=analysis.participants.to_dict("records"),
        questions=analysis.questions.to_dict("records"),
        comments=[(p.label, p.experience, p.comment) for p in analysis.responses.participants if p.comment],
        plots={name: _data_uri(content) for name, content in plots.items()},
        highlights=highlights,
        fmt=_format,
    )


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


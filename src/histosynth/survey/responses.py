"""Survey responses and their CSV layout (the thesis' layout: one row per participant).

The layout, as written by the admin export and read by ``histosynth survey analyze FILE.csv``::

    participant,experience,q1,q2,q3,...,qN,comment
    truth,,synthetic,real,real,...,synthetic,
    P1,3,real,synthetic,real,...,real,I looked at the nuclei
    P2,1,synthetic,,real,...,synthetic,

- ``participant``: a label, unique per row. The row labelled ``truth`` holds the correct answers; there
  must be exactly one (an export from a form tool lacks it: add it by hand from the answer key).
- ``experience``: experience with renal histopathology, an integer from 1 ("barely any") to
  5 ("pathologist"); empty on the truth row.
- ``q1`` ... ``qN``: one column per question, numbered from 1 in the order shown (``q01`` is read as
  ``q1``). A cell holds ``real`` or ``synthetic`` (any case; ``r``/``s`` accepted), or is empty for an
  unanswered question.
- ``comment``: optional; the participant's answer to "how did you decide?".

No other columns are accepted, so that a misspelt question column is an error rather than a silent
gap. Rows may come in any order; participants are analysed in the order given.

A cell that a spreadsheet would run as a formula (one starting with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return) is written with a leading ``'``, which spreadsheets show as text; reading
removes that quote again, so a comment reads back as it was given.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..io import write_text_atomic
from .build import REAL, SYNTHETIC, open_survey, read_answer_key
from .store import SurveyStore

TRUTH_LABEL = "truth"
EXPERIENCE_LEVELS = range(1, 6)
# As in the thesis' form, only the ends of the scale carry words.
EXPERIENCE_ENDS = {1: "Barely any experience", 5: "Pathologist"}
_ANSWER_SPELLINGS = {"real": REAL, "r": REAL, "synthetic": SYNTHETIC, "s": SYNTHETIC}
_QUESTION_COLUMN = re.compile(r"^q(\d+)$", re.IGNORECASE)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Quotes already in front of a formula start get one more on writing, so reading is exact.
_ESCAPED = re.compile(r"^'*[=+\-@\t\r]")


def spreadsheet_safe(value: object) -> object:
    """A text cell that no spreadsheet runs as a formula (other values unchanged).

    Line breaks become ``\n``: the CSV writer quotes a cell holding ``\n`` but not one holding a
    lone ``\r``, which would then split the row for every reader.
    """
    if not isinstance(value, str):
        return value
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    return "'" + value if _ESCAPED.match(value) else value


def spreadsheet_text(value: str) -> str:
    """The text that :func:`spreadsheet_safe` escaped."""
    return value[1:] if value.startswith("'") and _ESCAPED.match(value[1:]) else value


@dataclass(frozen=True)
class ParticipantAnswers:
    """One participant's answers; `answers[i]` answers question i + 1 (None: not answered)."""

    label: str
    experience: int
    answers: tuple[str | None, ...]
    comment: str = ""


@dataclass(frozen=True)
class Responses:
    """The truth of every question and every participant's answers."""

    truth: tuple[str, ...]
    participants: tuple[ParticipantAnswers, ...]

    @property
    def n_questions(self) -> int:
        return len(self.truth)


def stored_responses(truth: Sequence[str], store: SurveyStore) -> Responses:
    """The answers in a store; participants who have not answered a single question are left out."""
    return Responses(truth=tuple(truth), participants=tuple(
        ParticipantAnswers(label=p.label, experience=p.experience, comment=p.comment,
                           answers=tuple(p.answers.get(n) for n in range(1, len(truth) + 1)))
        for p in store.participants() if p.answers
    ))


def survey_responses(survey_dir: str | Path) -> Responses:
    """The answers collected by the survey server in a survey folder, with its answer key."""
    survey = open_survey(survey_dir)
    if not survey.responses_path.is_file():
        raise DataError(f"{survey_dir} has no answers yet (no {survey.responses_path.name}); "
                        "run 'histosynth survey serve' and collect some")
    return stored_responses(read_answer_key(survey_dir), SurveyStore(survey.responses_path))


def responses_to_csv(responses: Responses) -> str:
    """The responses in the layout described in this module's docstring."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    rows = [["participant", "experience", *_question_columns(responses.n_questions), "comment"],
            [TRUTH_LABEL, "", *responses.truth, ""]]
    rows += [[p.label, p.experience, *(a or "" for a in p.answers), p.comment] for p in responses.participants]
    writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def write_responses_csv(path: str | Path, responses: Responses) -> None:
    write_text_atomic(path, responses_to_csv(responses))


def read_responses_csv(path: str | Path) -> Responses:
    """Read a CSV in the layout described in this module's docstring; errors name row and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"responses file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [[spreadsheet_text(cell) for cell in row] for row in csv.reader(handle)]
    if not rows:
        raise DataError(f"{path} is empty; expected a header 'participant,experience,q1,...,qN[,comment]'")
    header = [name.strip() for name in rows[0]]
    numbers = _question_numbers(path, header)
    truth_rows = [row for row in rows[1:] if row and row[0].strip().lower() == TRUTH_LABEL]
    if len(truth_rows) != 1:
        raise DataError(f"{path} needs exactly one row labelled '{TRUTH_LABEL}' with the correct answers "
                        f"(found {len(truth_rows)})")
    participants = []
    labels = set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path} line {line} has {len(row)} cells; the header has {len(header)}")
        cells = dict(zip(header, (cell.strip() for cell in row), strict=True))
        answers = _answers(path, line, cells, numbers)
        if cells["participant"].lower() == TRUTH_LABEL:
            if None in answers:
                raise DataError(f"{path} line {line}: the truth row must give every question's answer")
            truth = answers
            continue
        if not cells["participant"] or cells["participant"] in labels:
            raise DataError(f"{path} line {line}: participant label {cells['participant']!r} is empty or repeated")
        labels.add(cells["participant"])
        participants.append(ParticipantAnswers(
            label=cells["participant"], experience=_experience(path, line, cells["experience"]),
            answers=answers, comment=cells.get("comment", "")))
    return Responses(truth=truth, participants=tuple(participants))


def _question_columns(n: int) -> list[str]:
    return [f"q{number}" for number in range(1, n + 1)]


def _question_numbers(path: Path, header: list[str]) -> dict[str, int]:
    """Map each question column to its number; the numbers must be exactly 1..N."""
    required = {"participant", "experience"}
    missing = required - set(header)
    numbers = {}
    for name in header:
        match = _QUESTION_COLUMN.match(name)
        if match:
            numbers[name] = int(match.group(1))
        elif name not in required | {"comment"}:
            raise DataError(f"{path}: unknown column {name!r}; allowed are participant, experience, "
                            "q1..qN and comment")
    if missing or not numbers:
        raise DataError(f"{path}: the header needs participant, experience and q1..qN columns "
                        f"(missing: {', '.join(sorted(missing)) or 'question columns'})")
    if sorted(numbers.values()) != list(range(1, len(numbers) + 1)):
        raise DataError(f"{path}: question columns must be numbered q1..q{len(numbers)} without gaps or repeats")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: the header repeats a column")
    return numbers


def _answers(path: Path, line: int, cells: dict[str, str], numbers: dict[str, int]) -> tuple[str | None, ...]:
    answers: list[str | None] = [None] * len(numbers)
    for column, number in numbers.items():
        value = cells[column].lower()
        if value and value not in _ANSWER_SPELLINGS:
            raise DataError(f"{path} line {line}, column {column}: {cells[column]!r} is not "
                            f"'{REAL}' or '{SYNTHETIC}' (or empty for no answer)")
        answers[number - 1] = _ANSWER_SPELLINGS.get(value)
    return tuple(answers)


def _experience(path: Path, line: int, value: str) -> int:
    if value not in {str(level) for level in EXPERIENCE_LEVELS}:
        raise DataError(f"{path} line {line}: experience {value!r} must be an integer from 1 to 5")
    return int(value)


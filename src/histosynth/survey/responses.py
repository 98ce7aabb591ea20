"""Survey responses and their two CSV layouts: the thesis' (one row per participant) and a tidy one
(one row per answer).

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

The tidy layout, written by ``histosynth survey export`` and ``/admin/answers.csv`` for R or pandas, and
also read by ``survey analyze``::

    reader,experience,image_id,question,truth,answer,confidence,scale,position,answered_at,seconds
    P1,3,5f0c...,7,synthetic,real,4,,1,2026-05-04T10:00:03.120+00:00,12.4

- ``reader``, ``experience``: as above; ``image_id``: the image's opaque id (the question number when
  the answers came from a CSV); ``question``: its number in the survey's seeded order; ``truth``.
- ``answer``: ``real``, ``synthetic``, or ``unsure`` (the midpoint of the real-to-synthetic scale).
- ``confidence``: 1 (guessing) to 5 (certain), where the survey asked for it; ``scale``: 1 (definitely
  real) to 5 (definitely synthetic), where the survey asked for that instead; empty otherwise.
- ``position``: where in the reader's order the image was shown (1 = first).
- ``answered_at``: when the (last) answer was given, UTC; ``seconds``: time since the reader's previous
  answer (for their first, since they started); empty where unknown.

A cell that a spreadsheet would run as a formula (one starting with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return) is written with a leading ``'``, which spreadsheets show as text; reading
removes that quote again, so a comment reads back as it was given.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..io import write_text_atomic
from .build import RATINGS, REAL, SYNTHETIC, Survey, open_survey, read_answer_key
from .store import UNSURE, Participant, SurveyStore

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
    """One participant's answers; `answers[i]` answers question i + 1 (None: not answered, or
    "unsure" on the real-to-synthetic scale when `ratings[i]` is set).

    Where known: `ratings[i]`, the 1-5 rating given with answer i; `positions[i]`, where question
    i + 1 was shown in this participant's order (None for all: the survey's own order);
    `answered_at[i]` and `started_at`, UTC times.
    """

    label: str
    experience: int
    answers: tuple[str | None, ...]
    comment: str = ""
    ratings: tuple[int | None, ...] | None = None
    positions: tuple[int | None, ...] | None = None
    answered_at: tuple[str | None, ...] | None = None
    started_at: str | None = None

    def answered(self, index: int) -> bool:
        """Whether question index + 1 was answered (an "unsure" scale rating counts)."""
        return self.answers[index] is not None or (self.ratings is not None and self.ratings[index] is not None)

    def position(self, index: int) -> int:
        return index + 1 if self.positions is None or self.positions[index] is None else self.positions[index]

    def rating(self, index: int) -> int | None:
        return None if self.ratings is None else self.ratings[index]


@dataclass(frozen=True)
class Responses:
    """The truth of every question and every participant's answers.

    `rating`: the rating the survey asked for with each answer ("confidence", "scale" or None);
    `image_ids`: each question's opaque image id, where known.
    """

    truth: tuple[str, ...]
    participants: tuple[ParticipantAnswers, ...]
    rating: str | None = None
    image_ids: tuple[str, ...] | None = None

    @property
    def n_questions(self) -> int:
        return len(self.truth)


def stored_responses(truth: Sequence[str], store: SurveyStore, survey: Survey | None = None) -> Responses:
    """The answers in a store; participants who have not answered a single question are left out.

    With the `survey`, the responses also know its rating mode and image ids.
    """
    numbers = range(1, len(truth) + 1)
    return Responses(
        truth=tuple(truth), rating=None if survey is None else survey.rating,
        image_ids=None if survey is None else tuple(q.image_id for q in survey.questions),
        participants=tuple(_stored_participant(p, numbers) for p in store.participants() if p.answers))


def _stored_participant(person: Participant, numbers: range) -> ParticipantAnswers:
    order = person.order
    positions = None if order is None else {question: position for position, question in enumerate(order, 1)}
    return ParticipantAnswers(
        label=person.label, experience=person.experience, comment=person.comment,
        answers=tuple(person.answers.get(n) for n in numbers),
        ratings=tuple(person.ratings.get(n) for n in numbers) if person.ratings else None,
        positions=None if positions is None else tuple(positions.get(n) for n in numbers),
        answered_at=tuple(person.answered_at.get(n) for n in numbers), started_at=person.started_at)


def survey_responses(survey_dir: str | Path) -> Responses:
    """The answers collected by the survey server in a survey folder, with its answer key."""
    survey = open_survey(survey_dir)
    if not survey.responses_path.is_file():
        raise DataError(f"{survey_dir} has no answers yet (no {survey.responses_path.name}); "
                        "run 'histosynth survey serve' and collect some")
    return stored_responses(read_answer_key(survey_dir), SurveyStore(survey.responses_path), survey)


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
        where = f"{path} line {line}" if line else str(path)
        raise DataError(f"{where}: experience {value!r} must be an integer from 1 to 5")
    return int(value)



# --- the tidy layout: one row per answer ----------------------------------------------------------

ANSWER_COLUMNS = ("reader", "experience", "image_id", "question", "truth", "answer", "confidence", "scale",
                  "position", "answered_at", "seconds")


def answer_rows(responses: Responses) -> list[dict]:
    """One dict per answer in the tidy layout (readers in order, each reader's answers by position)."""
    rows = []
    for person in responses.participants:
        seconds = _seconds_since_previous(person)
        answered = [i for i in range(responses.n_questions) if person.answered(i)]
        for index in sorted(answered, key=person.position):
            rating = person.rating(index)
            rows.append({
                "reader": person.label, "experience": person.experience,
                "image_id": responses.image_ids[index] if responses.image_ids else str(index + 1),
                "question": index + 1, "truth": responses.truth[index],
                "answer": person.answers[index] or UNSURE,
                "confidence": rating if responses.rating == "confidence" else None,
                "scale": rating if responses.rating == "scale" else None,
                "position": person.position(index),
                "answered_at": None if person.answered_at is None else person.answered_at[index],
                "seconds": seconds.get(index),
            })
    return rows


def _seconds_since_previous(person: ParticipantAnswers) -> dict[int, float]:
    """Per answered question: seconds since the reader's previous answer (the first: since the start)."""
    if person.answered_at is None:
        return {}
    times = sorted((_parse_time(at), index) for index, at in enumerate(person.answered_at) if at)
    previous = _parse_time(person.started_at) if person.started_at else None
    gaps = {}
    for moment, index in times:
        if previous is not None:
            gaps[index] = round((moment - previous).total_seconds(), 3)
        previous = moment
    return gaps


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def answers_to_csv(responses: Responses) -> str:
    """The responses in the tidy layout described in this module's docstring."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ANSWER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe("" if value is None else value) for key, value in row.items()}
                     for row in answer_rows(responses))
    return buffer.getvalue()


def write_answers_csv(path: str | Path, responses: Responses) -> None:
    write_text_atomic(path, answers_to_csv(responses))


def is_answers_csv(path: str | Path) -> bool:
    """Whether a CSV file is in the tidy layout (its header starts with ``reader``)."""
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    return bool(header) and header[0].strip() == "reader"


def read_answers_csv(path: str | Path) -> Responses:
    """Read a CSV in the tidy layout; every question 1..N must have at least one row."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = set(ANSWER_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: the tidy layout needs the columns {', '.join(ANSWER_COLUMNS)} "
                            f"(missing: {', '.join(sorted(missing))})")
        rows = [{key: spreadsheet_text(value or "").strip() for key, value in row.items() if key}
                for row in reader]
    truth: dict[int, str] = {}
    image_ids: dict[int, str] = {}
    readers: dict[str, dict] = {}
    modes = set()
    for line, row in enumerate(rows, start=2):
        question = _whole_number(path, line, "question", row["question"], low=1)
        if row["truth"] not in (REAL, SYNTHETIC) or truth.setdefault(question, row["truth"]) != row["truth"]:
            raise DataError(f"{path} line {line}: truth {row['truth']!r} of question {question} is not "
                            f"'{REAL}' or '{SYNTHETIC}', or differs from an earlier row's")
        image_ids.setdefault(question, row["image_id"])
        entry = readers.setdefault(row["reader"], {"experience": row["experience"], "answers": {}})
        if entry["experience"] != row["experience"] or question in entry["answers"]:
            raise DataError(f"{path} line {line}: reader {row['reader']!r} has another experience or "
                            f"a second answer to question {question}")
        rating = None
        for mode in ("confidence", "scale"):
            if row[mode]:
                modes.add(mode)
                rating = _whole_number(path, line, mode, row[mode], low=min(RATINGS), high=max(RATINGS))
        answer = _ANSWER_SPELLINGS.get(row["answer"].lower())
        if answer is None and not (row["answer"].lower() == UNSURE and row["scale"]):
            raise DataError(f"{path} line {line}: answer {row['answer']!r} is not '{REAL}' or '{SYNTHETIC}' "
                            f"('{UNSURE}' only with a scale rating)")
        entry["answers"][question] = (answer, rating, _whole_number(path, line, "position", row["position"], low=1)
                                      if row["position"] else None, row["answered_at"] or None)
    return _tidy_responses(path, truth, image_ids, readers, modes)


def _tidy_responses(path: Path, truth: dict[int, str], image_ids: dict[int, str], readers: dict[str, dict],
                    modes: set[str]) -> Responses:
    if not truth:
        raise DataError(f"{path} holds no answers")
    if sorted(truth) != list(range(1, len(truth) + 1)):
        gaps = sorted(set(range(1, max(truth) + 1)) - set(truth))
        raise DataError(f"{path}: no row answers question {gaps[0]}; the tidy layout needs every question "
                        "1..N answered at least once to know its truth")
    if len(modes) > 1:
        raise DataError(f"{path}: rows carry both confidence and scale ratings; a survey asks for one")
    numbers = range(1, len(truth) + 1)
    people = []
    for label, entry in readers.items():
        given = entry["answers"]
        people.append(ParticipantAnswers(
            label=label, experience=_experience(path, 0, entry["experience"]),
            answers=tuple(given[n][0] if n in given else None for n in numbers),
            ratings=tuple(given[n][1] if n in given else None for n in numbers) if modes else None,
            positions=tuple(given[n][2] if n in given else None for n in numbers),
            answered_at=tuple(given[n][3] if n in given else None for n in numbers)))
    return Responses(truth=tuple(truth[n] for n in numbers), participants=tuple(people),
                     rating=modes.pop() if modes else None, image_ids=tuple(image_ids[n] for n in numbers))


def _whole_number(path: Path, line: int, column: str, value: str, low: int, high: int | None = None) -> int:
    if not value.isdigit() or int(value) < low or (high is not None and int(value) > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise DataError(f"{path} line {line}, column {column}: {value!r} must be a whole number {span}")
    return int(value)

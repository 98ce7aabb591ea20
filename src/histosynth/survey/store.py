"""The survey's answers in SQLite: every answer is stored the moment it is given.

One connection per operation and WAL journaling let many participants answer at once (readers never
wait for the writer); writes take the write lock up front (``BEGIN IMMEDIATE``) so that concurrent
writers queue on the busy timeout instead of failing. A participant has one answer per question;
answering again replaces it and the change is kept in ``answer_changes``.

An invitation is a random code that creates one participant, once: redeeming it and creating the
participant happen in one transaction, so two people racing with the same code get one participant.

A participant's question order (the survey's question numbers in the order they are shown, drawn per
participant when the survey asks for it) is stored with them; NULL means the survey's own order. An
answer may carry a 1-5 ``rating`` (the survey's confidence or real-to-synthetic scale); on that scale's
midpoint ("unsure") the answer itself is NULL. Stores written before orders and ratings existed gain
the columns, empty, when opened.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from .build import LABELS, RATINGS

BUSY_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE,
    experience INTEGER NOT NULL CHECK (experience BETWEEN 1 AND 5),
    started_at TEXT NOT NULL,
    finished_at TEXT,
    comment TEXT NOT NULL DEFAULT '',
    question_order TEXT
);
CREATE TABLE IF NOT EXISTS answers (
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    question INTEGER NOT NULL CHECK (question >= 1),
    answer TEXT CHECK (answer IN ('real', 'synthetic')),
    answered_at TEXT NOT NULL,
    rating INTEGER CHECK (rating BETWEEN 1 AND 5),
    PRIMARY KEY (participant_id, question)
);
CREATE TABLE IF NOT EXISTS invites (
    code TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    participant_id INTEGER UNIQUE REFERENCES participants(id)
);
CREATE TABLE IF NOT EXISTS answer_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    question INTEGER NOT NULL,
    previous TEXT NOT NULL,
    answer TEXT NOT NULL,
    changed_at TEXT NOT NULL,
    previous_rating INTEGER,
    rating INTEGER
);
"""
# Columns added since the first stores were written: (table, column, declaration).
ADDED_COLUMNS = (
    ("participants", "question_order", "TEXT"),
    ("answers", "rating", "INTEGER CHECK (rating BETWEEN 1 AND 5)"),
    ("answer_changes", "previous_rating", "INTEGER"),
    ("answer_changes", "rating", "INTEGER"),
)
UNSURE = "unsure"


@dataclass
class Participant:
    """A participant as stored; `label` (P1, P2, ...) is what exports show, never the token."""

    id: int
    token: str
    experience: int
    started_at: str
    finished_at: str | None
    comment: str
    question_order: str | None = None
    answers: dict[int, str | None] = field(default_factory=dict)
    ratings: dict[int, int] = field(default_factory=dict)
    answered_at: dict[int, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"P{self.id}"

    @property
    def order(self) -> tuple[int, ...] | None:
        """The question numbers in the order this participant sees them (None: the survey's order)."""
        return None if self.question_order is None else tuple(json.loads(self.question_order))

    def question_at(self, position: int) -> int:
        """The question shown at 1-based `position`."""
        order = self.order
        return position if order is None else order[position - 1]

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass(frozen=True)
class Counts:
    """Live numbers for the admin page."""

    started: int
    finished: int
    answers: int
    changed_answers: int
    by_experience: dict[int, int]
    invites: int = 0
    invites_used: int = 0


@dataclass(frozen=True)
class Invite:
    """An invitation code; `participant_token` is set once it has been used."""

    code: str
    participant_token: str | None

    @property
    def used(self) -> bool:
        return self.participant_token is not None


def _now() -> str:
    """UTC to the millisecond: the gaps between answers are the readers' response times."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class SurveyStore:
    """Participants and their answers in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            _add_missing_columns(db)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def setting(self, name: str) -> str:
        """A server-side secret that survives restarts, made on first use (e.g. the form-signing key)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)",
                       (name, secrets.token_hex(32)))
            return db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()["value"]

    def create_participant(self, experience: int, order: Sequence[int] | None = None) -> Participant:
        """A new participant; `order`: the question numbers in the order they will be shown."""
        with self._write() as db:
            token = self._insert_participant(db, experience, order)
        participant = self.participant(token)
        assert participant is not None
        return participant

    @staticmethod
    def _insert_participant(db: sqlite3.Connection, experience: int, order: Sequence[int] | None) -> str:
        # The token is a credential (it is the participant's resume link), so it comes from the
        # system's secure random source rather than a seed.
        token = secrets.token_urlsafe(24)
        db.execute("INSERT INTO participants (token, experience, started_at, question_order) VALUES (?, ?, ?, ?)",
                   (token, experience, _now(), None if order is None else json.dumps([int(n) for n in order])))
        return token

    def mint_invites(self, n: int) -> list[str]:
        """`n` new invitation codes, each good for creating one participant."""
        codes = [secrets.token_urlsafe(18) for _ in range(n)]
        now = _now()
        with self._write() as db:
            db.executemany("INSERT INTO invites (code, created_at) VALUES (?, ?)", [(c, now) for c in codes])
        return codes

    def invite(self, code: str) -> Invite | None:
        with self._connection() as db:
            row = db.execute("SELECT invites.code, participants.token FROM invites LEFT JOIN participants "
                             "ON participants.id = invites.participant_id WHERE invites.code = ?",
                             (code,)).fetchone()
        return None if row is None else Invite(row[0], row[1])

    def invites(self) -> list[Invite]:
        """Every invitation in the order they were minted."""
        with self._connection() as db:
            rows = db.execute("SELECT invites.code, participants.token FROM invites LEFT JOIN participants "
                              "ON participants.id = invites.participant_id ORDER BY invites.rowid").fetchall()
        return [Invite(code, token) for code, token in rows]

    def redeem_invite(self, code: str, experience: int, order: Sequence[int] | None = None) -> Participant | None:
        """Create the participant of an unused invitation; None if the code is unknown or used."""
        with self._write() as db:
            row = db.execute("SELECT participant_id FROM invites WHERE code = ?", (code,)).fetchone()
            if row is None or row["participant_id"] is not None:
                return None
            token = self._insert_participant(db, experience, order)
            db.execute("UPDATE invites SET participant_id = (SELECT id FROM participants WHERE token = ?) "
                       "WHERE code = ?", (token, code))
        return self.participant(token)

    def participant(self, token: str) -> Participant | None:
        with self._connection() as db:
            row = db.execute("SELECT * FROM participants WHERE token = ?", (token,)).fetchone()
            if row is None:
                return None
            answers = db.execute("SELECT * FROM answers WHERE participant_id = ?", (row["id"],)).fetchall()
        return _participant(row, answers)

    def record_answer(self, participant_id: int, question: int, answer: str | None, rating: int | None = None) -> None:
        """Store an answer; a second answer to the same question replaces the first and is audited.

        `answer` is "real" or "synthetic", or None for the midpoint of the real-to-synthetic scale
        (which needs its `rating`, 3); `rating` is the answer's 1-5 rating where the survey asks for one.
        """
        if answer not in LABELS and not (answer is None and rating is not None):
            raise ValueError(f"answer must be one of {LABELS}, not {answer!r}")
        if rating is not None and rating not in RATINGS:
            raise ValueError(f"rating must be one of {tuple(RATINGS)}, not {rating!r}")
        now = _now()
        with self._write() as db:
            old = db.execute("SELECT answer, rating FROM answers WHERE participant_id = ? AND question = ?",
                             (participant_id, question)).fetchone()
            if old is not None:
                db.execute(
                    "INSERT INTO answer_changes (participant_id, question, previous, answer, changed_at, "
                    "previous_rating, rating) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (participant_id, question, old["answer"] or UNSURE, answer or UNSURE, now, old["rating"], rating))
            db.execute(
                "INSERT INTO answers (participant_id, question, answer, answered_at, rating) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (participant_id, question) DO UPDATE SET answer = excluded.answer, "
                "answered_at = excluded.answered_at, rating = excluded.rating",
                (participant_id, question, answer, now, rating))

    def finish(self, participant_id: int, comment: str) -> None:
        with self._write() as db:
            db.execute("UPDATE participants SET finished_at = ?, comment = ? WHERE id = ? AND finished_at IS NULL",
                       (_now(), comment, participant_id))

    def participants(self) -> list[Participant]:
        """Every participant with their answers, in the order they started."""
        with self._connection() as db:
            rows = db.execute("SELECT * FROM participants ORDER BY id").fetchall()
            answers = db.execute("SELECT * FROM answers").fetchall()
        by_participant: dict[int, list[sqlite3.Row]] = {}
        for a in answers:
            by_participant.setdefault(a["participant_id"], []).append(a)
        return [_participant(row, by_participant.get(row["id"], [])) for row in rows]

    def answer_changes(self) -> list[dict]:
        with self._connection() as db:
            return [dict(row) for row in db.execute("SELECT * FROM answer_changes ORDER BY id")]

    def counts(self) -> Counts:
        with self._connection() as db:
            started, finished = db.execute(
                "SELECT COUNT(*), COUNT(finished_at) FROM participants").fetchone()
            answers = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            changed = db.execute("SELECT COUNT(*) FROM answer_changes").fetchone()[0]
            by_experience = dict(db.execute(
                "SELECT experience, COUNT(*) FROM participants GROUP BY experience").fetchall())
            invites, used = db.execute("SELECT COUNT(*), COUNT(participant_id) FROM invites").fetchone()
        return Counts(started=started, finished=finished, answers=answers, changed_answers=changed,
                      by_experience={level: by_experience.get(level, 0) for level in range(1, 6)},
                      invites=invites, invites_used=used)


def _participant(row: sqlite3.Row, answers: list[sqlite3.Row]) -> Participant:
    return Participant(
        **dict(row), answers={a["question"]: a["answer"] for a in answers},
        ratings={a["question"]: a["rating"] for a in answers if a["rating"] is not None},
        answered_at={a["question"]: a["answered_at"] for a in answers})


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a store written by an earlier version up to the current schema (new columns stay empty)."""
    for table, column, declaration in ADDED_COLUMNS:
        if column not in {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}:
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it a moment ago
                if "duplicate column" not in str(exc):
                    raise

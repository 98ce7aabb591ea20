"""The answers database: WAL journaling, one answer per question, audited changes, kept secrets."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from histosynth.survey.store import SurveyStore


def test_store_uses_wal_and_keeps_one_answer_per_question(tmp_path):
    store = SurveyStore(tmp_path / "r.sqlite")
    assert sqlite3.connect(tmp_path / "r.sqlite").execute("PRAGMA journal_mode").fetchone() == ("wal",)
    person = store.create_participant(experience=3)
    assert (person.label, person.experience, person.answers, person.finished) == ("P1", 3, {}, False)
    store.record_answer(person.id, 2, "real")
    store.record_answer(person.id, 2, "real")
    store.record_answer(person.id, 2, "synthetic")
    store.record_answer(person.id, 1, "real")
    assert store.participant(person.token).answers == {1: "real", 2: "synthetic"}
    assert [(c["previous"], c["answer"]) for c in store.answer_changes()] == [("real", "real"), ("real", "synthetic")]
    with pytest.raises(ValueError, match="answer must be one of"):
        store.record_answer(person.id, 1, "unsure")
    store.finish(person.id, "by colour")
    store.finish(person.id, "second thoughts")  # a finished survey stays as submitted
    again = store.participant(person.token)
    assert (again.finished, again.comment) == (True, "by colour")
    second = store.create_participant(experience=5)
    counts = store.counts()
    assert (counts.started, counts.finished, counts.answers, counts.changed_answers) == (2, 1, 2, 2)
    assert counts.by_experience == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1}
    assert [p.label for p in store.participants()] == ["P1", "P2"] and second.token != person.token


def test_experience_outside_one_to_five_is_refused_by_the_database(tmp_path):
    with pytest.raises(sqlite3.IntegrityError):
        SurveyStore(tmp_path / "r.sqlite").create_participant(experience=6)


def test_server_secrets_survive_a_restart(tmp_path):
    first = SurveyStore(tmp_path / "r.sqlite").setting("form-key")
    assert len(first) == 64
    assert SurveyStore(tmp_path / "r.sqlite").setting("form-key") == first
    assert SurveyStore(tmp_path / "r.sqlite").setting("other") != first


def test_an_invitation_raced_from_many_threads_admits_exactly_one(tmp_path):
    store = SurveyStore(tmp_path / "r.sqlite")
    (code,) = store.mint_invites(1)
    together = threading.Barrier(8, timeout=30)

    def redeem(experience: int):
        together.wait()
        return SurveyStore(tmp_path / "r.sqlite").redeem_invite(code, experience)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(redeem, [1, 2, 3, 4, 5, 1, 2, 3]))
    admitted = [r for r in results if r is not None]
    assert len(admitted) == 1 and len(store.participants()) == 1
    assert store.invite(code).participant_token == admitted[0].token
    assert store.redeem_invite("unknown-code", 3) is None
    counts = store.counts()
    assert (counts.started, counts.invites, counts.invites_used) == (1, 1, 1)

"""Per-participant question orders, confidence and scale ratings, the tidy export, and old stores."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from histosynth.cli import main
from histosynth.errors import DataError
from histosynth.survey.analyze import analyze_responses
from histosynth.survey.app import create_app
from histosynth.survey.build import SURVEY_FILE, open_survey, read_answer_key
from histosynth.survey.responses import ANSWER_COLUMNS, read_answers_csv, survey_responses
from histosynth.survey.store import SurveyStore


def store_of(survey_dir) -> SurveyStore:
    return SurveyStore(open_survey(survey_dir).responses_path)


def test_each_participant_gets_their_own_order_recorded_with_the_answers(make_survey, admin_secret, participant):
    survey_dir = make_survey(n_real=6, n_synthetic=6)
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    first, second = participant(client), participant(client)
    first.start(2)
    second.start(4)
    orders = [store_of(survey_dir).participant(p.token).order for p in (first, second)]
    assert all(sorted(order) == list(range(1, 13)) for order in orders)
    assert orders[0] != orders[1], "12! orders: two participants drawing the same one is all but impossible"
    survey = open_survey(survey_dir)
    page = client.get(f"{first.base}/q/1").text
    assert f"/images/{survey.questions[orders[0][0] - 1].image_id}" in page and "Question 1 of 12" in page
    first.answer(1, "real")
    first.answer(2, "synthetic")
    stored = store_of(survey_dir).participant(first.token)
    assert stored.answers == {orders[0][0]: "real", orders[0][1]: "synthetic"}
    rows = list(csv.DictReader(io.StringIO(client.get(
        "/admin/answers.csv", headers={"Authorization": f"Bearer {admin_secret}"}).text)))
    assert [(r["reader"], r["question"], r["position"], r["answer"]) for r in rows] == [
        ("P1", str(orders[0][0]), "1", "real"), ("P1", str(orders[0][1]), "2", "synthetic")]
    assert rows[0]["image_id"] == survey.questions[orders[0][0] - 1].image_id
    assert float(rows[1]["seconds"]) >= 0 and rows[0]["confidence"] == rows[0]["scale"] == ""


def test_a_fixed_order_survey_shows_everyone_the_seeded_order(make_survey, admin_secret, participant):
    survey_dir = make_survey(fixed_order=True)
    assert open_survey(survey_dir).order == "fixed"
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    people = [participant(client) for _ in range(2)]
    for person in people:
        person.start(3)
        person.answer(1, "real")
    assert [(p.order, p.answers) for p in store_of(survey_dir).participants()] == [(None, {1: "real"})] * 2


def first_question(survey_dir, admin_secret, participant):
    """A client, a participant started in it, and their first question page."""
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    person = participant(client)
    person.start(5)
    return client, person, client.get(f"{person.base}/q/1").text


def test_confidence_is_asked_with_every_answer(make_survey, admin_secret, participant):
    survey_dir = make_survey(rating="confidence")
    client, person, page = first_question(survey_dir, admin_secret, participant)
    assert page.count('name="rating"') == 5 and "How sure are you?" in page and 'data-key="5"' in page
    missing = client.post(f"{person.base}/q/1", data={"answer": "real", "csrf": person.csrf})
    assert missing.status_code == 400 and "how sure you are" in missing.text
    assert client.post(f"{person.base}/q/1", data={"answer": "real", "rating": "6", "csrf": person.csrf}
                       ).status_code == 400
    assert client.post(f"{person.base}/q/1", data={"answer": "real", "rating": "4", "csrf": person.csrf}
                       ).status_code == 303
    stored = store_of(survey_dir).participant(person.token)
    assert (stored.answers, stored.ratings) == ({stored.question_at(1): "real"}, {stored.question_at(1): 4})
    assert re.search(r'value="4"[^>]*checked', client.get(f"{person.base}/q/1").text)


def test_the_scale_from_real_to_synthetic_gives_answers_and_unsure(make_survey, admin_secret, participant):
    survey_dir = make_survey(rating="scale")
    client, person, page = first_question(survey_dir, admin_secret, participant)
    assert "Definitely real" in page and "Definitely synthetic" in page and 'name="answer"' not in page
    assert client.post(f"{person.base}/q/1", data={"answer": "real", "csrf": person.csrf}).status_code == 400
    for position, rating in enumerate([1, 3, 5, 4, 2, 3], start=1):
        assert client.post(f"{person.base}/q/{position}", data={"rating": str(rating), "csrf": person.csrf}
                           ).status_code == 303
    stored = store_of(survey_dir).participant(person.token)
    shown = [stored.question_at(n) for n in range(1, 7)]
    assert [stored.answers[q] for q in shown] == ["real", None, "synthetic", "synthetic", "real", None]
    assert client.get(person.base).headers["location"].endswith("/comment"), "unsure is an answer too"
    analysis = analyze_responses(survey_responses(survey_dir))
    reader = analysis.participants.iloc[0]
    assert (reader["answered"], reader["unsure"]) == (4, 2)
    assert analysis.summary["reader_study"]["unsure"] == 2 and 0 <= reader["auc"] <= 1
    tidy = analysis.answers.sort_values("position")
    assert tidy["answer"].tolist() == ["real", "unsure", "synthetic", "synthetic", "real", "unsure"]
    assert tidy["scale"].tolist() == [1, 3, 5, 4, 2, 3]


def test_the_cli_builds_rated_surveys_and_exports_the_tidy_csv(image_folders, tmp_path, admin_secret, participant,
                                                              capsys):
    out = tmp_path / "survey"
    assert main(["survey", "build", "--real", str(image_folders[0]), "--synthetic", str(image_folders[1]),
                 "--out", str(out), "--n-real", "2", "--n-synthetic", "2", "--size", "32",
                 "--rating", "confidence", "--fixed-order"]) == 0
    survey = open_survey(out)
    assert (survey.rating, survey.order) == ("confidence", "fixed")
    client = TestClient(create_app(out, admin_secret), follow_redirects=False)
    person = participant(client)
    person.start(3)
    for position, (answer, rating) in enumerate([("real", 5), ("synthetic", 2), ("real", 1)], start=1):
        client.post(f"{person.base}/q/{position}", data={"answer": answer, "rating": str(rating), "csrf": person.csrf})
    capsys.readouterr()
    assert main(["survey", "export", str(out), "--csv", str(tmp_path / "answers.csv")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 answers of 1 readers to {tmp_path / 'answers.csv'}"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "answers.csv").read_text())))
    assert tuple(rows[0]) == ANSWER_COLUMNS
    truth = read_answer_key(out)
    assert [(r["question"], r["truth"], r["answer"], r["confidence"], r["position"]) for r in rows] == [
        ("1", truth[0], "real", "5", "1"), ("2", truth[1], "synthetic", "2", "2"), ("3", truth[2], "real", "1", "3")]
    assert read_answers_csv(tmp_path / "answers.csv").rating == "confidence"
    assert main(["survey", "build", "--real", str(image_folders[0]), "--synthetic", str(image_folders[1]),
                 "--out", str(tmp_path / "other"), "--rating", "stars"]) == 2
    assert "--rating 'stars' is unknown; use 'none', 'confidence' or 'scale'" in capsys.readouterr().err


def test_survey_plan_prints_readers_by_images_and_refuses_nonsense(capsys):
    assert main(["survey", "plan", "--expected-accuracy", "0.6", "--images", "20", "--images", "40"]) == 0
    printed = capsys.readouterr().out
    assert "199 independent answers give power 0.804" in printed and "ICC 0.05" in printed
    assert re.search(r"20\s*│\s*20\s*│\s*400", printed) and re.search(r"40\s*│\s*15\s*│\s*600", printed)
    for options, message in [(["--expected-accuracy", "0.5"], "must lie in (0, 1) and differ from 0.5"),
                              (["--expected-accuracy", "0.6", "--power", "1.2"], "--power 1.2 must lie between"),
                              (["--expected-accuracy", "0.6", "--icc", "-0.1"], "--icc -0.1 must lie in [0, 1)")]:
        assert main(["survey", "plan", *options]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("reader,experience\nP1,3\n", "the tidy layout needs the columns"),
    (",".join(ANSWER_COLUMNS) + "\nP1,3,x,2,real,real,,,1,,\n", "no row answers question 1"),
    (",".join(ANSWER_COLUMNS) + "\nP1,3,x,1,real,maybe,,,1,,\n", "answer 'maybe' is not"),
    (",".join(ANSWER_COLUMNS) + "\nP1,3,x,1,real,real,7,,1,,\n", "column confidence: '7' must be a whole number"),
])
def test_tidy_csv_errors_name_the_problem(tmp_path, text, message):
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        read_answers_csv(tmp_path / "a.csv")


OLD_SCHEMA = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE participants (id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
    experience INTEGER NOT NULL CHECK (experience BETWEEN 1 AND 5), started_at TEXT NOT NULL, finished_at TEXT,
    comment TEXT NOT NULL DEFAULT '');
CREATE TABLE answers (participant_id INTEGER NOT NULL REFERENCES participants(id),
    question INTEGER NOT NULL CHECK (question >= 1), answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    answered_at TEXT NOT NULL, PRIMARY KEY (participant_id, question));
CREATE TABLE invites (code TEXT PRIMARY KEY, created_at TEXT NOT NULL, participant_id INTEGER UNIQUE
    REFERENCES participants(id));
CREATE TABLE answer_changes (id INTEGER PRIMARY KEY AUTOINCREMENT, participant_id INTEGER NOT NULL
    REFERENCES participants(id), question INTEGER NOT NULL, previous TEXT NOT NULL, answer TEXT NOT NULL,
    changed_at TEXT NOT NULL);
"""


def test_a_survey_and_store_from_before_orders_and_ratings_still_load_serve_and_analyse(
        make_survey, admin_secret, participant):
    survey_dir = make_survey(n_real=2, n_synthetic=2)
    public = json.loads((survey_dir / SURVEY_FILE).read_text())
    del public["order"], public["rating"]
    (survey_dir / SURVEY_FILE).write_text(json.dumps(public))
    truth = read_answer_key(survey_dir)
    with sqlite3.connect(survey_dir / "responses.sqlite") as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO participants (token, experience, started_at) VALUES ('old-token-1', 2, "
                   "'2025-03-01T10:00:00+00:00')")
        db.executemany("INSERT INTO answers VALUES (1, ?, ?, ?)",
                       [(n, truth[n - 1], f"2025-03-01T10:0{n}:00+00:00") for n in range(1, 5)])
    db.close()
    survey = open_survey(survey_dir)
    assert (survey.order, survey.rating) == ("fixed", None)
    analysis = analyze_responses(survey_responses(survey_dir))
    assert analysis.participants["correct"].tolist() == [4]
    assert analysis.answers["position"].tolist() == [1, 2, 3, 4]
    assert analysis.answers["seconds"].tolist() == [60.0, 60.0, 60.0, 60.0]
    assert analysis.participants["auc"].isna().all() and analysis.summary["reader_study"]["rating"] is None
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    newcomer = participant(client)
    newcomer.start(4)
    newcomer.answer(1, "real")
    people = store_of(survey_dir).participants()
    assert [(p.order, p.answers.get(1)) for p in people] == [(None, truth[0]), (None, "real")]

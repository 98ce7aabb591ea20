"""The survey web app in-process: participant flow, storage, protection, and that nothing leaks."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histosynth.errors import ConfigError
from histosynth.survey.app import COMMON_HEADERS, create_app, is_loopback
from histosynth.survey.build import KEY_FILE, build_survey, open_survey, read_answer_key, reencode
from histosynth.survey.responses import (
    ParticipantAnswers,
    Responses,
    read_responses_csv,
    responses_to_csv,
    write_responses_csv,
)
from histosynth.survey.security import ADMIN_COOKIE
from histosynth.survey.store import SurveyStore


@pytest.fixture
def survey_dir(make_survey):
    return make_survey(n_real=3, n_synthetic=3, seed=7)


@pytest.fixture
def client(survey_dir, admin_secret):
    return TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)


def stored(survey_dir, token):
    return SurveyStore(open_survey(survey_dir).responses_path).participant(token)


def start_form_token(client, participant) -> str:
    """The start form's signed token, read from an invitation's page as a participant would."""
    (code,) = client.app.state.survey.store.mint_invites(1)
    return participant.form_token(client.get(f"/i/{code}").text)


def test_a_participant_answers_resumes_and_finishes(by_position, client, survey_dir, participant):
    p = participant(client)
    assert p.start(experience=4).status_code == 303
    assert client.get(p.base).headers["location"] == f"{p.base}/q/1"
    first = client.get(f"{p.base}/q/1")
    assert first.status_code == 200 and "Question 1 of 6" in first.text
    for number, answer in [(1, "real"), (2, "synthetic")]:
        response = p.answer(number, answer)
        assert (response.status_code, response.headers["location"]) == (303, p.base)
    assert by_position(stored(survey_dir, p.token)) == {1: "real", 2: "synthetic"}, "each answer is stored when given"
    # a closed tab: the same link leads to the first question not yet answered
    assert client.get(p.base).headers["location"] == f"{p.base}/q/3"
    for number in range(3, 7):
        p.answer(number, "real")
    assert client.get(p.base).headers["location"] == f"{p.base}/comment"
    assert "How did you decide?" in client.get(f"{p.base}/comment").text
    response = p.finish("  I looked at the nuclei  ")
    assert response.headers["location"] == f"{p.base}/done"
    assert "Thank you" in client.get(f"{p.base}/done").text
    person = stored(survey_dir, p.token)
    assert (person.experience, person.comment, person.finished) == (4, "I looked at the nuclei", True)
    assert len(person.answers) == 6
    assert client.get(p.base).headers["location"] == f"{p.base}/done"


def test_answering_again_replaces_the_answer_and_is_audited(by_position, client, survey_dir, participant):
    p = participant(client)
    p.start(2)
    p.answer(1, "real")
    p.answer(2, "real")
    p.answer(1, "synthetic")
    assert by_position(stored(survey_dir, p.token)) == {1: "synthetic", 2: "real"}
    changes = SurveyStore(open_survey(survey_dir).responses_path).answer_changes()
    first_shown = stored(survey_dir, p.token).question_at(1)
    assert [(c["question"], c["previous"], c["answer"]) for c in changes] == [(first_shown, "real", "synthetic")]
    page = client.get(f"{p.base}/q/1").text
    assert re.search(r'value="synthetic"[^>]*class="answer chosen"[^>]*aria-pressed="true"', page)


def test_no_skipping_ahead_and_no_changes_after_submitting(by_position, client, survey_dir, participant):
    p = participant(client)
    p.start(3)
    assert client.get(f"{p.base}/q/3").headers["location"] == f"{p.base}/q/1"
    assert p.answer(3, "real").status_code == 303
    assert by_position(stored(survey_dir, p.token)) == {}
    assert client.get(f"{p.base}/comment").headers["location"] == f"{p.base}/q/1"
    for number in range(1, 7):
        p.answer(number, "synthetic")
    p.finish()
    refused = p.answer(1, "real")
    assert refused.status_code == 409 and "already submitted" in refused.text
    assert by_position(stored(survey_dir, p.token))[1] == "synthetic"
    assert client.get(f"{p.base}/q/1").headers["location"] == f"{p.base}/done"


def test_unknown_links_and_bad_input_are_rejected(client, participant):
    assert client.get("/p/not-a-participant").status_code == 404
    assert client.get("/p/" + "x" * 500 + "/q/1").status_code == 404
    assert client.get("/images/0123456789abcdef0123456789abcdef").status_code == 404
    p = participant(client)
    p.start(1)
    assert client.get(f"{p.base}/q/0").status_code == 404
    assert client.get(f"{p.base}/q/7").status_code == 404
    assert client.get(f"{p.base}/q/one").status_code == 400
    assert p.answer(1, "maybe").status_code == 400
    assert p.answer(7, "real").status_code == 404
    start_token = start_form_token(client, participant)
    for experience in ["0", "6", "three", ""]:
        assert client.post("/start", data={"experience": experience, "csrf": start_token}).status_code == 400
    for number in range(1, 7):
        p.answer(number, "real")
    assert p.finish("x" * 4001).status_code == 400
    assert p.finish("x" * 4000).status_code == 303


def test_form_posts_need_their_signed_token_and_the_same_origin(by_position, client, survey_dir, participant):
    p = participant(client)
    p.start(5)
    other = participant(client)
    other.start(5)
    start_token = start_form_token(client, participant)
    assert client.post(f"{p.base}/q/1", data={"answer": "real"}).status_code == 400
    assert p.answer(1, "real", csrf="0" * 64).status_code == 403
    assert p.answer(1, "real", csrf=start_token).status_code == 403, "a token is only good for its own form"
    assert p.answer(1, "real", csrf=other.csrf).status_code == 403, "and only for its own participant"
    assert client.post("/start", data={"experience": "3", "csrf": "0" * 64}).status_code == 403
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Referer": "https://evil.example/page"}):
        refused = client.post(f"{p.base}/q/1", data={"answer": "real", "csrf": p.csrf}, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text
    assert by_position(stored(survey_dir, p.token)) == {}
    same_site = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert client.post(f"{p.base}/q/1", data={"answer": "real", "csrf": p.csrf}, headers=same_site).status_code == 303
    assert by_position(stored(survey_dir, p.token)) == {1: "real"}


def test_admin_pages_need_the_secret(client, survey_dir, admin_secret, participant):
    p = participant(client)
    p.start(2)
    p.answer(1, "real")
    page = client.get("/admin")
    assert page.status_code == 200 and "Admin secret" in page.text and "answers stored" not in page.text
    assert client.get("/admin/export.csv").status_code == 401
    assert client.get("/admin/answers.csv").status_code == 401
    login_token = participant.form_token(page.text)
    wrong = client.post("/admin/login", data={"secret": "not the secret at all", "csrf": login_token})
    assert wrong.status_code == 403 and "not right" in wrong.text
    assert client.post("/admin/login", data={"secret": admin_secret, "csrf": "0" * 64}).status_code == 403
    signed_in = client.post("/admin/login", data={"secret": admin_secret, "csrf": login_token})
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    admin = client.get("/admin")
    assert admin.status_code == 200
    assert re.search(r'id="count-started">1<', admin.text) and re.search(r'id="count-answers">1<', admin.text)
    assert client.get("/admin/export.csv").status_code == 200
    # a new secret (server restarted with another one) ends old sessions
    restarted = TestClient(create_app(survey_dir, "another-secret-4567"), follow_redirects=False,
                           cookies={ADMIN_COOKIE: client.cookies[ADMIN_COOKIE]})
    assert restarted.get("/admin/export.csv").status_code == 401
    bearer = TestClient(create_app(survey_dir, admin_secret))
    assert bearer.get("/admin/export.csv", headers={"Authorization": f"Bearer {admin_secret}"}).status_code == 200
    assert bearer.get("/admin/export.csv", headers={"Authorization": "Bearer wrong-secret-123"}).status_code == 401


def test_export_is_the_documented_csv_with_the_truth_row(client, survey_dir, admin_secret, participant):
    truth = read_answer_key(survey_dir)
    first, second, idle = participant(client), participant(client), participant(client)
    first.start(4)
    for number in range(1, 7):
        first.answer(number, "real")
    first.finish('said "fine", then left')
    second.start(1)
    second.answer(1, "synthetic")
    idle.start(3)  # answered nothing: not exported
    second_row = [""] * 6  # answers in the survey's question order, wherever a participant saw them
    second_row[stored(survey_dir, second.token).question_at(1) - 1] = "synthetic"
    export = client.get("/admin/export.csv", headers={"Authorization": f"Bearer {admin_secret}"})
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"] == 'attachment; filename="survey-responses.csv"'
    assert export.text == (
        "participant,experience,q1,q2,q3,q4,q5,q6,comment\n"
        f"truth,,{','.join(truth)},\n"
        'P1,4,real,real,real,real,real,real,"said ""fine"", then left"\n'
        f"P2,1,{','.join(second_row)},\n"
    )


def test_question_pages_look_alike_for_real_and_synthetic_images(client, survey_dir, participant):
    truth = read_answer_key(survey_dir)
    assert set(truth[1:]) == {"real", "synthetic"}
    survey = open_survey(survey_dir)
    p = participant(client)
    p.start(3)
    person = stored(survey_dir, p.token)
    pages = []
    for position in range(1, 7):
        question = survey.questions[person.question_at(position) - 1]
        page = client.get(f"{p.base}/q/{position}")
        assert page.headers == client.get(f"{p.base}/q/{position}").headers
        pages.append((page.text.replace(question.image_id, "IMAGE"), dict(page.headers)))
        p.answer(position, "real")
    # Beyond the question number (and the first page lacking a "previous" link), nothing differs.
    normalised = {re.sub(r"\d+", "#", text) for text, _ in pages[1:]}
    assert len(normalised) == 1
    headers = [{k: v for k, v in h.items() if k != "content-length"} for _, h in pages]
    assert all(h == headers[0] for h in headers)
    for text, _ in pages:
        assert "real_0" not in text and "synthetic_0" not in text and "truth" not in text


def test_images_are_served_alike_from_memory(client, survey_dir, png_chunks):
    survey = open_survey(survey_dir)
    expected = {q.image_id: survey.image_path(q).read_bytes() for q in survey.questions}
    shutil.rmtree(survey_dir / "images")  # the server must not touch the disk per request
    headers, layouts = [], set()
    for image_id, content in expected.items():
        response = client.get(f"/images/{image_id}")
        assert response.status_code == 200 and response.content == content
        headers.append(dict(response.headers))
        chunks = png_chunks(response.content)
        layouts.add((chunks[0][1], tuple(kind for kind, _ in chunks)))
    assert all(h == headers[0] for h in headers), "every image is answered with the same headers and length"
    assert headers[0] == {"content-type": "image/png", "content-length": headers[0]["content-length"],
                          **{k.lower(): v for k, v in COMMON_HEADERS.items()}}
    assert len(layouts) == 1 and layouts.pop()[1] == ("IHDR", "IDAT", "paDd", "IEND")


def test_every_response_forbids_caching_and_embedding(client):
    for path in ["/", "/admin", "/p/unknown", "/static/survey.js"]:
        response = client.get(path)
        assert response.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "same-origin"


def test_the_app_refuses_a_weak_admin_secret_and_knows_loopback(survey_dir):
    with pytest.raises(ConfigError, match="at least 12"):
        create_app(survey_dir, "short")
    assert [is_loopback(h) for h in ["127.0.0.1", "localhost", "::1", "0.0.0.0", "192.168.1.5", "example.org"]] == [
        True, True, True, False, False, False]


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_served_images_say_nothing_of_their_class_by_length_or_headers(telltale_folders, tmp_path, admin_secret,
                                                                      image_format):
    survey_dir = tmp_path / "survey"
    build_survey(*telltale_folders, survey_dir, n_real=4, n_synthetic=4, size=64, image_format=image_format,
                 progress=False)
    survey, truth = open_survey(survey_dir), read_answer_key(survey_dir)
    key = {row["number"]: row["source"] for row in json.loads((survey_dir / KEY_FILE).read_text())["questions"]}
    client = TestClient(create_app(survey_dir, admin_secret))
    served = {label: [] for label in ("real", "synthetic")}
    for question, label in zip(survey.questions, truth, strict=True):
        response = client.get(f"/images/{question.image_id}")
        served[label].append((dict(response.headers), len(response.content)))
        unpadded, _ = reencode(Path(key[question.number]), 64, image_format)
        assert np.array_equal(decoded(response.content), decoded(unpadded))
    # unpadded, the two classes have sizes that do not even overlap ...
    sizes = {label: [len(reencode(Path(key[q.number]), 64, image_format)[0])
                     for q, t in zip(survey.questions, truth, strict=True) if t == label] for label in served}
    assert min(sizes["real"]) > max(sizes["synthetic"])
    # ... served, every response has the same headers, Content-Length included, whatever its class
    everything = served["real"] + served["synthetic"]
    assert all(entry == everything[0] for entry in everything)
    assert int(everything[0][0]["content-length"]) == everything[0][1]


def test_a_survey_built_without_padding_is_padded_when_served(telltale_folders, tmp_path, admin_secret):
    survey_dir = tmp_path / "survey"
    build_survey(*telltale_folders, survey_dir, n_real=3, n_synthetic=3, size=48, progress=False)
    survey = open_survey(survey_dir)
    key = {row["number"]: row["source"] for row in json.loads((survey_dir / KEY_FILE).read_text())["questions"]}
    for question in survey.questions:  # as an earlier version wrote them: each file its own length
        survey.image_path(question).write_bytes(reencode(Path(key[question.number]), 48, "png")[0])
    assert len({survey.image_path(q).stat().st_size for q in survey.questions}) > 1
    client = TestClient(create_app(survey_dir, admin_secret))
    responses = [client.get(f"/images/{q.image_id}") for q in survey.questions]
    assert len({r.headers["content-length"] for r in responses}) == 1
    for question, response in zip(survey.questions, responses, strict=True):
        assert np.array_equal(decoded(response.content), decoded(survey.image_path(question).read_bytes()))


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"click\")", "+1+2", "-2+3", "@SUM(A1)", "\tindented=1",
            "\r=1", "'=already quoted", "fine = not a formula"]


def test_the_export_neutralises_cells_a_spreadsheet_would_run(client, survey_dir, admin_secret, participant):
    for comment in FORMULAS:
        person = participant(client)
        person.start(2)
        for number in range(1, 7):
            person.answer(number, "real")
        person.finish(comment)  # stored stripped of surrounding blanks: "\r=1" is kept as "=1"
    export = client.get("/admin/export.csv", headers={"Authorization": f"Bearer {admin_secret}"}).text
    rows = list(csv.reader(io.StringIO(export)))[2:]
    stored_comments = [p.comment for p in SurveyStore(open_survey(survey_dir).responses_path).participants()]
    cells = [row[-1] for row in rows]
    for kept, cell in zip(stored_comments, cells, strict=True):
        if kept[:1] in ("=", "+", "-", "@", "\t", "\r") or kept.startswith("'="):
            assert cell == "'" + kept
        else:
            assert cell == kept
    assert cells[0] == "'=HYPERLINK(\"http://evil.example\",\"click\")" and cells[1] == "'+1+2"
    assert cells[-1] == "fine = not a formula"
    assert not any(cell[:1] in "=+-@\t\r" for row in rows for cell in row if cell)
    (survey_dir / "export.csv").write_text(export)
    assert [p.comment for p in read_responses_csv(survey_dir / "export.csv").participants] == stored_comments


def test_every_text_cell_of_every_export_is_neutralised(tmp_path):
    responses = Responses(truth=("real", "synthetic"), participants=tuple(
        ParticipantAnswers(label, 3, ("real", None), comment) for label, comment in
        [("=cmd|' /C calc'!A0", "@x"), ("+P", "\tx"), ("-P", "\rx"), ("P4", "'+x"), ("P5", "plain")]))
    text = responses_to_csv(responses)
    rows = list(csv.reader(io.StringIO(text)))
    assert [row[0] for row in rows[2:]] == ["'=cmd|' /C calc'!A0", "'+P", "'-P", "P4", "P5"]
    # a lone carriage return is written as a line break (quoted), so it cannot split the row
    assert [row[-1] for row in rows[2:]] == ["'@x", "'\tx", "\nx", "''+x", "plain"]
    assert len(rows) == 7
    write_responses_csv(tmp_path / "r.csv", responses)
    again = read_responses_csv(tmp_path / "r.csv")
    assert [(p.label, p.comment) for p in again.participants] == [
        ("=cmd|' /C calc'!A0", "@x"), ("+P", "x"), ("-P", "x"), ("P4", "'+x"), ("P5", "plain")]
    # the analysis tables carry the participants' labels: neutralised there as well
    from histosynth.survey.analyze import analyze_survey

    analyze_survey(tmp_path / "r.csv", tmp_path / "report")
    for table in ("participants.csv", "questions.csv"):
        cells = [cell for row in csv.reader((tmp_path / "report" / table).open()) for cell in row]
        assert not any(cell[:1] in "=+-@\t\r" for cell in cells if cell), table
    labels = [row[0] for row in csv.reader((tmp_path / "report" / "participants.csv").open())][1:]
    assert labels == ["'=cmd|' /C calc'!A0", "'+P", "'-P", "P4", "P5"]

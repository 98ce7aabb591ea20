"""The survey web app in-process: participant flow, storage, protection, and that nothing leaks."""

from __future__ import annotations

import re
import shutil

import pytest
from fastapi.testclient import TestClient

from histosynth.errors import ConfigError
from histosynth.survey.app import COMMON_HEADERS, create_app, is_loopback
from histosynth.survey.build import open_survey, read_answer_key
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


def test_a_participant_answers_resumes_and_finishes(client, survey_dir, participant):
    p = participant(client)
    assert p.start(experience=4).status_code == 303
    assert client.get(p.base).headers["location"] == f"{p.base}/q/1"
    first = client.get(f"{p.base}/q/1")
    assert first.status_code == 200 and "Question 1 of 6" in first.text
    for number, answer in [(1, "real"), (2, "synthetic")]:
        response = p.answer(number, answer)
        assert (response.status_code, response.headers["location"]) == (303, p.base)
    assert stored(survey_dir, p.token).answers == {1: "real", 2: "synthetic"}, "each answer is stored when given"
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


def test_answering_again_replaces_the_answer_and_is_audited(client, survey_dir, participant):
    p = participant(client)
    p.start(2)
    p.answer(1, "real")
    p.answer(2, "real")
    p.answer(1, "synthetic")
    assert stored(survey_dir, p.token).answers == {1: "synthetic", 2: "real"}
    changes = SurveyStore(open_survey(survey_dir).responses_path).answer_changes()
    assert [(c["question"], c["previous"], c["answer"]) for c in changes] == [(1, "real", "synthetic")]
    page = client.get(f"{p.base}/q/1").text
    assert re.search(r'value="synthetic"[^>]*class="answer chosen"[^>]*aria-pressed="true"', page)


def test_no_skipping_ahead_and_no_changes_after_submitting(client, survey_dir, participant):
    p = participant(client)
    p.start(3)
    assert client.get(f"{p.base}/q/3").headers["location"] == f"{p.base}/q/1"
    assert p.answer(3, "real").status_code == 303
    assert stored(survey_dir, p.token).answers == {}
    assert client.get(f"{p.base}/comment").headers["location"] == f"{p.base}/q/1"
    for number in range(1, 7):
        p.answer(number, "synthetic")
    p.finish()
    refused = p.answer(1, "real")
    assert refused.status_code == 409 and "already submitted" in refused.text
    assert stored(survey_dir, p.token).answers[1] == "synthetic"
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
    start_token = participant.form_token(client.get("/").text)
    for experience in ["0", "6", "three", ""]:
        assert client.post("/start", data={"experience": experience, "csrf": start_token}).status_code == 400
    for number in range(1, 7):
        p.answer(number, "real")
    assert p.finish("x" * 4001).status_code == 400
    assert p.finish("x" * 4000).status_code == 303


def test_form_posts_need_their_signed_token_and_the_same_origin(client, survey_dir, participant):
    p = participant(client)
    p.start(5)
    other = participant(client)
    other.start(5)
    start_token = participant.form_token(client.get("/").text)
    assert client.post(f"{p.base}/q/1", data={"answer": "real"}).status_code == 400
    assert p.answer(1, "real", csrf="0" * 64).status_code == 403
    assert p.answer(1, "real", csrf=start_token).status_code == 403, "a token is only good for its own form"
    assert p.answer(1, "real", csrf=other.csrf).status_code == 403, "and only for its own participant"
    assert client.post("/start", data={"experience": "3", "csrf": "0" * 64}).status_code == 403
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Referer": "https://evil.example/page"}):
        refused = client.post(f"{p.base}/q/1", data={"answer": "real", "csrf": p.csrf}, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text
    assert stored(survey_dir, p.token).answers == {}
    same_site = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert client.post(f"{p.base}/q/1", data={"answer": "real", "csrf": p.csrf}, headers=same_site).status_code == 303
    assert stored(survey_dir, p.token).answers == {1: "real"}


def test_admin_pages_need_the_secret(client, survey_dir, admin_secret, participant):
    p = participant(client)
    p.start(2)
    p.answer(1, "real")
    page = client.get("/admin")
    assert page.status_code == 200 and "Admin secret" in page.text and "answers stored" not in page.text
    assert client.get("/admin/export.csv").status_code == 401
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
    export = client.get("/admin/export.csv", headers={"Authorization": f"Bearer {admin_secret}"})
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"] == 'attachment; filename="survey-responses.csv"'
    assert export.text == (
        "participant,experience,q1,q2,q3,q4,q5,q6,comment\n"
        f"truth,,{','.join(truth)},\n"
        'P1,4,real,real,real,real,real,real,"said ""fine"", then left"\n'
        "P2,1,synthetic,,,,,,\n"
    )


def test_question_pages_look_alike_for_real_and_synthetic_images(client, survey_dir, participant):
    truth = read_answer_key(survey_dir)
    assert set(truth[1:]) == {"real", "synthetic"}
    survey = open_survey(survey_dir)
    p = participant(client)
    p.start(3)
    pages = []
    for question in survey.questions:
        page = client.get(f"{p.base}/q/{question.number}")
        assert page.headers == client.get(f"{p.base}/q/{question.number}").headers
        pages.append((page.text.replace(question.image_id, "IMAGE"), dict(page.headers)))
        p.answer(question.number, "real")
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
        headers.append({k: v for k, v in response.headers.items() if k != "content-length"})
        chunks = png_chunks(response.content)
        layouts.add((chunks[0][1], tuple(dict.fromkeys(kind for kind, _ in chunks))))
    assert all(h == headers[0] for h in headers)
    assert headers[0] == {"content-type": "image/png", **{k.lower(): v for k, v in COMMON_HEADERS.items()}}
    assert len(layouts) == 1 and layouts.pop()[1] == ("IHDR", "IDAT", "IEND")


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

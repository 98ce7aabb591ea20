"""Who may become a participant: invitations (the default), open mode, and the start rate limit."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from histosynth.errors import ConfigError
from histosynth.survey.app import create_app
from histosynth.survey.build import build_survey, open_survey
from histosynth.survey.security import ADMIN_COOKIE, StartLimiter
from histosynth.survey.store import SurveyStore


@pytest.fixture
def survey_dir(make_survey):
    return make_survey(n_real=2, n_synthetic=2, seed=5)


def store_of(survey_dir) -> SurveyStore:
    return SurveyStore(open_survey(survey_dir).responses_path)


def post_start(client, participant, experience: int = 3, invite: str | None = None, page: str = "/"):
    csrf = participant.form_token(client.get(page).text)
    form = {"experience": str(experience), "csrf": csrf}
    return client.post("/start", data={**form, "invite": invite} if invite is not None else form)


def test_build_mints_invitations_that_each_admit_one_participant_once(image_folders, tmp_path, admin_secret,
                                                                      participant):
    survey_dir = tmp_path / "survey"
    build_survey(*image_folders, survey_dir, n_real=2, n_synthetic=2, seed=1, size=32, participants=3,
                 progress=False)
    invites = store_of(survey_dir).invites()
    assert len(invites) == 3 and len({i.code for i in invites}) == 3 and not any(i.used for i in invites)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", i.code) for i in invites)
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    code = invites[0].code
    page = client.get(f"/i/{code}")
    assert page.status_code == 200 and f'name="invite" value="{code}"' in page.text
    form = {"csrf": participant.form_token(page.text), "invite": code}
    first = client.post("/start", data={**form, "experience": "4"})
    assert first.status_code == 303 and first.headers["location"].startswith("/p/")
    # the same form sent again with the same invitation: refused, and no second participant
    again = client.post("/start", data={**form, "experience": "2"})
    assert again.status_code == 409 and "already been used" in again.text
    store = store_of(survey_dir)
    assert [p.experience for p in store.participants()] == [4]
    assert store.invite(code).participant_token == first.headers["location"].rsplit("/", 1)[-1]
    # opening a used invitation leads its participant back to their survey
    assert client.get(f"/i/{code}").headers["location"] == first.headers["location"]
    assert (store.counts().invites, store.counts().invites_used) == (3, 1)


def test_without_an_invitation_no_one_can_start_by_default(survey_dir, admin_secret, participant):
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    home = client.get("/")
    assert home.status_code == 200 and "by invitation" in home.text and 'action="/start"' not in home.text
    (code,) = store_of(survey_dir).mint_invites(1)
    csrf = participant.form_token(client.get(f"/i/{code}").text)
    refused = client.post("/start", data={"experience": "3", "csrf": csrf})
    assert refused.status_code == 403 and "by invitation only" in refused.text
    unknown = client.post("/start", data={"experience": "3", "csrf": csrf, "invite": "not-a-real-invitation"})
    assert unknown.status_code == 404 and "unknown" in unknown.text
    assert client.get("/i/not-a-real-invitation").status_code == 404
    assert client.get("/i/" + "x" * 500).status_code == 404
    assert store_of(survey_dir).participants() == []


def test_open_mode_admits_anyone_with_the_address(by_position, survey_dir, admin_secret, participant):
    client = TestClient(create_app(survey_dir, admin_secret, open_enrolment=True), follow_redirects=False)
    assert 'action="/start"' in client.get("/").text
    people = [participant(client) for _ in range(2)]
    for person, experience in zip(people, (1, 5), strict=True):
        assert person.start(experience).status_code == 303
        assert person.answer(1, "real").status_code == 303
    assert [(p.experience, by_position(p)) for p in store_of(survey_dir).participants()] == [
        (1, {1: "real"}), (5, {1: "real"})]
    (code,) = store_of(survey_dir).mint_invites(1)  # invitations still work in open mode
    assert participant(client).start(2, invite=code).status_code == 303
    assert store_of(survey_dir).invite(code).used


def test_the_start_after_the_limit_in_the_window_is_refused(survey_dir, admin_secret, participant):
    client = TestClient(create_app(survey_dir, admin_secret, open_enrolment=True, start_limit=3,
                                   start_window_s=600), follow_redirects=False)
    assert [post_start(client, participant).status_code for _ in range(3)] == [303, 303, 303]
    refused = post_start(client, participant)
    assert refused.status_code == 429 and "Too many surveys were started from your address" in refused.text
    assert 595 <= int(refused.headers["retry-after"]) <= 600
    assert len(store_of(survey_dir).participants()) == 3
    # an invitation is a start the admin already allowed: it is not limited
    (code,) = store_of(survey_dir).mint_invites(1)
    assert post_start(client, participant, invite=code, page=f"/i/{code}").status_code == 303
    # guessing invitation codes counts against the limit like starting without one
    assert post_start(client, participant, invite="guessed-code-0001").status_code == 429


def test_invitation_guesses_are_limited_in_the_default_mode_too(survey_dir, admin_secret, participant):
    client = TestClient(create_app(survey_dir, admin_secret, start_limit=2), follow_redirects=False)
    (code,) = store_of(survey_dir).mint_invites(1)
    statuses = [post_start(client, participant, invite=f"guess-{i}", page=f"/i/{code}").status_code
                for i in range(3)]
    assert statuses == [404, 404, 429]


def test_the_limiter_forgets_starts_older_than_its_window():
    now = [1000.0]
    limiter = StartLimiter(2, 60, clock=lambda: now[0])
    assert [limiter.allow("a"), limiter.allow("a"), limiter.allow("a"), limiter.allow("b")] == [True, True, False, True]
    assert limiter.retry_after("a") == 60 and limiter.retry_after("b") == 0
    now[0] += 59.5
    assert not limiter.allow("a") and limiter.retry_after("a") == 1
    now[0] += 0.5
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")


@pytest.mark.parametrize("limit, window, message", [
    (0, 600, "--start-limit must be at least 1, got 0"),
    (-1, 600, "--start-limit must be at least 1, got -1"),
    (5, 0, "--start-window (seconds) must be at least 1, got 0"),
    (5, -10, "--start-window (seconds) must be at least 1, got -10"),
    (5, float("nan"), "--start-window (seconds) must be a finite number, got nan"),
    (5, float("inf"), "--start-window (seconds) must be a finite number, got inf"),
])
def test_start_limits_must_be_positive_and_finite(survey_dir, admin_secret, limit, window, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_app(survey_dir, admin_secret, start_limit=limit, start_window_s=window)


def test_the_admin_mints_invitation_links(survey_dir, admin_secret, participant):
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    assert client.post("/admin/invites", data={"count": "2"}).status_code == 401
    login = participant.form_token(client.get("/admin").text)
    assert client.post("/admin/login", data={"secret": admin_secret, "csrf": login}).status_code == 303
    page = client.get("/admin")
    assert re.search(r'id="count-invites">0<', page.text) and "invite-links" not in page.text
    assert client.post("/admin/invites", data={"count": "2"}).status_code == 403, "a browser post needs its token"
    minted = client.post("/admin/invites", data={"count": "2", "csrf": participant.form_token(page.text)})
    assert (minted.status_code, minted.headers["location"]) == (303, "/admin#invites")
    codes = [i.code for i in store_of(survey_dir).invites()]
    links = [f"http://testserver/i/{code}" for code in codes]
    assert len(codes) == 2
    page = client.get("/admin")
    assert re.search(r'id="count-invites">2<', page.text) and "\n".join(links) in page.text
    listed = client.get("/admin/invites.txt")
    assert listed.headers["content-type"] == "text/plain; charset=utf-8" and listed.text == "".join(
        f"{link}\n" for link in links)
    # a script with the secret gets the new links back directly
    bearer = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    scripted = bearer.post("/admin/invites", data={"count": "3"}, headers={"Authorization": f"Bearer {admin_secret}"})
    assert scripted.status_code == 200 and len(scripted.text.splitlines()) == 3
    assert all(line.startswith("http://testserver/i/") for line in scripted.text.splitlines())
    for bad in ["0", "1001", "-2", "many"]:
        refused = bearer.post("/admin/invites", data={"count": bad},
                              headers={"Authorization": f"Bearer {admin_secret}"})
        assert refused.status_code == 400
    assert len(store_of(survey_dir).invites()) == 5
    # a link taken from the list starts a survey; then it is no longer listed
    person = participant(client)
    assert person.start(4, invite=codes[0]).status_code == 303
    assert bearer.get("/admin/invites.txt", headers={"Authorization": f"Bearer {admin_secret}"}).text.count("\n") == 4
    assert client.cookies.get(ADMIN_COOKIE)

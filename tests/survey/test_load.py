"""Twenty participants answering at the same moment against a real server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from histosynth.survey.app import create_app
from histosynth.survey.build import open_survey
from histosynth.survey.store import SurveyStore

CLIENTS = 20


@pytest.mark.timeout(120)
def test_twenty_concurrent_participants_lose_no_answer(by_position, make_survey, admin_secret, live_server,
                                                        participant):
    survey_dir = make_survey(n_real=5, n_synthetic=5, seed=3, participants=CLIENTS)
    invites = [invite.code for invite in SurveyStore(open_survey(survey_dir).responses_path).invites()]
    n_questions = 10
    plans = {i: ["real" if (i >> (q % 5)) & 1 else "synthetic" for q in range(n_questions)] for i in range(CLIENTS)}
    together = threading.Barrier(CLIENTS, timeout=30)

    def take_part(index: int) -> tuple[str, list[int]]:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            person = participant(http)
            assert person.start(experience=index % 5 + 1, invite=invites[index]).status_code == 303
            together.wait()  # everyone answers at once
            statuses = [person.answer(number, answer).status_code
                        for number, answer in enumerate(plans[index], start=1)]
            statuses.append(person.answer(1, plans[index][0]).status_code)  # and re-answers once
            return person.token, statuses

    with live_server(create_app(survey_dir, admin_secret)) as server:
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(take_part, range(CLIENTS)))
        elapsed = time.monotonic() - started
    assert elapsed < 60
    store = SurveyStore(open_survey(survey_dir).responses_path)
    for index, (token, statuses) in enumerate(results):
        assert statuses == [303] * (n_questions + 1)
        expected = dict(enumerate(plans[index], start=1))
        assert by_position(store.participant(token)) == expected
    counts = store.counts()
    assert (counts.started, counts.answers, counts.changed_answers) == (CLIENTS, CLIENTS * n_questions, CLIENTS)
    assert counts.invites_used == CLIENTS

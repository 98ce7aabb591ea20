"""End to end in headless Chromium: one participant clicks, one uses the keyboard (answers and
confidence), each in their own question order; the admin exports both layouts, and the analysis of the
exports gives the kappas and ROC AUCs the answers were planned to give; the report opens in the browser.

Set HISTOSYNTH_SURVEY_SCREENSHOTS=docs/images to refresh the screenshots shown in the README.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from PIL import Image

from histosynth.survey.analyze import analyze_survey
from histosynth.survey.app import create_app
from histosynth.survey.build import RATING_WORDS, build_survey, open_survey, read_answer_key
from histosynth.survey.store import SurveyStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                       "(`make browser` installs it, or `apt-get install chromium`)"),
]


def planned_answers(truth: list[str]) -> tuple[list[str], list[str]]:
    """The clicking participant is always right (kappa 1); the keyboard participant is wrong on the
    first real and the first synthetic question: 4 of 6 right, expected agreement 1/2, kappa 1/3."""
    keyboard = list(truth)
    keyboard[truth.index("real")] = "synthetic"
    keyboard[truth.index("synthetic")] = "real"
    return list(truth), keyboard


def planned_confidence(truth: list[str], answers: list[str], right: int, wrong: int) -> list[int]:
    """Confidence `right` on right answers and `wrong` on wrong ones. The keyboard participant's
    (4 right, 2 wrong) signed scores: synthetic images +4, +4, -2; real ones -4, -4, +2; 8 of the 9
    pairs ordered right: ROC AUC 8/9. The clicking participant, always right and certain: AUC 1."""
    return [right if t == a else wrong for t, a in zip(truth, answers, strict=True)]


def shown_order(survey_dir: Path, position: int) -> tuple[int, ...]:
    """The question order of the participant who started `position`-th (1-based)."""
    person = SurveyStore(open_survey(survey_dir).responses_path).participants()[position - 1]
    return person.order


def small_png(path: Path) -> None:
    """Rewrite a screenshot as a palette PNG (a fraction of the size, for the README)."""
    with Image.open(path) as shot:
        small = shot.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


@pytest.mark.timeout(180)
def test_survey_in_a_real_browser(screen_size_folders, tmp_path, admin_secret, live_server):
    playwright_api = pytest.importorskip("playwright.sync_api")
    sync_playwright, expect = playwright_api.sync_playwright, playwright_api.expect
    survey_dir = tmp_path / "survey"
    build_survey(*screen_size_folders, survey_dir, n_real=3, n_synthetic=3, seed=2, participants=2, progress=False,
                 rating="confidence")
    truth = read_answer_key(survey_dir)
    invites = [invite.code for invite in SurveyStore(open_survey(survey_dir).responses_path).invites()]
    by_click, by_keyboard = planned_answers(truth)
    sure_click = planned_confidence(truth, by_click, right=5, wrong=1)
    sure_keyboard = planned_confidence(truth, by_keyboard, right=4, wrong=2)
    words = RATING_WORDS["confidence"]
    shots = Path(os.environ.get("HISTOSYNTH_SURVEY_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)

    with live_server(create_app(survey_dir, admin_secret)) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            problems: list[str] = []

            def new_page(width: int = 960, **options):
                page = browser.new_context(viewport={"width": width, "height": 760}, **options).new_page()
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                return page

            clicking = new_page()
            clicking.goto(f"{server.url}/i/{invites[0]}")
            clicking.screenshot(path=shots / "survey-start.png", full_page=True)
            clicking.get_by_role("radio", name="4", exact=True).check()
            with clicking.expect_navigation():
                clicking.get_by_role("button", name="Start the survey").click()
            order = shown_order(survey_dir, 1)
            for number, question in enumerate(order, start=1):
                assert clicking.locator(".progress-text").inner_text() == f"Question {number} of 6"
                image = clicking.locator("img.survey-image")
                assert clicking.evaluate("img => img.complete && img.naturalWidth", image.element_handle()) == 256
                answer, confidence = by_click[question - 1], sure_click[question - 1]
                clicking.locator("label.choice-option", has_text=answer.capitalize()).click()
                clicking.locator("label.scale-option", has_text=words[confidence]).click()
                if number == 2:
                    clicking.screenshot(path=shots / "survey-question.png", full_page=True)
                with clicking.expect_navigation():
                    clicking.get_by_role("button", name="Next").click()
            clicking.get_by_label(re.compile("How did you decide")).fill("Looked at the nuclei.")
            with clicking.expect_navigation():
                clicking.get_by_role("button", name="Submit the survey").click()
            assert clicking.get_by_role("heading").inner_text() == "Thank you!"
            clicking.screenshot(path=shots / "survey-done.png", full_page=True)

            typing = new_page()
            typing.goto(f"{server.url}/i/{invites[1]}")
            expect(typing.get_by_role("radio", name="1 Barely any experience")).to_be_focused()
            typing.keyboard.press("ArrowRight")  # focus starts on level 1; the arrow picks level 2
            with typing.expect_navigation():
                typing.keyboard.press("Enter")
            order = shown_order(survey_dir, 2)
            for number, question in enumerate(order, start=1):
                assert typing.locator(".progress-text").inner_text() == f"Question {number} of 6"
                typing.keyboard.press("r" if by_keyboard[question - 1] == "real" else "s")
                typing.keyboard.press(str(sure_keyboard[question - 1]))
                expect(typing.locator(f'input[name="rating"][value="{sure_keyboard[question - 1]}"]')).to_be_checked()
                with typing.expect_navigation():
                    typing.keyboard.press("Enter")
            expect(typing.get_by_label(re.compile("How did you decide"))).to_be_focused()
            typing.keyboard.type("Too smooth = synthetic")
            typing.keyboard.press("Tab")
            typing.keyboard.press("Tab")
            with typing.expect_navigation():
                typing.keyboard.press("Enter")
            assert typing.get_by_role("heading").inner_text() == "Thank you!"

            admin = new_page(width=1160, accept_downloads=True)
            admin.goto(server.url + "/admin")
            admin.get_by_label("Admin secret").fill(admin_secret)
            with admin.expect_navigation():
                admin.get_by_role("button", name="Sign in").click()
            assert admin.locator("#count-finished").inner_text() == "2"
            assert admin.locator("#count-answers").inner_text() == "12"
            assert admin.locator("#count-invites-used").inner_text() == "2"
            admin.screenshot(path=shots / "survey-admin.png", full_page=True)
            with admin.expect_download() as download:
                admin.get_by_role("link", name="Download responses (CSV)").click()
            download.value.save_as(tmp_path / "export.csv")
            with admin.expect_download() as download:
                admin.get_by_role("link", name="One row per answer (CSV)").click()
            download.value.save_as(tmp_path / "answers.csv")

            _, report = analyze_survey(survey_dir)
            reading = new_page(width=1100)
            reading.goto(report.as_uri())
            top = reading.get_by_role("heading", name="Reader study").bounding_box()
            bottom = reading.locator("table").nth(2).bounding_box()  # summary, readers' table, by experience
            reading.screenshot(path=shots / "survey-report.png", full_page=True,
                               clip={"x": 0, "y": top["y"] - 10, "width": 1100,
                                     "height": bottom["y"] + bottom["height"] - top["y"] + 20})
            small_png(shots / "survey-report.png")
            assert problems == [], f"the browser reported errors: {problems}"
        finally:
            browser.close()

    analysis, _ = analyze_survey(tmp_path / "export.csv")
    people = analysis.participants
    assert people["participant"].tolist() == ["P1", "P2"]
    assert people["experience"].tolist() == [4, 2]
    assert people["correct"].tolist() == [6, 4]
    assert people["kappa"].tolist() == pytest.approx([1.0, 1 / 3])
    assert [p.comment for p in analysis.responses.participants] == ["Looked at the nuclei.", "Too smooth = synthetic"]
    tidy, _ = analyze_survey(tmp_path / "answers.csv")
    assert tidy.participants["kappa"].tolist() == pytest.approx([1.0, 1 / 3])
    assert tidy.participants["auc"].tolist() == pytest.approx([1.0, 8 / 9])
    assert tidy.answers["confidence"].tolist() == [
        sure[question - 1] for sure, person in ((sure_click, 1), (sure_keyboard, 2))
        for question in shown_order(survey_dir, person)]

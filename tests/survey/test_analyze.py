"""The survey analysis: kappa equal to sklearn's, the thesis' numbers, the CSV layout, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.metrics import cohen_kappa_score, recall_score

from histosynth.errors import DataError
from histosynth.survey.analyze import (
    GRID_CORRECT,
    GRID_OPEN,
    GRID_WRONG,
    analyze_responses,
    analyze_survey,
    answers_grid,
    fooling_images,
    load_source,
)
from histosynth.survey.app import create_app
from histosynth.survey.responses import (
    ParticipantAnswers,
    Responses,
    read_responses_csv,
    responses_to_csv,
    write_responses_csv,
)

R, S = "real", "synthetic"


def worked_example() -> Responses:
    """Six questions, four participants, every number below worked out by hand."""
    return Responses(truth=(R, R, R, S, S, S), participants=(
        ParticipantAnswers("A", 1, (R, R, R, S, S, S), "colour"),  # all right
        ParticipantAnswers("B", 2, (S, R, R, R, S, S)),            # wrong on q1 and q4
        ParticipantAnswers("C", 4, (R, R, R, R, R, R)),            # always "real"
        ParticipantAnswers("D", 5, (S, S, S, R, R, R)),            # always wrong
    ))


def test_worked_example_gives_the_hand_computed_numbers():
    analysis = analyze_responses(worked_example())
    people = analysis.participants.set_index("participant")
    assert people["kappa"].tolist() == pytest.approx([1.0, 1 / 3, 0.0, -1.0])
    assert people["correct"].tolist() == [6, 4, 3, 0]
    assert people["sensitivity"].tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert people["specificity"].tolist() == pytest.approx([1.0, 2 / 3, 1.0, 0.0])
    assert people["group"].tolist() == ["1-2", "1-2", "3-5", "3-5"]
    summary = analysis.summary
    assert summary["kappa_mean"] == pytest.approx(1 / 12)
    assert (summary["kappa_min"], summary["correct_at_kappa_min"]) == (pytest.approx(-1.0), 0)
    assert (summary["kappa_max"], summary["correct_at_kappa_max"]) == (pytest.approx(1.0), 6)
    assert summary["correct_mean"] == 3.25
    assert summary["groups"] == {"1-2": {"participants": 2, "kappa_mean": pytest.approx(2 / 3)},
                                 "3-5": {"participants": 2, "kappa_mean": pytest.approx(-0.5)}}
    questions = analysis.questions
    assert questions["correct"].tolist() == [2, 3, 3, 1, 2, 2]
    assert questions["majority"].tolist() == ["tie", R, R, R, "tie", "tie"]
    assert (summary["majority_correct"], summary["majority_ties"]) == (2, 3)
    assert summary["correct_per_question_mean"] == pytest.approx(13 / 6)
    assert summary["highlights"] == {"real_most_fooled": 1, "real_least_fooled": 2,
                                     "synthetic_most_fooled": 4, "synthetic_least_fooled": 5}


def test_the_thesis_minimum_twelve_of_forty_right_is_kappa_minus_0_40():
    # With 20 real and 20 synthetic questions all answered, chance agreement is 1/2 whatever the
    # participant's bias, so kappa = 2 * accuracy - 1: 12/40 right -> -0.40, as in the thesis (§5.2).
    truth = (R,) * 20 + (S,) * 20
    answers = (R,) * 6 + (S,) * 14 + (R,) * 14 + (S,) * 6
    analysis = analyze_responses(Responses(truth=truth, participants=(ParticipantAnswers("min", 2, answers),)))
    assert analysis.participants["correct"][0] == 12
    assert analysis.participants["kappa"][0] == pytest.approx(-0.40)


def test_kappa_and_rates_equal_sklearn_including_unanswered_questions():
    rng = np.random.default_rng(5)
    truth = tuple(rng.permutation([R] * 20 + [S] * 20))
    people = []
    for i in range(13):
        answers = [rng.choice([R, S]) if rng.random() > 0.1 else None for _ in truth]
        people.append(ParticipantAnswers(f"P{i + 1}", int(rng.integers(1, 6)), tuple(answers)))
    analysis = analyze_responses(Responses(truth=truth, participants=tuple(people)))
    for person, row in zip(people, analysis.participants.itertuples(), strict=True):
        answered = [(t, a) for t, a in zip(truth, person.answers, strict=True) if a is not None]
        y_true, y_given = [t for t, _ in answered], [a for _, a in answered]
        assert row.answered == len(answered) < 40
        assert row.kappa == cohen_kappa_score(y_true, y_given)
        assert row.sensitivity == recall_score(y_true, y_given, pos_label=S)
        assert row.specificity == recall_score(y_true, y_given, pos_label=R)
        assert row.correct == sum(t == a for t, a in answered)
    assert analysis.summary["kappa_mean"] == pytest.approx(float(np.mean(analysis.participants["kappa"])))


def test_undefined_kappa_is_nan_and_left_out_of_the_means():
    responses = Responses(truth=(R, S), participants=(
        ParticipantAnswers("one-answer", 3, (R, None)), ParticipantAnswers("B", 3, (R, S))))
    analysis = analyze_responses(responses)
    assert math.isnan(analysis.participants["kappa"][0]) and math.isnan(analysis.participants["sensitivity"][0])
    assert analysis.summary["kappa_mean"] == 1.0 and analysis.summary["groups"]["3-5"]["kappa_mean"] == 1.0
    assert analysis.summary["groups"]["1-2"] == {"participants": 0, "kappa_mean": None}
    with pytest.raises(DataError, match="no participant has answered"):
        analyze_responses(Responses(truth=(R, S), participants=()))


def test_answers_grid_orders_participants_by_experience():
    grid, people = answers_grid(Responses(truth=(R, S), participants=(
        ParticipantAnswers("X", 4, (R, R)), ParticipantAnswers("Y", 1, (S, None)))))
    assert [p.label for p in people] == ["Y", "X"]
    assert grid.tolist() == [[GRID_WRONG, GRID_CORRECT], [GRID_OPEN, GRID_WRONG]]


def test_csv_layout_round_trips_and_reads_form_style_spellings(tmp_path):
    responses = worked_example()
    write_responses_csv(tmp_path / "r.csv", responses)
    assert read_responses_csv(tmp_path / "r.csv") == responses
    (tmp_path / "form.csv").write_text(
        "participant,experience,q02,q01,comment\n"
        "Anna,2,Synthetic,R,\n"
        "truth,,synthetic,real,\n"
        ",,,,\n"
        "Ben,5,,s,\"long, quoted\"\n"
    )
    read = read_responses_csv(tmp_path / "form.csv")
    assert read == Responses(truth=(R, S), participants=(
        ParticipantAnswers("Anna", 2, (R, S), ""), ParticipantAnswers("Ben", 5, (S, None), "long, quoted")))
    assert responses_to_csv(read).splitlines()[:2] == ["participant,experience,q1,q2,comment", "truth,,real,synthetic,"]


@pytest.mark.parametrize("text, message", [
    ("participant,experience,q1\nA,1,real\n", "exactly one row labelled 'truth'"),
    ("participant,experience,q1,q3\ntruth,,real,real\n", "numbered q1..q2 without gaps"),
    ("participant,experience,q1,time\ntruth,,real,x\n", "unknown column 'time'"),
    ("participant,q1\ntruth,real\n", "missing: experience"),
    ("participant,experience,q1\ntruth,,real\nA,1,maybe\n", "line 3, column q1: 'maybe' is not 'real' or 'synthetic'"),
    ("participant,experience,q1\ntruth,,real\nA,6,real\n", "line 3: experience '6' must be an integer from 1 to 5"),
    ("participant,experience,q1\ntruth,,\nA,1,real\n", "the truth row must give every question's answer"),
    ("participant,experience,q1\ntruth,,real\nA,1,real\nA,2,real\n", "'A' is empty or repeated"),
    ("participant,experience,q1\ntruth,,real\nA,1\n", "line 3 has 2 cells; the header has 3"),
])
def test_csv_errors_name_the_problem(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_responses_csv(tmp_path / "bad.csv")


def test_report_has_tables_plots_and_escaped_comments(tmp_path):
    responses = worked_example()
    responses = Responses(truth=responses.truth, participants=responses.participants + (
        ParticipantAnswers("E", 3, (R,) * 6, "<script>alert(1)</script>"),))
    write_responses_csv(tmp_path / "answers.csv", responses)
    analysis, report = analyze_survey(tmp_path / "answers.csv")
    out = tmp_path / "answers-report"
    assert report == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy-by-position.png", "accuracy-per-reader.png", "answers-grid.png", "answers.csv",
        "called-real-per-image.png", "experience.csv", "kappa-vs-experience.png", "participants.csv",
        "positions.csv", "questions.csv", "report.html", "report.md", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["participants"] == 5
    # figure sizes follow the survey: 5 participants + truth column, 6 questions at 110 dpi
    for plot, size in [("answers-grid.png", (387, 299)), ("kappa-vs-experience.png", (605, 440))]:
        with Image.open(out / plot) as img:
            assert (img.format, img.size) == ("PNG", size)
    html = report.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert html.count("data:image/png;base64,") == 5  # the plots; a CSV has no images to show
    assert "Synthetic image most often called real: question 4, 1 of 5 correct" in html
    assert "<th>mean kappa</th><td>+0.07</td>" in html  # (1 + 1/3 + 0 - 1 + 0) / 5
    markdown = (out / "report.md").read_text()
    assert "> **E** (experience 3): &lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    # 6 + 4 + 3 + 0 + 3 right of 30 answers; the gallery has no pictures without the survey folder
    assert "| pooled accuracy, answers as independent | 53.3 % (36.1–69.8), p 0.856 |" in markdown
    assert "- question 4: called real by 4 of 5 (80.0 %)" in markdown and "gallery/" not in markdown


def test_analysing_the_survey_folder_equals_analysing_its_export(make_survey, admin_secret, participant, tmp_path):
    survey_dir = make_survey(n_real=2, n_synthetic=2, seed=1)
    client = TestClient(create_app(survey_dir, admin_secret), follow_redirects=False)
    for experience, answers in [(1, [R, R, S, S]), (5, [S, R, S, R]), (3, [R, S])]:
        person = participant(client)
        person.start(experience)
        for number, answer in enumerate(answers, start=1):
            person.answer(number, answer)
    bearer = {"Authorization": f"Bearer {admin_secret}"}
    (tmp_path / "export.csv").write_text(client.get("/admin/export.csv", headers=bearer).text)
    (tmp_path / "answers.csv").write_text(client.get("/admin/answers.csv", headers=bearer).text)
    from_folder, report = analyze_survey(survey_dir)
    from_csv = analyze_responses(load_source(tmp_path / "export.csv")[0])
    from_tidy = analyze_responses(load_source(tmp_path / "answers.csv")[0])
    assert report == survey_dir / "report" / "report.html"
    # one row per answer keeps everything, positions in each reader's own order included ...
    assert from_folder.participants.equals(from_tidy.participants)
    assert from_folder.summary == from_tidy.summary and from_folder.positions.equals(from_tidy.positions)
    # ... the thesis' layout keeps the answers but not the order they were seen in
    assert from_folder.participants.equals(from_csv.participants)
    position_free = {**from_folder.summary["reader_study"], "position_trend": None}
    assert {**from_csv.summary["reader_study"], "position_trend": None} == position_free
    # plots + the four highlighted images + the gallery of synthetic images (which ones depends on the
    # orders the participants drew), each also written beside report.md
    gallery = fooling_images(from_folder)
    assert 1 <= len(gallery) <= 2
    assert report.read_text().count("data:image/png;base64,") == 5 + 4 + len(gallery)
    markdown = (report.parent / "report.md").read_text()
    for number in gallery:
        assert f"![question {number}](gallery/question-{number}.png)" in markdown
        assert (report.parent / "gallery" / f"question-{number}.png").is_file()

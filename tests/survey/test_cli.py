"""`histosynth survey build / serve / analyze` from the command line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import httpx

from histosynth.cli import main
from histosynth.survey.build import open_survey
from histosynth.survey.responses import ParticipantAnswers, Responses, write_responses_csv


def test_build_then_analyze_a_csv(image_folders, tmp_path, capsys):
    real, synthetic = image_folders
    out = tmp_path / "survey"
    code = main(["survey", "build", "--real", str(real), "--synthetic", str(synthetic), "--out", str(out),
                 "--n-real", "2", "--n-synthetic", "3", "--seed", "4", "--size", "48"])
    captured = capsys.readouterr()
    assert code == 0
    assert f"built a survey of 5 images in {out}; serve it with: histosynth survey serve {out}" in captured.out
    assert captured.err.count("warning: real and synthetic source images differ") == 2
    assert open_survey(out).image_size == 48
    write_responses_csv(tmp_path / "answers.csv", Responses(truth=("real", "synthetic"), participants=(
        ParticipantAnswers("A", 1, ("real", "synthetic")), ParticipantAnswers("B", 4, ("real", "real")))))
    assert main(["survey", "analyze", str(tmp_path / "answers.csv"), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"mean kappa \(min, max\)\s*│\s*\+0\.500 \(\+0\.000, \+1\.000\)", printed)
    # 3 of 4 answers right; readers A and B agree on 1 of 2 images
    assert re.search(r"pooled accuracy \(95 % CI\), p vs 50 %\s*│\s*75\.0 % \(30\.1–95\.4\), p 0\.625", printed)
    assert re.search(r"Fleiss' kappa between readers\s*│\s*-0\.333 \(2 readers\)", printed)
    assert f"report: {tmp_path / 'rep' / 'report.html'}" in printed
    assert (tmp_path / "rep" / "report.html").is_file()


def test_mistakes_are_one_line_errors(image_folders, tmp_path, capsys):
    assert main(["survey", "build", "--real", str(tmp_path / "nope"), "--synthetic", str(image_folders[1]),
                 "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == f"error: image folder {tmp_path / 'nope'} does not exist"
    assert main(["survey", "analyze", str(tmp_path / "missing.csv")]) == 2
    assert "error: responses file" in capsys.readouterr().err
    assert main(["survey", "serve", str(tmp_path), "--port", "0"]) == 2
    assert "--port 0 is out of range" in capsys.readouterr().err
    assert main(["survey", "serve", str(tmp_path)]) == 2
    assert "is not a survey folder" in capsys.readouterr().err


def test_bad_numbers_are_one_line_errors_before_any_work(image_folders, tmp_path, capsys):
    real, synthetic = image_folders
    build = ["survey", "build", "--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "s")]
    for options, message in [
        (["--seed", "-1"], ("error: --seed -1 is out of range; give 0 to 9223372036854775807, or leave it out "
                            "for a random one")),
        (["--participants", "-2"], "error: --participants -2 is out of range; give 0 to 100000"),
        (["--n-real", "-3"], "error: --n-real and --n-synthetic must each be at least 1"),
    ]:
        assert main([*build, *options]) == 2
        assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "s").exists()
    survey = tmp_path / "built"
    assert main(["survey", "build", "--real", str(real), "--synthetic", str(synthetic), "--out", str(survey),
                 "--n-real", "1", "--n-synthetic", "1", "--size", "32", "--participants", "4"]) == 0
    assert "4 invitation links are listed on the admin page" in capsys.readouterr().out
    for options, message in [(["--start-limit", "0"], "--start-limit must be at least 1, got 0"),
                             (["--start-window", "-5"], "--start-window (seconds) must be at least 1, got -5")]:
        assert main(["survey", "serve", str(survey), *options]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {message}")


def test_serve_listens_on_localhost_and_prints_the_admin_secret(make_survey):
    survey = make_survey(n_real=1, n_synthetic=1, participants=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from histosynth.cli import run; run()", "survey", "serve", str(survey),
               "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        try:
            lines = [process.stdout.readline() for _ in range(4)]
            assert lines[:2] == [f"survey:  http://127.0.0.1:{port}/\n", f"admin:   http://127.0.0.1:{port}/admin\n"]
            secret = re.fullmatch(r"admin secret: (\S{20,})\n", lines[2]).group(1)
            assert lines[3].startswith("invitations: 2 unused; participants need one")
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "the server did not come up"
                    time.sleep(0.1)
            export = httpx.get(f"http://127.0.0.1:{port}/admin/export.csv",
                               headers={"Authorization": f"Bearer {secret}"})
            assert export.status_code == 200 and export.text.startswith("participant,experience,q1,q2,comment\n")
        finally:
            process.terminate()
            process.wait(timeout=20)

"""Report helpers: Markdown tables, mean ± sd, and the report folder."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from histosynth.evaluate.report import Report, markdown_table, mean_sd


def test_markdown_table_formats_cells():
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [0.12345, math.nan], "count": [3, 4]})
    assert markdown_table(frame, digits=2) == (
        "| name | value | count |\n"
        "|---|---|---|\n"
        "| a\\|b | 0.12 | 3 |\n"
        "| c | — | 4 |"
    )


def test_mean_sd_uses_the_sample_sd():
    assert mean_sd([0.9, 0.95, 1.0]) == "0.950 ± 0.050"
    assert mean_sd([0.5]) == "0.500"
    assert mean_sd([]) == "—"


def test_report_folder_holds_markdown_csv_and_png(tmp_path):
    report = Report(tmp_path / "r", "Title")
    report.text("Some words.")
    report.table("numbers", pd.DataFrame({"x": [1.0]}), "a caption")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    report.figure("line", fig, "a line")
    path = report.write()
    assert path.read_text() == (
        "# Title\n\nSome words.\n\n*a caption* ([numbers.csv](numbers.csv))\n\n| x |\n|---|\n| 1.000 |\n\n"
        "![a line](line.png)\n\n*a line*\n"
    )
    assert pd.read_csv(tmp_path / "r" / "numbers.csv")["x"].tolist() == [1.0]
    assert (tmp_path / "r" / "line.png").read_bytes()[:4] == b"\x89PNG"

"""The real-vs-synthetic realism survey of the thesis' human-perception study (§4.2.2, §5.2).

- :mod:`.build`: pick and re-encode real and synthetic images into a leak-proof survey folder (each
  participant's own question order, optional 1-5 ratings).
- :mod:`.app`: the web app participants answer in (FastAPI, server-rendered pages, SQLite via
  :mod:`.store`, form protection in :mod:`.security`).
- :mod:`.responses`: the responses and their CSV layouts (one row per participant; one per answer).
- :mod:`.stats`: reader-study statistics (Wilson intervals, binomial tests, Fleiss' kappa, ROC AUC,
  design effect, trend test) and study planning.
- :mod:`.analyze`: the reader-study numbers, Cohen's kappa and the thesis' other numbers, plots and
  HTML and Markdown reports.

The web app and the analysis pull in FastAPI and matplotlib; import them from their modules.
"""

from .build import LABELS, REAL, SYNTHETIC, Survey, build_survey, open_survey, read_answer_key
from .responses import Responses, read_responses_csv, responses_to_csv

__all__ = [
    "LABELS", "REAL", "SYNTHETIC", "Survey", "build_survey", "open_survey", "read_answer_key",
    "Responses", "read_responses_csv", "responses_to_csv",
]

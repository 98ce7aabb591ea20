"""The real-vs-synthetic realism survey of the thesis' human-perception study (§4.2.2, §5.2).

- :mod:`.build`: pick and re-encode real and synthetic images into a leak-proof survey folder.
- :mod:`.app`: the web app participants answer in (FastAPI, server-rendered pages, SQLite via
  :mod:`.store`, form protection in :mod:`.security`).
- :mod:`.responses`: the responses and their CSV layout (one row per participant).
- :mod:`.analyze`: Cohen's kappa and the thesis' other numbers, plots and an HTML report.

The web app and the analysis pull in FastAPI and matplotlib; import them from their modules.
"""

from .build import LABELS, REAL, SYNTHETIC, Survey, build_survey, open_survey, read_answer_key
from .responses import Responses, read_responses_csv, responses_to_csv

__all__ = [
    "LABELS", "REAL", "SYNTHETIC", "Survey", "build_survey", "open_survey", "read_answer_key",
    "Responses", "read_responses_csv", "responses_to_csv",
]

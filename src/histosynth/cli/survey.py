"""`histosynth survey`: build a real-vs-synthetic survey, serve it to participants, analyse it as a
reader study, plan its size, export its answers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .common import seed_option

survey_app = typer.Typer(help="The realism survey: plan, build and serve it, analyse and export the answers.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(survey_app, name="survey")


@survey_app.command("build")
def build(
    real: Path = typer.Option(..., "--real", help="folder of real images (or a patch dataset)"),
    synthetic: Path = typer.Option(..., "--synthetic", help="folder of synthetic images"),
    out: Path = typer.Option(..., "--out", help="new survey folder to create"),
    n_real: int = typer.Option(20, "--n-real", help="real images to pick"),
    n_synthetic: int = typer.Option(20, "--n-synthetic", help="synthetic images to pick"),
    seed: Optional[int] = seed_option(
        "seed of which images are picked and their order (default: random); it rebuilds the answer key, so keep it "
        "as private as the key", default=None),
    size: int = typer.Option(256, "--size", help="every image is shown at this size (px, square)"),
    image_format: str = typer.Option("png", "--format", help="png (lossless) or jpeg"),
    jpeg_quality: int = typer.Option(90, "--jpeg-quality", help="quality with --format jpeg"),
    title: str = typer.Option("Real or synthetic?", "--title", help="shown on every page"),
    participants: int = typer.Option(0, "--participants",
                                     help="invitation links to create (more can be made on the admin page)"),
    fixed_order: bool = typer.Option(
        False, "--fixed-order",
        help="show everyone the seeded order, as the thesis did (default: each participant their own random order)"),
    rating: str = typer.Option(
        "none", "--rating",
        help="with each answer also ask: 'confidence' (1 guessing .. 5 certain) or 'scale' (1 definitely real .. "
             "5 definitely synthetic); gives every reader an ROC AUC"),
) -> None:
    """Pick images, re-encode them alike with no metadata, shuffle; the answer key stays server-side."""
    from ..survey.build import build_survey

    survey, warnings = build_survey(real, synthetic, out, n_real=n_real, n_synthetic=n_synthetic, seed=seed,
                                    size=size, image_format=image_format, jpeg_quality=jpeg_quality,
                                    title=title, participants=participants, fixed_order=fixed_order,
                                    rating=None if rating == "none" else rating)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"built a survey of {len(survey.questions)} images in {out}; "
               f"serve it with: histosynth survey serve {out}")
    if participants:
        typer.echo(f"{participants} invitation links are listed on the admin page once it is served")


@survey_app.command("serve")
def serve(
    survey: Path = typer.Argument(..., help="a survey folder made by 'histosynth survey build'"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (default: this machine only)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    admin_secret: Optional[str] = typer.Option(
        None, "--admin-secret", envvar="HISTOSYNTH_SURVEY_ADMIN_SECRET",
        help="secret for the admin page (default: a random one, printed at start)"),
    open_enrolment: bool = typer.Option(
        False, "--open", help="anyone with the address may take part (default: invitation links only)"),
    start_limit: int = typer.Option(30, "--start-limit",
                                    help="with --open: surveys one address may start per --start-window"),
    start_window: int = typer.Option(600, "--start-window", help="the --start-limit window, in seconds"),
) -> None:
    """Serve the survey: invitation links (or, with --open, /) for participants; counts, invitations
    and CSV export at /admin."""
    import uvicorn

    from ..survey.app import create_app, is_loopback
    from ..survey.security import new_admin_secret

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range; give 1 to 65535")
    secret = admin_secret or new_admin_secret()
    app = create_app(survey, secret, open_enrolment=open_enrolment, start_limit=start_limit,
                     start_window_s=start_window)
    shown_host = f"[{host}]" if ":" in host else host
    typer.echo(f"survey:  http://{shown_host}:{port}/")
    typer.echo(f"admin:   http://{shown_host}:{port}/admin")
    if admin_secret is None:
        typer.echo(f"admin secret: {secret}")
    counts = app.state.survey.store.counts()
    if open_enrolment:
        typer.echo("open mode: anyone with the address can take part")
    else:
        typer.echo(f"invitations: {counts.invites - counts.invites_used} unused; participants need one "
                   "(the admin page lists them and makes more; --open admits anyone)")
    if not is_loopback(host):
        typer.echo("warning: listening beyond this machine over plain HTTP; put the survey behind an "
                   "HTTPS reverse proxy before sending the link out", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@survey_app.command("analyze")
def analyze(
    source: Path = typer.Argument(..., help="a survey folder, or a responses CSV (one row per participant, or the "
                                           "tidy one row per answer of 'survey export')"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default: SOURCE/report or FILE-report)"),
) -> None:
    """Reader-study statistics (accuracy with intervals and tests, kappas, ROC AUC, experience, order) and
    the thesis' analysis, with plots, an HTML and a Markdown report."""
    from ..survey.analyze import analyze_survey, format_p_value, format_percent

    analysis, report = analyze_survey(source, out)
    summary, study = analysis.summary, analysis.summary["reader_study"]
    table = Table("measure", "value", title=f"{summary['participants']} participants, {summary['questions']} questions")
    table.add_row("pooled accuracy (95 % CI), p vs 50 %",
                  f"{format_percent(study['accuracy'], study['accuracy_low'], study['accuracy_high'])}, "
                  f"p {format_p_value(study['p_value'])}")
    clustered = format_percent(study["accuracy"], study["accuracy_low_clustered"], study["accuracy_high_clustered"])
    table.add_row(f"  clustered by reader (ICC {'–' if study['icc'] is None else format(study['icc'], '.3f')})",
                  f"{clustered}, p {format_p_value(study['p_value_clustered'])}")
    table.add_row("sensitivity / specificity",
                  f"{format_percent(study['sensitivity'])} / {format_percent(study['specificity'])}")
    table.add_row("Fleiss' kappa between readers", "–" if study["fleiss_kappa"] is None
                  else f"{study['fleiss_kappa']:+.3f} ({study['fleiss_readers']} readers)")
    if study["auc_readers"]:
        table.add_row("ROC AUC, mean over readers", f"{study['auc_mean']:.3f} ({study['auc_readers']} readers)")
    table.add_row("mean kappa (min, max)", f"{summary['kappa_mean']:+.3f} ({summary['kappa_min']:+.3f}, "
                  f"{summary['kappa_max']:+.3f})" if summary["kappa_mean"] is not None else "undefined")
    for name, group in summary["groups"].items():
        mean = group["kappa_mean"]
        table.add_row(f"mean kappa, experience {name} (n={group['participants']})",
                      "–" if mean is None else f"{mean:+.3f}")
    table.add_row("mean correct", f"{summary['correct_mean']:.1f} of {summary['questions']}")
    table.add_row("majority vote correct", f"{summary['majority_correct']} of {summary['questions']}")
    Console().print(table)
    typer.echo(f"report: {report}")


@survey_app.command("plan")
def plan(
    expected_accuracy: float = typer.Option(..., "--expected-accuracy",
                                            help="the readers' accuracy you expect (e.g. 0.6; chance is 0.5)"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level of the two-sided test"),
    power: float = typer.Option(0.8, "--power", help="wanted chance to detect the expected accuracy"),
    icc: float = typer.Option(0.05, "--icc", help="assumed correlation of one reader's answers (intraclass "
                                                  "correlation of correctness; 'survey analyze' reports it)"),
    images: Optional[list[int]] = typer.Option(None, "--images", help="images per reader to plan for "
                                                                      "(repeatable; default 16 20 40 60 80 100)"),
) -> None:
    """How many readers x images give the wanted power to tell the expected accuracy from chance."""
    from ..survey.stats import DEFAULT_IMAGES, plan_study

    result = plan_study(expected_accuracy, alpha=alpha, power=power, icc=icc,
                        images=tuple(images) if images else DEFAULT_IMAGES)
    typer.echo(f"Exact two-sided binomial test of pooled answers against 50 % (alpha {alpha}): "
               f"{result['independent_answers']} independent answers give power {result['achieved_power']:.3f} "
               f"at accuracy {expected_accuracy}.")
    typer.echo(f"One reader's answers are assumed correlated with ICC {icc}: m images per reader need "
               "that many answers times the design effect 1 + (m - 1) x ICC; images are treated as fixed.")
    table = Table("images per reader", "readers", "answers", "design effect",
                  title=f"readers x images for {power:.0%} power")
    for row in result["designs"]:
        table.add_row(str(row["images"]), str(row["readers"]), str(row["answers"]), f"{row['design_effect']:.2f}")
    Console().print(table)
    if result["min_readers"] is not None:
        typer.echo(f"However many images: at least {result['min_readers']} readers (answers x ICC).")


@survey_app.command("export")
def export(
    survey: Path = typer.Argument(..., help="a survey folder with answers"),
    csv_path: Path = typer.Option(..., "--csv", help="CSV file to write: one row per answer (reader, experience, "
                                                     "image id, truth, answer, confidence, position, time)"),
) -> None:
    """The answers as a tidy CSV for R or pandas."""
    from ..survey.responses import survey_responses, write_answers_csv

    responses = survey_responses(survey)
    write_answers_csv(csv_path, responses)
    answers = sum(p.answered(i) for p in responses.participants for i in range(responses.n_questions))
    typer.echo(f"wrote {answers} answers of {len(responses.participants)} readers to {csv_path}")

"""The survey web app: server-rendered pages for participants and a secret-protected admin page.

Participant pages: ``/i/<invite>`` (experience rating, start; ``/`` in open mode) ->
``/p/<token>/q/<n>`` (the n-th image in this participant's order: Real or Synthetic, and the survey's
1-5 rating if it asks for one) -> ``/p/<token>/comment`` (optional "how did you decide?") ->
``/p/<token>/done``. The token in the address is the participant's resume link: every answer is stored
when given, and ``/p/<token>`` leads to the first unanswered question; opening a used invitation leads
there too. Each participant's question order is drawn when they start (see
:func:`~histosynth.survey.build.participant_order`). Images are served from memory by opaque id, all of
one length, through one code path with one set of headers; the answer key never leaves the admin pages.

By default only invitations admit participants (each one participant, once). Open mode lets anyone
with the address start, at most ``start_limit`` times per ``start_window_s`` seconds per client
address.

Admin pages: ``/admin`` (live counts, invitation links, minting more), ``/admin/invites.txt`` (the
unused invitation links), ``/admin/export.csv`` (the responses in the thesis' layout of
:mod:`histosynth.survey.responses`, with the truth row) and ``/admin/answers.csv`` (one row per
answer, with ratings, positions and times).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DataError
from .build import (
    RATING_WORDS,
    RATINGS,
    Question,
    Survey,
    equal_sizes,
    open_survey,
    participant_order,
    read_answer_key,
    scale_answer,
)
from .responses import (
    EXPERIENCE_ENDS,
    EXPERIENCE_LEVELS,
    answers_to_csv,
    responses_to_csv,
    stored_responses,
)
from .security import (
    ADMIN_COOKIE,
    FormSigner,
    StartLimiter,
    admin_bearer_ok,
    check_admin_secret,
    same_origin,
    secret_matches,
)
from .store import Participant, SurveyStore

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
MAX_COMMENT = 4000
MAX_TOKEN = 64
MAX_MINT = 1000
START_LIMIT = 30
START_WINDOW_S = 600

# Sent with every response, image or page, real or synthetic alike: nothing is cached, nothing is
# embedded elsewhere, no address (with its participant token) leaks to another site. ("no-referrer"
# would also blank the Origin of our own form posts, which the same-origin check relies on.)
COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


@dataclass
class SurveyContext:
    """Everything the routes need, built once when the app starts."""

    survey: Survey
    truth: tuple[str, ...]
    store: SurveyStore
    signer: FormSigner
    admin_secret: str
    images: dict[str, bytes]
    open_enrolment: bool
    start_limiter: StartLimiter

    @property
    def n_questions(self) -> int:
        return len(self.survey.questions)

    def question(self, number: int) -> Question:
        if not 1 <= number <= self.n_questions:
            raise HTTPException(404, f"There is no question {number}.")
        return self.survey.questions[number - 1]


def create_app(survey_dir: str | Path, admin_secret: str, open_enrolment: bool = False,
               start_limit: int = START_LIMIT, start_window_s: float = START_WINDOW_S) -> FastAPI:
    """The survey app over a folder made by :func:`~histosynth.survey.build.build_survey`.

    `open_enrolment`: anyone with the address may start (otherwise only with an invitation), at most
    `start_limit` times per `start_window_s` seconds from one client address.
    """
    check_admin_secret(admin_secret)
    start_limiter = StartLimiter(start_limit, start_window_s)
    survey = open_survey(survey_dir)
    truth = tuple(read_answer_key(survey_dir))
    if len(truth) != len(survey.questions):
        raise DataError(f"{survey_dir}: the answer key and survey.json disagree on the number of questions; "
                        "rebuild the survey")
    images = _load_images(survey)
    store = SurveyStore(survey.responses_path)
    context = SurveyContext(survey=survey, truth=truth, store=store, signer=FormSigner(store.setting("form-key")),
                            admin_secret=admin_secret, images=images, open_enrolment=open_enrolment,
                            start_limiter=start_limiter)
    app = FastAPI(title=survey.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.survey = context
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(StarletteHTTPException, _error_page)
    app.add_exception_handler(RequestValidationError, _invalid_input_page)

    @app.middleware("http")
    async def common_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(COMMON_HEADERS)
        return response

    return app


def _load_images(survey: Survey) -> dict[str, bytes]:
    """All images in memory, all of one length: each is answered from the same place in the same
    time with the same headers. (A survey built without padding is padded here.)"""
    contents = []
    for question in survey.questions:
        path = survey.image_path(question)
        if not path.is_file():
            raise DataError(f"{path} is missing; rebuild the survey")
        contents.append(path.read_bytes())
    padded = equal_sizes(contents, survey.image_format)
    return {question.image_id: content for question, content in zip(survey.questions, padded, strict=True)}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- dependencies -------------------------------------------------------------------------------


async def survey_context(request: Request) -> SurveyContext:
    return request.app.state.survey


Context = Annotated[SurveyContext, Depends(survey_context)]
Csrf = Annotated[str, Form(max_length=128)]


def same_origin_post(request: Request) -> None:
    if not same_origin(request):
        raise HTTPException(403, "This form was sent from another site and was refused.")


def participant_for(token: str, ctx: Context) -> Participant:
    participant = ctx.store.participant(token) if len(token) <= MAX_TOKEN else None
    if participant is None:
        raise HTTPException(404, "This survey link is unknown. Please start from the survey's first page.")
    return participant


def check_form(ctx: SurveyContext, scope: str, csrf: str) -> None:
    if not ctx.signer.valid(scope, csrf):
        raise HTTPException(403, "This form has expired or was not sent by the survey; reload the page.")


def participant_scope(participant: Participant) -> str:
    return f"participant:{participant.token}"


ParticipantDep = Annotated[Participant, Depends(participant_for)]
router = APIRouter()
posts = APIRouter(dependencies=[Depends(same_origin_post)])


# --- participant pages --------------------------------------------------------------------------


def _start_page(request: Request, ctx: SurveyContext, invite: str | None) -> Response:
    """The start form, or (by invitation only, and none given) a note that one is needed."""
    return TEMPLATES.TemplateResponse(request, "start.html", {
        "title": ctx.survey.title, "n_questions": ctx.n_questions, "levels": list(EXPERIENCE_LEVELS),
        "level_words": EXPERIENCE_ENDS, "csrf": ctx.signer.token("start"), "invite": invite or "",
        "show_form": invite is not None or ctx.open_enrolment,
    })


@router.get("/")
def start_page(request: Request, ctx: Context) -> Response:
    return _start_page(request, ctx, None)


@router.get("/i/{code}")
def invitation(request: Request, ctx: Context, code: str) -> Response:
    invite = ctx.store.invite(code) if len(code) <= MAX_TOKEN else None
    if invite is None:
        raise HTTPException(404, "This invitation link is unknown. Please check that you copied all of it.")
    if invite.used:  # its participant, continuing where they left off
        return RedirectResponse(f"/p/{invite.participant_token}", status_code=303)
    return _start_page(request, ctx, code)


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def limit_starts(request: Request, ctx: SurveyContext) -> None:
    address = client_address(request)
    if not ctx.start_limiter.allow(address):
        minutes = max(1, round(ctx.start_limiter.window_s / 60))
        raise HTTPException(429, f"Too many surveys were started from your address in the last {minutes} "
                                 "minutes; please try again later.",
                            headers={"Retry-After": str(ctx.start_limiter.retry_after(address))})


@posts.post("/start")
def start(request: Request, ctx: Context, experience: Annotated[int, Form(ge=1, le=5)], csrf: Csrf,
          invite: Annotated[str, Form(max_length=MAX_TOKEN)] = "") -> Response:
    check_form(ctx, "start", csrf)
    if invite:
        found = ctx.store.invite(invite)
        if found is None:
            limit_starts(request, ctx)  # guessing codes is as limited as starting without one
            raise HTTPException(404, "This invitation link is unknown. Please check that you copied all of it.")
        participant = None if found.used else ctx.store.redeem_invite(invite, experience,
                                                                       participant_order(ctx.survey))
        if participant is None:
            raise HTTPException(409, "This invitation has already been used; open its link again to "
                                     "continue where you left off.")
    elif ctx.open_enrolment:
        limit_starts(request, ctx)
        participant = ctx.store.create_participant(experience, participant_order(ctx.survey))
    else:
        raise HTTPException(403, "This survey is by invitation only; please open the link you were sent.")
    return RedirectResponse(f"/p/{participant.token}", status_code=303)


def first_open_question(ctx: SurveyContext, participant: Participant) -> int | None:
    """The first position (in the participant's order) not yet answered."""
    return next((n for n in range(1, ctx.n_questions + 1) if participant.question_at(n) not in participant.answers),
                None)


def next_step(ctx: SurveyContext, participant: Participant) -> str:
    """Where a participant continues: first unanswered question, the comment page, or the end."""
    base = f"/p/{participant.token}"
    if participant.finished:
        return f"{base}/done"
    number = first_open_question(ctx, participant)
    return f"{base}/q/{number}" if number is not None else f"{base}/comment"


def may_answer(ctx: SurveyContext, participant: Participant, number: int) -> bool:
    """Answered questions may be revisited and the next one answered; no skipping ahead."""
    first_open = first_open_question(ctx, participant)
    return not participant.finished and number <= (first_open or ctx.n_questions)


@router.get("/p/{token}")
def resume(participant: ParticipantDep, ctx: Context) -> Response:
    return RedirectResponse(next_step(ctx, participant), status_code=303)


def shown_question(ctx: SurveyContext, participant: Participant, position: int) -> Question:
    """The question at `position` of the participant's order (404 past the end)."""
    ctx.question(position)
    return ctx.question(participant.question_at(position))


@router.get("/p/{token}/q/{number}")
def question_page(request: Request, participant: ParticipantDep, ctx: Context, number: int) -> Response:
    question = shown_question(ctx, participant, number)
    if not may_answer(ctx, participant, number):
        return RedirectResponse(next_step(ctx, participant), status_code=303)
    return TEMPLATES.TemplateResponse(request, "question.html", {
        "title": ctx.survey.title, "number": number, "total": ctx.n_questions,
        "answered": len(participant.answers), "image_url": f"/images/{question.image_id}",
        "image_size": ctx.survey.image_size, "current": participant.answers.get(question.number),
        "current_rating": participant.ratings.get(question.number), "rating_mode": ctx.survey.rating,
        "rating_words": RATING_WORDS.get(ctx.survey.rating or "", {}),
        "action": f"/p/{participant.token}/q/{number}",
        "previous": f"/p/{participant.token}/q/{number - 1}" if number > 1 else None,
        "resume": f"/p/{participant.token}", "csrf": ctx.signer.token(participant_scope(participant)),
    })


def given_answer(ctx: SurveyContext, answer: str | None, rating: int | None) -> tuple[str | None, int | None]:
    """The (answer, rating) a question form gives, as the survey's rating mode asks for them."""
    mode = ctx.survey.rating
    if mode == "scale":
        if rating is None:
            raise HTTPException(400, "Please choose a point on the scale from definitely real to definitely synthetic.")
        return scale_answer(rating), rating
    if answer is None:
        raise HTTPException(400, "Please choose Real or Synthetic.")
    if mode == "confidence" and rating is None:
        raise HTTPException(400, "Please say how sure you are, from 1 (guessing) to 5 (certain).")
    return answer, rating if mode == "confidence" else None


@posts.post("/p/{token}/q/{number}")
def answer_question(participant: ParticipantDep, ctx: Context, number: int, csrf: Csrf,
                    answer: Annotated[Literal["real", "synthetic"] | None, Form()] = None,
                    rating: Annotated[int | None, Form(ge=min(RATINGS), le=max(RATINGS))] = None) -> Response:
    question = shown_question(ctx, participant, number)
    check_form(ctx, participant_scope(participant), csrf)
    if participant.finished:
        raise HTTPException(409, "You have already submitted the survey; answers can no longer change.")
    answer, rating = given_answer(ctx, answer, rating)
    if may_answer(ctx, participant, number):
        ctx.store.record_answer(participant.id, question.number, answer, rating)
    return RedirectResponse(f"/p/{participant.token}", status_code=303)


@router.get("/p/{token}/comment")
def comment_page(request: Request, participant: ParticipantDep, ctx: Context) -> Response:
    if participant.finished or first_open_question(ctx, participant) is not None:
        return RedirectResponse(next_step(ctx, participant), status_code=303)
    return TEMPLATES.TemplateResponse(request, "comment.html", {
        "title": ctx.survey.title, "total": ctx.n_questions, "max_length": MAX_COMMENT,
        "action": f"/p/{participant.token}/comment",
        "previous": f"/p/{participant.token}/q/{ctx.n_questions}",
        "csrf": ctx.signer.token(participant_scope(participant)),
    })


@posts.post("/p/{token}/comment")
def finish(participant: ParticipantDep, ctx: Context, csrf: Csrf,
           comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "") -> Response:
    check_form(ctx, participant_scope(participant), csrf)
    if first_open_question(ctx, participant) is not None:
        raise HTTPException(409, "Please answer every question before submitting the survey.")
    ctx.store.finish(participant.id, comment.strip())
    return RedirectResponse(f"/p/{participant.token}/done", status_code=303)


@router.get("/p/{token}/done")
def done_page(request: Request, participant: ParticipantDep, ctx: Context) -> Response:
    if not participant.finished:
        return RedirectResponse(next_step(ctx, participant), status_code=303)
    return TEMPLATES.TemplateResponse(request, "done.html", {"title": ctx.survey.title})


@router.get("/images/{image_id}")
async def image(image_id: str, ctx: Context) -> Response:
    content = ctx.images.get(image_id)
    if content is None:
        raise HTTPException(404, "There is no such image.")
    return Response(content, media_type=ctx.survey.media_type)


# --- admin pages --------------------------------------------------------------------------------


def is_admin(request: Request, ctx: SurveyContext) -> bool:
    cookie = request.cookies.get(ADMIN_COOKIE, "")
    return ctx.signer.valid_admin_session(ctx.admin_secret, cookie) or admin_bearer_ok(request, ctx.admin_secret)


def invite_links(request: Request, codes: list[str]) -> list[str]:
    base = str(request.base_url).rstrip("/")
    return [f"{base}/i/{code}" for code in codes]


def unused_invite_links(request: Request, ctx: SurveyContext) -> list[str]:
    return invite_links(request, [invite.code for invite in ctx.store.invites() if not invite.used])


@router.get("/admin")
def admin_page(request: Request, ctx: Context) -> Response:
    if not is_admin(request, ctx):
        return _admin_login(request, ctx)
    participants = ctx.store.participants()
    return TEMPLATES.TemplateResponse(request, "admin.html", {
        "title": ctx.survey.title, "counts": ctx.store.counts(), "participants": participants,
        "total": ctx.n_questions, "levels": list(EXPERIENCE_LEVELS),
        "unused_links": unused_invite_links(request, ctx), "open_enrolment": ctx.open_enrolment,
        "start_limit": ctx.start_limiter.limit, "start_window_min": max(1, round(ctx.start_limiter.window_s / 60)),
        "max_mint": MAX_MINT, "csrf": ctx.signer.token("admin-invites"),
    })


@posts.post("/admin/invites")
def mint_invites(request: Request, ctx: Context, count: Annotated[int, Form(ge=1, le=MAX_MINT)],
                 csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    """New invitation links. A script (bearer secret) gets them as text; the admin page goes back to
    its list. A cookie session needs the form's signed token, as every browser post does."""
    bearer = admin_bearer_ok(request, ctx.admin_secret)
    if not bearer:
        if not ctx.signer.valid_admin_session(ctx.admin_secret, request.cookies.get(ADMIN_COOKIE, "")):
            raise HTTPException(401, "Sign in on the admin page first.")
        check_form(ctx, "admin-invites", csrf)
    links = invite_links(request, ctx.store.mint_invites(count))
    if bearer:
        return Response("".join(f"{link}\n" for link in links), media_type="text/plain; charset=utf-8")
    return RedirectResponse("/admin#invites", status_code=303)


@router.get("/admin/invites.txt")
def invites_text(request: Request, ctx: Context) -> Response:
    if not is_admin(request, ctx):
        raise HTTPException(401, "Sign in on the admin page first.")
    return Response("".join(f"{link}\n" for link in unused_invite_links(request, ctx)),
                    media_type="text/plain; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="survey-invitations.txt"'})


def _admin_login(request: Request, ctx: SurveyContext, failed: bool = False) -> Response:
    return TEMPLATES.TemplateResponse(request, "admin_login.html", {
        "title": ctx.survey.title, "csrf": ctx.signer.token("admin-login"), "failed": failed,
    }, status_code=403 if failed else 200)


@posts.post("/admin/login")
def admin_login(request: Request, ctx: Context, csrf: Csrf,
                secret: Annotated[str, Form(max_length=256)]) -> Response:
    check_form(ctx, "admin-login", csrf)
    if not secret_matches(secret, ctx.admin_secret):
        return _admin_login(request, ctx, failed=True)
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(ADMIN_COOKIE, ctx.signer.admin_session(ctx.admin_secret), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/admin")
    return response


@router.get("/admin/export.csv")
def export_csv(request: Request, ctx: Context) -> Response:
    if not is_admin(request, ctx):
        raise HTTPException(401, "Sign in on the admin page first.")
    return Response(responses_to_csv(stored_responses(ctx.truth, ctx.store)), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="survey-responses.csv"'})


@router.get("/admin/answers.csv")
def export_answers_csv(request: Request, ctx: Context) -> Response:
    if not is_admin(request, ctx):
        raise HTTPException(401, "Sign in on the admin page first.")
    responses = stored_responses(ctx.truth, ctx.store, ctx.survey)
    return Response(answers_to_csv(responses), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="survey-answers.csv"'})


router.include_router(posts)


# --- error pages --------------------------------------------------------------------------------


async def _error_page(request: Request, exc: StarletteHTTPException) -> Response:
    return TEMPLATES.TemplateResponse(request, "error.html", {"message": exc.detail, "status": exc.status_code},
                                      status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _invalid_input_page(request: Request, exc: RequestValidationError) -> Response:
    return TEMPLATES.TemplateResponse(request, "error.html", {
        "message": "The form was incomplete or held a value that is not allowed.", "status": 400,
    }, status_code=400)

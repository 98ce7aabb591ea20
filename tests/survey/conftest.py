"""Survey test set-up: tissue-like images, small surveys, and a live server on a free local port."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from scipy import ndimage

from histosynth.survey.build import build_survey

_FORM_TOKEN = re.compile(r'name="csrf" value="([0-9a-f]+)"')

ADMIN_SECRET = "test-admin-secret-0123"


@pytest.fixture
def admin_secret() -> str:
    return ADMIN_SECRET


def tissue_image(seed: int, width: int = 96, height: int = 96) -> np.ndarray:
    """An H&E-like picture (uint8 RGB): pale stroma, tubuli as pink rings of cells with purple
    nuclei around white lumina."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    image = np.empty((height, width, 3))
    image[:] = (236, 196, 218)
    image += (ndimage.gaussian_filter(rng.random((height, width)), 2)[..., None] - 0.5) * 50
    scale = min(width, height)
    for _ in range(max(4, (width * height) // 1800)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.07, 0.13) * scale
        stretch = rng.uniform(0.7, 1.3)
        r = np.hypot((yy - cy) * stretch, (xx - cx) / stretch) / radius
        image[r < 1.0] = (214, 120, 170)                        # epithelium
        ring = (r > 0.65) & (r < 0.95) & (rng.random((height, width)) < 0.07)
        image[ndimage.binary_dilation(ring, iterations=1)] = (92, 52, 140)  # nuclei
        image[r < 0.42] = (248, 244, 247)                       # lumen
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image_folders(root: Path, n: int = 6) -> tuple[Path, Path]:
    """Real images as non-square JPEGs with EXIF and a comment; synthetic ones as RGBA PNGs with a
    text chunk naming the prompt — the kind of giveaways a survey must strip."""
    real, synthetic = root / "real", root / "synthetic"
    (real / "slide_a").mkdir(parents=True)
    synthetic.mkdir()
    for i in range(n):
        exif = Image.Exif()
        exif[0x010E] = f"real patch {i} from slide A"  # ImageDescription
        Image.fromarray(tissue_image(i, 120, 100)).save(
            real / "slide_a" / f"real_{i:03d}.jpg", quality=92, exif=exif, comment=b"scanner X")
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", "synthetic; caption: The prevalence of Tubuli is medium.")
        rgba = np.dstack([tissue_image(100 + i), np.full((96, 96), 255, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(synthetic / f"synthetic_{i:03d}.png", pnginfo=info)
    (real / "notes.txt").write_text("not an image")
    return real, synthetic


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> tuple[Path, Path]:
    return write_image_folders(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="session")
def screen_size_folders(tmp_path_factory) -> tuple[Path, Path]:
    """256 px PNGs in both groups, as a lab would bring them (for the browser test)."""
    root = tmp_path_factory.mktemp("screen")
    for group, offset in (("real", 0), ("synthetic", 500)):
        (root / group).mkdir()
        for i in range(3):
            Image.fromarray(tissue_image(offset + i, 256, 256)).save(root / group / f"{i}.png")
    return root / "real", root / "synthetic"


@pytest.fixture(scope="session")
def telltale_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Real images full of fine noise, synthetic ones smooth: re-encoded, the real ones compress far
    worse, so their files would be larger — the size leak a survey must hide."""
    root = tmp_path_factory.mktemp("telltale")
    for group in ("real", "synthetic"):
        (root / group).mkdir()
    for i in range(4):
        noisy = tissue_image(200 + i, 64, 64).astype(int) + np.random.default_rng(i).integers(-40, 40, (64, 64, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "real" / f"{i}.png")
        smooth = ndimage.gaussian_filter(tissue_image(300 + i, 64, 64).astype(float), (3, 3, 0))
        Image.fromarray(smooth.astype(np.uint8)).save(root / "synthetic" / f"{i}.png")
    return root / "real", root / "synthetic"


@pytest.fixture
def make_survey(image_folders, tmp_path):
    """Build a fresh survey folder (its own responses database) in the test's tmp_path."""
    def make(n_real: int = 3, n_synthetic: int = 3, seed: int = 7, name: str = "survey", **options) -> Path:
        out = tmp_path / name
        build_survey(*image_folders, out, n_real=n_real, n_synthetic=n_synthetic, seed=seed,
                     size=options.pop("size", 64), progress=False, **options)
        return out
    return make


class LiveServer:
    """The app served by uvicorn in a thread, on a port the OS picked on 127.0.0.1."""

    def __init__(self, app):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the survey server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


@pytest.fixture
def live_server():
    """`with live_server(app) as server:` serves `app` at `server.url` for the block's duration."""
    return LiveServer


def read_png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """The (type, payload) chunks of a PNG file, in order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8].decode("ascii"), data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


@pytest.fixture
def png_chunks():
    return read_png_chunks


class SurveyParticipant:
    """A participant speaking plain HTTP, as a browser does: form tokens are read from the pages.

    `start(experience, invite)` opens the invitation link; without one, an in-process app that admits
    only invited participants gets an invitation minted in its store, as the admin would hand one out.
    """

    def __init__(self, http: httpx.Client):
        self.http = http
        self.base = ""
        self.csrf = ""

    @property
    def token(self) -> str:
        return self.base.rsplit("/", 1)[-1]

    def start(self, experience: int, invite: str | None = None) -> httpx.Response:
        app = getattr(self.http, "app", None)
        if invite is None and app is not None and not app.state.survey.open_enrolment:
            (invite,) = app.state.survey.store.mint_invites(1)
        page = self.http.get(f"/i/{invite}" if invite else "/")
        form = {"experience": str(experience), "csrf": form_token(page.text)}
        response = self.http.post("/start", data={**form, "invite": invite} if invite else form)
        if response.status_code == 303:
            self.base = response.headers["location"]
            self.csrf = form_token(self.http.get(self.base, follow_redirects=True).text)
        return response

    def answer(self, number: int, answer: str, csrf: str | None = None) -> httpx.Response:
        return self.http.post(f"{self.base}/q/{number}", data={"answer": answer, "csrf": csrf or self.csrf})

    def finish(self, comment: str = "") -> httpx.Response:
        return self.http.post(f"{self.base}/comment", data={"comment": comment, "csrf": self.csrf})

    @staticmethod
    def form_token(html: str) -> str:
        return form_token(html)


def form_token(html: str) -> str:
    match = _FORM_TOKEN.search(html)
    assert match, "the page has no form token"
    return match.group(1)


def answers_by_position(person) -> dict[int, str]:
    """A stored participant's answers keyed by where each question came in their own order."""
    if person.order is None:
        return dict(person.answers)
    return {position: person.answers[question] for position, question in enumerate(person.order, start=1)
            if question in person.answers}


@pytest.fixture
def by_position():
    """`by_position(stored_participant)`: their answers keyed by position in their own order."""
    return answers_by_position


@pytest.fixture
def participant():
    """`participant(http_client)` makes a SurveyParticipant."""
    return SurveyParticipant

"""The playground page (GET / of the Serve app) in a real headless browser: Debian's Chromium driven by Playwright,
against the app under a route prefix with tiny random models."""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from models.tiny import make_tiny_audio_vae, make_tiny_text_encoder_stack
from tests.conftest import free_port
from tests.test_serve import TOKEN, serve_config, start_app
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is not possible here
if not os.path.exists(CHROMIUM):
    pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the dev extras)")
expect = sync_api.expect

PREFIX = "/lumina"  # the harder case for the page's URLs: the app is not at the server's root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url(ray_cluster, tmp_path_factory):
    """The app at PREFIX on a Serve instance of its own (module-scoped, shut down at the end, as test_serve's)."""
    from ray import serve

    root = tmp_path_factory.mktemp("playground-models")
    te, vae = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    dual, mel_vae = make_tiny_text_encoder_stack(root / "dual"), make_tiny_audio_vae(root / "mel-vae")
    folders = {"tiny": {"path": make_tiny_model_folder(root / "m0", te, vae, seed=0)},
               "tiny-audio": {"path": make_tiny_model_folder(root / "audio", dual, mel_vae, preset_name="tiny-audio")},
               "tiny-points": {"path": make_tiny_model_folder(root / "points", te, preset_name="tiny-points")}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    start_app(serve_config(folders), "playground", PREFIX)
    yield f"http://127.0.0.1:{port}{PREFIX}"
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # a temporary profile of its own (Playwright's default), removed when the browser closes
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh context (empty sessionStorage) on the playground; fails the test on a JavaScript error or a request
    that leaves the app."""
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    errors, outside = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: None if request.url.startswith(app_url) else outside.append(request.url))
    page.goto(app_url)
    yield page
    context.close()
    assert not errors, errors
    assert not outside, outside


def sign_in(page, token: str) -> None:
    page.fill("#token", token)
    page.press("#token", "Tab")  # the change event lists the models with the token


def test_page_is_public_html_with_a_strict_policy(app_url):
    for url in (app_url, app_url + "/"):
        response = httpx.get(url, follow_redirects=True)  # no token: the page holds no secret
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), url
        assert response.url.path == PREFIX + "/"  # the prefix without its slash redirects to the app's /
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        assert "<title>Lumina-Ray playground</title>" in response.text


def test_generates_an_image_and_shows_its_seed(page, tmp_path):
    sign_in(page, TOKEN)
    expect(page.locator("#model option[value='tiny-points']")).to_have_count(1)
    page.select_option("#model", "tiny")
    page.fill("#prompt", "a blue square")
    page.fill("#size", "32x32")
    page.fill("#steps", "1")
    page.fill("#seed", "1234")
    page.click("#generate")
    image = page.locator("#results img")
    expect(image).to_have_count(1, timeout=60_000)
    source = image.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (32, 32)
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]  # the browser decoded it
    expect(page.locator("#results .seed")).to_have_text("seed 1234")
    assert page.locator("#results .latency").inner_text().endswith(" s")
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "image.png"), full_page=True)  # to look at: pytest --basetemp=DIR

    # seeds beyond a JS number's exact integers (2^53) go and come back digit for digit
    page.fill("#seed", str(2**63 - 1))
    page.click("#generate")
    expect(page.locator("#results .seed")).to_have_text(f"seed {2**63 - 1}", timeout=60_000)

    # a points model's clouds are drawn on a canvas
    page.select_option("#model", "tiny-points")
    assert page.locator("#size").is_hidden() and page.locator("#points").is_visible()
    page.fill("#points", "64")
    page.click("#generate")
    canvas = page.locator("#results canvas")
    expect(canvas).to_have_count(1, timeout=60_000)
    expect(page.locator("#results .detail")).to_contain_text("64 points")
    drawn = canvas.evaluate("c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)")
    assert drawn
    page.screenshot(path=str(tmp_path / "points.png"), full_page=True)

    # an audio model's clips get a player
    page.select_option("#model", "tiny-audio")
    assert page.locator("#points").is_hidden() and page.locator("#duration").is_visible()
    page.fill("#duration", "0.5")
    page.click("#generate")
    player = page.locator("#results audio")
    expect(player).to_have_count(1, timeout=60_000)
    assert player.get_attribute("src").startswith("data:audio/wav;base64,UklGR")  # "RIFF": a WAV file
    expect(page.locator("#results .detail")).to_contain_text("0.5 s at")
    # the browser itself reads the WAV: its duration, once the metadata is loaded
    duration = player.evaluate("a => a.readyState >= 1 ? a.duration : new Promise(r => "
                               "a.addEventListener('loadedmetadata', () => r(a.duration)))")
    assert duration == pytest.approx(0.5, abs=0.05)
    page.screenshot(path=str(tmp_path / "audio.png"), full_page=True)


def test_api_errors_are_shown_on_the_page(page, tmp_path):
    sign_in(page, "wrong-token")
    error = page.locator("#error")
    expect(error).to_contain_text("HTTP 401: missing or invalid bearer token")  # from GET /v1/models
    page.click("#generate")
    expect(page.locator("#generate")).to_be_enabled()
    expect(error).to_contain_text("HTTP 401: missing or invalid bearer token")  # from the generation route
    page.screenshot(path=str(tmp_path / "401.png"), full_page=True)
    assert page.locator("#results > *").count() == 0

    sign_in(page, TOKEN)  # the page goes on working: a 400 shows the API's own message
    expect(error).to_be_hidden()
    page.fill("#size", "33x33")
    page.fill("#steps", "1")
    page.click("#generate")
    expect(error).to_contain_text("HTTP 400:", timeout=60_000)
    expect(error).to_contain_text("must be a positive multiple of 16 pixels")  # the replica's own message

"""`latentdiff serve`: the form checks, the model session on the embedded default, the HTTP API, and the page in a
real headless browser (Debian's chromium driven by selenium through the system chromedriver; `.ci/run` installs
them).

The model is loaded once for the module; runs use few steps except where the detector must read the image.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch

import pipelines
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.eval import shapesbench
from latentdiff.sampling_settings import read_sampling_settings
from latentdiff.schedulers import SAMPLERS, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from latentdiff.webui import forms
from latentdiff.webui.server import WebUIServer
from latentdiff.webui.session import EDIT_PIPELINES, ModelSession, sampler_choices
from pipelines.latent_pipeline import LatentPipeline
from tests.test_lora import write_adapter

PROMPT = "a large red circle in the top left on a black background"
CHOICES = forms.Choices(
    samplers=("ddim", "ddpm", "euler"),
    adapters=("star",),
    size_multiple=16,
    max_side=256,
    max_steps=1000,
    karras_samplers=("euler",),
)
GOOD_FORM = {
    "prompt": PROMPT,
    "negative_prompt": "",
    "sampler": "ddim",
    "steps": "3",
    "guidance": "5",
    "seed": "7",
    "width": "64",
    "height": "64",
    "num_images": "1",
    "loras": [],
}


def png_data_url(size: tuple[int, int], mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------------------- form checks


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"prompt": "  "}, "prompt", "type what the image should show"),
        ({"steps": "0"}, "steps", "from 1 to 1000"),
        ({"steps": "2.5"}, "steps", "not a whole number"),
        ({"guidance": "nan"}, "guidance", "not a number"),
        ({"guidance": "abc"}, "guidance", "not a number"),
        ({"width": "50"}, "width", "not a multiple of 16"),
        ({"height": "512"}, "height", "from 16 to 256"),
        ({"num_images": "9"}, "num_images", "from 1 to 8"),
        ({"sampler": "lms"}, "sampler", "ddim, ddpm, euler"),
        ({"karras": True}, "karras", "'ddim' has no Karras sigmas; untick it or pick euler"),
        ({"karras": "yes"}, "karras", "send true or false"),
        ({"seed": "-5"}, "seed", "out of range: pass 0 .. 18446744073709551615"),
        ({"seed": str(2**64 - 1), "num_images": "2"}, "seed", "pass 0 .. 18446744073709551614"),
        ({"seed": "1e3"}, "seed", "not a whole number"),
        (
            {"loras": [{"name": "../../etc/passwd", "scale": 1}]},
            "loras",
            "no adapter named '../../etc/passwd'",
        ),
        ({"loras": [{"name": "star", "scale": "3"}]}, "loras", "from 0 to 2"),
    ],
)
def test_a_bad_form_value_names_its_field_and_the_fix(change, field, words):
    with pytest.raises(forms.InputError, match=words) as error:
        forms.parse_text_to_image({**GOOD_FORM, **change}, CHOICES)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


def test_a_good_form_is_read_with_random_seed_words_and_adapters():
    request = forms.parse_text_to_image({**GOOD_FORM, "loras": [{"name": "star", "scale": "0.5"}]}, CHOICES)
    assert (request.steps, request.guidance, request.seed, request.width) == (3, 5.0, 7, 64)
    assert request.loras == (("star", 0.5),)
    assert forms.parse_text_to_image({**GOOD_FORM, "seed": str(2**64 - 1)}, CHOICES).seed == 2**64 - 1
    for word in ("", "random", "-1", -1, None):
        assert forms.parse_text_to_image({**GOOD_FORM, "seed": word}, CHOICES).seed is None


@pytest.mark.parametrize(
    ("upload", "words"),
    [
        (png_data_url((50, 64)), "50x64; its sides must be multiples of 16"),
        (png_data_url((512, 512)), "up to 256 pixels"),
        ("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable PNG or JPEG"),
        ("data:text/html;base64,PGgxPg==", "the upload is text/html"),
        ("/etc/passwd", "upload a PNG or JPEG image"),
    ],
)
def test_an_edit_upload_of_the_wrong_size_or_kind_is_refused(upload, words):
    with pytest.raises(forms.InputError, match=words) as error:
        forms.parse_edit({**GOOD_FORM, "image": upload, "strength": "0.5"}, CHOICES)
    assert error.value.field == "image"


def test_an_edit_takes_its_size_from_the_image_and_needs_a_mask_of_that_size():
    request = forms.parse_edit({**GOOD_FORM, "image": png_data_url((96, 32)), "strength": "0.5"}, CHOICES)
    assert (request.settings.width, request.settings.height, request.mask) == (96, 32, None)
    with pytest.raises(forms.InputError, match="the mask is 64x64 but the image is 96x32") as error:
        forms.parse_edit(
            {
                **GOOD_FORM,
                "image": png_data_url((96, 32)),
                "mask": png_data_url((64, 64), "L"),
                "strength": 1,
            },
            CHOICES,
        )
    assert error.value.field == "mask"


def test_the_page_offers_every_sampler_of_the_registry_with_its_web_ui_name():
    offered = {choice["name"]: choice for choice in sampler_choices()}
    assert list(offered) == list(SAMPLERS)
    assert (offered["euler_a"]["label"], offered["dpmpp_2m"]["karras"], offered["ddim"]["karras"]) == (
        "Euler a",
        True,
        False,
    )


# ------------------------------------------------------------------------------ the session on the default


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def session(lora_dir) -> ModelSession:
    session = ModelSession(lora_dir=lora_dir)
    session.load()
    return session


def read_png(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


def test_the_page_starts_from_the_models_settings(session):
    choices = session.choices()
    assert (choices.samplers, choices.size_multiple, choices.max_side) == (tuple(SAMPLERS), 16, 512)
    defaults = session.defaults()
    assert (defaults["sampler"], defaults["karras"], defaults["width"], defaults["height"]) == (
        "ddim",
        False,
        64,
        64,
    )
    carried = read_sampling_settings(DEFAULT_MODEL_DIR)  # the settings the default was measured best at
    assert (defaults["steps"], defaults["guidance"]) == (carried.num_inference_steps, carried.guidance_scale)


def test_text_to_image_gives_the_pipelines_images_with_their_settings_in_the_png(session):
    steps_seen = []
    request = forms.parse_text_to_image({**GOOD_FORM, "num_images": "2"}, session.choices())
    results = session.text_to_image(request, lambda step, total: steps_seen.append((step, total)))
    assert steps_seen == [(1, 3), (2, 3), (3, 3)]
    # image i is the image of seed + i, as `latentdiff generate` makes it (one generator per image)
    pipe = session.load()
    generators = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    expected = pipe(
        PROMPT, num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2, generator=generators
    ).images[1]
    second = read_png(results[1].png)
    assert results[1].seed == 8 and np.array_equal(np.asarray(second), np.asarray(expected))
    text = second.text
    assert text["parameters"] == (
        f"{PROMPT}\nSteps: 3, Sampler: DDIM, CFG scale: 5.0, Seed: 8, Size: 64x64, Model: embedded default, "
        "Eta: 0.0"
    )
    assert {k: text[k] for k in ("prompt", "seed", "steps", "guidance", "sampler", "size")} == {
        "prompt": PROMPT,
        "seed": "8",
        "steps": "3",
        "guidance": "5.0",
        "sampler": "ddim",
        "size": "64x64",
    }


def test_the_sampler_switches_per_request_and_back(session):
    def image(sampler: str) -> np.ndarray:
        request = forms.parse_text_to_image({**GOOD_FORM, "sampler": sampler}, session.choices())
        return np.asarray(read_png(session.text_to_image(request)[0].png))

    ddim = image("ddim")
    assert type(session.load().scheduler) is DDIMScheduler
    ddpm = image("ddpm")
    assert type(session.load().scheduler) is DDPMScheduler and not np.array_equal(ddim, ddpm)
    assert session.defaults()["sampler"] == "ddim"  # the page still starts at the folder's sampler
    assert np.array_equal(image("ddim"), ddim)
    request = forms.parse_text_to_image({**GOOD_FORM, "sampler": "euler", "karras": True}, session.choices())
    text = read_png(session.text_to_image(request)[0].png).text
    assert type(session.load().scheduler) is EulerDiscreteScheduler
    assert session.load().scheduler.config.use_karras_sigmas
    assert (text["sampler"], text["karras"]) == ("euler", "True") and "Sampler: Euler Karras," in text[
        "parameters"
    ]


def test_adapters_come_from_the_folder_and_apply_per_request(session, lora_dir):
    write_adapter(lora_dir / "trained", session.load(), seed=1, spec=None)
    (lora_dir / "notes.txt").write_text("not an adapter")
    assert session.choices().adapters == ("trained",)

    def image(loras: list) -> np.ndarray:
        request = forms.parse_text_to_image({**GOOD_FORM, "loras": loras}, session.choices())
        return np.asarray(read_png(session.text_to_image(request)[0].png))

    base = image([])
    with_adapter = image([{"name": "trained", "scale": "1"}])
    assert not np.array_equal(base, with_adapter)
    assert np.array_equal(image([{"name": "trained", "scale": "0"}]), base)  # weight 0: the base model
    assert np.array_equal(image([]), base)  # a request without adapters runs the base model again
    shutil.rmtree(lora_dir / "trained")
    with pytest.raises(forms.InputError, match="no adapter named 'trained'"):
        forms.parse_text_to_image({**GOOD_FORM, "loras": [{"name": "trained"}]}, session.choices())


# ---------------------------------------------------------------------------------------------- the HTTP API


@pytest.fixture(scope="module")
def server(session):
    server = WebUIServer(session, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def call(server, path: str, body=None, headers: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for(server, job_id: str) -> dict:
    while True:
        status, body = call(server, f"/api/jobs/{job_id}")
        job = json.loads(body)
        if job["state"] in ("done", "error"):
            return job


def test_the_api_runs_a_job_and_serves_its_png(server):
    status, body = call(server, "/api/txt2img", GOOD_FORM)
    assert status == 202
    job = wait_for(server, json.loads(body)["job"])
    assert job["state"] == "done" and (job["step"], job["total"]) == (3, 3)
    status, png = call(server, job["images"][0]["url"])
    assert status == 200 and read_png(png).text["parameters"] == job["images"][0]["parameters"]


def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, monkeypatch):
    status, body = call(server, "/api/txt2img", {**GOOD_FORM, "steps": "-3"})
    assert status == 400 and json.loads(body)["field"] == "steps"
    assert call(server, "/api/txt2img", b"{not json")[0] == 400
    # an oversized body is refused from its Content-Length, before it is read
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.putrequest("POST", "/api/txt2img")
    connection.putheader("Content-Length", str(server.max_body + 1))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and json.loads(answer.read())["field"] == "image"
    connection.close()
    assert call(server, "/api/config", headers={"Host": "attacker.example"})[0] == 403  # DNS rebinding
    for path in (
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/../../etc/passwd",
        "/api/images/x/0.png",
    ):
        assert call(server, path)[0] == 404
    # an unexpected failure in a handler is a 500 with a message, then the server answers as before
    monkeypatch.setattr(server.session, "choices", lambda: 1 / 0)
    status, body = call(server, "/api/txt2img", GOOD_FORM)
    assert status == 500 and json.loads(body)["error"].startswith("server: internal error (division by zero)")
    monkeypatch.undo()
    # a failure inside the pipeline ends that job with a message; the next job runs
    monkeypatch.setattr(server.session, "_use_sampler", lambda name, karras: 1 / 0)
    job = wait_for(server, json.loads(call(server, "/api/txt2img", GOOD_FORM)[1])["job"])
    assert job["state"] == "error" and "internal error (ZeroDivisionError" in job["error"]
    monkeypatch.undo()
    job = wait_for(server, json.loads(call(server, "/api/txt2img", GOOD_FORM)[1])["job"])
    assert job["state"] == "done"


def test_latentdiff_serve_serves_the_page_and_names_a_busy_port(server, tmp_path):
    command = [sys.executable, "-m", "latentdiff.cli", "serve", "--port"]
    busy = subprocess.run(
        [*command, str(server.server_address[1])], capture_output=True, text=True, timeout=120
    )
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{server.server_address[1]}" in busy.stderr
    no_folder = subprocess.run(
        [*command, "0", "--lora-dir", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert (
        no_folder.returncode == 2
        and "--lora-dir" in no_folder.stderr
        and "is not a folder" in no_folder.stderr
    )
    process = subprocess.Popen([*command, "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", process.stderr.readline())[0]
        with urllib.request.urlopen(url, timeout=30) as answer:
            assert answer.status == 200 and b"<title>latentdiff</title>" in answer.read()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_edit_says_it_is_not_available_in_this_version(server):
    status, body = call(
        server, "/api/edit", {**GOOD_FORM, "image": png_data_url((64, 64)), "strength": "0.5"}
    )
    assert status == 501 and "not available in this version" in json.loads(body)["error"]
    status, body = call(
        server, "/api/edit", {**GOOD_FORM, "image": png_data_url((60, 64)), "strength": "0.5"}
    )
    assert status == 400 and json.loads(body)["field"] == "image"


class RecordingEditPipeline(LatentPipeline):
    """Stands in for an editing pipeline (diffusers' call: image, mask_image, strength): records what it is given
    and draws text-to-image, so the panel's wiring is tested before the editing pipelines exist."""

    calls: list[dict] = []

    def __call__(self, prompt, image, strength, mask_image=None, **kwargs):
        RecordingEditPipeline.calls.append(
            {"image": image, "mask_image": mask_image, "strength": strength, "sampler": type(self.scheduler)}
        )
        return super().__call__(prompt, **kwargs)


@pytest.fixture
def editing(monkeypatch):
    """This version's `pipelines` with editing pipelines (the recording stand-in for both)."""
    RecordingEditPipeline.calls.clear()
    for name in EDIT_PIPELINES.values():
        monkeypatch.setattr(pipelines, name, RecordingEditPipeline, raising=False)
    return RecordingEditPipeline.calls


def test_an_edit_with_a_mask_reaches_the_inpainting_pipeline(server, editing):
    mask = PIL.Image.new("L", (64, 48))
    mask.paste(255, (0, 0, 32, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    mask_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    form = {
        **GOOD_FORM,
        "image": png_data_url((64, 48)),
        "mask": mask_url,
        "strength": "0.5",
        "sampler": "ddpm",
    }
    status, body = call(server, "/api/edit", form)
    assert status == 202
    job = wait_for(server, json.loads(body)["job"])
    assert job["state"] == "done"
    (given,) = editing
    assert given["image"].size == (64, 48) and given["strength"] == 0.5
    assert given["sampler"] is DDPMScheduler  # the sampler the form asked for
    assert np.array_equal(np.asarray(given["mask_image"]), np.asarray(mask))
    result = read_png(call(server, job["images"][0]["url"])[1])
    assert result.size == (64, 48) and result.text["strength"] == "0.5"


# ------------------------------------------------------------------------------------ in a real browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,640",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="latentdiff-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    # a driver path given: selenium does not look for (or download) a driver or browser
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "generate").is_enabled())


def generate_in_page(browser, fields: dict[str, str]) -> None:
    from selenium.webdriver.common.by import By

    for field, value in fields.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate").click()


def wait_for_result_or_error(browser, count: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(b):
        if b.find_element(By.ID, "error").is_displayed():
            return True
        shown = b.find_elements(By.CSS_SELECTOR, "#gallery img.result")
        return len(shown) >= count and b.execute_script("return arguments[0].complete", shown[0])

    WebDriverWait(browser, 120).until(finished)


@pytest.mark.slow
def test_the_page_draws_the_prompt_in_a_browser(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    generate_in_page(browser, {"prompt": PROMPT, "seed": "0"})
    wait_for_result_or_error(browser, 1)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "used-seed").text == "0"
    # the pixels the browser decoded and shows, read back through a canvas
    data_url = browser.execute_script(
        "const img = document.querySelector('#gallery img.result');"
        "const c = Object.assign(document.createElement('canvas'), {width: img.naturalWidth, height: img.naturalHeight});"
        "c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png');"
    )
    shown = PIL.Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    assert shown.size == (64, 64)
    assert shapesbench.matches_prompt(shown, PROMPT), shapesbench.evaluate(shown, PROMPT)
    # the download link's PNG carries the settings
    link = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption a")
    assert link.get_attribute("download") == "latentdiff-0.png"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as answer:
        parameters = read_png(answer.read()).text["parameters"]
    assert parameters.startswith(f"{PROMPT}\nSteps: 25, Sampler: DDIM, CFG scale: 5.0, Seed: 0, Size: 64x64")


@pytest.mark.slow
def test_the_page_shows_bad_input_and_the_server_keeps_serving(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    before = len(browser.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
    generate_in_page(browser, {"prompt": PROMPT, "steps": "0"})
    wait_for_result_or_error(browser, before + 1)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == "steps: 0 is out of range; enter a number from 1 to 1000."
    assert "invalid" in browser.find_element(By.ID, "steps").get_attribute("class")
    generate_in_page(browser, {"width": "50", "steps": "2"})
    wait_for_result_or_error(browser, before + 1)
    assert "width: 50 is not a multiple of 16" in browser.find_element(By.ID, "error").text
    generate_in_page(browser, {"width": "64"})
    wait_for_result_or_error(browser, before + 1)
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img.result")) == before + 1
    # the edit panel says this version cannot edit
    browser.find_element(By.ID, "tab-edit").click()
    assert "not available in this version" in browser.find_element(By.ID, "edit-unavailable").text


@pytest.mark.slow
def test_the_edit_panel_sends_the_upload_and_the_painted_mask(browser, server, editing, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = tmp_path / "start.png"
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(start)
    open_page(browser, server)
    browser.find_element(By.ID, "tab-edit").click()
    assert not browser.find_element(By.ID, "edit-unavailable").is_displayed()
    browser.find_element(By.ID, "image").send_keys(str(start))
    canvas = browser.find_element(By.ID, "mask-canvas")
    WebDriverWait(browser, 30).until(lambda b: canvas.get_attribute("width") == "64")  # the upload is drawn
    # drag across the top-left quarter: 256 CSS px show 64 image px, offsets are from the canvas centre
    ActionChains(browser).move_to_element_with_offset(canvas, -100, -100).click_and_hold().move_by_offset(
        60, 60
    ).release().perform()
    generate_in_page(browser, {"prompt": PROMPT, "steps": "2"})
    wait_for_result_or_error(browser, 1)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    (given,) = editing
    assert np.array_equal(np.asarray(given["image"]), np.asarray(PIL.Image.open(start)))
    mask = np.asarray(given["mask_image"])
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert mask[10, 10] == 255 and mask[20, 20] == 255  # the stroke from (7, 7) to (22, 22), 6 px wide
    assert mask[48:, :].max() == 0 and mask[:, 48:].max() == 0  # the rest is kept

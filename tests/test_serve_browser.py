"""``multidiff serve`` in a real headless browser (Debian's chromium + chromedriver, through
selenium; ``make browser`` installs them): for a tiny model of each modality the page loads with
nothing fetched from outside, a prompt and Generate show an image / an audio player / a video whose
file decodes at the right size and equals what ``multidiff generate`` writes for the same settings;
a bad value shows generate's message and the next request succeeds; four API clients at once each
get their own result. The page of each modality is saved to ``docs/serve-<modality>.png``."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, Served

from multidiff.adapters.video import read_video
from multidiff.cli.generate import adapter_of
from multidiff.cli.main import main

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("MULTIDIFF_REQUIRE_BROWSER"):
        raise RuntimeError("chromium and chromedriver are not installed: run `make browser` (Debian: apt-get install "
                           "chromium chromium-driver)")
    pytest.skip("no chromium/chromedriver here: `make browser` installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPTS = {"image": "a handwritten digit seven", "audio": "a plucked string playing A4",
           "video": "a digit three moving right"}


@pytest.fixture(scope="module")
def servers(tiny_run, audio_run, video_run, tmp_path_factory):
    """One server per modality, started together; the audio one also serves the image model."""
    base = tmp_path_factory.mktemp("serve")
    models = {"image": [tiny_run / "model"], "audio": [audio_run / "model", tiny_run / "model"],
              "video": [video_run[0] / "model"]}
    started = {}
    for kind, paths in models.items():
        listed = ",".join(str(p) for p in paths)
        started[kind] = Served(f"models=[{listed}]", f"out={base / kind}", "steps=2")
    try:
        for s in started.values():
            s.wait()
        yield {kind: (s, models[kind][0], base / kind) for kind, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def open_page(browser, url: str) -> WebDriverWait:
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    return wait


def set_number(browser, elem_id: str, value) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.clear()
    box.send_keys(str(value))


def generate(browser, wait: WebDriverWait, count_before: int) -> list[str]:
    """Press Generate; the download links of the new result."""
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#files a")) > 0 and files_shown(d) != count_before)
    return [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#files a")]


def files_shown(driver) -> str:
    return "|".join(a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#files a"))


def download(url: str, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url) as r:
        to.write_bytes(r.read())
    return to


def decoded(path: Path) -> np.ndarray:
    """The file's content as numbers (pixels, samples or frames), by its type."""
    if path.suffix == ".png":
        from PIL import Image

        return np.asarray(Image.open(path))
    if path.suffix == ".wav":
        import soundfile as sf

        return sf.read(path)[0]
    return read_video(path)[0].numpy()


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_prompt_and_generate_show_the_result_and_it_is_what_generate_writes(servers, browser, kind, tmp_path):
    server, model, out = servers[kind]
    wait = open_page(browser, server.url)
    external = [u for u in browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
                if not u.startswith(server.url)]
    assert external == []  # offline: no CDN fonts or scripts, no analytics
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPTS[kind])
    set_number(browser, "seed", 3)
    (link,) = generate(browser, wait, count_before=0)
    media = {"image": "#images img", "audio": "#audio-0 audio", "video": "#video-0 video"}[kind]
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, media))
    if kind != "image":  # the player's own download button fetches the same file
        (button,) = browser.find_elements(By.CSS_SELECTOR, f"#{kind}-0 a[download]")
        assert button.get_attribute("href") == link
    browser.save_screenshot(str(ROOT / "docs" / f"serve-{kind}.png"))

    got = download(link, tmp_path / "page" / link.rsplit("/", 1)[1])
    cli = tmp_path / "cli"
    assert main(["generate", f"model={model}", f"prompt={PROMPTS[kind]}", "seed=3", "steps=2", f"out={cli}"]) == 0
    (want,) = [p for p in cli.iterdir() if p.name.startswith("0000")]
    assert got.suffix == want.suffix == {"image": ".png", "audio": ".wav", "video": ".mp4"}[kind]
    a, b = decoded(got), decoded(want)
    assert a.shape == b.shape and np.array_equal(a, b)
    adapter = adapter_of(str(model))
    if kind == "image":
        assert a.shape[:2] == tuple(adapter.size)
    elif kind == "audio":
        import soundfile as sf

        assert sf.info(got).samplerate == adapter.sample_rate and len(a) == round(adapter.duration * adapter.sample_rate)
    else:
        assert a.shape[1] == adapter.num_frames  # (channels, frames, height, width)
    assert (out / got.name).read_bytes() == got.read_bytes()  # the run folder holds the same file
    rows = (out / "metadata.jsonl").read_text().splitlines()
    assert f'"file": "{got.name}"' in rows[-1] and '"seed": 3' in rows[-1]


def test_a_bad_value_shows_generates_message_and_the_next_request_succeeds(servers, browser):
    server, _, out = servers["image"]
    wait = open_page(browser, server.url)
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a handwritten digit one")
    set_number(browser, "steps", 0)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: "steps=0 is invalid: it must be a positive integer" in d.page_source)
    set_number(browser, "steps", 2)
    links = generate(browser, wait, count_before=0)
    assert len(links) == 1
    assert "Traceback" not in server.output()


def test_four_clients_at_once_each_get_their_own_result(servers, tmp_path):
    from gradio_client import Client

    server, model, _ = servers["image"]
    prompt = "a handwritten digit four"

    def ask(seed: int):
        client = Client(server.url, verbose=False)
        *_, files, rows = client.predict(prompt=prompt, seed=seed, steps=2, num_samples=1, api_name="/generate")
        return seed, files, rows

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, [20, 21, 22, 23]))
    cli = tmp_path / "cli"
    assert main(["generate", f"model={model}", f"prompt={prompt}", "seed=20", "num_samples=4", "steps=2", f"out={cli}"]) == 0
    names = set()
    for seed, files, rows in results:
        (path,) = files
        assert f'"seed": {seed}' in rows
        names.add(Path(path).name)
        want = cli / f"{seed - 20:04d}.png"  # generate's sample k uses seed 20 + k
        assert Path(path).read_bytes() == want.read_bytes()
    assert len(names) == 4  # four files, none overwritten


def test_the_model_list_routes_to_each_models_adapter(servers, browser):
    from gradio_client import Client

    server, audio_model, _ = servers["audio"]
    open_page(browser, server.url)
    assert browser.find_elements(By.CSS_SELECTOR, "#model")  # several models: a choice in the page
    image_model = [m for m in server.proc.args if "models=" in m][0].split(",")[1].rstrip("]")
    *_, files, rows = Client(server.url, verbose=False).predict(model=image_model, prompt="a handwritten digit nine",
                                                               steps=2, api_name="/generate")
    assert Path(files[0]).suffix == ".png" and image_model in rows


def test_an_edit_uploaded_through_the_api_keeps_the_input(servers, tmp_path):
    """init= uploaded, fill_box= typed as text: the kept upper half is the input's, pixel for pixel."""
    from gradio_client import Client, handle_file
    from PIL import Image

    server, _, out = servers["image"]
    init = tmp_path / "init.png"
    pixels = (np.arange(16 * 16).reshape(16, 16) * 7 % 256).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(init)
    *_, files, rows = Client(server.url, verbose=False).predict(
        prompt="a handwritten digit seven", steps=2, init=handle_file(str(init)), fill_box="[8, 0, 16, 16]",
        api_name="/generate")
    edited = np.asarray(Image.open(files[0]).convert("L"))
    assert np.array_equal(edited[:8], pixels[:8]) and not np.array_equal(edited[8:], pixels[8:])
    assert '"fill_box": [8, 0, 16, 16]' in rows and '"init": ' in rows
    assert (out / ".gradio").is_dir()  # the upload stayed inside the run folder

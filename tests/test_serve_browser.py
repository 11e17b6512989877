"""The playground page in a real browser: Debian's chromium, headless, driven by Selenium.

Types a prompt, checks the tokenizer pane against /v1/tokenize, generates (seeded), checks
that each token is shaded by its probability and that hovering shows the five alternatives the
API reports, and saves a screenshot (``$SMALLGPT_TEST_ARTIFACTS/playground.png`` when that is
set, else the test's temporary folder).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'smallgpt[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium "
                                "(pip install 'smallgpt[test]')")
httpx = pytest.importorskip("httpx")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver"
                                          if Path("/usr/bin/chromedriver").exists() else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no Chromium here: install Debian's chromium and chromium-driver "
    "(apt-get install chromium chromium-driver; .ci/run does)")

import torch  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import ThreadServer, make_run  # noqa: E402

from smallgpt.checkpoint import load_model  # noqa: E402
from smallgpt.serve.app import create_app  # noqa: E402
from smallgpt.serve.engine import Engine  # noqa: E402

PROMPT = "The quick brown fox"
SETTINGS = {"max_tokens": "24", "temperature": "0.8", "top_k": "40", "seed": "7"}


@pytest.fixture()
def browser():  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def rgb(css: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def test_playground(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = make_run(tmp_path / "run")
    loaded = load_model(run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=4)
    app = create_app(engine, loaded.tokenizer, model_name="tiny-run",
                     metrics_path=run / "metrics.jsonl")
    try:
        with ThreadServer(app) as server:
            drive(browser, server.url, tmp_path)
    finally:
        torch.set_num_threads(threads)


def drive(d, url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wait = WebDriverWait(d, 60)
    d.get(url + "/")
    wait.until(lambda d: "context 64" in d.find_element(By.ID, "model").text)

    # The tokenizer pane follows the typing.
    d.find_element(By.ID, "prompt").send_keys(PROMPT)
    want = httpx.post(url + "/v1/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    wait.until(lambda d: [c.get_attribute("data-id") for c in
                          d.find_elements(By.CSS_SELECTOR, "#tokens .chip")] == [str(t) for t
                                                                                   in want])
    assert "5 of 64" in d.find_element(By.ID, "count").get_attribute("textContent")

    for name, value in SETTINGS.items():
        box = d.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    d.find_element(By.ID, "go").click()
    wait.until(lambda d: "tokens \u00b7" in d.find_element(By.ID, "status").text)
    spans = d.find_elements(By.CSS_SELECTOR, "#output .tok")
    assert len(spans) == 24

    # The same request through the API (seeded): the page shows these tokens and numbers.
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "top_k": 40, "top_p": 1,
            "repetition_penalty": 1, "seed": 7, "logprobs": 5}
    api = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert d.find_element(By.ID, "output").text == PROMPT + api["text"]
    lp = api["logprobs"]
    for span, logp in zip(spans, lp["token_logprobs"]):
        p = float(span.get_attribute("data-p"))
        assert p == pytest.approx(math.exp(logp), abs=1e-5)
        # Shaded by probability: white at p = 1, strongest at p = 0.
        a = 1 - p
        r, g, b = rgb(span.value_of_css_property("background-color"))
        assert (r, g, b) == (255, round(255 - 145 * a), round(255 - 175 * a))
    assert len({s.value_of_css_property("background-color") for s in spans}) > 3

    # Hovering shows the five most likely tokens there, with their probabilities.
    i = min(range(24), key=lambda k: lp["token_logprobs"][k])  # a surprising token
    ActionChains(d).move_to_element(spans[i]).perform()
    popup = d.find_element(By.ID, "alts")
    wait.until(lambda d: popup.is_displayed())
    rows = popup.find_elements(By.CSS_SELECTOR, ".alt")
    top = sorted(lp["top_logprobs"][i].items(), key=lambda kv: -kv[1])
    assert 5 <= len(rows) <= 6
    for row, (_, logp) in zip(rows[:5], top[:5]):
        assert float(row.get_attribute("data-p")) == pytest.approx(math.exp(logp), abs=1e-5)
    chosen = popup.find_elements(By.CSS_SELECTOR, ".alt.chosen")
    assert len(chosen) == 1
    assert float(chosen[0].get_attribute("data-p")) == pytest.approx(
        math.exp(lp["token_logprobs"][i]), abs=1e-5)

    # The run's training curves are drawn.
    assert d.find_element(By.ID, "curves").is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#curves svg path")) == 3

    out = Path(os.environ.get("SMALLGPT_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(out / "playground.png"))
    print(f"screenshot: {out / 'playground.png'}")

    # A tap pins the popup; a tap elsewhere closes it.
    ActionChains(d).move_to_element(d.find_element(By.ID, "prompt")).perform()
    wait.until(lambda d: not popup.is_displayed())
    spans[0].click()
    wait.until(lambda d: popup.is_displayed())
    d.find_element(By.TAG_NAME, "h1").click()
    wait.until(lambda d: not popup.is_displayed())
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

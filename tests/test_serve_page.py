"""The web page of `diffutron serve` in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium): load it, type a prompt, press generate, wait for the text, check it against the API,
and save a screenshot as a test artefact (runs/test-artifacts/, or $DIFFUTRON_TEST_ARTIFACTS).

Skipped where Chromium is not installed, except in CI (CI=true), where a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from diffutron.serve import create_app, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("DIFFUTRON_TEST_ARTIFACTS", "runs/test-artifacts"))

if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI", "").lower() not in ("1", "true"):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def base():
    from diffutron.model import DiffusionLM

    lm = DiffusionLM.from_pretrained("tiny-diffutron", device="cpu")
    with serving(create_app(lm)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "Chromium is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)  # no sandbox: CI runs as root
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_until_done(driver, done: str = "Done", timeout: float = 90) -> str:
    """The status line once the run is over: `done` (in the page's language) or an error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(d):
        status = d.find_element(By.ID, "status")
        return status.text if status.text == done or "error" in (status.get_attribute("class") or "") else False

    return WebDriverWait(driver, timeout).until(finished)


def test_page_generates_live_in_chromium(base, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    prompt = "Türkiye'nin en büyük şehri"
    browser.get(base + "/")
    browser.find_element(By.ID, "lang-en").click()
    assert browser.find_element(By.ID, "run").text == "Generate"
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("24")
    # count the canvas redraws as they happen: the page draws every step, not a replay at the end. A
    # redraw is a mutation record; a loaded browser may hand several to one callback (counting callbacks
    # flaked, 23 of 24), but a replay at the end would come as a single callback
    browser.execute_script(
        "window.draws = 0; window.callbacks = 0; new MutationObserver((records) => {"
        " window.callbacks++; window.draws += records.length; })"
        ".observe(document.getElementById('step'), {childList: true});"
    )
    browser.find_element(By.ID, "run").click()
    assert wait_until_done(browser) == "Done", browser.find_element(By.ID, "status").text

    expected = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 24}, timeout=60).json()
    output = browser.find_element(By.ID, "output")
    assert output.get_attribute("data-text") == expected["choices"][0]["text"]
    assert output.text.replace("\n", " ").startswith(prompt)
    passes = expected["usage"]["forward_passes"]
    stats = browser.find_element(By.ID, "stats")
    assert stats.get_attribute("data-forward-passes") == str(passes) and "tokens/s" in stats.text
    assert browser.find_element(By.ID, "step").text == f"step {passes}"
    assert browser.execute_script("return window.draws") == passes
    assert browser.execute_script("return window.callbacks") > 1  # drawn as the steps came
    assert not browser.find_elements(By.CSS_SELECTOR, "#canvas .m")  # every mask resolved
    # offline: everything the page loaded came from the server
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(base) for url in loaded), loaded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "serve-page.png"))

    # Turkish labels, and the fill-mask mode
    browser.find_element(By.ID, "lang-tr").click()
    assert browser.find_element(By.ID, "run").text == "Üret"
    Select(browser.find_element(By.ID, "mode")).select_by_value("fill-mask")
    assert "<mask>" in browser.find_element(By.ID, "prompt").get_attribute("value")
    browser.find_element(By.ID, "run").click()
    assert wait_until_done(browser, "Bitti") == "Bitti"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#output tr")) == 1 + 5  # header + top 5

    # the word blank: the button puts <word> where the cursor is; whole words come back, as the API's
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("Türkiye Büyük Millet  Ankara'da toplandı.")
    browser.execute_script("const b = document.getElementById('prompt'); b.selectionStart = b.selectionEnd = 21;")
    browser.find_element(By.ID, "insert_word").click()
    text = "Türkiye Büyük Millet <word> Ankara'da toplandı."
    assert box.get_attribute("value") == text
    browser.find_element(By.ID, "run").click()
    assert wait_until_done(browser, "Bitti") == "Bitti"
    expected = httpx.post(base + "/v1/fill-mask", json={"text": text, "top_k": 5}, timeout=120).json()["words"][0]
    rows = browser.find_elements(By.CSS_SELECTOR, "#words_table tr")[1:]
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [c["text"] for c in expected["candidates"]]
    assert not browser.find_elements(By.ID, "masks_table")

    # infill with a span of unknown length: the page asks without a stream (the server refuses one: the
    # lengths are scored once all are filled) and shows the chosen text and every length's score
    Select(browser.find_element(By.ID, "mode")).select_by_value("infill")
    text = "Türkiye Büyük Millet <mask*?> Ankara'da toplandı."
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "run").click()
    assert wait_until_done(browser, "Bitti") == "Bitti", browser.find_element(By.ID, "status").text
    expected = httpx.post(base + "/v1/infill", json={"text": text}, timeout=120).json()["choices"][0]
    assert browser.find_element(By.ID, "output").get_attribute("data-text") == expected["text"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#lengths_table tr")[1:]
    lengths = [
        [int(r.find_elements(By.TAG_NAME, "td")[0].text), r.find_elements(By.TAG_NAME, "td")[2].text] for r in rows
    ]
    assert lengths == [[e["length"], e["text"]] for e in expected["lengths"]] and len(lengths) > 1

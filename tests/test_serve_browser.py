"""The chat page in headless Chromium: it sends a message and shows the streamed reply as text."""

from __future__ import annotations

import os
import shutil

import pytest
from _serve_fixtures import API_KEY, running_server, tiny_ir

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,800")


def chromium(profile_dir):
    """Debian's Chromium through its own driver: nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    binary = shutil.which("chromium")
    if binary:
        options.binary_location = binary
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not shutil.which(CHROMEDRIVER):
        reason = "chromium-driver is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs it: a CI run without it must not pass quietly
            pytest.fail(reason)
        pytest.skip(reason)
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_page_streams_reply_as_text(tmp_path_factory, tiny_model_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ir = tiny_ir(tmp_path_factory, tiny_model_dir)
    with running_server(ir, api_key=API_KEY, max_tokens_limit=256) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        # Without the key the page says why it cannot list the model.
        wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)
        key = browser.find_element(By.ID, "api-key")
        key.send_keys(API_KEY)
        browser.find_element(By.ID, "max_tokens").click()  # fires the key field's change event
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-poet")
        info = browser.find_element(By.ID, "model-info").text
        assert "1024" in info and "256" in info  # context and max_tokens limit

        max_tokens = browser.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("200")
        # Record every length the reply's text takes, to see it grow chunk by chunk.
        browser.execute_script("""
            window.lengths = [];
            new MutationObserver(() => {
              const m = document.querySelectorAll('.msg.assistant');
              if (m.length) window.lengths.push(m[m.length - 1].textContent.length);
            }).observe(document.getElementById('log'),
                       {subtree: true, childList: true, characterData: true});""")
        hostile = '<img src=x onerror="document.title=\'pwned\'">寫一首關於明月的詩'
        browser.find_element(By.ID, "prompt").send_keys(hostile)
        browser.find_element(By.ID, "send").click()

        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        text = reply.get_attribute("textContent")
        lengths = [n for n in browser.execute_script("return window.lengths") if n]
        assert text and len(set(lengths)) >= 3 and lengths[-1] == len(text), lengths  # streamed
        user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]
        # Text typed or generated is shown as text: no element is created from it.
        assert user.text == hostile
        assert not browser.find_elements(By.CSS_SELECTOR, "#log img")
        assert browser.title != "pwned"
        stats = browser.find_element(By.ID, "stats").text
        assert "first token" in stats and "tokens" in stats
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and "/v1/models" not in e["message"]]  # the expected 401 before the key
        assert not errors, errors

"""The viewer at ``/`` in a real (headless) Chromium: upload a WFDB record, see the plot and the verdict.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium`` (test extras); where
any is missing the test skips and says which. The screenshot lands in ``test-artifacts/viewer.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ecgad.settings import REPO_ROOT
from serve.testing import local_config, local_service, random_checkpoint

pytestmark = pytest.mark.cluster  # starts Ray Serve and a browser (see pyproject.toml's markers)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RECORD = "ptbxl/records500/06000/06000_hr"
ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).is_file() and shutil.which(Path(binary).name) is None:
            pytest.skip(f"{binary} not found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1300"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("viewer") / "checkpoint", seed=0)
    with local_service(checkpoint, local_config(args={"mode": "fast"})) as url:
        yield url


def test_upload_shows_plot_and_score(browser, service, sample_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base = sample_data / RECORD
    browser.get(f"{service}/")
    wait = WebDriverWait(browser, 90)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "fast mode"))
    # Several files go into one <input multiple> as newline-separated paths.
    browser.find_element(By.ID, "files").send_keys("\n".join(str(base.with_suffix(s)) for s in (".hea", ".dat")))
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.execute_script(
        "const img = document.getElementById('plot');"
        "return !document.getElementById('result').hidden && img.complete && img.naturalWidth > 0;"))
    verdict = browser.find_element(By.ID, "verdict").text
    assert verdict.startswith("score ") and ("normal" in verdict or "anomalous" in verdict), verdict
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    width = browser.execute_script("return document.getElementById('plot').naturalWidth")
    assert width > 800
    ARTIFACTS.mkdir(exist_ok=True)
    browser.find_element(By.TAG_NAME, "body").screenshot(str(ARTIFACTS / "viewer.png"))


def test_rejection_is_shown(browser, service, sample_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{service}/")
    browser.find_element(By.ID, "files").send_keys(str((sample_data / RECORD).with_suffix(".hea")))  # no .dat
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.ID, "error")))
    error = browser.find_element(By.ID, "error").text
    assert "HTTP 422" in error and "bad_file" in error, error
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None

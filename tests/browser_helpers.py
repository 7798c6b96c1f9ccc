"""A real browser for the dashboard's tests: Debian's headless Chromium, driven by its chromium-driver through
selenium. Nothing is downloaded: `make test` installs both with apt-get where apt exists (and fails if it cannot);
only on a machine without apt do the browser tests skip, saying why.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = ("chromium", "chromium-browser")


def browser_paths() -> tuple[str, str]:
    """The system's Chromium and chromedriver; skips the test where they cannot be had (no apt), fails where
    they should have been installed."""
    chromium = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",
                                                               "/usr/lib/chromium/chromedriver") if Path(p).exists()),
                                                  None)
    if chromium and driver:
        return chromium, driver
    if shutil.which("apt-get"):
        pytest.fail("chromium and chromium-driver are missing although apt-get is here: `make test` installs them")
    pytest.skip("no Chromium here, and no apt-get to install it with (the browser tests need Debian's chromium)")


@contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A headless Chromium window of ``width`` x ``height``, closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--metrics-recording-only", "--no-default-browser-check", "--host-resolver-rules=MAP * ~NOTFOUND, "
                "EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    drv.set_page_load_timeout(60)
    if width < 500:  # a window is at least 500 px wide: narrower is a phone's viewport, emulated
        drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    try:
        yield drv
    finally:
        drv.quit()

"""Headless Chromium helpers for the app's end-to-end test (tests/test_app_browser.py): start the browser,
read an image the page shows, paint on gr.ImageEditor, read error toasts, save full-page screenshots.

Selectors follow Gradio 6: a tab's button has id "<tab elem_id>-button", an error toast is
[data-testid=toast-body] with its text in [data-testid=toast-text], a component's hidden upload field is its
input[type=file], and a component shows a status tracker (class "hide" when idle) while its event runs.
"""
from __future__ import annotations

import base64
import io
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def missing() -> str:
    """Why the browser test cannot run here, or "" when everything it needs is installed."""
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -r requirements-dev.txt -c constraints.txt)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    return ""


def start_chrome(width: int = 1280, height: int = 1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait(driver, condition, timeout: float = 30, what: str = "the page"):
    """Polls `condition(driver)` until it returns something truthy; fails naming `what` and the page's toasts."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition(driver)
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException):
            pass  # the page re-rendered the element between the find and the read: poll again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; toasts: {toasts(driver)}")
        time.sleep(0.1)


def by_id(driver, elem_id):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, elem_id)


def open_tab(driver, tab_id):
    """Clicks the tab's button; returns once its panel is shown."""
    wait(driver, lambda d: by_id(d, f"{tab_id}-button"), what=f"the tab button {tab_id}").click()
    wait(driver, lambda d: by_id(d, tab_id).is_displayed(), what=f"the tab {tab_id} to show")


def idle(driver) -> bool:
    """True when no component shows a running status tracker (every event finished). A tracker left showing
    "Error" (it holds a clear-status button) after a failed event counts as finished."""
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=status-tracker]')].every(e =>"
        " e.classList.contains('hide') || e.offsetParent === null || e.querySelector('.clear-status'))")


def text_of(driver, elem_id) -> str:
    """The value of a gr.Textbox (its textarea/input) or the text of a gr.Code/Markdown."""
    from selenium.webdriver.common.by import By
    element = by_id(driver, elem_id)
    fields = element.find_elements(By.CSS_SELECTOR, "textarea, input[type=text]")
    if fields:
        return fields[0].get_attribute("value") or ""
    return driver.execute_script("return arguments[0].innerText", element) or ""


def image_src(driver, elem_id) -> str:
    from selenium.webdriver.common.by import By
    images = by_id(driver, elem_id).find_elements(By.CSS_SELECTOR, "img")
    return (images[0].get_attribute("src") or "") if images else ""


def fetch_image(src: str) -> np.ndarray:
    """The pixels of an <img> src: a data URL or a /gradio_api/file= URL of the local server."""
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        with urllib.request.urlopen(src, timeout=10) as response:
            data = response.read()
    return np.array(Image.open(io.BytesIO(data)))


def wait_image(driver, elem_id, old_src: str = "", timeout: float = 30) -> np.ndarray:
    """Waits until `elem_id` shows an image other than `old_src` and every event has finished; its pixels.
    An error toast meanwhile fails at once with its text (toasts vanish after a few seconds)."""
    def shown(d):
        errors = toasts(d)
        assert not errors, f"an error toast while waiting for #{elem_id}: {errors}"
        return idle(d) and (s := image_src(d, elem_id)) and s != old_src and s
    src = wait(driver, shown, timeout, f"an image in #{elem_id}")
    return fetch_image(image_src(driver, elem_id) or src)


def upload(driver, elem_id, path):
    """Sends `path` to the component's file field; one showing an image (or a broken one) is cleared first."""
    from selenium.webdriver.common.by import By
    element = wait(driver, lambda d: by_id(d, elem_id), what=f"#{elem_id}")  # tabs render their content lazily
    remove = element.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove Image']")
    if remove and not element.find_elements(By.CSS_SELECTOR, "input[type=file]"):
        remove[0].click()
    field = wait(driver, lambda d: by_id(d, elem_id).find_elements(By.CSS_SELECTOR, "input[type=file]"),
                 what=f"the upload field of #{elem_id}")
    field[0].send_keys(str(Path(path).resolve()))


def toasts(driver) -> list[str]:
    """The texts of the error toasts now on the page."""
    try:  # textContent: a toast still fading in has no visible text yet
        return driver.execute_script("return [...document.querySelectorAll("
                                     "'[data-testid=toast-body] [data-testid=toast-text]')].map(e => e.textContent)")
    except Exception:  # noqa: BLE001 - also used in failure messages: never hide the real failure
        return []


def close_toasts(driver):
    driver.execute_script("document.querySelectorAll('[data-testid=toast-close]').forEach(b => b.click())")
    wait(driver, lambda d: not toasts(d), 10, "the toasts to close")


def editor_geometry(driver, elem_id, image_shape):
    """(canvas element, scale, (cx, cy)): CSS pixels per image pixel and the image centre in canvas offsets.

    The editor draws the image centred in its visible canvas at the zoom its toolbar shows (e.g. "450%")."""
    from selenium.webdriver.common.by import By
    editor = by_id(driver, elem_id)
    canvas = wait(driver, lambda d: [c for c in editor.find_elements(By.CSS_SELECTOR, "canvas") if c.is_displayed()],
                  what=f"the canvas of #{elem_id}")[0]
    zoom = wait(driver, lambda d: editor.find_element(By.CSS_SELECTOR, ".zoom-number span").text.strip("% "),
                what="the editor's zoom")
    return canvas, float(zoom) / 100, (0, 0)


def brush_size(driver, elem_id, size: int):
    """Sets the editor's brush size (image pixels) with its own slider, as a user would."""
    from selenium.webdriver.common.by import By
    editor = by_id(driver, elem_id)
    editor.find_element(By.CSS_SELECTOR, "button[aria-label='Brush Size']").click()
    slider = wait(driver, lambda d: [i for i in editor.find_elements(By.CSS_SELECTOR, "input[type=range]")
                                     if i.is_displayed()], 10, "the brush size slider")[0]
    driver.execute_script("const s = arguments[0]; s.value = arguments[1];"
                          "s.dispatchEvent(new Event('input', {bubbles: true}));"
                          "s.dispatchEvent(new Event('change', {bubbles: true}))", slider, size)
    editor.find_element(By.CSS_SELECTOR, "button[aria-label='Brush Size']").click()  # closes the slider


def paint_row(driver, elem_id, image_shape, row: float = 0.5, start: float = 0.25, stop: float = 0.75):
    """Drags the brush along image row `row` (a fraction of the height) from x = start to stop (fractions)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    brush = by_id(driver, elem_id).find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]")
    if brush and "highlight" not in (brush[0].get_attribute("class") or ""):
        brush[0].click()  # the brush tool may not be the selected one
    canvas, scale, _ = editor_geometry(driver, elem_id, image_shape)
    # WebDriver offsets count from the centre of the element's part in the window: show all of it first
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", by_id(driver, elem_id))
    height, width = image_shape[:2]
    y = (row - 0.5) * height * scale  # move_to_element_with_offset counts from the canvas centre
    x0, x1 = (start - 0.5) * width * scale, (stop - 0.5) * width * scale
    chain = ActionChains(driver).move_to_element_with_offset(canvas, int(x0), int(y)).click_and_hold()
    steps = 12
    for _ in range(steps):
        chain.move_by_offset(int((x1 - x0) / steps), 0)
    chain.release().perform()


def screenshot(driver, path, bottom_of=()):
    """A PNG of the whole page down to the lowest of the elements `bottom_of` (ids), beyond the window too."""
    bottom = max([driver.execute_script("return arguments[0].getBoundingClientRect().bottom + window.scrollY",
                                        by_id(driver, e)) for e in bottom_of] or [800])
    width = driver.execute_script("return document.documentElement.clientWidth")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": int(bottom) + 24, "scale": 1}})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(base64.b64decode(shot["data"]))


def set_value(driver, elem_id, value):
    """Types `value` into the number/text field of component `elem_id` and leaves it (Gradio reads it on blur)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    field = by_id(driver, elem_id).find_element(By.CSS_SELECTOR, "input:not([type=range]), textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)

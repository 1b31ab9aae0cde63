"""The page of `minidpo explain` in a real browser (headless Chromium through selenium).

It loads with no console error and no network request; every number it prints is the
library's; its beta slider, worked from the keyboard, gives losses.dpo_loss at each beta; it
reads at laptop and phone widths (screenshots kept under $MINIDPO_ARTIFACTS when set, else a
temporary folder) and prints without its controls.

Needs Chromium, chromedriver and selenium (Debian: apt-get install chromium chromium-driver;
pip install -e ".[explain]"); without them every test here skips, naming what is missing.
MINIDPO_CHROMIUM and MINIDPO_CHROMEDRIVER override where they are looked for."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from minidpo import explain as ex
from minidpo import runtime
from minidpo.cli import load_model
from minidpo.data import read_preferences


def _find(env: str, names) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).exists() else None
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs the selenium package (pip install -e '.[explain]')")
    chrome = _find("MINIDPO_CHROMIUM", ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"])
    driver = _find("MINIDPO_CHROMEDRIVER", ["chromedriver"])
    if chrome is None or driver is None:
        pytest.skip(f"needs {'Chromium' if chrome is None else 'chromedriver'} (Debian: apt-get install chromium "
                    f"chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              "--force-device-scale-factor=1", "--window-size=1280,900", "--disable-extensions"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshots, the page and its PDF are kept: $MINIDPO_ARTIFACTS/explain (CI keeps it)."""
    root = os.environ.get("MINIDPO_ARTIFACTS")
    out = Path(root) / "explain" if root else tmp_path_factory.mktemp("explain-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def made(explain_run, artifacts):
    """(Explanation, page path, policy/reference log-probs) for the default model and data."""
    reference, config, tokenizer = load_model(explain_run / "sft", "cpu")
    policy, _, _ = load_model(explain_run / "dpo_beta0.1", "cpu")
    examples = read_preferences(explain_run / "pairs_eval.jsonl")[:8]
    pairs = [ex.tokenize_pair(tokenizer, e.prompt, e.chosen, e.rejected, config.n_ctx, e.source) for e in examples]
    with runtime.use_threads(1):
        expl = ex.explain_step(policy, reference, config, tokenizer, pairs, beta=0.1, lr=5e-4,
                               bandit=ex.bandit_world(seed=0),
                               meta={"policy_steps": 30, "command": "minidpo explain RUN", "run": str(explain_run)})
    page = ex.write_page(artifacts / "explain.html", ex.render_html(expl))
    return expl, page, (policy, reference, config, tokenizer, pairs)


def load(browser, page: Path, width: int = 1280, height: int = 900):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(width, height)
    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def printed(text: str) -> tuple[float, float]:
    """A number as the page prints it ("−1.2918", "+0.269", "0.00266", "4.4e-16", "93,312") and half
    a unit of its last printed digit."""
    s = text.strip().replace("\u2212", "-").replace(",", "")
    mant, _, exp = s.partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return float(s), 0.5 * 10.0 ** (int(exp or 0) - decimals)


def assert_shown(text: str, want: float, what: str, slack: float = 0.0) -> None:
    got, half = printed(text)
    # half a printed unit, plus the JSON's 9 significant digits and the caller's slack
    assert abs(got - want) <= half * (1 + 1e-6) + 1e-9 * abs(want) + slack, (what, text, want)


def dom_numbers(browser) -> list:
    return browser.execute_script(
        "return [...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.textContent, e.title])")


# ------------------------------------------------------------------------------------ tests


def test_loads_with_no_console_error_and_no_network_request(browser, made):
    _, page, _ = made
    browser.get_log("browser"), browser.get_log("performance")  # drop anything before this page
    load(browser, page)
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == [], problems
    # the page loads nothing: no resource entries, and Chrome's network log holds the page alone
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    urls = [m["params"]["request"]["url"] for m in (json.loads(e["message"])["message"] for e in browser.get_log("performance"))
            if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(u == page.as_uri() or u.startswith("data:") for u in urls), urls
    assert browser.execute_script("return document.querySelectorAll('svg').length") >= 4  # drawn by its script
    assert browser.title.startswith("One DPO step")


def test_every_number_on_the_page_is_the_librarys(browser, made):
    """Each number the DOM shows, read back and compared, to its printed precision, with the
    Explanation's value of the same key, and the weights also with losses.dpo_loss of
    log-probs recomputed here on another layout (scoring.batched_sequence_logps, padded)."""
    from minidpo.losses import dpo_loss
    from minidpo.packing import Batcher
    from minidpo.scoring import batched_sequence_logps

    expl, page, (policy, reference, config, tokenizer, pairs) = made
    load(browser, page)
    shown = dom_numbers(browser)
    keys = {k for k, _, _ in shown}
    assert len(shown) > 300, len(shown)
    for need in ("pairs.0.chosen.tokens.logp.0", "pairs.0.rejected.tokens.ref_logp.0", "pairs.0.chosen.logp",
                 "pairs.0.rejected.ref_logp", "pairs.0.chosen.reward", "pairs.0.margin", "pairs.0.loss", "pairs.0.weight",
                 "pairs.0.chosen.grad_logp", "pairs.0.rejected.tokens.grad_row.0", "pairs.0.chosen.tokens.grad_label.0",
                 "pairs.0.chosen.logp_after", "pairs.0.rejected.tokens.logp_after.0", "step.grad_norm", "step.loss",
                 "step.loss_after", "bandit.exact.policy_gap", "bandit.log_pi_opt.2.4", "bandit.exact.recovered.1.1"):
        assert need in keys, need
    assert {f"pairs.{i}.weight" for i in range(8)} <= keys  # the whole batch
    for key, text, title in shown:
        assert_shown(text, expl.value(key), key)
        src = ex.SOURCES[browser.execute_script(f"return document.querySelector('[data-key=\"{key}\"]').dataset.src")]
        assert title.startswith(src["fn"]) and f"eq. {src['eq']}" in title, (key, title)
    # every number the page prints carries its source: the data's, and those it derives (differences)
    untitled = browser.execute_script(
        "return [...document.querySelectorAll('.num')].filter(e => !e.title).map(e => e.outerHTML).slice(0, 5)")
    assert untitled == []
    derived = browser.execute_script(
        "return [...document.querySelectorAll('.num:not([data-key])')].map(e => [e.dataset.src, e.textContent, +e.dataset.value])")
    assert len(derived) > 50
    for src, text, value in derived:
        assert src in ex.SOURCES
        assert_shown(text, value, src)
    bare = browser.execute_script(  # a table cell showing a number that is neither a .num nor an index
        "return [...document.querySelectorAll('td')].filter(td => /^[\u2212+-]?[0-9]/.test(td.textContent.trim())"
        " && !td.querySelector('.num') && !td.classList.contains('idx')).map(td => td.outerHTML).slice(0, 5)")
    assert bare == []
    # the same weights from the library again, on the padded layout
    padded = Batcher(tokenizer.pad_id, share_prompt=False, pack=False)
    pc, pr = batched_sequence_logps(policy, config, pairs, padded, 4)
    rc, rr = batched_sequence_logps(reference, config, pairs, padded, 4)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    text = dict((k, t) for k, t, _ in shown)
    for i in range(8):
        assert_shown(text[f"pairs.{i}.weight"], float(out.gradient_weight[i]), f"weight {i}", slack=2e-5)
        assert_shown(text[f"pairs.{i}.loss"], float(out.losses[i]), f"loss {i}", slack=2e-5)
    # the batch table is sorted by weight, largest first
    order = browser.execute_script("return [...document.querySelectorAll('#batch-body tr[data-pair]')].map(r => +r.dataset.pair)")
    weights = [expl.value(f"pairs.{i}.weight") for i in order]
    assert sorted(order) == list(range(8)) and weights == sorted(weights, reverse=True)


def test_the_beta_slider_gives_dpo_loss_at_each_beta(browser, made):
    """Worked from the keyboard: three betas, each giving losses.dpo_loss's rewards, margin, loss
    and weight for the pair shown, from its real log-probs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from minidpo.losses import dpo_loss

    expl, page, _ = made
    load(browser, page)
    slider = browser.find_element(By.ID, "beta")
    assert slider.get_attribute("type") == "range"
    label = browser.find_element(By.CSS_SELECTOR, "label[for=beta]")
    assert "\u03b2" in label.text
    p = expl.value("pairs.0")
    lp = [np.array([v]) for v in (p["chosen"]["logp"], p["rejected"]["logp"], p["chosen"]["ref_logp"], p["rejected"]["ref_logp"])]

    def reads():
        return {i: browser.find_element(By.ID, i).text for i in ("beta-out", "live-rw", "live-rl", "live-margin",
                                                                    "live-loss", "live-weight")}

    assert reads()["beta-out"] == "0.1"  # it starts at the step's beta
    browser.execute_script("arguments[0].focus()", slider)  # as a Tab would; a click would move it
    seen = []
    for keys in ([Keys.ARROW_LEFT] * 2, [Keys.ARROW_RIGHT] * 8, [Keys.END]):
        for k in keys:
            slider.send_keys(k)
        assert browser.switch_to.active_element == slider  # the keyboard moved it
        r = reads()
        beta = float(r["beta-out"])
        seen.append(beta)
        out = dpo_loss(*lp, beta=beta)
        assert_shown(r["live-rw"], float(out.chosen_rewards[0]), "r_w")
        assert_shown(r["live-rl"], float(out.rejected_rewards[0]), "r_l")
        assert_shown(r["live-margin"], float(out.chosen_rewards[0] - out.rejected_rewards[0]), "margin")
        assert_shown(r["live-loss"], float(out.losses[0]), "loss")
        assert_shown(r["live-weight"], float(out.gradient_weight[0]), "weight")
        assert slider.get_attribute("aria-valuetext") == f"beta {r['beta-out']}"
    assert seen == [0.05, 1.0, 10.0]
    # the real step's numbers are not the slider's: they stay at the step's beta
    assert_shown(browser.find_element(By.CSS_SELECTOR, '[data-key="pairs.0.loss"]').text, p["loss"], "step loss")


def test_another_pair_is_shown_in_detail_on_request(browser, made):
    from selenium.webdriver.common.by import By

    expl, page, _ = made
    load(browser, page)
    first = browser.find_element(By.CSS_SELECTOR, "#batch-body tr[data-pair]")
    j = int(first.get_attribute("data-pair"))
    assert j != 0
    first.find_element(By.TAG_NAME, "button").click()
    assert browser.find_element(By.CSS_SELECTOR, "#pair-body p").text.startswith(f"Pair {j + 1} of 8")
    shown = dom_numbers(browser)
    assert any(k.startswith(f"pairs.{j}.chosen.tokens.") for k, _, _ in shown)
    assert not any(k.startswith("pairs.0.chosen.tokens.") for k, _, _ in shown)
    for key, text, _ in shown:
        assert_shown(text, expl.value(key), key)
    assert browser.find_element(By.ID, "live-loss").text == browser.find_element(By.CSS_SELECTOR, f'[data-key="pairs.{j}.loss"]').text


def _screenshot(browser, path: Path, width: int) -> np.ndarray:
    """The whole page at ``width`` px, saved to ``path``; its pixels."""
    from PIL import Image

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(height, 20000))
    browser.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("width", [1280, 390])
def test_screenshots_at_laptop_and_phone_widths(browser, made, artifacts, width):
    _, page, _ = made
    load(browser, page, width)
    # the page fits the width (wide tables scroll inside their own boxes, never the page)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    px = _screenshot(browser, artifacts / f"explain-{width}.png", width)
    assert px.shape[1] == width and px.shape[0] > 3000
    assert px.std() > 20  # not blank: text, tokens, bars and figures
    ink = (np.abs(px - px[0, 0]).sum(axis=2) > 60).mean()
    assert 0.02 < ink < 0.6, ink


def test_the_print_layout_hides_the_controls(browser, made, artifacts):
    import base64

    _, page, _ = made
    load(browser, page)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        shown = browser.execute_script(
            "const d = (s) => getComputedStyle(document.querySelector(s)).display;"
            "return [d('#beta'), d('nav.toc'), d('#batch-body button'), d('#logps-body table'), d('#bandit-body svg')]")
        assert shown[:3] == ["none", "none", "none"] and shown[3] == "table" and shown[4] != "none", shown
        pdf = base64.b64decode(browser.execute_cdp_cmd("Page.printToPDF", {"printBackground": True})["data"])
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    (artifacts / "explain.pdf").write_bytes(pdf)
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) >= 3  # pages of content

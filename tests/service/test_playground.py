"""The playground at ``/`` in a real browser: headless Chromium (Debian's chromium and chromium-driver, installed
by ``make chromium`` when missing) loads the page from the session's app (auth on), is given the secret, renders
a typed prompt, a token's features, a feature's decoder neighbours and a streamed steer; each is checked against
the same request sent over HTTP. Waits are on the page's own data-state attributes, never fixed sleeps.

SAESERVE_PLAYGROUND_SCREENSHOT=docs/img/playground.png writes the screenshot the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from ingress.examples import EXAMPLES
from tests.compare import assert_same_ranking
from tests.service.conftest import SECRET

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "ingress" / "playground" / "index.html"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# This machine's network is closed: without the background-networking flags Chromium's own connections are refused
# many at a time; an empty profile per run.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1360,1020")
PROMPT = "For dinner we had soup with bread."  # the demo pack's own words (tests/ingress/test_examples.py)
WAIT_S = 90  # the first calls may wait for SAEs to load on a loaded 2-core machine


def _ensure_chromium() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    out = subprocess.run(["make", "-s", "chromium"], cwd=REPO, capture_output=True, text=True, timeout=900)
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"no headless browser: Debian's chromium and chromium-driver are not installed and `make chromium` "
                    f"could not install them:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")


@pytest.fixture(scope="module")
def browser():
    _ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, what, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as e:
        status = driver.execute_script("return [document.getElementById('status').textContent, "
                                       "document.getElementById('steer-status').textContent]")
        raise AssertionError(f"waiting for {what}: {type(e).__name__}; page status {status}; "
                             f"console {driver.get_log('browser')[-5:]}") from e


def _attr(driver, css: str, name: str):
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])",
                                 css, name)


def _rows(driver, css: str) -> list[tuple]:
    """``((source, index), value)`` of the rendered rows, in page order."""
    got = driver.execute_script("return [...document.querySelectorAll(arguments[0])].map("
                                "r => [r.dataset.source, Number(r.dataset.index), Number(r.dataset.value)])", css)
    return [((s, i), v) for s, i, v in got]


def _console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _api_per_token(http, prompt: str, sources: list[str], top_k: int) -> tuple[list[str], dict[int, list[tuple]]]:
    """The page's requests (topk-by-token, once per SAE of the set) sent over HTTP: the tokens (BOS left out, as
    with ignore_bos), and per token position every reported feature as ``((source, index), value)``, strongest
    first."""
    per_token: dict[int, list[tuple]] = {}
    tokens = None
    for s in sources:
        r = http.post("/v1/activation/topk-by-token", json={"prompt": prompt, "model": "demo-lm", "source": s,
                                                             "top_k": top_k, "ignore_bos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        tokens = body["tokens"]
        for res in body["results"]:
            per_token.setdefault(res["token_position"], []).extend(
                ((s, f["feature_index"]), f["activation_value"]) for f in res["top_features"])
    for fs in per_token.values():
        fs.sort(key=lambda f: -f[1])
    return tokens, per_token


def test_the_page_is_public_static_and_reaches_only_this_api(serve_app):
    from ingress.endpoints import ENDPOINTS

    r = httpx.get(f"{serve_app}/", timeout=30)  # no secret: the page holds no data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert html == PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page loads something from elsewhere"
    assert not re.search(r"https?://", html.split("<script>", 1)[1]), "the script names a host"
    called = set(re.findall(r'"(v1/[a-z/-]+)"', html))
    assert called and called <= {e.path.lstrip("/") for e in ENDPOINTS}, called
    assert httpx.get(f"{serve_app}/v1/capabilities", timeout=30).status_code == 401  # the API is not public


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_docs_example_is_answered(http, name):
    """The request examples /docs offers ("Try it out") are answered 200 by the demo service, as they stand."""
    from ingress.endpoints import ENDPOINTS

    ep = next(e for e in ENDPOINTS if e.name == name)
    body = {**EXAMPLES[name], **({"secret": SECRET} if "legacy" in ep.tags else {})}
    r = http.post(ep.path, json=body)
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_the_playground_in_chromium_renders_what_the_api_answers(browser, serve_app, http):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    # 1. no secret in this browser yet: the page asks for it
    d.get(f"{serve_app}/")
    _wait(d, "the secret form", lambda d: "shown" in (_attr(d, "#secret-panel", "class") or ""))
    d.find_element(By.ID, "secret").send_keys(SECRET)
    d.find_element(By.ID, "secret-save").click()
    default_prompt = d.find_element(By.ID, "prompt").get_attribute("value")
    _wait(d, "the default prompt's tokens",
          lambda d: _attr(d, "#tokens", "data-state") == "done" and _attr(d, "#tokens", "data-prompt") == default_prompt)
    assert "shown" not in _attr(d, "#secret-panel", "class")
    assert d.execute_script("return localStorage.getItem('saeserve.secret')") == SECRET
    d.get_log("browser")  # drop the first load's 401 (expected: it is how the page learns it needs the secret)

    # 2. a typed prompt: each token's strongest feature across the set's SAEs
    box = d.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(PROMPT, Keys.ENTER)
    _wait(d, "the typed prompt's tokens",
          lambda d: _attr(d, "#tokens", "data-state") == "done" and _attr(d, "#tokens", "data-prompt") == PROMPT)
    caps = http.get("/v1/capabilities").json()
    sources = caps["sae_sets"][_attr(d, "#tokens", "data-set")]
    top_k = int(_attr(d, "body", "data-top-k"))
    tokens, per_token = _api_per_token(http, PROMPT, sources, top_k)
    shown = d.execute_script("return [...document.querySelectorAll('#tokens .tok')].map(e => "
                             "[e.querySelector('.t').textContent, Number(e.dataset.pos), e.dataset.source || null, "
                             "Number(e.dataset.index), Number(e.dataset.value)])")
    assert [t for t, *_ in shown] == tokens and len(tokens) > 5
    assert [p for _, p, *_ in shown] == sorted(per_token) == list(range(1, len(tokens) + 1))  # BOS (0) left out
    for _, pos, source, index, value in shown:
        assert_same_ranking([((source, index), value)], per_token[pos][:1])

    # 3. a token's features across the SAEs (the strongest token of the prompt)
    pos = max(per_token, key=lambda p: per_token[p][0][1])
    d.find_element(By.CSS_SELECTOR, f'#tokens .tok[data-pos="{pos}"]').click()
    _wait(d, "the token's features", lambda d: _attr(d, "#token-feature-table", "data-pos") == str(pos))
    n_shown = int(_attr(d, "body", "data-shown-features"))
    rows = _rows(d, "#token-feature-table tbody tr")
    assert len(rows) == min(n_shown, len(per_token[pos])) and len({s for (s, _), _ in rows}) > 1
    assert_same_ranking(rows, per_token[pos][:n_shown])

    # 4. a feature: its decoder neighbours
    (source, index), _ = rows[0]
    d.find_element(By.CSS_SELECTOR, "#token-feature-table tbody tr").click()
    _wait(d, "the decoder neighbours", lambda d: _attr(d, "#neighbours", "data-state") == "done"
          and _attr(d, "#neighbour-table", "data-source") == source and _attr(d, "#neighbour-table", "data-index") == str(index))
    n = int(_attr(d, "body", "data-neighbours"))
    r = http.post("/v1/util/sae-topk-by-decoder-cossim", json={"feature": {"model": "demo-lm", "source": source, "index": index},
                                                               "model": "demo-lm", "source": source, "num_results": n + 1})
    assert r.status_code == 200, r.text
    want = [((c["feature"]["source"], c["feature"]["index"]), c["cosine_similarity"])
            for c in r.json()["topk_decoder_cossim_features"] if (c["feature"]["source"], c["feature"]["index"]) != (source, index)][:n]
    got = _rows(d, "#neighbour-table tbody tr")
    assert len(got) == n
    assert_same_ranking(got, want)

    # 5. steer with it: STEERED and DEFAULT streamed side by side; the last event equals the non-streamed reply
    for field, value in (("steer-tokens", "6"), ("strength", "40")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.ID, "steer").click()
    _wait(d, "the steered completions", lambda d: _attr(d, "#out-STEERED", "data-state") == "done"
          and _attr(d, "#out-DEFAULT", "data-state") == "done")
    body = {"prompt": d.find_element(By.ID, "steer-prompt").get_attribute("value"), "model": "demo-lm",
            "steer_method": d.find_element(By.ID, "method").get_attribute("value"), "normalize_steering": False,
            "types": ["STEERED", "DEFAULT"], "features": [{"model": "demo-lm", "source": source, "index": index, "strength": 40}],
            "n_completion_tokens": 6, "temperature": 0.5, "strength_multiplier": 1, "freq_penalty": 0, "seed": 0}
    r = http.post("/v1/steer/completion", json=body)
    assert r.status_code == 200, r.text
    want = {o["type"]: o["output"] for o in r.json()["outputs"]}
    got = {t: d.execute_script(f"return document.getElementById('out-{t}').textContent") for t in ("STEERED", "DEFAULT")}
    assert got == want and want["STEERED"] != want["DEFAULT"]  # seeded generation is exact (README "Steering")

    assert not _console_errors(d), _console_errors(d)
    shot = os.environ.get("SAESERVE_PLAYGROUND_SCREENSHOT")
    if shot:
        d.find_element(By.CSS_SELECTOR, f'#tokens .tok[data-pos="{pos}"]').click()  # keep a token selected
        (REPO / shot).parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(REPO / shot))


@pytest.mark.slow
def test_a_secret_in_the_fragment_is_used_and_leaves_the_address_bar(browser, serve_app):
    d = browser
    d.get("about:blank")  # a fresh load of the page each time, not a fragment change (the page handles those too)
    d.get(f"{serve_app}/#secret=wrong")
    _wait(d, "the refused-secret form", lambda d: "shown" in (_attr(d, "#secret-panel", "class") or ""))
    assert "refused" in d.execute_script("return document.getElementById('secret-why').textContent")
    d.get("about:blank")
    d.get(f"{serve_app}/#secret={SECRET}")
    _wait(d, "the tokens", lambda d: _attr(d, "#tokens", "data-state") == "done")
    assert "#" not in d.current_url
    assert d.execute_script("return localStorage.getItem('saeserve.secret')") == SECRET

"""The report of a real version, rendered by headless Chromium: every chart drawn and readable,
no console errors, no network, and a full-page screenshot a person can look at.

One version is curated from the three sample batches (module fixture, like test_certify.py);
one Chromium is started and driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: fds 3/4, NUL-terminated JSON; no websocket, no extra package).
That gives, from one page load, the console and log entries, every network request, the
rendered DOM (what ``--dump-dom`` prints), the geometry of every chart's marks and texts,
and a full-page PNG, decoded here with zlib/struct/numpy.

Without ``chromium`` (Debian package ``chromium``) on PATH the browser tests skip with the
reason, except under CI (``CI=true``), where ``.ci/run`` installs it and its absence fails.
The screenshot's path is printed (``pytest -s``) so a person can look at it.
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

from pipeline.curate import curate
from pipeline.store import Store
from schemas.policy import Policy

pytestmark = pytest.mark.service

CHROMIUM = shutil.which("chromium")
SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
PLANTED = json.loads((ROOT / "data" / "samples" / "answer_key" / "planted.json").read_text(encoding="utf-8"))
WINDOW = (1200, 3600)
# data-chart name -> fewest data marks (bars, dots, cells with a <title>) the sample version must draw
EXPECTED_CHARTS = {
    "ledger-flow": 5,          # rows in / judgments / pairs, split into their fates
    "label-distribution": 12,  # label shares per locale x annotator kind (>= 6 slices x labels)
    "position-bias": 10,       # first-shown win rate per annotator with a CI (11 humans + 2 AI judges)
    "length-ratio": 12,        # chosen/rejected length ratio histogram bins
    "agreement": 6,            # alpha and kappa per slice
    "reliability": 8,          # agreement with consensus vs gold accuracy, one dot per annotator with gold
    "near-duplicates": 2,      # the two planted near-duplicate clusters
    "language": 6,             # locale x detected language cells
}
CHART_JS = """(() => {
  const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  const charts = [...document.querySelectorAll('svg[data-chart]')].map(svg => {
    const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
    const marks = [...svg.querySelectorAll('rect, circle')].filter(e => {
      const b = e.getBoundingClientRect(); return e.querySelector(':scope > title') && b.width > 0 && b.height > 0; });
    const texts = [...svg.querySelectorAll(':scope > text')].filter(t => t.textContent.trim()).map(t => ({
      text: t.textContent, box: box(t), px: parseFloat(getComputedStyle(t).fontSize) * scale, fill: t.getAttribute('fill')}));
    return {name: svg.dataset.chart, box: box(svg), scale, marks: marks.length, texts};
  });
  const d = document.documentElement;
  return {charts, scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, height: d.scrollHeight};
})()"""


# ---------------------------------------------------------------- a minimal DevTools-protocol client
class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (we write fd 3, it writes fd 4)."""

    def __init__(self, binary: str, profile: Path, timeout: float = 30.0):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # in the child: move the ends to fds 3 and 4 (dup2 onto another fd clears CLOEXEC)
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = profile.parent / f"{profile.name}.stderr.log"
        self._stderr = self.log.open("wb")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--enable-logging=stderr", "--v=0", "--remote-debugging-pipe", "about:blank"],
            # close_fds=True would close 3/4 again after wire_pipes; our other fds are CLOEXEC anyway (PEP 446)
            preexec_fn=wire_pipes, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium within {self.timeout:.0f} s (stderr: {self.log})")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()}; stderr: {self.log})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            r = self._recv(deadline)
            if r.get("id") == self._id:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r.get("result", {})
            self.events.append(r)

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._recv(deadline))

    def open(self, url: str) -> Page:
        """Load ``url`` in a new tab with console/log/network recording; wait for the load event."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        sid = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", sid)
        self.call("Page.navigate", sid, url=url)
        self.wait_for("Page.loadEventFired", sid)
        self.call("Runtime.evaluate", sid, expression="document.fonts.ready.then(() => 1)", awaitPromise=True)
        return Page(self, sid)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            self._stderr.close()


@dataclass
class Page:
    browser: Chromium
    session: str

    def evaluate(self, expression: str) -> Any:
        r = self.browser.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def dom(self) -> str:
        """The rendered DOM, as ``chromium --dump-dom`` prints it."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self) -> bytes:
        # optimizeForSpeed: a fast encoder whose rows decode quickly below (filters 0-2); the image is the same
        r = self.browser.call("Page.captureScreenshot", self.session, format="png", captureBeyondViewport=True, optimizeForSpeed=True)
        return base64.b64decode(r["data"])

    def _events(self) -> list[dict[str, Any]]:
        return [e for e in self.browser.events if e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Console errors/assertions, uncaught exceptions, and browser log errors (failed loads, CSP, ...)."""
        out = []
        for e in self._events():
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self._events() if e["method"] == "Network.requestWillBeSent"]


def stderr_console_lines(log: Path, url: str) -> list[str]:
    """Console messages of ``url`` in the ``--enable-logging=stderr`` log (a second, independent witness).

    Chromium logs every console message there at INFO level (``INFO:CONSOLE:1] "text", source: URL``),
    whatever its console level; the report runs no script, so any message of its own is a fault.
    """
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return [ln for ln in text.splitlines() if ":CONSOLE" in ln and f"source: {url}" in ln]


# ---------------------------------------------------------------- PNG (stdlib zlib/struct, numpy for speed)
def decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB/RGBA non-interlaced PNG -> (H, W, C) uint8."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG signature")
    pos, idat, header = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, crc = data[pos + 8:pos + 8 + n], struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if header is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = header
    if depth != 8 or ctype not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}, interlace {interlace}")
    c = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * c + 1)
    img = np.zeros((h, w * c), np.uint8)
    prev = np.zeros(w * c, np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:  # Sub: running sum per channel
            cur = (np.cumsum(line.reshape(w, c).astype(np.uint32), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif f == 2:  # Up
            cur = line + prev
        elif f in (3, 4):  # Average / Paeth: sequential, plain Python (Chromium's fast encoder does not use them)
            cur, p = bytearray(line.tobytes()), prev.tolist()
            for i in range(w * c):
                a = cur[i - c] if i >= c else 0
                b, cc = p[i], (p[i - c] if i >= c else 0)
                if f == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    pa, pb, pc = abs(b - cc), abs(a - cc), abs(a + b - 2 * cc)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 255
            cur = np.frombuffer(bytes(cur), np.uint8)
        else:
            raise ValueError(f"bad filter type {f} in row {y}")
        img[y] = prev = cur
    return img.reshape(h, w, c)


# ---------------------------------------------------------------- fixtures
@dataclass
class Rendered:
    dom: str
    layout: dict[str, Any]
    png: bytes
    png_path: Path
    errors: list[str]
    stderr_console: list[str]
    requests: list[str]
    url: str


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory) -> Path:
    store = Store(tmp_path_factory.mktemp("reportstore"))
    res = curate(SAMPLES, store, Policy())
    return store.get(res.version_id).path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run should have installed the Debian package chromium")
        pytest.skip("chromium not installed (Debian package chromium); .ci/run installs it in CI")
    b = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


@pytest.fixture(scope="module")
def rendered(browser, version_dir, tmp_path_factory) -> Rendered:
    report = version_dir / "report.html"
    page = browser.open(report.resolve().as_uri())
    layout = page.evaluate(CHART_JS)
    png = page.screenshot()
    shot = tmp_path_factory.mktemp("screenshot") / "report.png"
    shot.write_bytes(png)
    print(f"\nreport screenshot: {shot}\nreport:            {report}")
    return Rendered(dom=page.dom(), layout=layout, png=png, png_path=shot,
                    errors=page.errors(), stderr_console=stderr_console_lines(browser.log, report.resolve().as_uri()), requests=page.requests(),
                    url=report.resolve().as_uri())


# ---------------------------------------------------------------- tests
def test_report_html_is_self_contained(version_dir):
    html = (version_dir / "report.html").read_text(encoding="utf-8")
    assert (version_dir / "report.md").read_text(encoding="utf-8").startswith("# prefpipe report")
    external = re.findall(r"""(?:src|href|xlink:href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//[^"'\s>]*""", html, re.I)
    external += re.findall(r"""url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//[^)]*\)|@import""", html, re.I)
    assert not external, f"report.html refers to external resources: {external[:5]}"
    assert not re.search(r"<(script|link|iframe|img|object|embed)\b", html, re.I), "the report should be plain HTML + inline SVG"


def test_page_loads_without_errors_or_network(rendered):
    assert rendered.errors == [], rendered.errors
    assert rendered.stderr_console == [], rendered.stderr_console
    assert rendered.requests == [rendered.url], f"the page loaded more than itself: {rendered.requests}"


def test_every_chart_is_in_the_dom_and_drawn(rendered):
    dumped = set(re.findall(r'<svg[^>]*\bdata-chart="([^"]+)"', rendered.dom))
    assert set(EXPECTED_CHARTS) <= dumped, f"charts missing from the rendered DOM: {set(EXPECTED_CHARTS) - dumped}"
    charts = {c["name"]: c for c in rendered.layout["charts"]}
    for name, fewest in EXPECTED_CHARTS.items():
        c = charts[name]
        x0, y0, x1, y1 = c["box"]
        assert x1 - x0 > 300 and y1 - y0 > 60, f"{name}: rendered {x1 - x0:.0f}x{y1 - y0:.0f} px"
        assert c["marks"] >= fewest, f"{name}: {c['marks']} data marks drawn, expected at least {fewest}"
        assert not any(t["text"] in ("no data", "no annotator has both measures") for t in c["texts"]), f"{name} is empty"
    # the planted position-biased annotator is the one highlighted in red
    biased = PLANTED["position_bias"]["annotator_id"]
    red = [t["text"] for t in charts["position-bias"]["texts"] if t["fill"] == "#dc2626"]
    assert len(red) == 1 and red[0].startswith(biased), red


def _overlap(a: list[float], b: list[float]) -> tuple[float, float]:
    return min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])


def chart_text_problems(c: dict) -> list[str]:
    """What a reader would trip over in one rendered chart: text clipped by its edge, smaller than
    9 px, or overlapping other text (also used by tests/test_train_report_browser.py)."""
    problems = []
    x0, y0, x1, y1 = c["box"]
    ts = c["texts"]
    for t in ts:
        tx0, ty0, tx1, ty1 = t["box"]
        if tx0 < x0 - 1 or tx1 > x1 + 1 or ty0 < y0 - 1 or ty1 > y1 + 1:
            problems.append(f"{c['name']}: {t['text']!r} is clipped by the chart edge")
        if t["px"] < 9:
            problems.append(f"{c['name']}: {t['text']!r} renders at {t['px']:.1f} px")
    for i in range(len(ts)):
        for j in range(i + 1, len(ts)):
            w, h = _overlap(ts[i]["box"], ts[j]["box"])
            if w > 1 and h > 2:
                problems.append(f"{c['name']}: {ts[i]['text']!r} overlaps {ts[j]['text']!r}")
    return problems


def test_chart_text_is_readable(rendered):
    lay = rendered.layout
    problems = []
    if lay["scrollWidth"] > lay["clientWidth"]:
        problems.append(f"the page scrolls sideways: {lay['scrollWidth']} > {lay['clientWidth']} px")
    for c in lay["charts"]:
        problems += chart_text_problems(c)
    assert not problems, "\n".join(problems[:20])


def test_screenshot_is_a_real_picture(rendered):
    img = decode_png(rendered.png)
    h, w, _ = img.shape
    assert w >= WINDOW[0] * 0.95 and h >= rendered.layout["height"] * 0.95, (w, h, rendered.layout["height"], rendered.png_path)
    rgb = img[:, :, :3].reshape(-1, 3).astype(np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    assert len(values) >= 200, f"only {len(values)} distinct colours: blank or broken screenshot {rendered.png_path}"
    background = counts.max() / counts.sum()
    assert background < 0.9, f"{background:.0%} of the page is one colour"
    # the chart palette is on screen: blue bars, amber bars, the red highlight
    for colour in ("#3b82f6", "#f59e0b", "#dc2626"):
        v = int(colour[1:], 16)
        assert counts[values == v].sum() > 50, f"{colour} barely appears in the screenshot"


def test_harness_sees_errors_and_requests(browser, tmp_path):
    """Control: the same checks do catch a console error, an exception and a request off the page."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><title>bad</title><img src='http://127.0.0.1:9/x.png'>"
                   "<script>console.error('planted error'); null.boom;</script>", encoding="utf-8")
    page = browser.open(bad.resolve().as_uri())
    errors = page.errors()
    assert any("planted error" in e for e in errors) and any(e.startswith("exception:") for e in errors), errors
    assert "http://127.0.0.1:9/x.png" in page.requests()
    for _ in range(50):  # the browser's stderr is written asynchronously
        if any('"planted error"' in ln for ln in stderr_console_lines(browser.log, bad.resolve().as_uri())):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the planted console error is not in Chromium's stderr log {browser.log}")

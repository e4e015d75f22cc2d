"""The dashboard pages in a real browser (Debian chromium) against a real site.

One site for the module: a GoodWe simulator read every 0.1 s, two Eastron meter simulators
(one with a year of history), the runtime, the SQLite store and the dashboard under uvicorn
(see ``browser.py``). One chromium for the module, a fresh context per test. Every page in
every test runs with requests beyond this machine aborted, and fails its test on any console
error or uncaught exception, or on any attempt to reach beyond loopback.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    WebSocketRoute,
    sync_playwright,
)

from tests.edge_runtime.web.browser import (
    DESKTOP,
    PHONE,
    SPARE_TIMEOUT_S,
    BrowserSite,
    PageWatch,
    launch_chromium,
)

STATUS_REFRESH_S = 2.0  # app.js STATUS_REFRESH_MS
FIELDS = ("active_power_total_w", "voltage_l1_v")
LINE_RGB = (29, 78, 216)  # app.js COLORS.line

# Pixels of a chart's canvas close to the series colour: the data line was drawn (the axes
# and grid alone are grey, so a canvas with only those counts zero).
_INK = """(rgb) => [...document.querySelectorAll('#charts canvas')].map((c) => {
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < px.length; i += 4) {
    if (px[i + 3] > 200 && Math.abs(px[i] - rgb[0]) < 40 && Math.abs(px[i + 1] - rgb[1]) < 40
        && Math.abs(px[i + 2] - rgb[2]) < 40) n++;
  }
  return n;
})"""

# Text changes of one element, and nodes added or removed anywhere in the device cards,
# over a window: values must change in place, never by rebuilding the DOM.
_MUTATIONS = """([selector, ms]) => new Promise((resolve) => {
  const target = document.querySelector(selector);
  const cards = document.getElementById('devices');
  let changes = 0, rebuilt = 0;
  const a = new MutationObserver((ms) => { changes += ms.length; });
  const b = new MutationObserver((ms) => { for (const m of ms) rebuilt += m.addedNodes.length; });
  a.observe(target, {subtree: true, characterData: true, childList: true});
  b.observe(cards, {subtree: true, childList: true});
  setTimeout(() => { a.disconnect(); b.disconnect(); resolve({changes, rebuilt}); }, ms);
})"""


@pytest.fixture(scope="module")
def browser_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserSite]:
    site = BrowserSite(tmp_path_factory.mktemp("site"))
    site.start()
    try:
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = launch_chromium(pw)
        try:
            yield chromium
        finally:
            chromium.close()


class Pages:
    """Opens pages of the site in fresh browser contexts that are all closed, and checked,
    at the end of the test."""

    def __init__(self, browser: Browser, site: BrowserSite) -> None:
        self.browser = browser
        self.site = site
        self.watch = PageWatch()
        self._contexts: list[BrowserContext] = []

    def open(
        self,
        path: str,
        viewport: ViewportSize = DESKTOP,
        setup: Callable[[Page], None] | None = None,
    ) -> Page:
        """A new context and page at ``path``; ``setup`` runs before the page loads."""
        context = self.browser.new_context(viewport=viewport, accept_downloads=True)
        self._contexts.append(context)
        self.watch.guard(context)
        page = context.new_page()
        self.watch.watch(page)
        if setup is not None:
            setup(page)
        page.goto(self.site.url + path)
        return page

    def close(self) -> None:
        for context in self._contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, browser_site: BrowserSite) -> Iterator[Pages]:
    p = Pages(browser, browser_site)
    try:
        yield p
    finally:
        p.close()
    p.watch.check()


def wait_live(page: Page) -> None:
    """Until the live view shows values of every device."""
    for dev, f in (("inverter", "ppv"), ("grid-meter", "voltage_l1_v")):
        page.wait_for_function(
            """([dev, f]) => {
              const td = document.querySelector(`[data-device="${dev}"] [data-field="${f}"]`);
              return td && td.textContent !== '—';
            }""",
            arg=[dev, f],
        )


def wait_chart(page: Page, range_: str) -> None:
    page.wait_for_selector(f'#charts[data-range="{range_}"] canvas')


def test_live_values_update_in_place(pages: Pages) -> None:
    page = pages.open("/")
    wait_live(page)
    ppv = '[data-device="inverter"] [data-field="ppv"]'
    seen = page.evaluate(_MUTATIONS, [ppv, 2000])
    # Read at 10 Hz, pushed at up to 10 messages/s: at least 5 changes a second on the page.
    assert seen["changes"] >= 10, seen
    assert seen["rebuilt"] == 0, "the device cards were rebuilt instead of updated"

    # A card per device with every field, its unit, its value and the age of its value.
    api = page.request.get(pages.site.url + "/api/devices").json()
    assert {d["device_id"] for d in api} == {"inverter", "grid-meter", "heat-pump-meter"}
    for dev in api:
        card = page.locator(f'[data-device="{dev["device_id"]}"]')
        assert card.locator("tbody tr").count() == len(dev["fields"])
        assert card.locator(".badge").inner_text() == "online"
    row = page.locator(
        '[data-device="grid-meter"] tr', has=page.locator('[data-field="voltage_l1_v"]')
    )
    assert row.locator("td.unit").inner_text() == "V"
    assert 200 < float(row.locator("td.num").first.inner_text().replace(",", "")) < 260
    page.wait_for_function(
        """() => /^\\d+ s$/.test(document.querySelector(
             '[data-device="inverter"] [data-field="ppv"]').parentElement
             .querySelector('td.age').textContent)"""
    )

    # The power-flow summary balances: what the inverter reports, with GoodWe's signs turned
    # into import-positive grid power and discharge-positive battery power.
    flow = page.evaluate("computeFlow()")
    assert flow["pv"] > 0, flow
    assert flow["soc"] is not None and 0 <= flow["soc"] <= 100, flow
    assert abs(flow["pv"] + flow["battery"] + flow["grid"] - flow["load"]) < 1.5, flow
    for key in ("pv", "grid", "battery", "load"):
        assert page.locator(f'[data-flow="{key}"]').inner_text() != "—"


def test_live_reconnects_after_a_drop(pages: Pages) -> None:
    sockets: list[WebSocketRoute] = []

    def through(ws: WebSocketRoute) -> None:
        ws.connect_to_server()  # messages pass both ways untouched
        sockets.append(ws)

    page = pages.open("/", setup=lambda p: p.route_web_socket("**/api/live*", through))
    wait_live(page)
    assert page.locator("#banner").is_hidden()
    sockets[0].close(code=1012, reason="restarting")
    page.wait_for_selector("#banner", state="visible", timeout=2000)
    assert "Disconnected" in page.locator("#banner").inner_text()
    page.wait_for_selector("#banner", state="hidden", timeout=5000)
    assert len(sockets) == 2
    seen = page.evaluate(_MUTATIONS, ['[data-device="inverter"] [data-field="ppv"]', 1000])
    assert seen["changes"] >= 3, seen


def test_history_charts_for_every_range(pages: Pages) -> None:
    page = pages.open(f"/history?device=grid-meter&fields={','.join(FIELDS)}&range=1h")
    expected = {"1h": "raw", "24h": "1m", "7d": "1m", "30d": "1h", "1y": "1h"}
    for range_, resolution in expected.items():
        if range_ != "1h":
            page.get_by_label(range_, exact=True).check()
        wait_chart(page, range_)
        assert page.locator("#charts").get_attribute("data-resolution") == resolution
        ink = page.evaluate(_INK, list(LINE_RGB))
        assert len(ink) == len(FIELDS) and min(ink) > 50, (range_, ink)
        # Rollups carry a min/max band: the chart has avg, min and max series.
        series = page.evaluate("charts.map((u) => u.series.length)")
        assert series == [4 if resolution != "raw" else 2] * len(FIELDS), (range_, series)
        assert f"range={range_}" in page.url
    assert page.locator("#charts figure figcaption").all_inner_texts() == [
        "active_power_total_w (W)",
        "voltage_l1_v (V)",
    ]

    # Drag-select zooms every chart to the same span; double-click resets all of them.
    full = page.evaluate("charts.map((u) => [u.scales.x.min, u.scales.x.max])")
    box = page.locator(".chart .u-over").first.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=5)
    page.mouse.up()
    zoomed = page.evaluate("charts.map((u) => [u.scales.x.min, u.scales.x.max])")
    span = full[0][1] - full[0][0]
    assert zoomed[0] == zoomed[1], zoomed
    assert 0.1 * span < zoomed[0][1] - zoomed[0][0] < 0.3 * span, (full, zoomed)
    page.locator(".chart .u-over").nth(1).dblclick()
    assert page.evaluate("charts.map((u) => [u.scales.x.min, u.scales.x.max])") == full


@pytest.mark.parametrize("range_", ["1h", "30d"])
def test_history_csv_download(pages: Pages, tmp_path: Path, range_: str) -> None:
    page = pages.open(f"/history?device=grid-meter&fields={','.join(FIELDS)}&range={range_}")
    wait_chart(page, range_)
    points = page.evaluate("charts[0].data[0].filter((x, i) => charts[0].data[1][i] != null)")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if range_ == "1h":
        assert rows[0] == ["ts_ms", *FIELDS]
    else:
        assert rows[0] == ["ts_ms"] + [f"{n}_{s}" for n in FIELDS for s in ("min", "avg", "max")]
    stamps = [int(r[0]) for r in rows[1:]]
    assert stamps == sorted(stamps)
    # The file holds the range shown (the link pins the chart's end_ms): the charted points,
    # plus perhaps raw frames that were read before that end but committed after the chart's
    # request.
    assert [t / 1000 for t in stamps[: len(points)]] == points
    href = page.locator("#h-csv").get_attribute("href") or ""
    end_ms = int(parse_qs(urlsplit(href).query)["end_ms"][0])
    assert all(points[-1] * 1000 < t <= end_ms for t in stamps[len(points) :])
    for r in rows[1:]:
        assert all(v == "" or float(v) > -1e9 for v in r[1:])


def test_status_page_shows_a_stopped_device_offline(pages: Pages) -> None:
    site = pages.site
    page = pages.open("/status")
    spare = page.locator('tr[data-device="heat-pump-meter"]')
    spare.locator(".badge", has_text="online").wait_for()
    inverter = page.locator('tr[data-device="inverter"]')
    assert "firmware: " in inverter.inner_text()
    dead = page.locator("#s-dead tbody tr", has_text="gridlet/node-9/telemetry")
    dead.wait_for()
    assert "not JSON" in dead.inner_text()
    assert "Frames" in page.locator("#s-store").inner_text()

    assert site.spare is not None
    started = time.monotonic()
    site.call(site.spare.stop())
    spare.locator(".badge", has_text="offline").wait_for(timeout=10_000)
    took = time.monotonic() - started
    # Offline within the device's read timeout, plus one refresh of the page.
    assert took < SPARE_TIMEOUT_S + STATUS_REFRESH_S + 1.0, took
    assert int(spare.locator("td.num").nth(1).inner_text().replace(",", "")) >= 1  # errors
    assert spare.locator("td.error").inner_text() != ""


def test_pages_work_with_only_loopback_reachable(pages: Pages) -> None:
    """Every request beyond 127.0.0.1 is aborted (by the fixture, in every test): the pages
    still work, and none was even attempted (no CDN, no web font, no analytics)."""
    page = pages.open("/")
    wait_live(page)
    page.get_by_role("link", name="History").click()
    wait_chart(page, "1h")
    page.get_by_role("link", name="Status").click()
    page.locator('tr[data-device="inverter"] .badge').wait_for()
    assert not pages.watch.blocked
    urls = "\n".join(pages.watch.requests)
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js"):
        assert asset in urls

    # The guard itself: a request to a CDN is caught (in a context of its own, so that the
    # fixture's check stays about the dashboard).
    context = page.context.browser.new_context()  # type: ignore[union-attr]
    watch = PageWatch()
    watch.guard(context)
    probe = context.new_page()
    probe.goto(pages.site.url + "/static/style.css")
    probe.evaluate("fetch('https://cdn.example.com/uPlot.js').catch(() => null)")
    context.close()
    assert watch.blocked == ["https://cdn.example.com/uPlot.js"]


def test_screenshots_and_phone_width(pages: Pages, tmp_path: Path) -> None:
    views = {
        "live": ("/", wait_live),
        "history": ("/history?device=grid-meter&range=7d", lambda p: wait_chart(p, "7d")),
        "status": ("/status", lambda p: p.locator("#s-devices tbody tr").first.wait_for()),
    }
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        for name, (path, ready) in views.items():
            page = pages.open(path, viewport)
            ready(page)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name} scrolls sideways at {size} width: {width}"
            page.screenshot(path=tmp_path / f"{name}-{size}.png", full_page=True)
            page.context.close()  # a live page left open keeps the browser busy
    assert len(list(tmp_path.glob("*.png"))) == 6

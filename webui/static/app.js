// gridlet dashboard: one page, three views (live, history, status) chosen by the path.
// Plain JS, no build step; the API it reads is described in webui/API.md. The edge serves it
// at the root, the hub under /nodes/<id>/, so every URL is built from BASE.
"use strict";

const PATH = location.pathname.replace(/\/index\.html$/, "/");
const ROUTE = /^(.*?)\/(history|status)?\/?$/.exec(PATH);
const BASE = ROUTE ? ROUTE[1] : PATH.replace(/\/+$/, "");
const VIEW = (ROUTE && ROUTE[2]) || "live";

// ------------------------------------------------------------------ helpers

/** Element builder: h("td", {class: "num"}, "text", child, ...). */
function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid != null) e.append(kid);
  return e;
}

/** A snake_case name that may wrap after its underscores (not inside a word). */
function breakable(name) {
  return name.split("_").flatMap((part, i) => (i ? [h("wbr"), `_${part}`] : [part]));
}

/** Change a text node only when its text changes: no needless mutation, no layout work. */
function setText(node, s) {
  if (node.nodeValue !== s) node.nodeValue = s;
}

async function api(path) {
  const r = await fetch(BASE + path, { headers: { accept: "application/json" } });
  if (r.status === 401) {
    location.assign(`${BASE}/login`);
    throw new Error("login required");
  }
  if (!r.ok) {
    let detail = r.statusText;
    try {
      detail = (await r.json()).detail || detail;
    } catch {
      // not JSON: keep the status text
    }
    throw new Error(`${r.status} ${detail}`);
  }
  return r.json();
}

// The site's clock, not the browser's: ages stay right when the two disagree.
let clockOffset = 0;
const serverNow = () => Date.now() + clockOffset;
const syncClock = (nowMs) => {
  if (typeof nowMs === "number") clockOffset = nowMs - Date.now();
};

const numberFormats = new Map();
function fmtNum(v, decimals = 2) {
  if (v == null) return "—";
  let f = numberFormats.get(decimals);
  if (!f) {
    f = new Intl.NumberFormat(undefined, {
      minimumFractionDigits: decimals,
      maximumFractionDigits: decimals,
    });
    numberFormats.set(decimals, f);
  }
  return f.format(v);
}

/** Decimals worth showing for a field: those its tolerance resolves (tol 0.1 -> 1). */
function decimalsFor(tol) {
  if (!(tol > 0)) return 2;
  return Math.min(6, Math.max(0, Math.ceil(-Math.log10(tol) - 1e-9)));
}

function fmtPower(w) {
  if (w == null) return "—";
  return Math.abs(w) < 1000 ? `${fmtNum(w, 0)} W` : `${fmtNum(w / 1000, 2)} kW`;
}

function fmtAge(ms) {
  if (ms == null) return "—";
  const s = Math.max(0, ms) / 1000;
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function fmtBytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${fmtNum(n, i ? 1 : 0)} ${units[i]}`;
}

const fmtTime = (ms) => (ms == null ? "—" : new Date(ms).toLocaleString());

let bannerReason = null;
function banner(text) {
  const b = document.getElementById("banner");
  bannerReason = text;
  b.hidden = !text;
  if (text) b.textContent = text;
}

// ------------------------------------------------------------------ live view

/** Device id -> card state; cards are built once per schema and then updated in place. */
const cards = new Map();

/** Which device cards are on screen: only those get their values written into the DOM. */
const visibility = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const card = cards.get(entry.target.dataset.device);
    if (!card || card.el !== entry.target) continue;
    card.visible = entry.isIntersecting;
    if (card.visible) {
      const now = serverNow();
      for (const row of card.rows) {
        if (row.dirty) {
          row.dirty = false;
          setValue(row, row.val, row.ts);
        } else setAge(row, now);
      }
    }
  }
});
/** Device id -> {kind, model, fields: Map(name -> {unit, tol})} from /api/devices. */
const meta = new Map();
let metaPending = null;

async function loadMeta() {
  if (!metaPending) {
    metaPending = api("/api/devices")
      .then((list) => {
        for (const d of list) {
          meta.set(d.device_id, {
            kind: d.kind,
            model: d.model,
            fields: new Map(d.fields.map((f) => [f.name, f])),
          });
        }
        for (const [id, card] of cards) applyMeta(id, card);
      })
      .finally(() => {
        metaPending = null;
      });
  }
  return metaPending;
}

function buildCard(id, names) {
  const rows = names.map((name) => {
    const value = document.createTextNode("—");
    const unit = document.createTextNode("");
    const age = document.createTextNode("—");
    const tr = h(
      "tr",
      null,
      h("th", { scope: "row" }, breakable(name)),
      h("td", { class: "num", "data-field": name }, value),
      h("td", { class: "unit" }, unit),
      h("td", { class: "num age" }, age),
    );
    return { name, tr, value, unit, age, val: null, ts: null, shownAge: "", decimals: 2 };
  });
  const badge = h("span", { class: "badge" }, "…");
  const read = document.createTextNode("no reading yet");
  const model = document.createTextNode("");
  const el = h(
    "article",
    { class: "card", "data-device": id },
    h(
      "header",
      null,
      h("h2", null, id),
      badge,
      h("p", { class: "muted small" }, model, " · ", read),
    ),
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { class: "fields" },
        h(
          "thead",
          null,
          h(
            "tr",
            null,
            h("th", { scope: "col" }, "Field"),
            h("th", { scope: "col", class: "num" }, "Value"),
            h("th", { scope: "col" }, "Unit"),
            h("th", { scope: "col", class: "num", title: "Time since the value changed" }, "Changed"),
          ),
        ),
        h("tbody", null, rows.map((r) => r.tr)),
      ),
    ),
  );
  const card = {
    el,
    badge,
    read,
    model,
    names,
    rows,
    index: new Map(names.map((n, i) => [n, i])),
    ts: null,
    online: null,
    visible: true, // until the observer says otherwise
  };
  applyMeta(id, card);
  return card;
}

function applyMeta(id, card) {
  const m = meta.get(id);
  if (!m) return;
  setText(card.model, [m.kind, m.model].filter(Boolean).join(" · "));
  for (const r of card.rows) {
    const f = m.fields.get(r.name);
    if (!f) continue;
    setText(r.unit, f.unit || "");
    const decimals = decimalsFor(f.tol);
    if (decimals !== r.decimals) {
      r.decimals = decimals;
      if (r.val != null) setText(r.value, fmtNum(r.val, decimals));
    }
  }
}

function setOnline(card, online) {
  if (card.online === online) return;
  card.online = online;
  card.badge.textContent = online ? "online" : "offline";
  card.badge.className = `badge ${online ? "on" : "off"}`;
  card.el.classList.toggle("offline", !online);
}

function setValue(row, v, ts) {
  row.val = v;
  row.ts = ts;
  setText(row.value, fmtNum(v, row.decimals));
  setAge(row, serverNow());
}

function setAge(row, now) {
  const s = fmtAge(row.ts == null ? null : now - row.ts);
  if (s !== row.shownAge) {
    row.shownAge = s;
    row.age.nodeValue = s;
  }
}

/** Create, rebuild (field list changed) or keep the card of a device. */
function ensureCard(id, names) {
  const card = cards.get(id);
  if (card && card.names.length === names.length && card.names.every((n, i) => n === names[i])) {
    return card;
  }
  const fresh = buildCard(id, names);
  const container = document.getElementById("devices");
  if (card) {
    container.replaceChild(fresh.el, card.el);
    visibility.unobserve(card.el);
  } else insertSorted(container, id, fresh.el);
  visibility.observe(fresh.el);
  if (card) setOnline(fresh, card.online);
  cards.set(id, fresh);
  if (!meta.has(id) || names.some((n) => !meta.get(id).fields.has(n))) {
    loadMeta().catch(() => {}); // units only; values show without them
  }
  document.getElementById("live-empty").hidden = true;
  return fresh;
}

function insertSorted(container, id, el) {
  const after = [...cards.keys()].filter((k) => k > id).sort()[0];
  container.insertBefore(el, after ? cards.get(after).el : null);
}

function applySnapshot(msg) {
  const seen = new Set();
  for (const [id, d] of Object.entries(msg.devices || {})) {
    seen.add(id);
    const card = ensureCard(id, d.fields);
    setOnline(card, !!d.online);
    card.ts = d.ts_ms ?? null;
    d.values?.forEach((v, i) => card.rows[i] && setValue(card.rows[i], v, d.ts_ms));
  }
  for (const [id, card] of cards) {
    if (!seen.has(id)) {
      visibility.unobserve(card.el);
      card.el.remove();
      cards.delete(id);
    }
  }
  document.getElementById("live-empty").hidden = cards.size > 0;
}

function applyDelta(msg) {
  for (const [id, names] of Object.entries(msg.schema || {})) ensureCard(id, names);
  for (const [id, online] of Object.entries(msg.online || {})) {
    const card = cards.get(id);
    if (card) setOnline(card, !!online);
  }
  for (const [id, d] of Object.entries(msg.d || {})) {
    const card = cards.get(id);
    if (!card) continue;
    card.ts = d.ts;
    for (const [i, v] of Object.entries(d.v || {})) {
      const row = card.rows[+i];
      if (!row) continue;
      if (card.visible) setValue(row, v, d.ts);
      else {
        // Off screen: keep the value, touch the DOM when the card scrolls into view.
        row.val = v;
        row.ts = d.ts;
        row.dirty = true;
      }
    }
  }
}

// Power flow from well-known field names. Signs: GoodWe's active_power and
// meter_active_power_total are export positive, pbattery1 discharge positive; Eastron meters
// (active_power_total_w) and P1 meters are import positive.
const flowNodes = {};

function fieldValue(card, name) {
  const i = card.index.get(name);
  return i === undefined ? undefined : card.rows[i].val;
}

/** Sum of a field over every device that has it; undefined when none has it. */
function sumField(name, pick = [...cards.values()]) {
  let total;
  for (const card of pick) {
    const v = fieldValue(card, name);
    if (v != null) total = (total ?? 0) + v;
  }
  return total;
}

function computeFlow() {
  const all = [...cards.values()];
  const inverters = all.filter((c) => c.index.has("ppv") || c.index.has("pbattery1"));
  const pv = sumField("ppv", inverters);
  const battery = sumField("pbattery1", inverters);
  const socCard = all.find((c) => fieldValue(c, "battery_soc") != null);
  const soc = socCard ? fieldValue(socCard, "battery_soc") : undefined;
  let grid;
  const exported =
    sumField("active_power", inverters) ?? sumField("meter_active_power_total", inverters);
  if (exported !== undefined) grid = -exported;
  if (grid === undefined) {
    // No inverter: the grid meter (named so, else a P1 meter, else the only meter).
    const meters = all.filter((c) => c.index.has("active_power_total_w"));
    const gridMeter = meters.find((c) => /grid|main/i.test(cardId(c)));
    const p1 = all.find((c) => c.index.has("power_import_kw") && c.index.has("power_export_kw"));
    if (gridMeter) grid = fieldValue(gridMeter, "active_power_total_w") ?? undefined;
    else if (p1) {
      const imp = fieldValue(p1, "power_import_kw");
      const exp = fieldValue(p1, "power_export_kw");
      if (imp != null && exp != null) grid = (imp - exp) * 1000;
    } else if (meters.length === 1) {
      grid = fieldValue(meters[0], "active_power_total_w") ?? undefined;
    }
  }
  let load = sumField("house_consumption", inverters) ?? sumField("load_ptotal", inverters);
  if (load === undefined && grid !== undefined && (pv !== undefined || battery !== undefined)) {
    load = grid + (pv ?? 0) + (battery ?? 0);
  }
  return { pv, grid, battery, soc, load };
}

function cardId(card) {
  return card.el.dataset.device;
}

function renderFlow() {
  const f = computeFlow();
  const set = (key, s) => setText(flowNodes[key], s);
  set("pv", fmtPower(f.pv));
  set("pv-note", f.pv === undefined ? "no PV data" : f.pv > 0 ? "producing" : "idle");
  set("grid", f.grid === undefined ? "—" : fmtPower(Math.abs(f.grid)));
  const sign = (x, pos, neg, none) => (x === undefined ? none : x > 0 ? pos : x < 0 ? neg : "idle");
  set("grid-note", sign(f.grid, "importing", "exporting", "no grid data"));
  set("battery", f.battery === undefined ? "—" : fmtPower(Math.abs(f.battery)));
  const state = sign(f.battery, "discharging", "charging", "no battery data");
  set("battery-note", f.soc == null ? state : `${state} · ${fmtNum(f.soc, 0)} %`);
  const meter = document.querySelector('[data-flow="soc-meter"]');
  meter.hidden = f.soc == null;
  if (f.soc != null && meter.value !== f.soc) meter.value = f.soc;
  set("load", fmtPower(f.load));
  set("load-note", f.load === undefined ? "no load data" : "consuming");
}

/** Once a second: the ages. Only text whose shown value changes is touched. */
function tickAges() {
  const now = serverNow();
  for (const card of cards.values()) {
    setText(card.read, card.ts == null ? "no reading yet" : `read ${fmtAge(now - card.ts)} ago`);
    if (card.visible) for (const r of card.rows) setAge(r, now);
  }
}

function startLive() {
  for (const el of document.querySelectorAll("[data-flow]")) {
    if (el.tagName !== "METER") {
      const t = document.createTextNode(el.textContent);
      el.replaceChildren(t);
      flowNodes[el.dataset.flow] = t;
    }
  }
  loadMeta().catch((e) => banner(`Could not load devices: ${e.message}`));
  let failures = 0;
  let flowDue = false;

  const connect = () => {
    const rate = new URLSearchParams(location.search).get("rate");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = rate ? `?rate=${encodeURIComponent(rate)}` : "";
    const ws = new WebSocket(`${scheme}//${location.host}${BASE}/api/live${query}`);
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      syncClock(msg.now_ms);
      if (msg.type === "snapshot") {
        failures = 0;
        banner(null);
        document.getElementById("devices").classList.remove("stale");
        applySnapshot(msg);
        tickAges();
      } else if (msg.type === "delta") {
        applyDelta(msg);
      }
      // The flow summary is recomputed at most once per animation frame.
      if (!flowDue) {
        flowDue = true;
        requestAnimationFrame(() => {
          flowDue = false;
          renderFlow();
        });
      }
    };
    ws.onclose = () => {
      // Jittered exponential backoff: 0.5 s, 1 s, 2 s, ... up to 30 s.
      const delay = Math.min(30000, 500 * 2 ** failures) * (0.5 + Math.random() / 2);
      failures++;
      document.getElementById("devices").classList.add("stale");
      banner(`Disconnected from the site, reconnecting in ${Math.ceil(delay / 1000)} s…`);
      setTimeout(connect, delay);
    };
  };
  connect();
  setInterval(tickAges, 1000);
}

// ------------------------------------------------------------------ history view

const RESOLUTION_NAMES = {
  raw: "raw readings",
  "1m": "1-minute min/avg/max",
  "1h": "1-hour min/avg/max",
};
const COLORS = {
  line: "#1d4ed8",
  band: "rgba(29, 78, 216, 0.16)",
  edge: "rgba(29, 78, 216, 0.35)",
};
let charts = [];
let syncingZoom = false;

function historyState() {
  const q = new URLSearchParams(location.search);
  return {
    device: q.get("device") || "",
    range: q.get("range") || "1h",
    fields: (q.get("fields") || "").split(",").filter(Boolean),
  };
}

function saveHistoryState(st) {
  const q = new URLSearchParams({ device: st.device, range: st.range, fields: st.fields.join(",") });
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

async function startHistory() {
  const form = document.getElementById("history-form");
  const select = document.getElementById("h-device");
  const list = document.getElementById("h-fields");
  const filter = document.getElementById("h-filter");
  const msg = document.getElementById("h-msg");
  let devices;
  try {
    devices = await api("/api/devices");
  } catch (e) {
    msg.textContent = `Could not load devices: ${e.message}`;
    return;
  }
  if (!devices.length) {
    msg.textContent = "No devices yet.";
    return;
  }
  const st = historyState();
  if (!devices.some((d) => d.device_id === st.device)) st.device = devices[0].device_id;
  select.replaceChildren(...devices.map((d) => h("option", { value: d.device_id }, d.device_id)));
  select.value = st.device;
  form.elements.range.value = st.range;

  const deviceFields = () => devices.find((d) => d.device_id === st.device).fields;
  const defaultFields = () => {
    const fields = deviceFields();
    const power = fields.filter((f) => f.unit === "W").slice(0, 3);
    return (power.length ? power : fields.slice(0, 3)).map((f) => f.name);
  };
  const fillFieldList = () => {
    const known = new Set(deviceFields().map((f) => f.name));
    st.fields = st.fields.filter((n) => known.has(n));
    if (!st.fields.length) st.fields = defaultFields();
    list.replaceChildren(
      ...deviceFields().map((f) =>
        h(
          "label",
          { "data-name": f.name },
          h("input", { type: "checkbox", value: f.name, checked: st.fields.includes(f.name) }),
          ` ${f.name}`,
          f.unit ? h("span", { class: "muted" }, ` ${f.unit}`) : null,
        ),
      ),
    );
    applyFilter();
  };
  const applyFilter = () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const label of list.children) {
      label.hidden = !words.every((w) => label.dataset.name.toLowerCase().includes(w));
    }
  };
  let loadSeq = 0;
  const load = async () => {
    const mine = ++loadSeq;
    saveHistoryState(st);
    document.getElementById("h-fields-summary").textContent = st.fields.join(", ") || "none";
    const csv = document.getElementById("h-csv");
    if (!st.fields.length) {
      clearCharts();
      msg.textContent = "Pick at least one field.";
      csv.hidden = true;
      return;
    }
    msg.textContent = "Loading…";
    const q = new URLSearchParams({ range: st.range, fields: st.fields.join(",") });
    const path = `/api/devices/${encodeURIComponent(st.device)}/history`;
    let data;
    try {
      data = await api(`${path}?${q}`);
    } catch (e) {
      if (mine === loadSeq) msg.textContent = `Could not load history: ${e.message}`;
      return;
    }
    if (mine !== loadSeq) return; // a newer request was made meanwhile
    q.set("end_ms", data.end_ms);
    csv.href = `${BASE}${path}.csv?${q}`;
    csv.hidden = false;
    const res = RESOLUTION_NAMES[data.resolution] || data.resolution;
    msg.textContent = data.t.length
      ? `${data.t.length} points (${res}), ${fmtTime(data.start_ms)} to ${fmtTime(data.end_ms)}`
      : `No data in this range (${fmtTime(data.start_ms)} to ${fmtTime(data.end_ms)}).`;
    drawCharts(data);
  };

  select.addEventListener("change", () => {
    st.device = select.value;
    st.fields = [];
    fillFieldList();
    load();
  });
  form.addEventListener("change", (ev) => {
    if (ev.target.name === "range") {
      st.range = ev.target.value;
      load();
    } else if (ev.target.type === "checkbox") {
      st.fields = [...list.querySelectorAll("input:checked")].map((i) => i.value);
      load();
    }
  });
  form.addEventListener("submit", (ev) => ev.preventDefault());
  filter.addEventListener("input", applyFilter);
  fillFieldList();
  new ResizeObserver(() => {
    const width = chartWidth();
    for (const u of charts) if (u.width !== width) u.setSize({ width, height: u.height });
  }).observe(document.getElementById("charts"));
  await load();
}

function chartWidth() {
  return Math.max(200, document.getElementById("charts").clientWidth);
}

function clearCharts() {
  for (const u of charts) u.destroy();
  charts = [];
  const container = document.getElementById("charts");
  container.replaceChildren();
  delete container.dataset.range;
}

function drawCharts(data) {
  clearCharts();
  const container = document.getElementById("charts");
  // What is drawn, for whoever needs to know (the browser tests wait on it).
  container.dataset.range = data.range;
  container.dataset.resolution = data.resolution;
  if (!data.t.length) return;
  // Points at both ends of the range (no values) make the axis span the whole range, also
  // when data covers only part of it, and make double-click reset to the whole range.
  const start = data.start_ms / 1000;
  const end = data.end_ms / 1000;
  const xs = data.t.map((t) => t / 1000);
  const padStart = xs[0] > start;
  const padEnd = xs[xs.length - 1] < end;
  const pad = (arr) => [...(padStart ? [null] : []), ...arr, ...(padEnd ? [null] : [])];
  const x = pad(xs);
  if (padStart) x[0] = start;
  if (padEnd) x[x.length - 1] = end;
  const width = chartWidth();
  for (const f of data.fields) {
    const s = data.series[f.name];
    // Rollups (and raw frames the server thinned into buckets) carry a min/max band.
    const rollup = data.resolution !== "raw" || s.min.some((v, i) => v !== s.max[i]);
    const decimals = decimalsFor(f.tol);
    const value = (u, v) => (v == null ? "—" : `${fmtNum(v, decimals)} ${f.unit}`);
    const series = [
      {},
      { label: rollup ? "avg" : f.name, stroke: COLORS.line, width: 1.5, value },
    ];
    const columns = [x, pad(s.avg)];
    if (rollup) {
      series.push({ label: "min", stroke: COLORS.edge, width: 1, value });
      series.push({ label: "max", stroke: COLORS.edge, width: 1, value });
      columns.push(pad(s.min), pad(s.max));
    }
    const holder = h("div", { class: "chart", "data-field": f.name });
    const unit = f.unit ? h("span", { class: "muted" }, ` (${f.unit})`) : null;
    container.append(h("figure", null, h("figcaption", null, f.name, unit), holder));
    const u = new uPlot(
      {
        width,
        height: 220,
        series,
        bands: rollup ? [{ series: [3, 2], fill: COLORS.band }] : [],
        scales: { x: { time: true } },
        axes: [{}, { size: 64, values: (u, ticks) => ticks.map((t) => fmtNum(t, tickDecimals(ticks))) }],
        cursor: { sync: { key: "history" } },
        hooks: { setScale: [(u, key) => key === "x" && syncZoom(u)] },
      },
      columns,
      holder,
    );
    charts.push(u);
  }
}

function tickDecimals(ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
  return step > 0 ? Math.min(6, Math.max(0, Math.ceil(-Math.log10(step)))) : 0;
}

/** A drag-zoom (or double-click reset) on one chart applies to all of them. */
function syncZoom(src) {
  if (syncingZoom) return;
  syncingZoom = true;
  const { min, max } = src.scales.x;
  for (const u of charts) if (u !== src) u.setScale("x", { min, max });
  syncingZoom = false;
}

// ------------------------------------------------------------------ status view

const STATUS_REFRESH_MS = 2000;

function kvList(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

function chips(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return "—";
  const text = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
  return h("ul", { class: "chips" }, entries.map(([k, v]) => h("li", null, `${k}: ${text(v)}`)));
}

const ago = (ms) => (ms == null ? "never" : `${fmtAge(serverNow() - ms)} ago`);
const cell = (v, cls) => h("td", cls ? { class: cls } : null, v == null ? "—" : String(v));
const count = (n, what) => `${fmtNum(n, 0)} ${what}`;

function deviceRow(d) {
  const state = d.online ? "online" : "offline";
  const what = [d.kind, d.model].filter(Boolean).join(" · ");
  return h(
    "tr",
    { "data-device": d.device_id },
    h("th", { scope: "row" }, d.device_id, h("div", { class: "sub" }, what)),
    h("td", null, h("span", { class: `badge ${d.online ? "on" : "off"}` }, state)),
    h("td", { title: fmtTime(d.last_seen_ms) }, ago(d.last_seen_ms)),
    cell(d.reads, "num"),
    cell(d.errors, "num"),
    cell(d.timeouts, "num"),
    d.last_error ? h("td", { class: "error" }, d.last_error) : cell(null),
    h("td", null, chips(d.counters)),
    h("td", { class: "info" }, chips(d.info)),
  );
}

function deadLetterRow(x) {
  return h(
    "tr",
    null,
    cell(fmtTime(x.ts_ms), "time"),
    cell(x.source),
    h("td", { class: "key" }, h("code", null, x.key)),
    cell(x.reason),
    h("td", { class: "payload" }, h("code", null, `${x.payload_base64 ? "base64: " : ""}${x.payload}`)),
  );
}

function renderStatus(st, deadLetters) {
  document.querySelector("#s-devices tbody").replaceChildren(...st.devices.map(deviceRow));
  const s = st.store;
  const used = s.max_size_bytes ? s.size_bytes / s.max_size_bytes : null;
  const use = used == null ? null : h("meter", { high: 0.9, value: used, "aria-label": "Store use" });
  kvList(document.getElementById("s-store"), [
    ["Size", h("span", null, `${fmtBytes(s.size_bytes)} of ${fmtBytes(s.max_size_bytes)}`, use)],
    ["Frames", fmtNum(s.committed_frames, 0)],
    ["Commits", `${fmtNum(s.commits, 0)}, last ${ago(s.last_commit_ms)}`],
    ["Evicted", `${count(s.evicted_synced, "synced")}, ${count(s.evicted_unsynced, "unsynced")}`],
    ["Expired", count(s.expired_frames, "frames")],
    ["Dead letters", fmtNum(s.dead_letters, 0)],
    ["Path", h("code", null, s.path)],
  ]);
  const y = st.sync;
  kvList(document.getElementById("s-sync"), [
    ["State", y.state],
    ["Hub", y.hub_url || "—"],
    ["Backlog", y.backlog_frames == null ? "—" : count(y.backlog_frames, "frames")],
    ["Oldest waiting", y.backlog_oldest_ms == null ? "—" : ago(y.backlog_oldest_ms)],
    ["Rate", y.rate_fps == null ? "—" : `${fmtNum(y.rate_fps, 1)} frames/s`],
    ["ETA", y.eta_s == null ? "—" : `${fmtNum(y.eta_s, 0)} s`],
    ["Clock drift", y.drift_ms == null ? "—" : `${fmtNum(y.drift_ms / 1000, 1)} s${y.drift_flagged ? " (over 60 s!)" : ""}`],
    ["Last upload", ago(y.last_upload_ms)],
    ["Last error", y.last_error || "—"],
  ]);
  kvList(document.getElementById("s-live"), [
    ["Clients", fmtNum(st.live.clients, 0)],
    ["Messages", fmtNum(st.live.messages, 0)],
    ["Dropped updates", fmtNum(st.live.dropped_updates, 0)],
  ]);
  kvList(
    document.getElementById("s-bus"),
    Object.entries(st.bus).map(([name, b]) => [
      name,
      `${count(b.queued, "queued")}, ${count(b.delivered, "delivered")}, ${count(b.dropped, "dropped")}`,
    ]),
  );
  document
    .querySelector("#s-dead tbody")
    .replaceChildren(
      ...(deadLetters.length
        ? deadLetters.map(deadLetterRow)
        : [h("tr", null, h("td", { colspan: 5, class: "muted" }, "None."))]),
    );
  document.getElementById("s-updated").textContent =
    `Updated ${new Date().toLocaleTimeString()}; refreshes every ${STATUS_REFRESH_MS / 1000} s.`;
}

function startStatus() {
  const refresh = async () => {
    setTimeout(refresh, STATUS_REFRESH_MS);
    if (document.hidden) return; // nobody is looking: spare the Pi
    try {
      const [st, dead] = await Promise.all([api("/api/status"), api("/api/dead-letters?limit=50")]);
      if (bannerReason) banner(null);
      renderStatus(st, dead);
    } catch (e) {
      banner(`Could not reach the site (${e.message}); retrying…`);
    }
  };
  refresh();
}

// ------------------------------------------------------------------ start

function start() {
  for (const a of document.querySelectorAll("nav a")) {
    const v = a.dataset.view;
    a.href = `${BASE}/${v === "live" ? "" : v}`;
    if (v === VIEW) a.setAttribute("aria-current", "page");
  }
  document.getElementById(`view-${VIEW}`).hidden = false;
  const title = { live: "Live", history: "History", status: "Status" }[VIEW];
  document.title = `gridlet · ${title}`;
  api("/api/site")
    .then((site) => {
      syncClock(site.now_ms);
      document.getElementById("site-name").textContent = site.name || site.node_id || "";
      document.getElementById("version").textContent = `gridlet ${site.version} · node ${site.node_id}`;
      document.title = `${site.name || "gridlet"} · ${title}`;
    })
    .catch(() => {}); // the view reports its own connection problems
  ({ live: startLive, history: startHistory, status: startStatus })[VIEW]();
}

start();

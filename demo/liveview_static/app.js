// The live view: poll /api/state every second and redraw (unless paused). Plain DOM + SVG, no build step, no CDN.
// Every value from the API is set with textContent, never innerHTML: session ids come from browsers.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function num(value, digits) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
}

// The model card: readable names for the keys of model.json's metrics (others: underscores as spaces).
const METRIC_LABELS = {
  roc_auc: "ROC AUC", pr_auc: "PR AUC", base_rate: "base rate", log_loss: "log loss",
  lift_top_decile: "lift in top 10 %", brier: "Brier score",
};

function metricLabel(key) {
  return METRIC_LABELS[key] || key.replace(/_/g, " ");
}

// Counts (rows, positives) as integers, everything else with 4 decimals.
function metricValue(value) {
  return Number.isInteger(value) ? String(value) : num(value, 4);
}

// [label, value] pairs of the "Current model" card.
function modelItems(model) {
  const metrics = model.metrics || {};
  const items = [
    ["name", model.name], ["version", model.version || "none published yet"],
    ["ROC AUC", num(model.roc_auc, 4)], ["PR AUC", num(model.pr_auc, 4)],
    ["threshold", num(model.threshold, 4)], ["algorithm", model.algorithm || "–"],
    ["trained", model.created_at || "–"],
  ];
  for (const [key, value] of Object.entries(metrics)) {
    if (!["roc_auc", "pr_auc"].includes(key) && typeof value === "number") items.push([metricLabel(key), metricValue(value)]);
  }
  return items;
}

// A component's status text and class: up (green), down with the reason (red), or not configured
// (grey: no /metrics URL is set, which is a choice, not a failure).
function componentStatus(component) {
  if (component.up) return ["up", "up"];
  if (!component.url && component.error === "not configured") return ["not configured", "off"];
  return [`down (${component.error || "no answer"})`, "down"];
}

function clock(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "–";
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? wrap(cell) : el("td", cell));
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD" || node.tagName === "TH") return node;
  const td = document.createElement("td");
  td.appendChild(node);
  return td;
}

// A row's name (a component's): read out with each of its cells.
function rowHeader(text) {
  const th = el("th", text);
  th.scope = "row";
  return th;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [row([empty, ...Array(columns - 1).fill("")])]));
}

// A p_buy sparkline: x = time across the session's points, y = probability 0..1, dashed threshold.
function sparkline(points, threshold) {
  const width = 160, height = 28;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const last = points.length ? points[points.length - 1].p : null;
  const name = `p_buy over the session's events (${points.length} scored` +
    (typeof last === "number" ? `, latest ${last.toFixed(3)}` : "") +
    (typeof threshold === "number" ? `, threshold ${threshold.toFixed(3)}` : "") + ")";
  svg.setAttribute("aria-label", name);
  const title = document.createElementNS(SVG, "title");
  title.textContent = name;
  svg.appendChild(title);
  if (typeof threshold === "number") {
    const line = document.createElementNS(SVG, "line");
    const y = (1 - threshold) * (height - 2) + 1;
    line.setAttribute("x1", 0); line.setAttribute("x2", width);
    line.setAttribute("y1", y); line.setAttribute("y2", y);
    svg.appendChild(line);
  }
  const first = points.length ? points[0].t : 0;
  const span = points.length > 1 ? points[points.length - 1].t - first || 1 : 1;
  const coords = points.map((p, i) => {
    const x = points.length > 1 ? ((p.t - first) / span) * (width - 2) + 1 : width / 2;
    const y = (1 - p.p) * (height - 2) + 1;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  if (coords.length === 1) coords.push(coords[0].replace(/^[^,]+/, (x) => String(Number(x) + 1)));
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", coords.join(" "));
  svg.appendChild(line);
  return svg;
}

function sparkCell(points, threshold) {
  const td = el("td", null, "spark-col");   // the column phones do without (style.css)
  td.appendChild(sparkline(points, threshold));
  return td;
}

function decisionCell(decision) {
  return el("td", decision || "–", decision === "buy" ? "buy" : "defer");
}

function idCell(id, cls) {
  const td = el("td", id, cls);      // the text is the whole id (screen readers read it): CSS only draws it short
  if (id) td.title = id;             // and the whole id on hover
  return td;
}

function renderModel(model) {
  const dl = document.getElementById("model");
  const items = modelItems(model);
  dl.replaceChildren(...items.flatMap(([k, v]) => [el("dt", k), el("dd", v, k === "version" ? "model-version" : "")]));
}

function renderStages(state) {
  const tiles = state.stages.map((stage) => {
    const tile = el("div", null, "tile");
    tile.append(el("div", num(stage.per_s, 1), "value"), el("div", stage.name, "name"), el("div", stage.source, "source"));
    return tile;
  });
  document.getElementById("stages").replaceChildren(...tiles);
  const bad = state.bad_rate;
  document.getElementById("bad-rate").textContent = typeof bad === "number" ? `${(bad * 100).toFixed(1)} %` : "–";
  const lags = Object.entries(state.lag_ms).map(([name, ms]) => row([rowHeader(name), ms === null || ms === undefined ? "–" : `${Math.round(ms)} ms`]));
  document.querySelector("#lag tbody").replaceChildren(...lags);
  const components = Object.entries(state.components).map(([name, c]) => {
    const [text, cls] = componentStatus(c);
    return row([rowHeader(name), el("td", text, `status ${cls}`)]);
  });
  document.querySelector("#components tbody").replaceChildren(...components);
}

function renderSessions(state) {
  const rows = state.sessions.map((s) => row([
    idCell(s.session_id, "id session-id"), sparkCell(s.points, s.threshold), num(s.p_buy, 3),
    decisionCell(s.decision), s.events ?? "–", s.offered ? "offered" : "",
  ]));
  fill(document.querySelector("#sessions tbody"), rows, "no predictions yet", 6);
}

function renderDecisions(state) {
  const rows = state.decisions.map((d) => row([
    clock(d.at), idCell(d.session_id, "id"), num(d.p_buy, 3), decisionCell(d.decision),
    d.latency_us === null || d.latency_us === undefined ? "–" : `${d.latency_us} µs`,
  ]));
  fill(document.querySelector("#decisions tbody"), rows, "none yet", 5);
}

function renderOffers(state) {
  const rows = state.offers.map((o) => row([
    o.offered_at ? clock(Date.parse(o.offered_at)) : "–", idCell(o.session_id, "id offer-session"),
    o.code || "–", o.discount_percent ? `${o.discount_percent} %` : "–", num(o.p_buy, 3),
  ]));
  fill(document.querySelector("#offers tbody"), rows, "no offers yet", 5);
}

// Rewrites a live region's text only when it changes: the same text written again would be read out again.
function say(node, text, cls) {
  if (node.textContent !== text) node.textContent = text;
  node.className = cls;
}

// The errors box is in a live region: it changes only when the problems do, and once shown it stays,
// saying when they ended, so a screen reader hears the recovery as well as the failure.
let problems = "";
function renderErrors(state) {
  const lines = Object.entries(state.errors || {}).map(([k, v]) => `${k}: ${v}`);
  if (lines.join("\n") === problems) return;
  problems = lines.join("\n");
  if (!lines.length) lines.push(`none since ${clock(state.generated_at)}: every source is read again`);
  document.getElementById("errors-box").hidden = false;
  document.getElementById("errors").replaceChildren(...lines.map((line) => el("li", line)));
}

function showConnection(error) {
  const box = document.getElementById("connection");
  if (error) say(box, `cannot reach the live view server: ${error.message}`, "down");
  else if (box.className === "down") say(box, "connected again", "up");
}

// WCAG 2.2.2: a reader can stop the redraw. Polling goes on (connection problems are still said), and
// Resume draws the latest answer at once.
let paused = false, latest = null;
function togglePause() {
  paused = !paused;
  document.getElementById("pause").textContent = paused ? "Resume updates" : "Pause updates";
  const status = document.getElementById("status");
  if (paused) status.textContent = `paused · ${status.textContent}`;
  else if (latest) render(latest);
}

function render(state) {
  renderModel(state.model);
  renderStages(state);
  renderSessions(state);
  renderDecisions(state);
  renderOffers(state);
  renderErrors(state);
  document.getElementById("status").textContent =
    `updated ${clock(state.generated_at)} · live view up ${Math.round(state.uptime_s)} s`;
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    latest = await response.json();
    showConnection(null);
    if (!paused) render(latest);
  } catch (error) {
    showConnection(error);
  } finally {
    setTimeout(poll, POLL_MS);   // after the answer, so a slow server never gets a pile of requests
  }
}

if (typeof module === "object" && module.exports) {
  // Under Node (tests/demo): the formatting functions, no polling.
  module.exports = { num, metricLabel, metricValue, modelItems, componentStatus };
} else {
  document.getElementById("pause").addEventListener("click", togglePause);
  poll();
}

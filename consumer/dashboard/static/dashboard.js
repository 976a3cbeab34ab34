// The live page: per stream a stacked bar per window (faces per top label), and the latest
// windows. Fed by /events (server-sent events): a `snapshot`, then one `summary` each.
// Keeps what it shows by the server's rules (consumer/dashboard/store.py): per stream the
// windows within history_minutes of its newest one; a window replaced by a later record.
"use strict";

const LABELS = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"];
const COLORS = { angry: "#d62728", disgusted: "#6b8e23", fearful: "#9467bd", happy: "#f2b701",
  neutral: "#8c8c8c", sad: "#1f77b4", surprised: "#ff7f0e" };
const OTHER = "#c7c7c7";       // a label this page does not know (custom model labels)
const SKIPPED = "#ececec";     // faces not classified (skipped for quality)
const SVG = "http://www.w3.org/2000/svg";
const W = 960, H = 170, TOP = 8, BOTTOM = 22, LEFT = 36;

const state = { streams: new Map(), historyMs: 600000, maxStreams: 64, topic: "", events: 0 };
let pending = null;

function keep(s) {
  let windows = state.streams.get(s.stream_id);
  if (!windows) { windows = new Map(); state.streams.set(s.stream_id, windows); }
  const held = windows.get(s.window_start);
  if (held && Date.parse(held.closed_at) > Date.parse(s.closed_at)) return;
  windows.set(s.window_start, s);
  const newest = Math.max(...[...windows.values()].map((w) => Date.parse(w.window_end)));
  for (const [start, w] of windows) {
    if (Date.parse(w.window_end) <= newest - state.historyMs) windows.delete(start);
  }
  while (state.streams.size > state.maxStreams) {
    let oldest = null, oldestEnd = Infinity;
    for (const [name, ws] of state.streams) {
      const end = Math.max(...[...ws.values()].map((w) => Date.parse(w.window_end)));
      if (end < oldestEnd || (end === oldestEnd && name < oldest)) { oldest = name; oldestEnd = end; }
    }
    state.streams.delete(oldest);
  }
}

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

const sorted = (windows) => [...windows.values()].sort((a, b) =>
  Date.parse(a.window_start) - Date.parse(b.window_start));
const clock = (iso) => new Date(iso).toISOString().slice(11, 19);
const count = (w, label) => (w.labels[label] ? w.labels[label].faces : 0);

function topLabel(w) {
  let best = null;
  for (const label of [...LABELS, ...Object.keys(w.labels).filter((l) => !LABELS.includes(l))]) {
    if (count(w, label) > 0 && (best === null || count(w, label) > count(w, best))) best = label;
  }
  return best;
}

// One time axis for every stream, so that their bars line up: the last history_minutes
// before the newest window of any stream, widened for a stream whose camera clock lags.
function axis() {
  const all = [...state.streams.values()].flatMap((ws) => [...ws.values()]);
  const end = Math.max(...all.map((w) => Date.parse(w.window_end)));
  return [Math.min(end - state.historyMs, ...all.map((w) => Date.parse(w.window_start))), end];
}

function chart(windows, [start, end]) {
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
    role: "img" });
  const peak = Math.max(1, ...windows.map((w) => w.faces));
  const x = (t) => LEFT + ((t - start) / (end - start)) * (W - LEFT - 4);
  const y = (n) => (n / peak) * (H - TOP - BOTTOM);
  svg.append(el("svg:line", { class: "axis", x1: LEFT, x2: W, y1: H - BOTTOM, y2: H - BOTTOM }));
  svg.append(el("svg:text", { x: 2, y: TOP + 10 }, String(peak)));
  svg.append(el("svg:text", { x: 2, y: H - BOTTOM }, "0"));
  for (const t of [start, (start + end) / 2, end]) {
    const anchor = t === start ? "start" : t === end ? "end" : "middle";
    svg.append(el("svg:text", { x: x(t), y: H - 6, "text-anchor": anchor },
      clock(new Date(t).toISOString())));
  }
  for (const w of windows) {
    const x0 = x(Date.parse(w.window_start));
    const width = Math.max(2, x(Date.parse(w.window_end)) - x0 - 1);
    const bar = el("svg:g", { "data-window-start": w.window_start, "data-window-end": w.window_end,
      "data-faces": w.faces, "data-classified": w.classified, "data-skipped": w.skipped });
    bar.append(el("svg:title", {}, `${clock(w.window_start)}: ${w.faces} faces`));
    let base = H - BOTTOM;
    const parts = [...LABELS, ...Object.keys(w.labels).filter((l) => !LABELS.includes(l))]
      .map((label) => [label, count(w, label), COLORS[label] || OTHER]);
    parts.push(["skipped", Math.max(0, w.faces - w.classified), SKIPPED]);
    for (const [label, n, color] of parts) {
      if (n <= 0) continue;
      base -= y(n);
      bar.append(el("svg:rect", { x: x0, y: base, width, height: y(n), fill: color,
        "data-label": label, "data-count": n }));
    }
    svg.append(bar);
  }
  return svg;
}

function render() {
  pending = null;
  const section = document.getElementById("streams");
  const rows = [];
  let total = 0;
  const span = axis();
  section.replaceChildren();
  for (const name of [...state.streams.keys()].sort()) {
    const windows = sorted(state.streams.get(name));
    const faces = windows.reduce((sum, w) => sum + w.faces, 0);
    total += windows.length;
    const box = el("article", { class: "stream", "data-stream": name,
      "data-windows": windows.length, "data-faces-total": faces });
    const title = el("h2", {}, name);
    title.append(el("span", { class: "meta" }, `${windows.length} windows · ${faces} faces`));
    box.append(title, chart(windows, span));
    section.append(box);
    rows.push(...windows.map((w) => [name, w]));
  }
  if (!state.streams.size) {
    section.append(el("p", { class: "empty" }, `No window summaries on ${state.topic} ` +
      `in the last ${state.historyMs / 60000} minutes yet.`));
  }
  rows.sort((a, b) => Date.parse(b[1].window_start) - Date.parse(a[1].window_start)
    || a[0].localeCompare(b[0]));
  const body = document.querySelector("#latest tbody");
  body.replaceChildren(...rows.slice(0, 25).map(([name, w]) => {
    const top = topLabel(w);
    const tr = el("tr", { "data-stream": name, "data-window-start": w.window_start,
      "data-faces": w.faces, "data-top-label": top || "" });
    const conf = w.mean_confidence === null ? "–" : w.mean_confidence.toFixed(2);
    for (const [text, cls] of [[name, ""], [w.window_start.slice(0, 19).replace("T", " "), ""],
      [w.faces, "num"], [`${(w.skipped_share * 100).toFixed(0)}%`, "num"], [conf, "num"],
      [top || "–", ""]]) tr.append(el("td", cls ? { class: cls } : {}, String(text)));
    return tr;
  }));
  document.body.dataset.summaries = String(total);
  document.body.dataset.events = String(state.events);
}

const schedule = () => { if (pending === null) pending = setTimeout(render, 100); };

function status(text, value) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.dataset.state = value;
  document.body.dataset.state = value;
}

function connect() {
  const legend = document.getElementById("legend");
  legend.replaceChildren(...[...LABELS, "skipped"].map((label) => {
    const item = el("li", { "data-label": label });
    item.append(el("span", { class: "swatch" }), label);
    item.firstChild.style.background = COLORS[label] || SKIPPED;
    return item;
  }));
  const source = new EventSource("events");
  source.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    state.historyMs = snap.history_minutes * 60000;
    state.maxStreams = snap.max_streams;
    state.topic = snap.topic;
    state.streams = new Map();
    for (const stream of snap.streams) stream.windows.forEach(keep);
    status(`live · ${snap.topic}`, "live");
    render();
  });
  source.addEventListener("summary", (e) => { state.events += 1; keep(JSON.parse(e.data)); schedule(); });
  source.onerror = () => status("reconnecting…", "reconnecting");
}

document.addEventListener("DOMContentLoaded", connect);

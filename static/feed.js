// The live feed page (DESIGN §8). Plain JS, no build step. The key is read from
// the URL fragment (never sent to the server in a URL) or the form, and sent as
// the socket's first message (and, for the read API, in an Authorization header).
// Incoming events are queued and applied once per animation frame, and at most
// MAX_ROWS rows are kept, so thousands of events a second leave the page
// responsive. Content is always inserted as text.
//
// Nothing is missed and nothing is shown twice (DESIGN §16): every change carries
// its cursor, its position in the organization's change feed. The page remembers
// the cursor of the last change it processed (in memory, and in sessionStorage
// under a hash of the key, so that reloading the tab resumes too) and
// authenticates every reconnect with "after": that cursor; the server sends what
// followed it, then live changes, in order, each once, whatever their timestamps.
// A change whose cursor it has already processed is ignored, and a row is never
// drawn twice. A `dropped` notice needs nothing from the page: the server resends.
"use strict";

const MAX_ROWS = 500;
const MAX_BACKOFF_MS = 30000;
const CHART_SECONDS = 60;
const MAX_NAMES = 2000;
const SEEN_CURSORS = 2 * MAX_ROWS;  // cursors of recent changes, to ignore one arriving again
const BRIEF_NOTICE_MS = 5000;

const $ = (id) => document.getElementById(id);
const feed = {
  socket: null, key: null, backoff: 500, retryTimer: null,
  cursor: null, seen: new Set(), resumeNote: null,  // where this page is in the change feed
  paused: false, held: [], queue: [], scheduled: false, noticeTimer: null,
  rows: new Map(), sentiments: new Map(), names: new Map(),
  perSecond: new Array(CHART_SECONDS).fill(0), currentSecond: 0, currentCount: 0,
};

function setState(name, text) {
  const el = $("state");
  el.className = "state state-" + name;
  el.textContent = text;
}

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return scheme + "//" + location.host + "/api/feed/ws";
}

function connect(key) {
  if (key !== feed.key) {
    feed.key = key;
    feed.cursor = loadCursor(key);
    feed.seen.clear();
  }
  clearTimeout(feed.retryTimer);
  if (feed.socket) { feed.socket.onclose = null; feed.socket.close(); }
  setState(feed.backoff > 500 ? "reconnecting" : "connecting", "connecting…");
  const socket = new WebSocket(socketUrl());
  feed.socket = socket;
  socket.onopen = () => {
    const auth = { type: "auth", token: key };
    if (feed.cursor) auth.after = feed.cursor;  // resume right after the last change processed
    socket.send(JSON.stringify(auth));
  };
  socket.onmessage = (message) => { if (feed.socket === socket) receive(JSON.parse(message.data)); };
  socket.onclose = (event) => closed(event);
}

function closed(event) {
  feed.socket = null;
  if (event.code === 4401 || event.code === 4403) {
    setState("error", event.code === 4401 ? "invalid key" : "key lacks read scope");
    return;  // retrying cannot help
  }
  let why = "disconnected";
  if (event.code === 4410) {  // "cursor expired; oldest: CURSOR"
    const oldest = /oldest: (\S+)/.exec(event.reason);
    setCursor(oldest ? oldest[1] : null);
    why = "changes since this page's last one are no longer all kept";
    feed.resumeNote = "resumed from the oldest change kept; earlier ones were missed";
  } else if (event.code === 4400) {
    setCursor(null);
    why = "the server did not recognise where this page left off";
    feed.resumeNote = "from now on: could not resume where this page left off";
  }
  setState("reconnecting", why + ", retrying in " + Math.round(feed.backoff / 1000) + " s");
  feed.retryTimer = setTimeout(() => connect(feed.key), feed.backoff);
  feed.backoff = Math.min(feed.backoff * 2, MAX_BACKOFF_MS);
}

function receive(message) {
  if (message.type === "ready") {
    feed.backoff = 500;
    if (!feed.cursor) setCursor(message.cursor);  // where this socket starts: a reconnect resumes there
    setState("open", feed.resumeNote ? "live, " + feed.resumeNote : "live");
    feed.resumeNote = null;
    return;
  }
  if (message.type === "dropped") {  // the server sends them again: nothing to do
    showNotice(message.count + " event(s) were dropped while this page fell behind; the server is resending them",
      BRIEF_NOTICE_MS);
    return;
  }
  if (message.cursor) {
    if (feed.seen.has(message.cursor)) return;  // processed already
    feed.seen.add(message.cursor);
    if (feed.seen.size > SEEN_CURSORS) feed.seen.delete(feed.seen.values().next().value);
    feed.cursor = message.cursor;
  }
  if (message.type === "customer.deleted") {
    removeCustomer(message.data.id);
    return;
  }
  if (message.type === "interaction.created") countEvent();
  if (feed.paused && message.type === "interaction.created") {
    feed.held.push(message);
    if (feed.held.length > MAX_ROWS) feed.held.shift();
    return;
  }
  enqueue(message);
}

// The cursor survives a reload of the tab (sessionStorage, under a hash of the
// key: the key itself is not written down); it is saved when the page is left.
function cursorName(key) {
  let hash = 0x811c9dc5;  // FNV-1a
  for (let i = 0; i < key.length; i++) hash = Math.imul(hash ^ key.charCodeAt(i), 16777619);
  return "feed.cursor." + (hash >>> 0).toString(36);
}

function loadCursor(key) {
  try { return sessionStorage.getItem(cursorName(key)); } catch (error) { return null; }
}

function saveCursor() {
  if (!feed.key) return;
  try {
    if (feed.cursor) sessionStorage.setItem(cursorName(feed.key), feed.cursor);
    else sessionStorage.removeItem(cursorName(feed.key));
  } catch (error) { /* storage unavailable: the cursor lives in memory only */ }
}

function setCursor(cursor) {
  feed.cursor = cursor;
  saveCursor();
}

function enqueue(message) {
  feed.queue.push(message);
  // A hidden tab runs no animation frames: keep only what could still be shown.
  if (feed.queue.length > 2 * MAX_ROWS) feed.queue.splice(0, feed.queue.length - 2 * MAX_ROWS);
  if (!feed.scheduled) {
    feed.scheduled = true;
    requestAnimationFrame(flush);
  }
}

function flush() {
  feed.scheduled = false;
  const batch = feed.queue.splice(0);
  const fragment = document.createDocumentFragment();
  for (const message of batch) {
    if (message.type === "interaction.created") {
      if (!feed.rows.has(message.data.id)) fragment.prepend(makeRow(message.data));
    } else if (message.type === "interaction.analyzed") {
      applySentiment(message.data);
    }
  }
  const tbody = $("rows");
  tbody.prepend(fragment);
  while (tbody.rows.length > MAX_ROWS) {
    const last = tbody.lastElementChild;
    feed.rows.delete(last.dataset.id);
    last.remove();
  }
}

// The time of day, and the date unless it is today: an event may be sent long
// after it happened, and a resumed page is sent what it missed, however old.
function shortTime(time) {
  const clock = time.toLocaleTimeString();
  if (time.toDateString() === new Date().toDateString()) return clock;
  return time.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + ", " + clock;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function makeRow(data) {
  const tr = document.createElement("tr");
  tr.dataset.id = data.id;
  tr.dataset.channel = data.channel;
  tr.dataset.customer = data.customerId;
  tr.hidden = !matchesFilter(data.channel);
  tr.tabIndex = 0;
  const time = new Date(data.timestamp);
  const when = cell(isNaN(time) ? data.timestamp : shortTime(time));
  when.title = data.timestamp;
  const customer = cell(data.customerId.slice(0, 8) + "…", "customer");
  showCustomer(data.customerId, customer);
  tr.append(
    when,
    customer,
    cell(data.channel),
    cell(data.eventType),
    cell((data.content || "").slice(0, 200)),
  );
  const sentiment = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = "…";
  sentiment.append(badge);
  tr.append(sentiment);
  tr.title = data.content || "";
  feed.rows.set(data.id, badge);
  const early = feed.sentiments.get(data.id);
  if (early) { feed.sentiments.delete(data.id); setBadge(badge, early); }
  else if (data.analysisStatus && data.analysisStatus !== "pending") setBadge(badge, data);
  return tr;
}

// The read API, with the key in a header (never in a URL).
async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + feed.key } });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// A customer by name, else external id, else its id; each looked up once.
function showCustomer(id, td) {
  if (!feed.names.has(id)) {
    if (feed.names.size >= MAX_NAMES) feed.names.clear();
    feed.names.set(id, api("/api/customers/" + encodeURIComponent(id))
      .then((customer) => customer.name || customer.externalId || id)
      .catch(() => id));
  }
  feed.names.get(id).then((label) => { td.textContent = label; td.title = id; });
}

function removeCustomer(id) {
  let removed = 0;
  for (const tr of [...$("rows").rows]) {
    if (tr.dataset.customer === id) { feed.rows.delete(tr.dataset.id); tr.remove(); removed += 1; }
  }
  feed.names.delete(id);
  showNotice("a customer was erased: " + removed + " row(s) removed");
}

async function openDetails(id) {
  const dialog = $("details");
  const fields = $("details-fields");
  fields.replaceChildren();
  try {
    const item = await api("/api/interactions/" + encodeURIComponent(id));
    const customer = await feed.names.get(item.customerId) || item.customerId;
    const rows = [
      ["Id", item.id], ["Customer", customer + " (" + item.customerId + ")"],
      ["Event time", item.timestamp], ["Received", item.receivedAt], ["Channel", item.channel],
      ["Type", item.eventType], ["Message id", item.messageId], ["Content", item.content],
      ["Analysis", item.analysisStatus + (item.sentiment ?
        ": " + item.sentiment.label + " " + item.sentiment.score.toFixed(3) : "")],
      ["Analysed", item.analyzedAt], ["Analysis error", item.analysisError],
    ];
    for (const [name, value] of rows) {
      if (value == null) continue;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      fields.append(dt, dd);
    }
    $("details-metadata").textContent = JSON.stringify(item.metadata, null, 2);
  } catch (error) {
    $("details-metadata").textContent = "could not load it: " + error.message;
  }
  if (!dialog.open) dialog.showModal();
}

function applySentiment(data) {
  const badge = feed.rows.get(data.id);
  if (badge) { setBadge(badge, data); return; }
  feed.sentiments.set(data.id, data);  // analysis landed before its row was drawn
  if (feed.sentiments.size > MAX_ROWS) feed.sentiments.delete(feed.sentiments.keys().next().value);
}

function setBadge(badge, data) {
  const label = data.sentiment ? data.sentiment.label : data.analysisStatus;
  badge.textContent = data.sentiment ? label + " " + data.sentiment.score.toFixed(2) : label;
  badge.className = "badge badge-" + label;
}

function matchesFilter(channel) {
  const wanted = $("channel-filter").value;
  return !wanted || wanted === channel;
}

function applyFilter() {
  for (const tr of $("rows").rows) tr.hidden = !matchesFilter(tr.dataset.channel);
}

function togglePause() {
  feed.paused = !feed.paused;
  const button = $("pause");
  button.textContent = feed.paused ? "Resume" : "Pause";
  button.setAttribute("aria-pressed", String(feed.paused));
  if (!feed.paused) feed.held.splice(0).forEach(enqueue);
}

// A notice; a brief one hides itself after briefMs.
function showNotice(text, briefMs) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = false;
  clearTimeout(feed.noticeTimer);
  if (briefMs) feed.noticeTimer = setTimeout(() => { notice.hidden = true; }, briefMs);
}

function countEvent() {
  tick(Math.floor(Date.now() / 1000));
  feed.currentCount += 1;
}

// Close the counting second(s) once the clock has moved past them.
function tick(second) {
  if (second === feed.currentSecond) return;
  const elapsed = feed.currentSecond ? Math.min(second - feed.currentSecond, CHART_SECONDS) : 1;
  feed.perSecond.push(feed.currentCount);
  for (let i = 1; i < elapsed; i++) feed.perSecond.push(0);
  feed.perSecond.splice(0, feed.perSecond.length - CHART_SECONDS);
  feed.currentSecond = second;
  feed.currentCount = 0;
  $("rate").textContent = String(feed.perSecond[feed.perSecond.length - 1]);
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const peak = Math.max(1, ...feed.perSecond);
  const width = canvas.width / CHART_SECONDS;
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.fillStyle = "#4a78d0";
  feed.perSecond.forEach((count, i) => {
    const height = (count / peak) * (canvas.height - 2);
    context.fillRect(i * width, canvas.height - height, Math.max(width - 1, 1), height);
  });
}

function keyFromFragment() {
  const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("read-key").value.trim();
    if (key) { feed.backoff = 500; connect(key); }
  });
  $("channel-filter").addEventListener("change", applyFilter);
  $("pause").addEventListener("click", togglePause);
  $("rows").addEventListener("click", (event) => {
    const tr = event.target.closest("tr");
    if (tr) openDetails(tr.dataset.id);
  });
  $("rows").addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr");
    if (tr && event.key === "Enter") openDetails(tr.dataset.id);
  });
  $("details-close").addEventListener("click", () => $("details").close());
  setInterval(() => tick(Math.floor(Date.now() / 1000)), 1000);
  window.addEventListener("pagehide", saveCursor);
  const key = keyFromFragment();
  if (key) {
    $("read-key").value = key;
    connect(key);
  }
});

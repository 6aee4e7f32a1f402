// Shared helpers. Everything that came from Redis (captions, answers, questions, stream ids,
// errors) is put on the page with textContent, never parsed as HTML.
"use strict";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function secs(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} s`;
}

function clock(unixSeconds) {
  if (!unixSeconds) return "–";
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function ago(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

// "<ms>-<seq>" entry ids, compared as numbers.
function idLess(a, b) {
  const [am, as] = a.split("-").map(BigInt), [bm, bs] = b.split("-").map(BigInt);
  return am < bm || (am === bm && as < bs);
}

function badge(state) {
  const known = ["live", "connecting", "starting", "reconnecting", "ended", "failed", "stopped"];
  return el("span", "badge " + (known.includes(state) ? state : ""), state);
}

function streamUrl(id) { return "/streams/" + encodeURIComponent(id); }
function apiUrl(id, rest) { return "/api/streams/" + encodeURIComponent(id) + (rest || ""); }

async function getJSON(url, options) {
  const response = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
  if (response.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail;
    const message = typeof detail === "string" ? detail : (Array.isArray(detail) ? detail.map(d => d.msg).join("; ") : response.statusText);
    const error = new Error(message || `HTTP ${response.status}`);
    error.body = body;
    throw error;
  }
  return body;
}

// Live updates: server-sent events; the browser reconnects by itself after a drop.
function liveUpdates(query, handlers) {
  const conn = document.getElementById("conn");
  const source = new EventSource("/api/updates" + (query || ""));
  const setConn = (ok, text) => { if (conn) { conn.textContent = text; conn.classList.toggle("down", !ok); } };
  source.addEventListener("open", () => setConn(true, "live updates"));
  source.addEventListener("error", () => setConn(false, "reconnecting to the server…"));
  source.addEventListener("stream", (e) => handlers.stream && handlers.stream(JSON.parse(e.data)));
  source.addEventListener("removed", (e) => handlers.removed && handlers.removed(JSON.parse(e.data)));
  source.addEventListener("redis", (e) => {
    const msg = JSON.parse(e.data);
    setConn(msg.ok, msg.ok ? "live updates" : msg.error);
  });
  return source;
}

function eventLine(ev) {
  const li = el("li", `phase-${ev.phase}`);
  li.dataset.event = ev.event_id || "";
  li.append(el("span", "when", clock(ev.created_at)), el("span", "phase", eventState(ev)));
  const p = ev.probability !== undefined && ev.probability !== null ? ` (P(yes) ${ev.probability.toFixed(2)})` : "";
  li.append(document.createTextNode(`${ev.question} → ${ev.text}${p}`));
  if (ev.ack) li.append(el("span", "acked", ackText(ev.ack)));
  return li;
}

// "open since 12:00:01", "closed (open 12:00:01–12:00:45)": what an event record says happened.
function eventState(ev) {
  const since = ev.opened_at ? clock(ev.opened_at) : clock(ev.wall_end);
  if (ev.phase === "closed") return `closed (open ${since}–${clock(ev.wall_end)})`;
  return `open since ${since}`;
}

function ackText(ack) {
  return `acknowledged by ${ack.by || "someone"} at ${clock(ack.at)}` + (ack.note ? `: ${ack.note}` : "");
}

// A window the scene gate found unchanged repeats an earlier caption: say since when.
function unchangedText(c) {
  if (!c || c.unchanged_since_window === undefined || c.unchanged_since_window === null) return "";
  return `unchanged since ${clock(c.unchanged_since)} (window ${c.unchanged_since_window})`;
}

function acknowledge(streamId, eventId, by) {
  return getJSON(apiUrl(streamId, `/events/${encodeURIComponent(eventId)}/ack`), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ by: by || "" }),
  });
}

// A running stream's status is refreshed every second; a much older one means the pipeline
// (or its link to Redis) is gone.
function staleness(summary) {
  const st = summary.status;
  if (!st || ["ended", "failed", "stopped"].includes(summary.state)) return "";
  const age = Date.now() / 1000 - st.updated_at;
  return age > summary.stale_after_s ? `no status update for ${Math.round(age)} s: is the pipeline running?` : "";
}

function captionText(c) {
  if (!c) return "waiting for the first caption…";
  if (c.error) return `model failed on this window: ${c.error}`;
  return c.text || "(window without a caption)";
}

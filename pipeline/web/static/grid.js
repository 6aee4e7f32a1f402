// `/`: one card per stream, kept current from the live update stream.
"use strict";

const grid = document.getElementById("grid");
const empty = document.getElementById("empty");
const cards = new Map(); // stream id -> {root, parts, summary}

function newCard(id) {
  const root = el("article", "card");
  root.dataset.stream = id;
  const head = el("div", "card-head");
  const name = el("a", "name", id);
  name.href = streamUrl(id);
  const badgeSlot = el("span");
  head.append(name, badgeSlot);
  const picture = el("a", "picture");
  picture.href = streamUrl(id);
  const img = el("img");
  img.alt = `latest frame of ${id}`;
  img.hidden = true;
  const nopic = el("div", "nopic", "no picture yet");
  const stamp = el("span", "stamp");
  stamp.hidden = true;
  picture.append(img, nopic, stamp);
  const body = el("div", "card-body");
  const error = el("div", "error");
  const caption = el("div", "caption");
  const unchanged = el("div", "unchanged");
  const meta = el("div", "meta");
  const alertTitle = el("div", "alert-title");
  const events = el("ul", "events");
  body.append(error, caption, unchanged, meta, alertTitle, events);
  root.append(head, picture, body);
  return { root, parts: { badgeSlot, img, nopic, stamp, error, caption, unchanged, meta, alertTitle, events } };
}

function render(summary) {
  let card = cards.get(summary.id);
  if (!card) {
    card = newCard(summary.id);
    cards.set(summary.id, card);
    const ids = [...cards.keys()].sort();
    const next = ids[ids.indexOf(summary.id) + 1];
    grid.insertBefore(card.root, next ? cards.get(next).root : null);
  }
  card.summary = summary;
  const p = card.parts;
  p.badgeSlot.replaceChildren(badge(summary.state));
  if (summary.frame) {
    if (p.img.dataset.src !== summary.frame.url) { p.img.src = summary.frame.url; p.img.dataset.src = summary.frame.url; }
    p.img.hidden = false; p.nopic.hidden = true; p.stamp.hidden = false;
  }
  const c = summary.caption;
  p.caption.textContent = captionText(c);
  p.caption.classList.toggle("none", !(c && c.text && !c.error));
  p.caption.dataset.entry = c ? c.entry_id : "";
  p.unchanged.textContent = unchangedText(c);
  p.unchanged.hidden = !p.unchanged.textContent;
  // Open events first (an unacknowledged one is an alert), then the last hour's openings and closings.
  const open = summary.open_events || [];
  const openIds = new Set(open.map((e) => e.event_id));
  const recent = (summary.events || []).filter((e) => !(e.phase === "opened" && openIds.has(e.event_id)));
  card.root.classList.toggle("alert", open.some((e) => !e.ack));
  card.root.classList.toggle("open", open.length > 0);
  p.alertTitle.textContent = open.length ? `${open.length} open event${open.length > 1 ? "s" : ""}`
    : (recent.length ? `${recent.length} event record${recent.length > 1 ? "s" : ""} in the last hour` : "");
  p.alertTitle.hidden = !p.alertTitle.textContent;
  p.events.replaceChildren(...[...open, ...recent].slice(0, 4).map(eventLine));
  tick(card);
  empty.hidden = cards.size > 0;
}

// Relative times ("12 s ago") move on by themselves; the data only changes on updates.
function tick(card) {
  const s = card.summary, c = s.caption, p = card.parts;
  const problem = [staleness(s), s.last_error].filter(Boolean).join(" · ");
  p.error.textContent = problem;
  p.error.hidden = !problem;
  p.meta.textContent = c
    ? `${c.start.toFixed(1)}–${c.end.toFixed(1)} s · latency ${secs(c.latency_s)} · ${ago(c.created_at)}`
    : "";
  if (s.frame) p.stamp.textContent = `window ${s.frame.window} · ${clock(s.frame.wall_time)}`;
}

liveUpdates("", {
  stream: render,
  removed: (msg) => {
    const card = cards.get(msg.id);
    if (card) { card.root.remove(); cards.delete(msg.id); }
    empty.hidden = cards.size > 0;
  },
});
setInterval(() => cards.forEach(tick), 1000);

// `/streams/{id}`: one stream's picture, captions, events, standing answers and the ask box.
"use strict";

const streamId = decodeURIComponent(location.pathname.split("/").pop());
const PAGE = 30;
const $ = (id) => document.getElementById(id);
let current = null;       // latest summary
let newestCaption = null; // entry id at the top of the timeline
let oldestCaption = null; // entry id at the bottom ("older" pages back from here)
let oldestEvent = null;
let eventsKey = "";

document.title = `${streamId} · slowfast-stream`;
$("name").textContent = streamId;
$("dl-jsonl").href = apiUrl(streamId, "/captions.jsonl");
$("dl-vtt").href = apiUrl(streamId, "/captions.vtt");

function captionItem(c) {
  const li = el("li");
  li.dataset.entry = c.entry_id;
  li.append(el("span", "range", `#${c.window} · ${c.start.toFixed(1)}–${c.end.toFixed(1)} s · ${clock(c.wall_end)} · latency ${secs(c.latency_s)}`));
  li.append(el("span", c.error ? "error" : (c.text ? "" : "meta"), c.error ? captionText(c) : (c.text || "(no caption)")));
  const unchanged = unchangedText(c);
  if (unchanged) { li.classList.add("gated"); li.append(el("span", "unchanged", unchanged)); }
  return li;
}

function eventItem(ev) {
  const row = el("div", "event-row");
  if (Date.now() / 1000 - ev.created_at < 3600) row.classList.add("recent");
  if (ev.snapshot_url) {
    const img = el("img");
    img.src = ev.snapshot_url; img.alt = `window ${ev.window}`; img.loading = "lazy";
    row.append(img);
  }
  const txt = el("div", "txt");
  row.classList.add(`phase-${ev.phase}`);
  row.dataset.event = ev.event_id || "";
  txt.append(el("div", "phase", eventState(ev)));
  txt.append(el("div", "meta", `${clock(ev.created_at)} · window ${ev.window} · ${ev.start.toFixed(1)}–${ev.end.toFixed(1)} s · ${ev.trigger}`));
  txt.append(el("div", "", ev.question));
  const p = ev.probability !== undefined && ev.probability !== null ? `  (P(yes) ${ev.probability.toFixed(2)})` : "";
  txt.append(el("b", "", ev.text + p));
  txt.append(ackPart(ev));
  row.append(txt);
  return row;
}

// Who acknowledged the event, or a button to do it (an event without an id predates them).
function ackPart(ev) {
  if (ev.ack) return el("div", "acked", ackText(ev.ack));
  if (!ev.event_id) return el("span");
  const button = el("button", "button ack", "Acknowledge");
  button.type = "button";
  button.addEventListener("click", async () => {
    button.disabled = true;
    const by = $("ack-by").value.trim();
    localStorage.setItem("sfs-ack-by", by);
    try {
      await acknowledge(streamId, ev.event_id, by);
      await Promise.all([loadDetail(), loadEvents(false)]);
    } catch (err) {
      button.disabled = false;
      button.replaceWith(el("div", "error", err.message));
    }
  });
  return button;
}

let openKey = null;
function showOpenEvents(list) {
  const key = list.map((e) => `${e.event_id}@${e.window}${e.ack ? "+" : ""}`).join(",");
  if (key === openKey) return; // unchanged: keep the rows (and a button about to be clicked)
  openKey = key;
  $("open-empty").hidden = list.length > 0;
  $("open-events").replaceChildren(...list.map(eventItem));
}

function showSummary(s) {
  current = s;
  $("badge").replaceChildren(badge(s.state));
  $("source").textContent = s.source;
  if (s.frame) {
    const img = $("frame");
    if (img.dataset.src !== s.frame.url) { img.src = s.frame.url; img.dataset.src = s.frame.url; }
    img.hidden = false; $("nopic").hidden = true; $("stamp").hidden = false;
  }
  const c = s.caption;
  $("latest").textContent = captionText(c);
  $("latest-unchanged").textContent = unchangedText(c);
  $("latest-unchanged").hidden = !$("latest-unchanged").textContent;
  showOpenEvents(s.open_events || []);
  const st = s.status || {};
  const rate = (v) => (v === undefined ? "–" : `${Number(v).toFixed(1)}/s`);
  const stats = [["frames in", st.frames_in], ["fps in", rate(st.fps_in)], ["fps out", rate(st.fps_out)],
                 ["windows done", st.windows_done], ["skipped", st.windows_skipped], ["failed", st.windows_failed],
                 ["gated (unchanged)", st.windows_gated], ["events open", st.events_open],
                 ["events opened", st.events_opened], ["lag", secs(st.lag_s)], ["latency", secs(st.latency_s)],
                 ["reconnects", st.reconnects], ["dropped offline", st.offline_dropped],
                 ["notifications waiting", st.deliveries_pending], ["notifications failed", st.deliveries_failed]];
  $("stats").replaceChildren(...stats.map(([label, value]) => {
    const d = el("div", "", label); d.prepend(el("b", "", value === undefined ? "–" : value)); return d;
  }));
  tick();
}

function tick() {
  if (!current) return;
  const st = current.status || {};
  const undelivered = st.deliveries_failed ? `${st.deliveries_failed} event notifications not delivered (last error: ${st.last_delivery_error})` : "";
  const problem = [staleness(current), current.last_error, undelivered].filter(Boolean).join(" · ");
  $("last-error").textContent = problem;
  $("last-error").hidden = !problem;
  const c = current.caption;
  $("latest-meta").textContent = c ? `${c.start.toFixed(1)}–${c.end.toFixed(1)} s · latency ${secs(c.latency_s)} · ${ago(c.created_at)}` : "";
  if (current.frame) $("stamp").textContent = `window ${current.frame.window} · ${clock(current.frame.wall_time)}`;
}

function showStanding(list) {
  $("standing-empty").hidden = list.length > 0;
  $("standing").replaceChildren(...list.map((a) => {
    const tr = el("tr");
    tr.append(el("td", "", a.question || a.question_id));
    tr.append(el("td", "", a.error ? `error: ${a.error}` : a.text));
    const p = el("td");
    if (a.probability !== undefined && a.probability !== null) {
      const bar = el("span", "pbar"); const fill = el("i"); fill.style.width = `${Math.round(a.probability * 100)}%`;
      bar.append(fill); p.append(bar, document.createTextNode(a.probability.toFixed(2)));
    } else p.textContent = "–";
    tr.append(p, el("td", "", a.window ?? "–"));
    return tr;
  }));
}

async function loadOlderCaptions() {
  const query = oldestCaption ? `?before=${oldestCaption}&count=${PAGE}` : `?count=${PAGE}`;
  const page = await getJSON(apiUrl(streamId, "/captions" + query));
  page.forEach((c) => $("timeline").append(captionItem(c)));
  if (page.length) {
    oldestCaption = page[page.length - 1].entry_id;
    if (!newestCaption) newestCaption = page[0].entry_id;
  }
  $("older").hidden = page.length < PAGE;
}

async function loadNewerCaptions() {
  if (!newestCaption) return loadOlderCaptions();
  const page = (await getJSON(apiUrl(streamId, `/captions?after=${newestCaption}&count=500`)))
    .filter((c) => idLess(newestCaption, c.entry_id));
  if (!page.length) return;
  newestCaption = page[0].entry_id;
  $("timeline").prepend(...page.map(captionItem));
}

async function loadEvents(more) {
  const query = more && oldestEvent ? `?before=${oldestEvent}&count=${PAGE}` : `?count=${PAGE}`;
  const page = await getJSON(apiUrl(streamId, "/events" + query));
  if (!more) $("events").replaceChildren();
  // Openings and closings; an open event's updates (one per window) are in the open events panel.
  page.filter((ev) => ev.phase !== "updated").forEach((ev) => $("events").append(eventItem(ev)));
  if (page.length) oldestEvent = page[page.length - 1].entry_id;
  $("events-empty").hidden = $("events").children.length > 0;
  $("events-more").hidden = page.length < PAGE;
}

async function loadDetail() {
  const detail = await getJSON(apiUrl(streamId));
  showSummary(detail);
  showStanding(detail.standing || []);
}

// Updates arrive faster than fetches may finish: the fetches they cause run one at a time,
// each deciding afresh what is missing, so no caption is added twice.
let queue = Promise.resolve();
function onUpdate(s) {
  if (s.id !== streamId) return;
  showSummary(s);
  queue = queue.then(async () => {
    if (s.caption && (!newestCaption || idLess(newestCaption, s.caption.entry_id))) {
      await loadNewerCaptions();
      showStanding((await getJSON(apiUrl(streamId))).standing || []);
    }
    const key = (s.events || []).map((e) => e.entry_id + (e.ack ? "+" : "")).join(",");
    if (key !== eventsKey) { eventsKey = key; await loadEvents(false); }
  }).catch((err) => console.warn(err));
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const reply = $("reply"), button = $("ask-button");
  const text = $("question").value.trim();
  if (!text) return;
  button.disabled = true;
  reply.className = "reply";
  reply.textContent = "waiting for the answer…";
  try {
    const a = await getJSON(apiUrl(streamId, "/questions"), {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, kind: $("kind").value }),
    });
    const p = a.probability !== undefined && a.probability !== null ? `  P(yes) = ${a.probability.toFixed(2)}` : "";
    reply.replaceChildren(el("div", "meta", `window ${a.window} · ${a.start.toFixed(1)}–${a.end.toFixed(1)} s`), el("div", "answer", a.text + p));
  } catch (err) {
    reply.className = "reply err";
    reply.textContent = err.message;
  } finally {
    button.disabled = false;
  }
});
$("ack-by").value = localStorage.getItem("sfs-ack-by") || "";
setupSearch(streamId);
setupPast(streamId);
setupReport(streamId);
$("older").addEventListener("click", loadOlderCaptions);
$("events-more").addEventListener("click", () => loadEvents(true));

(async () => {
  try {
    await loadDetail();
  } catch (err) {
    $("last-error").textContent = err.message; $("last-error").hidden = false;
    return;
  }
  await Promise.all([loadOlderCaptions(), loadEvents(false)]);
  liveUpdates("?stream=" + encodeURIComponent(streamId), { stream: onUpdate, removed: () => {
    $("badge").replaceChildren(badge("removed"));
  } });
  setInterval(tick, 1000);
})();

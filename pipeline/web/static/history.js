// The history panels: search (grid page: every stream; stream page: that one), and on a stream's
// page questions about a range and reports. Every text from Redis goes in with textContent.
"use strict";

function rangeParams(prefix) {
  // "since" select, or explicit from/to (datetime-local: local time, which the server reads as such)
  const since = document.getElementById(prefix + "-since");
  const from = document.getElementById(prefix + "-from");
  const to = document.getElementById(prefix + "-to");
  const out = {};
  if (from && from.value) out.start = from.value;
  if (to && to.value) out.end = to.value;
  if (!out.start && !out.end && since && since.value) out.since = since.value;
  return out;
}

function hitItem(h) {
  const li = el("li", "hit");
  li.dataset.kind = h.kind;
  li.dataset.window = h.window;
  if (h.picture_url) {
    const img = el("img");
    img.src = h.picture_url; img.alt = `window ${h.window}`; img.loading = "lazy";
    li.append(img);
  }
  const txt = el("div", "txt");
  const windows = h.kind === "summary" ? `windows ${h.first_window}–${h.window}` : `window ${h.window}`;
  const video = h.start === null || h.start === undefined ? "" : ` · ${h.start.toFixed(1)}–${h.end.toFixed(1)} s`;
  const stream = el("a", "", h.stream);
  stream.href = streamUrl(h.stream);
  const meta = el("div", "meta");
  meta.append(stream, document.createTextNode(` · ${h.kind} · ${windows}${video} · ${new Date(h.wall_time * 1000).toLocaleString()}`));
  txt.append(meta);
  if (h.question) txt.append(el("div", "question", h.question));
  txt.append(el("div", "text", h.text));
  li.append(txt);
  return li;
}

const SEARCH_KINDS = [["", "everything"], ["caption", "captions"], ["answer", "answers"], ["event", "events"],
                      ["summary", "summaries"]];
const SEARCH_RANGES = [["", "all Redis holds"], ["1h", "last hour"], ["6h", "last 6 h"], ["24h", "last 24 h"],
                       ["7d", "last 7 days"]];

function choice(id, label, options) {
  const select = el("select");
  select.id = id; select.setAttribute("aria-label", label);
  select.append(...options.map(([value, text]) => { const o = el("option", "", text); o.value = value; return o; }));
  return select;
}

function searchControls(form) {
  // One form for both pages; each page gives only its placeholder.
  const input = el("input");
  Object.assign(input, { id: "search-q", type: "search", maxLength: 2000, required: true, placeholder: form.dataset.placeholder });
  input.setAttribute("aria-label", "search");
  const button = el("button", "", "Search");
  button.type = "submit";
  form.append(input, choice("search-kind", "kind", SEARCH_KINDS), choice("search-since", "time range", SEARCH_RANGES), button);
}

function setupSearch(stream) {
  const form = document.getElementById("search");
  if (!form) return;
  searchControls(form);
  const out = document.getElementById("hits"), status = document.getElementById("search-status");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const params = new URLSearchParams({ q: document.getElementById("search-q").value, limit: "50" });
    const kind = document.getElementById("search-kind").value;
    if (kind) params.append("kind", kind);
    if (stream) params.append("stream", stream);
    const range = rangeParams("search");
    if (range.since) params.set("since", range.since);
    status.className = "meta"; status.textContent = "searching…";
    try {
      const result = await getJSON("/api/search?" + params.toString());
      out.replaceChildren(...result.hits.map(hitItem));
      const total = result.complete === false ? `at least ${result.total}` : result.total;  // reading stopped early
      status.textContent = `${result.hits.length} of ${total} hits · ${result.elapsed_ms} ms`;
    } catch (err) {
      out.replaceChildren();
      status.className = "meta err"; status.textContent = err.message;
    }
  });
}

function setupPast(stream) {
  const form = document.getElementById("past");
  if (!form) return;
  const reply = document.getElementById("past-reply"), button = document.getElementById("past-button");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = document.getElementById("past-question").value.trim();
    if (!text) return;
    button.disabled = true; reply.className = "reply"; reply.textContent = "retrieving and asking…";
    try {
      const a = await getJSON(apiUrl(stream, "/questions"), {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign({ text, kind: "history", timeout_s: 300 }, rangeParams("past"))),
      });
      const sources = el("ul", "hits");
      sources.append(...(a.sources || []).map(hitItem));
      reply.replaceChildren(el("div", "answer", a.text), el("div", "meta", `drawn from ${(a.sources || []).length} entries:`), sources);
    } catch (err) {
      reply.className = "reply err"; reply.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });
}

function setupReport(stream) {
  const form = document.getElementById("report");
  if (!form) return;
  const out = document.getElementById("report-out"), button = document.getElementById("report-button");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true; out.className = "reply"; out.textContent = "building the report…";
    try {
      const r = await getJSON(apiUrl(stream, "/report"), {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign({ timeout_s: 900 }, rangeParams("report"))),
      });
      const pictures = el("div", "report-pictures");
      for (const p of r.report.pictures) {
        const img = el("img"); img.src = p.picture_url; img.alt = `window ${p.window}`; img.loading = "lazy";
        pictures.append(img);
      }
      out.replaceChildren(el("pre", "markdown", r.markdown), pictures);
    } catch (err) {
      out.className = "reply err"; out.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });
}

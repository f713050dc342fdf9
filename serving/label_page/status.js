// The operators' status page: reads /status/api with an admin key and shows it, every 15 s.
"use strict";

const KEY = "instructloop-admin-key";
const $ = (id) => document.getElementById(id);
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function pct(x) { return x === undefined || x === null ? "–" : (100 * x).toFixed(1) + "%"; }
function when(t) { return t ? new Date(t * 1000).toLocaleString() : "–"; }

function pairs(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) dl.append(el("dt", k), el("dd", v));
}

function signIn(note) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  $("figures").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("error").textContent = note || "";
  $("key").focus();
}

async function load() {
  let resp;
  try {
    resp = await fetch("/status/api", {
      headers: { "Authorization": "Bearer " + sessionStorage.getItem(KEY) },
    });
  } catch (e) {
    $("error").textContent = "the server cannot be reached: " + e.message;
    return;
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const msg = (data.error && data.error.message) || resp.statusText;
    if (resp.status === 401 || resp.status === 403) signIn(msg);
    else $("error").textContent = msg;
    return;
  }
  $("error").textContent = "";
  $("sign-in").hidden = true;
  $("sign-out").hidden = false;
  $("figures").hidden = false;
  draw(data);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function draw(d) {
  const s = d.serving, q = d.queue;
  pairs($("serving"), [
    ["version", s.version], ["since", when(s.since)], ["replica", s.replica], ["path", s.path],
  ]);
  const flags = Object.entries(q.flags_by_reason || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  pairs($("queue"), [
    ["waiting", q.available], ["being labelled", q.leased], ["done", q.done],
    ["flagged", q.flagged + (flags ? ` (${flags})` : "")], ["labels", q.labels],
    ["labels in the last hour", q.labels_last_hour], ["skips", q.skips],
    ["labels per task", q.labels_per_task],
    ["agreement between labellers", q.pairs_judged ? `${pct(q.agreement)} of ${q.pairs_judged} pairs`
      : "none yet: it needs tasks with two or more labels (--labels-per-task)"],
  ]);
  const lb = $("labellers").tBodies[0];
  lb.replaceChildren();
  for (const l of q.labellers) {
    const tr = el("tr");
    tr.append(el("td", l.labeller), el("td", l.labels, "num"), el("td", l.pairs_judged, "num"),
      el("td", pct(l.agreement), "num"));
    lb.append(tr);
  }
  const cb = $("cycles").tBodies[0];
  cb.replaceChildren();
  if (!d.cycles.length) {
    const tr = el("tr");
    const td = el("td", "no cycle yet");
    td.colSpan = 6;
    tr.append(td);
    cb.append(tr);
  }
  for (const c of d.cycles) {
    const tr = el("tr");
    const state = el("td", c.state + (c.reason ? ": " + c.reason : ""));
    let gate = el("td", "–");
    if (c.gate) {
      const failed = Object.entries(c.gate.checks || {}).filter(([, ok]) => !ok).map(([k]) => k);
      gate = el("td", c.gate.passed ? "passed" : "failed" + (failed.length ? ": " + failed.join(", ") : ""),
        c.gate.passed ? "pass" : "fail");
    }
    const figs = Object.entries(c.figures || {})
      .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : v}`).join(" · ");
    tr.append(el("td", c.id), state, el("td", when(c.created_at)),
      el("td", (c.parent || "?") + " → " + (c.candidate || "?")), gate, el("td", figs || "–"));
    cb.append(tr);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (e) => {
    e.preventDefault();
    const k = $("key").value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY, k);
    $("key").value = "";
    load();
    clearInterval(timer);
    timer = setInterval(load, 15000);
  });
  $("sign-out").addEventListener("click", () => signIn(""));
  if (sessionStorage.getItem(KEY)) {
    load();
    timer = setInterval(load, 15000);
  } else {
    signIn("");
  }
});

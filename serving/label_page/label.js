// The labelling page: sign in with a labeller key, rank a leased task's answers, submit or
// skip or flag, and the next task loads. Talks to /label/api/* (serving/labeling_http.py).
// Every text from the server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "instructloop-labeller-key";
const $ = (id) => document.getElementById(id);
const LETTERS = "ABCDEFGHIJKLMNOP";

let task = null;        // the leased task, as /label/api/next returns it
let ranks = new Map();  // response_id -> the rank number the labeller gave (1 = best)
let order = [];         // response ids in the order the cards are shown
let busy = false;

function key() { return sessionStorage.getItem(KEY) || ""; }

class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function api(path, body, method = "POST") {
  const init = { method, headers: { "Authorization": "Bearer " + key() } };
  if (method === "POST") {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached: " + e.message, "unavailable");
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = data.error || {};
    throw new ApiError(resp.status, err.message || resp.statusText, err.code || "");
  }
  return data;
}

function say(text) { $("message").textContent = text; }
function fail(text) { $("error").textContent = text; }
function clearNotes() { say(""); fail(""); }

function show(which) {
  for (const id of ["sign-in", "empty", "task"]) $(id).hidden = id !== which;
  $("sign-out").hidden = which === "sign-in";
}

function signIn(note) {
  sessionStorage.removeItem(KEY);
  task = null;
  show("sign-in");
  $("queue-line").textContent = "";
  if (note) fail(note);
  $("key").focus();
}

function handle(e) {
  if (e.status === 401 || e.status === 403) {
    signIn(e.message);
    return true;
  }
  fail(e.message);
  return false;
}

async function refreshStats() {
  try {
    const s = await api("/label/api/stats", null, "GET");
    const agreement = s.agreement === undefined ? "" :
      ` · agreement between labellers ${(100 * s.agreement).toFixed(0)}%`;
    $("queue-line").textContent = `${s.available} waiting, ${s.leased} being labelled · ` +
      `${s.labels_last_hour} labels in the last hour${agreement}`;
  } catch (e) {
    $("queue-line").textContent = "";
  }
}

async function loadNext() {
  try {
    const r = await api("/label/api/next", {});
    refreshStats();
    if (!r.has_task) {
      task = null;
      show("empty");
      $("again").focus();
      return;
    }
    render(r.task);
  } catch (e) {
    handle(e);
  }
}

function turn(role, text) {
  const div = document.createElement("div");
  div.className = "turn";
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  return div;
}

function render(t) {
  task = t;
  $("task").dataset.taskId = t.task_id;
  ranks = new Map();
  order = t.candidates.map((c) => c.response_id);
  const prompt = $("prompt");
  prompt.replaceChildren();
  if (t.messages && t.messages.length) {
    for (const m of t.messages) prompt.append(turn(m.role, m.content));
  } else {
    prompt.append(turn("prompt", t.prompt));
  }
  const until = new Date(t.lease_expires);
  $("task-meta").textContent = `${t.candidates.length} answers from model ${t.model_version} · ` +
    `yours until ${until.toLocaleTimeString()} · labels ${t.labels_done} of ${t.labels_needed}`;
  $("comment").value = "";
  $("rating-0").checked = true;
  countComment();
  show("task");
  drawCandidates();
  $("task-h").focus();
}

function letter(id) {
  return LETTERS[task.candidates.findIndex((c) => c.response_id === id)];
}

function drawCandidates(focusId) {
  const list = $("candidates");
  list.replaceChildren();
  const byId = new Map(task.candidates.map((c) => [c.response_id, c]));
  for (const id of order) {
    const c = byId.get(id);
    const li = document.createElement("li");
    li.className = "candidate" + (ranks.has(id) ? " ranked" : "");
    li.tabIndex = 0;
    li.draggable = true;
    li.dataset.responseId = id;
    const badge = document.createElement("div");
    badge.className = "badge";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = "Answer " + letter(id);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = ranks.has(id) ? "rank " + ranks.get(id) : "not ranked";
    badge.append(name, rank);
    const text = document.createElement("div");
    const p = document.createElement("p");
    p.className = "text";
    p.textContent = c.text;
    text.append(p);
    if (c.finish_reason === "length") {
      const cut = document.createElement("p");
      cut.className = "cut";
      cut.textContent = "(cut off at the length limit)";
      text.append(cut);
    }
    li.append(badge, text);
    li.addEventListener("keydown", onCardKey);
    li.addEventListener("dragstart", onDragStart);
    li.addEventListener("dragend", onDragEnd);
    li.addEventListener("dragover", onDragOver);
    li.addEventListener("dragleave", (e) => e.currentTarget.classList.remove("over"));
    li.addEventListener("drop", onDrop);
    list.append(li);
    if (id === focusId) li.focus();
  }
  summarise();
}

// The ranking as the server takes it: ids best first, dense ranks (ties share one).
function ranking() {
  const ids = [...order].filter((id) => ranks.has(id));
  ids.sort((a, b) => ranks.get(a) - ranks.get(b));
  const dense = [];
  let prev = null;
  for (const id of ids) {
    const r = ranks.get(id);
    dense.push(prev === null ? 1 : r === prev ? dense[dense.length - 1] : dense[dense.length - 1] + 1);
    prev = r;
  }
  return { ids, ranks: dense };
}

function summarise() {
  const { ids, ranks: dense } = ranking();
  const missing = order.length - ids.length;
  if (!ids.length) {
    $("summary").textContent = "Nothing ranked yet.";
    return;
  }
  let text = "Your ranking: " + letter(ids[0]);
  for (let i = 1; i < ids.length; i++) text += (dense[i] === dense[i - 1] ? " = " : " > ") + letter(ids[i]);
  if (missing) text += ` (${missing} not ranked yet)`;
  $("summary").textContent = text;
}

function onCardKey(e) {
  const li = e.currentTarget;
  const id = li.dataset.responseId;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (/^[0-9]$/.test(e.key)) {
    const n = Number(e.key);
    if (n === 0) ranks.delete(id);
    else if (n <= order.length) ranks.set(id, n);
    else {
      fail(`ranks go from 1 to ${order.length}`);
      return;
    }
    fail("");
    e.preventDefault();
    drawCandidates(id);
  } else if (e.key === "Backspace" || e.key === "Delete") {
    ranks.delete(id);
    e.preventDefault();
    drawCandidates(id);
  } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    const sib = e.key === "ArrowDown" ? li.nextElementSibling : li.previousElementSibling;
    if (sib) sib.focus();
    e.preventDefault();
  }
}

// Dragging puts the cards in order and ranks them by position, best at the top.
let dragged = null;
function onDragStart(e) {
  dragged = e.currentTarget.dataset.responseId;
  e.currentTarget.classList.add("dragging");
  e.dataTransfer.effectAllowed = "move";
  e.dataTransfer.setData("text/plain", dragged);
}
function onDragEnd(e) { e.currentTarget.classList.remove("dragging"); dragged = null; }
function onDragOver(e) {
  e.preventDefault();
  e.dataTransfer.dropEffect = "move";
  e.currentTarget.classList.add("over");
}
function onDrop(e) {
  e.preventDefault();
  const target = e.currentTarget;
  target.classList.remove("over");
  const moved = dragged || e.dataTransfer.getData("text/plain");
  const onto = target.dataset.responseId;
  if (!moved || moved === onto) return;
  const box = target.getBoundingClientRect();
  const after = e.clientY > box.top + box.height / 2;
  order = order.filter((id) => id !== moved);
  order.splice(order.indexOf(onto) + (after ? 1 : 0), 0, moved);
  ranks = new Map(order.map((id, i) => [id, i + 1]));
  drawCandidates(moved);
}

function countComment() {
  const n = $("comment").value.length;
  $("comment-count").textContent = `${n} of ${$("comment").maxLength} characters`;
}

async function submit(e) {
  if (e) e.preventDefault();
  if (!task || busy) return;
  const { ids, ranks: dense } = ranking();
  if (ids.length < order.length) {
    fail(`Rank every answer first: ${order.length - ids.length} not ranked yet.`);
    const first = [...$("candidates").children].find((li) => !ranks.has(li.dataset.responseId));
    if (first) first.focus();
    return;
  }
  busy = true;
  $("submit").disabled = true;
  const rating = Number(document.querySelector('input[name="rating"]:checked').value);
  try {
    const r = await api("/label/api/submit", {
      task_id: task.task_id,
      lease_id: task.lease_id,
      ranked_response_ids: ids,
      ranks: dense,
      rating,
      comment: $("comment").value,
    });
    clearNotes();
    await loadNext();
    say(`Saved (ranking ${r.feedback_id}).`);
  } catch (err) {
    if (!handle(err) && err.code === "failed_precondition") await loadNext();
  } finally {
    busy = false;
    $("submit").disabled = false;
  }
}

async function release(path, extra, done) {
  if (!task || busy) return;
  busy = true;
  try {
    await api(path, { task_id: task.task_id, lease_id: task.lease_id, ...extra });
    clearNotes();
    await loadNext();
    say(done);
  } catch (err) {
    if (!handle(err) && err.code === "failed_precondition") await loadNext();
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (e) => {
    e.preventDefault();
    const k = $("key").value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY, k);
    $("key").value = "";
    clearNotes();
    loadNext();
  });
  $("sign-out").addEventListener("click", () => { clearNotes(); signIn(""); });
  $("again").addEventListener("click", () => { clearNotes(); loadNext(); });
  $("task").addEventListener("submit", submit);
  $("task").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e);
  });
  $("skip").addEventListener("click", () => release("/label/api/skip", {}, "Skipped."));
  $("flag").addEventListener("click", () => release(
    "/label/api/flag",
    { reason: $("flag-reason").value, comment: $("comment").value },
    "Flagged: it leaves the queue.",
  ));
  $("comment").addEventListener("input", countComment);
  if (key()) loadNext();
  else signIn("");
});

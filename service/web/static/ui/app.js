// The task-runner dashboard. Plain JavaScript, no dependencies, nothing from the network
// but this API. Every element is built with the DOM (text through textContent), never from
// HTML strings: task output, errors and ids are shown as text, whatever they hold.
"use strict";

const TOKEN_KEY = "task-runner-token";
const STATES = ["NOTSTARTED", "STARTED", "COMPLETE", "FAILED"];
const POLL_MS = 3000; // when the event feed is down
const REFRESH_MS = 15000; // always: worker liveness and lags move without task events
const DEBOUNCE_MS = 250;
const MIN_GAP_MS = 1000;

const view = { state: "", type: "", queue: "", limit: 20, cursors: [null], page: 0, next: null, detail: null };
let feedLive = false;
let lastRefresh = 0;
let refreshTimer = null;
let refreshing = null;

// -- helpers ----------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(container, ...children) {
  container.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

function taskLink(id) {
  return el("a", { href: "#task=" + encodeURIComponent(id), class: "task-link" }, id);
}

function stateBadge(state) {
  const known = STATES.includes(state) ? state : "";
  return el("span", { class: "state " + known }, state === null ? "?" : state);
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return value.toFixed(1) + " s";
  if (value < 3600) return (value / 60).toFixed(1) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const ago = (Date.now() - date.getTime()) / 1000;
  const text = utc(date);
  return el("span", { title: iso, class: "time" }, text, el("span", { class: "muted" }, " (" + relative(ago) + ")"));
}

// Times as the API writes them: UTC, whatever the browser's zone and locale.
function utc(date) {
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "") + " UTC";
}

function relative(ago) {
  return ago >= 0 ? seconds(ago) + " ago" : "in " + seconds(-ago);
}

function short(text, length = 160) {
  if (text === null || text === undefined) return "";
  text = String(text);
  return text.length > length ? text.slice(0, length - 1) + "…" : text;
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "muted" }, empty);
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows),
  );
}

function say(text, bad = false) {
  const box = $("message");
  box.textContent = text;
  box.className = bad ? "message bad" : "message";
  box.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => (box.hidden = true), bad ? 12000 : 5000);
}

// -- the API ----------------------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, json) {
  const headers = { Accept: "application/json", ...authHeaders() };
  const request = { method, headers, cache: "no-store" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(json);
  }
  const response = await fetch(path, request);
  if (response.status === 204) return null;
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : {};
    let message = error.message || response.status + " " + response.statusText;
    if (response.status === 401) message = "this API needs a token: enter it above (" + message + ")";
    throw new ApiError(response.status, error.code || "", message);
  }
  return body;
}

// -- what the page shows ----------------------------------------------------------------

async function loadStats() {
  const stats = await api("GET", "/stats");
  const oldest = stats.oldest_due;
  const card = (label, value, cls, id) =>
    el("div", { class: "card " + (cls || ""), id }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  fill(
    $("summary"),
    card("tasks", stats.total, "", "card-total"),
    STATES.map((s) => card(s, stats.by_state[s] || 0, s === "FAILED" && stats.by_state[s] ? "bad" : "", "card-" + s)),
    card("due backlog", stats.due, stats.due ? "warn" : "", "card-due"),
    card("oldest due waits", oldest ? seconds(oldest.lag_seconds) : "–", oldest ? "warn" : "", "card-lag"),
    card("stale", stats.stale, stats.stale ? "bad" : "", "card-stale"),
    card("unreadable", stats.unreadable, stats.unreadable ? "bad" : "", "card-unreadable"),
  );

  const types = [...new Set(stats.counts.map((c) => String(c.type)))].sort();
  const grid = {};
  for (const c of stats.counts) grid[String(c.type) + "\u0000" + String(c.state)] = c.count;
  const states = [...new Set([...STATES, ...stats.counts.map((c) => String(c.state))])];
  fill(
    $("counts"),
    el("thead", {}, el("tr", {}, el("th", {}, "type"), states.map((s) => el("th", { class: "num" }, s)), el("th", { class: "num" }, "total"), el("th", {}, ""))),
    el(
      "tbody",
      {},
      types.map((t) =>
        el(
          "tr",
          { "data-type": t },
          el("td", {}, t),
          states.map((s) => el("td", { class: "num" }, grid[t + "\u0000" + s] || 0)),
          el("td", { class: "num" }, stats.by_type[t] || 0),
          el("td", { class: "buttons" }, requeueFailedButton(t, grid[t + "\u0000FAILED"] || 0)),
        ),
      ),
    ),
  );
  $("oldest").textContent = oldest
    ? "oldest due task: " + oldest.id + " (" + oldest.type + "), due " + seconds(oldest.lag_seconds) + " ago"
    : "no task is waiting past its time";

  $("stale-count").textContent = "(" + stats.stale + ", threshold " + stats.stale_after + " s)";
  fill(
    $("stale"),
    table(
      ["task", "type", "worker", "last heartbeat", "attempt"],
      stats.stale_tasks.map((t) =>
        el("tr", {}, el("td", {}, taskLink(t.id)), el("td", {}, t.type), el("td", {}, t.worker || "–"), el("td", {}, when(t.heartbeat_at)), el("td", { class: "num" }, t.attempts + "/" + (t.max_attempts ?? "?"))),
      ),
      "no stale task",
    ),
  );
  fill(
    $("failures"),
    table(
      ["task", "type", "attempts", "finished", "error", ""],
      stats.recent_failures.map((t) =>
        el(
          "tr",
          { "data-id": t.id },
          el("td", {}, taskLink(t.id)),
          el("td", {}, t.type),
          el("td", { class: "num" }, t.attempts),
          el("td", {}, when(t.finished_at)),
          el("td", { class: "error" }, short(t.error)),
          el("td", { class: "buttons" }, el("button", { type: "button", class: "requeue", onclick: () => requeue(t.id) }, "Requeue")),
        ),
      ),
      "no failed task",
    ),
  );
}

async function loadWorkers() {
  let workers;
  try {
    workers = await api("GET", "/workers");
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      fill($("workers"), el("p", { class: "muted" }, "no worker data"));
      return;
    }
    throw error;
  }
  if (!Array.isArray(workers)) workers = (workers && workers.workers) || [];
  const alive = workers.filter((w) => w.alive !== false).length;
  fill(
    $("workers"),
    el("p", { class: "muted" }, alive + " alive, " + (workers.length - alive) + " gone"),
    table(
      ["worker", "", "running", "holds", "last seen"],
      workers.map((w) =>
        el(
          "tr",
          { class: w.alive === false ? "gone" : "alive" },
          el("td", {}, w.id),
          el("td", {}, w.alive === false ? el("span", { class: "state FAILED" }, "gone") : el("span", { class: "state COMPLETE" }, "alive")),
          el("td", { class: "num" }, w.running ?? (w.tasks || []).length),
          el("td", {}, (w.tasks || []).flatMap((id, i) => (i ? [", ", taskLink(id)] : [taskLink(id)]))),
          el("td", {}, w.seconds_since_seen === undefined || w.seconds_since_seen === null ? when(w.last_seen) : seconds(w.seconds_since_seen) + " ago"),
        ),
      ),
      "no worker has registered",
    ),
  );
}

function recurrence(s) {
  let text = "?";
  if (s.cron) text = "cron " + s.cron + " (" + s.timezone + ")";
  else if (s.every) text = "every " + s.every + " s" + (s.every >= 60 ? " (" + seconds(s.every) + ")" : "");
  const bound = (label, iso) => (iso ? el("div", { class: "muted" }, label + " ", when(iso)) : null);
  return [text, bound("from", s.start_at), bound("until", s.end_at)];
}

function scheduleState(s) {
  if (s.paused) return "paused";
  return s.next_at ? "active" : "ended";
}

function nextOccurrence(s) {
  if (!s.next_at) return el("span", { class: "muted" }, "none left");
  // Paused, next_at stays where it was: on resume, if it has passed, `missed` decides.
  return s.paused ? [when(s.next_at), el("div", { class: "muted" }, "held while paused")] : when(s.next_at);
}

function scheduleRow(s) {
  const state = scheduleState(s);
  const args = s.args && Object.keys(s.args).length ? JSON.stringify(s.args) : null;
  return el(
    "tr",
    { "data-id": s.id, "data-state": state },
    el("td", {}, el("code", {}, s.id)),
    el("td", {}, s.type, args === null ? null : el("div", { class: "muted args" }, short(args, 80))),
    el("td", { class: "when" }, recurrence(s)),
    el("td", { class: "next" }, nextOccurrence(s)),
    el("td", {}, s.missed),
    el(
      "td",
      {},
      el("span", { class: "state " + state }, state),
      s.problems.length ? el("div", { class: "error" }, s.problems.join("; ")) : null,
    ),
    el(
      "td",
      { class: "buttons" },
      s.paused
        ? el("button", { type: "button", class: "resume", onclick: () => pauseSchedule(s.id, false) }, "Resume")
        : el("button", { type: "button", class: "pause", onclick: () => pauseSchedule(s.id, true) }, "Pause"),
      el("button", { type: "button", class: "delete danger", onclick: () => removeSchedule(s.id) }, "Delete"),
    ),
  );
}

async function loadSchedules() {
  let body;
  try {
    body = await api("GET", "/schedules");
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      $("schedule-count").textContent = "";
      fill($("schedules"), el("p", { class: "muted" }, "no schedule data"));
      return;
    }
    throw error;
  }
  const schedules = body.schedules;
  const paused = schedules.filter((s) => s.paused).length;
  $("schedule-count").textContent = "(" + schedules.length + ", " + paused + " paused)";
  fill(
    $("schedules"),
    table(
      ["schedule", "type", "recurs", "next occurrence", "if missed", "state", ""],
      schedules.map(scheduleRow),
      "no schedule",
    ),
  );
}

function queueRow(q) {
  const state = q.paused ? "paused" : "active";
  const c = q.counts;
  const limit = (value, unit) => (value === null ? el("span", { class: "muted" }, "none") : value + unit);
  return el(
    "tr",
    { "data-name": q.name, "data-state": state },
    el("td", {}, el("code", {}, q.name)),
    el("td", { class: "rate" }, limit(q.rate, "/s"), q.rate === null ? null : el("div", { class: "muted" }, "burst " + q.burst)),
    el("td", { class: "concurrency" }, limit(q.concurrency, "")),
    el("td", { class: "num" }, String(c.NOTSTARTED || 0)),
    el("td", { class: "num" }, String(c.STARTED || 0)),
    el("td", { class: "num" }, String(c.COMPLETE || 0)),
    el("td", { class: "num" }, String(c.FAILED || 0)),
    el("td", {}, el("span", { class: "state " + state }, state)),
    el(
      "td",
      { class: "buttons" },
      q.paused
        ? el("button", { type: "button", class: "resume", onclick: () => pauseQueue(q.name, false) }, "Resume")
        : el("button", { type: "button", class: "pause", onclick: () => pauseQueue(q.name, true) }, "Pause"),
    ),
  );
}

// The task list's queue filter offers the queues GET /queues knows (and keeps the one chosen).
function queueChoices(names) {
  const select = $("filter-queue");
  const choices = names.includes(view.queue) || !view.queue ? names : [...names, view.queue];
  if (select.dataset.names === choices.join("\n")) return; // unchanged: an open list stays open
  select.dataset.names = choices.join("\n");
  fill(select, el("option", { value: "" }, "any"), choices.map((n) => el("option", { value: n }, n)));
  select.value = view.queue;
}

async function loadQueues() {
  let body;
  try {
    body = await api("GET", "/queues");
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      $("queue-count").textContent = "";
      fill($("queues"), el("p", { class: "muted" }, "no queue data"));
      return;
    }
    throw error;
  }
  const queues = body.queues;
  queueChoices(queues.map((q) => q.name));
  const paused = queues.filter((q) => q.paused).length;
  $("queue-count").textContent = "(" + queues.length + ", " + paused + " paused)";
  fill(
    $("queues"),
    table(
      ["queue", "rate", "concurrency", "NOTSTARTED", "STARTED", "COMPLETE", "FAILED", "state", ""],
      queues.map(queueRow),
      "no queue",
    ),
  );
}

async function loadTasks() {
  // The latest run_at first: what was just created or is about to run is on page one.
  const params = new URLSearchParams({ limit: String(view.limit), order: "desc" });
  if (view.state) params.set("state", view.state);
  if (view.type) params.set("type", view.type);
  if (view.queue) params.set("queue", view.queue);
  const cursor = view.cursors[view.page];
  if (cursor) params.set("cursor", cursor);
  const page = await api("GET", "/tasks?" + params.toString());
  view.next = page.next_cursor;
  fill(
    $("tasks"),
    el("thead", {}, el("tr", {}, ["id", "type", "queue", "state", "run at", "attempts", "worker", "error"].map((h) => el("th", {}, h)))),
    el(
      "tbody",
      {},
      page.tasks.length
        ? page.tasks.map((t) =>
            el(
              "tr",
              { "data-id": t.id, "data-state": t.state },
              el("td", {}, taskLink(t.id)),
              el("td", {}, t.type),
              el("td", { class: "queue" }, t.queue ?? "default"),
              el("td", {}, stateBadge(t.state)),
              el("td", {}, when(t.run_at)),
              el("td", { class: "num" }, t.attempts + "/" + (t.max_attempts ?? "?")),
              el("td", {}, t.worker || "–"),
              el("td", { class: "error" }, short(t.error, 80)),
            ),
          )
        : el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no task")),
    ),
  );
  $("page-prev").disabled = view.page === 0;
  $("page-first").disabled = view.page === 0;
  $("page-next").disabled = !view.next;
  $("page-info").textContent = "page " + (view.page + 1);
}

async function loadDetail() {
  const id = view.detail;
  const section = $("detail");
  if (!id) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  $("detail-id").textContent = id;
  let task;
  try {
    task = await api("GET", "/tasks/" + encodeURIComponent(id));
  } catch (error) {
    if (error.status !== 404) throw error;
    fill($("detail-body"), el("p", { class: "muted", id: "detail-gone" }, "no such task (deleted?)"));
    return;
  }
  const fields = [
    ["state", stateBadge(task.state)],
    ["type", task.type],
    ["queue", el("span", { id: "detail-queue" }, task.queue ?? "default")],
    ["run at", when(task.run_at)],
    ["created", when(task.created_at)],
    ["started", when(task.started_at)],
    ["finished", when(task.finished_at)],
    ["last heartbeat", when(task.heartbeat_at)],
    ["attempts", task.attempts + " of " + (task.max_attempts ?? "?")],
    ["worker", task.worker || "–"],
    ["error", task.error ? el("span", { class: "error" }, task.error) : "–"],
  ];
  fields.push(...callingFields(task));
  if (task.problems.length) fields.push(["problems", task.problems.join("; ")]);
  fill(
    $("detail-body"),
    el(
      "div",
      { class: "actions" },
      el("button", { type: "button", id: "detail-requeue", disabled: task.state !== "FAILED", onclick: () => requeue(task.id) }, "Requeue"),
      el("button", { type: "button", id: "detail-delete", class: "danger", onclick: () => remove(task.id) }, "Delete"),
    ),
    el("dl", { id: "detail-fields", "data-state": task.state }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h3", {}, "Output"),
    task.output === null ? el("p", { class: "muted" }, "none") : el("pre", { id: "detail-output" }, task.output),
    el("h3", {}, "Attempts that failed"),
    table(
      ["attempt", "at", "worker", "error"],
      attemptRows(task.errors),
      "none",
    ),
  );
}

// An http task's target and last status; any task's callback and where its delivery is.
function callingFields(task) {
  const fields = [];
  if (task.type === "http" && task.args && typeof task.args.url === "string") {
    const method = typeof task.args.method === "string" ? task.args.method : "POST";
    fields.push(["target", el("span", { id: "detail-target" }, method + " " + task.args.url)]);
    fields.push(["last status", el("span", { id: "detail-status" }, lastStatus(task))]);
  }
  if (task.callback_url) {
    const cb = task.callback;
    const where = cb
      ? cb.state + " after " + cb.attempts + " attempt(s)" + (cb.last_error ? ": " + cb.last_error : "")
      : "sent when the task ends";
    fields.push(["callback", el("span", { id: "detail-callback", "data-state": cb ? cb.state : "" }, task.callback_url + " — " + where)]);
  }
  return fields;
}

// The status code of an http task's last answer: its output's first line, else its last
// error's ("HTTP 503"), else none yet.
function lastStatus(task) {
  const found = /^(\d{3})/.exec(task.output || "") || /^HTTP (\d{3})/.exec(task.error || "");
  return found ? found[1] : "–";
}

// The failed attempts in order; where the count starts again (a requeue gave the task a
// fresh set of attempts), a row says so.
function attemptRows(errors) {
  const rows = [];
  let last = null;
  for (const e of errors) {
    if (last !== null && typeof e.attempt === "number" && e.attempt <= last) {
      rows.push(el("tr", { class: "requeued" }, el("td", { colspan: 4, class: "muted" }, "requeued: a fresh set of attempts")));
    }
    if (typeof e.attempt === "number") last = e.attempt;
    rows.push(el("tr", {}, el("td", { class: "num" }, e.attempt ?? "?"), el("td", {}, when(e.at)), el("td", {}, e.worker || "–"), el("td", { class: "error" }, e.error)));
  }
  return rows;
}

// -- refreshing ---------------------------------------------------------------------------

async function refresh() {
  if (refreshing) return refreshing;
  lastRefresh = Date.now();
  refreshing = (async () => {
    const results = await Promise.allSettled([loadStats(), loadWorkers(), loadTasks(), loadQueues(), loadSchedules(), loadDetail()]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) say(failed.reason.message || String(failed.reason), true);
    $("updated").textContent = "updated " + utc(new Date()).slice(11);
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  })();
  try {
    await refreshing;
  } finally {
    refreshing = null;
  }
}

function refreshSoon() {
  if (refreshTimer) return;
  const wait = Math.max(DEBOUNCE_MS, MIN_GAP_MS - (Date.now() - lastRefresh));
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, wait);
}

function setFeed(live, text) {
  feedLive = live;
  const badge = $("feed");
  badge.textContent = text;
  badge.className = "feed " + (live ? "live" : "polling");
}

// The event feed, read with fetch rather than EventSource: EventSource cannot send the
// Authorization header that TASK_RUNNER_AUTH_READS asks for. Reconnects by itself; while
// it is down, the page polls.
async function listen() {
  let failures = 0;
  for (;;) {
    try {
      const response = await fetch("/events", {
        headers: { Accept: "text/event-stream", ...authHeaders() },
        cache: "no-store",
      });
      if (!response.ok || !response.body) throw new Error("the event feed answered " + response.status);
      setFeed(true, "live");
      failures = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      failures += 1;
      setFeed(false, "polling");
    }
    await new Promise((resolve) => setTimeout(resolve, failures ? Math.min(30000, 1000 * 2 ** failures) : 100));
  }
}

function onEvent(block) {
  const data = block
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).trimStart())
    .join("\n");
  if (!data) return; // a comment (keep-alive) or the retry hint
  refreshSoon();
}

// -- actions ------------------------------------------------------------------------------

// Every action is one REST call, then a message and a refresh; its errors are shown. A bulk
// action (a JSON `body`) answers what one call did and `"more": true` when it stopped for time:
// it is called again until it is done, and `done` is then given every answer.
async function act(method, path, done, what, body) {
  try {
    const answers = [await api(method, path, body)];
    while (answers[answers.length - 1]?.more) answers.push(await api(method, path, body));
    say(typeof done === "function" ? done(answers) : done);
  } catch (error) {
    say(what + " failed: " + error.message, true);
  }
  refreshSoon();
}

function requeue(id) {
  return act("POST", "/tasks/" + encodeURIComponent(id) + "/requeue", "task " + id + " requeued: NOTSTARTED, due now", "requeue");
}

// The "Tasks by state and type" table: every FAILED task of a type back in the queue.
function requeueFailedButton(type, failed) {
  if (!failed || type === "(none)") return null;
  const title = "POST /tasks/requeue {\"state\": \"FAILED\", \"type\": \"" + type + "\"}";
  return el("button", { type: "button", class: "requeue-failed", title, onclick: () => requeueFailed(type, failed) }, "Requeue all failed");
}

function requeueFailed(type, failed) {
  const question = "Requeue all " + failed + " FAILED " + type + " tasks? Each goes back to NOTSTARTED, due now, with its attempts reset (its errors kept).";
  if (!window.confirm(question)) return;
  const done = (answers) => answers.reduce((n, a) => n + a.requeued, 0) + " FAILED " + type + " task(s) requeued: NOTSTARTED, due now";
  return act("POST", "/tasks/requeue", done, "requeue", { state: "FAILED", type });
}

function remove(id) {
  if (!window.confirm("Delete task " + id + "? A worker running it stops within a heartbeat.")) return;
  return act("DELETE", "/tasks/" + encodeURIComponent(id), "task " + id + " deleted", "delete");
}

function pauseSchedule(id, pause) {
  const verb = pause ? "pause" : "resume";
  const done = "schedule " + id + (pause ? " paused: it creates no task until resumed" : " resumed");
  return act("POST", "/schedules/" + encodeURIComponent(id) + "/" + verb, done, verb);
}

function pauseQueue(name, pause) {
  const verb = pause ? "pause" : "resume";
  const done = "queue " + name + (pause ? " paused: none of its tasks starts until resumed (running ones finish)" : " resumed");
  return act("POST", "/queues/" + encodeURIComponent(name) + "/" + verb, done, verb);
}

function removeSchedule(id) {
  const question = "Delete schedule " + id + "? Its tasks already due or running stay; those made ahead for later occurrences go with it.";
  if (!window.confirm(question)) return;
  return act("DELETE", "/schedules/" + encodeURIComponent(id), "schedule " + id + " deleted", "delete");
}

async function recover() {
  const button = $("recover");
  button.disabled = true;
  try {
    const result = await api("POST", "/recover");
    const kept = result.not_recovered.map((n) => n.id + ": " + n.reason);
    $("recover-result").textContent =
      result.found === 0
        ? "no stale task"
        : result.requeued.length + " back in the queue, " + result.failed.length + " failed (attempts used up)" + (kept.length ? "; not recovered: " + kept.join("; ") : "");
  } catch (error) {
    say("recovery failed: " + error.message, true);
  } finally {
    button.disabled = false;
  }
  refreshSoon();
}

// -- wiring -------------------------------------------------------------------------------

function readHash() {
  const match = /^#task=(.+)$/.exec(location.hash);
  view.detail = match ? decodeURIComponent(match[1]) : null;
}

function resetPaging() {
  view.cursors = [null];
  view.page = 0;
}

function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    say(token ? "token saved for this tab" : "token forgotten");
    refresh();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    say("token forgotten");
  });
  for (const [id, key] of [["filter-state", "state"], ["filter-type", "type"], ["filter-queue", "queue"], ["filter-limit", "limit"]]) {
    $(id).addEventListener("change", () => {
      view[key] = key === "limit" ? Number($(id).value) : $(id).value;
      resetPaging();
      loadTasks().catch((error) => say(error.message, true));
    });
  }
  $("page-first").addEventListener("click", () => {
    resetPaging();
    loadTasks().catch((error) => say(error.message, true));
  });
  $("page-prev").addEventListener("click", () => {
    view.page = Math.max(0, view.page - 1);
    loadTasks().catch((error) => say(error.message, true));
  });
  $("page-next").addEventListener("click", () => {
    if (!view.next) return;
    view.cursors[view.page + 1] = view.next;
    view.page += 1;
    loadTasks().catch((error) => say(error.message, true));
  });
  $("recover").addEventListener("click", recover);
  $("detail-close").addEventListener("click", () => {
    history.replaceState(null, "", location.pathname + location.search);
    readHash();
    loadDetail();
  });
  window.addEventListener("hashchange", () => {
    readHash();
    loadDetail().catch((error) => say(error.message, true));
    if (view.detail) $("detail").scrollIntoView();
  });
  readHash();
  refresh();
  listen();
  setInterval(() => {
    const due = feedLive ? REFRESH_MS : POLL_MS;
    if (Date.now() - lastRefresh >= due) refresh();
  }, 500);
}

document.addEventListener("DOMContentLoaded", start);

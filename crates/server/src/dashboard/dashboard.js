// digibot dashboard: plain JS, no build. Data comes from the JSON admin
// API with the token from sessionStorage; everything from the server is
// inserted as text (never as HTML).
"use strict";

const TOKEN_KEY = "digibot.admin.token";
const SIM_KEY = "digibot.simulator.conversation";
const VIEWS = ["plugins", "conversations", "dead-letters", "simulator"];

const $ = (selector, root = document) => root.querySelector(selector);

// Builds an element: el("td", {class: "num"}, "text", child, ...).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function toast(message, bad) {
  const t = $("#toast");
  t.textContent = message;
  t.className = bad ? "toast bad" : "toast";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorized extends Error {}

// Calls the admin API; a 401 signs out.
async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (response.status === 401) {
    signOut();
    throw new Unauthorized("The admin token was refused.");
  }
  if (!response.ok) {
    const reason = data && data.error ? data.error : text;
    throw new Error(`${method} ${path}: ${response.status} ${reason}`);
  }
  return data;
}

function fail(error) {
  if (!(error instanceof Unauthorized)) toast(error.message, true);
}

// ---- formatting ------------------------------------------------------------

function ago(ms) {
  if (!ms) return "—";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(ms).toLocaleString();
}

function time(ms) { return ms ? new Date(ms).toLocaleTimeString() : "—"; }

function micros(us) {
  if (us === undefined || us === null) return "—";
  if (us < 1000) return us + " µs";
  if (us < 1000000) return (us / 1000).toFixed(us < 10000 ? 2 : 1) + " ms";
  return (us / 1000000).toFixed(2) + " s";
}

function badge(text, kind) { return el("span", { class: "badge " + kind }, text); }

const STATE_KIND = { active: "ok", "half-open": "warn", quarantined: "bad" };
const OUTCOME_KIND = { ok: "ok", failed: "bad", skipped: "warn", filtered: "neutral" };
const STATUS_KIND = { sent: "ok", pending: "warn", dead: "bad", handled: "ok", recorded: "neutral" };

function json(value) { return el("pre", {}, JSON.stringify(value, null, 2)); }

function fillTable(table, rows) {
  const body = $("tbody", table);
  body.replaceChildren(...rows);
  const empty = table.parentElement.querySelector(".empty");
  if (empty) empty.hidden = rows.length > 0;
}

// ---- sign-in and navigation ------------------------------------------------

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin();
}

function showLogin(message) {
  for (const section of document.querySelectorAll(".view")) section.hidden = true;
  $("#view-login").hidden = false;
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  const error = $("#login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("#token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const value = $("#token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await api("GET", "/admin/plugins");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error instanceof Unauthorized ? "That token was refused." : error.message);
    return;
  }
  $("#token").value = "";
  route();
}

// A link such as the demo prints, `/admin#token=TOKEN`, signs in: the
// fragment never reaches the server or its logs, and it is taken out of the
// address bar and the history at once.
function tokenFromLink() {
  if (!location.hash.startsWith("#token=")) return;
  const value = decodeURIComponent(location.hash.slice("#token=".length)).trim();
  history.replaceState(null, "", location.pathname + location.search);
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
}

function route() {
  if (!token()) return showLogin();
  const view = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "plugins";
  for (const section of document.querySelectorAll(".view")) section.hidden = true;
  $("#view-" + view).hidden = false;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === view);
  }
  load(view);
}

function load(view) {
  const loaders = {
    plugins: loadPlugins,
    conversations: loadConversations,
    "dead-letters": loadDeadLetters,
    simulator: openSimulator,
  };
  loaders[view]().catch(fail);
}

// ---- plugins ---------------------------------------------------------------

async function loadPlugins() {
  const data = await api("GET", "/admin/plugins");
  const plugins = data.plugins || [];
  $("#plugins-meta").textContent =
    `${plugins.length} loaded · instance pooling ${data.pooling ? "on" : "off"}`;
  fillTable($("#plugins-table"), plugins.map((p) => {
    const latency = p.latency || {};
    return el("tr", { dataset: { plugin: p.name } },
      el("td", { class: "name" }, p.name, p.enabled === false ? el("span", { class: "muted small" }, " (disabled)") : null),
      el("td", {}, el("code", { title: p.version }, String(p.version).slice(0, 12)),
        el("div", { class: "muted small" }, "WIT " + p.wit_version)),
      el("td", {}, badge(p.state, STATE_KIND[p.state] || "neutral"),
        p.quarantined_until ? el("div", { class: "muted small" }, "until " + time(p.quarantined_until)) : null),
      el("td", { class: "num" }, p.invocations),
      el("td", { class: "num" }, p.failures),
      el("td", { class: "num" }, p.skipped),
      el("td", { class: "num", title: latency.samples ? latency.samples + " samples" : "" }, micros(latency.p50_us)),
      el("td", { class: "num" }, micros(latency.p99_us)),
      el("td", { class: "wrap small" }, p.last_failure || el("span", { class: "muted" }, "—")),
    );
  }));
  await loadRollouts(plugins);
}

// ---- rollouts --------------------------------------------------------------

const VERDICT_KIND = { same: "ok", different: "warn", failed: "bad" };
const ROLLOUT_KIND = { active: "ok", promoted: "neutral", aborted: "neutral", rolled_back: "bad" };

// The latest rollout of each plugin (a 404 means none), with its newest
// comparisons: the serving version's requests beside the candidate's.
async function loadRollouts(plugins) {
  const panels = [];
  for (const p of plugins) {
    let report;
    try {
      report = await api("GET", `/admin/plugins/${encodeURIComponent(p.name)}/rollout?limit=50`);
    } catch (error) {
      if (String(error.message).includes(": 404 ")) continue;
      throw error;
    }
    panels.push(rolloutPanel(report));
  }
  $("#rollouts").replaceChildren(...panels);
}

function rolloutPanel(report) {
  const r = report.rollout;
  const t = report.totals;
  const rows = (report.events || []).map((e) => el("tr", { dataset: { event: e.event_key } },
    el("td", {}, badge(e.verdict, VERDICT_KIND[e.verdict] || "neutral"),
      el("div", { class: "muted small" }, time(e.at))),
    el("td", { class: "small" }, e.conversation_id),
    el("td", { class: "serving" }, json(e.serving)),
    el("td", { class: "candidate" }, e.reason ? el("p", { class: "error small" }, e.reason) : null, json(e.candidate)),
  ));
  return el("div", { class: "card rollout", dataset: { plugin: r.plugin } },
    el("h2", {}, `Rollout of ${r.plugin} `, badge(r.mode + (r.mode === "canary" ? ` ${r.percent}%` : ""), "neutral"),
      " ", badge(r.state, ROLLOUT_KIND[r.state] || "neutral")),
    el("p", { class: "muted small" },
      `candidate ${String(r.candidate).slice(0, 12)} · started ${ago(r.started_at)} · `,
      el("span", { class: "totals" }, `${t.compared} compared: ${t.same} same, ${t.different} different, ${t.failed} failed`),
      r.reason ? el("span", { class: "error" }, " · " + r.reason) : null),
    el("table", { class: "diff" },
      el("thead", {}, el("tr", {}, el("th", {}, "Verdict"), el("th", {}, "Conversation"),
        el("th", {}, "Serving version sent"), el("th", {}, "Candidate would have sent"))),
      el("tbody", {}, rows)),
  );
}

// ---- conversations ---------------------------------------------------------

let selectedConversation = null;

function actionCounts(actions) {
  const parts = [];
  for (const status of ["sent", "pending", "dead"]) {
    if (actions && actions[status]) parts.push(badge(`${actions[status]} ${status}`, STATUS_KIND[status]));
  }
  return el("div", { class: "counts" }, parts.length ? parts : el("span", { class: "muted" }, "none"));
}

async function loadConversations() {
  const rows = await api("GET", "/admin/conversations?limit=100");
  fillTable($("#conversations-table"), rows.map((c) => el("tr", {
    class: "clickable" + (c.conversation_id === selectedConversation ? " selected" : ""),
    dataset: { conversation: c.conversation_id },
    onclick: () => showConversation(c.conversation_id).catch(fail),
  },
  el("td", { class: "wrap" }, el("code", {}, c.conversation_id),
    c.state ? el("div", {}, badge(stateText(c.state), "neutral")) : null),
  el("td", { class: "num" }, c.events, c.pending_events ? el("div", { class: "muted small" }, c.pending_events + " pending") : null),
  el("td", {}, actionCounts(c.actions)),
  el("td", {}, ago(c.last_event_at), el("div", { class: "muted small" }, shortEvent(c.last_event))),
  )));
  if (selectedConversation) await showConversation(selectedConversation);
}

// A conversation state as the lifecycle reports it (a string, or an
// object with a `state` field).
function stateText(state) {
  return typeof state === "string" ? state : (state && state.state) || JSON.stringify(state);
}

function shortEvent(name) { return String(name || "").replace(/^live_chat\./, ""); }

async function showConversation(id) {
  selectedConversation = id;
  for (const row of document.querySelectorAll("#conversations-table tbody tr")) {
    row.classList.toggle("selected", row.dataset.conversation === id);
  }
  const detail = await api("GET", "/admin/conversations/" + encodeURIComponent(id));
  const actionsBySeq = new Map();
  for (const action of detail.actions || []) {
    if (!actionsBySeq.has(action.event_seq)) actionsBySeq.set(action.event_seq, []);
    actionsBySeq.get(action.event_seq).push(action);
  }
  const pane = $("#conversation-detail");
  pane.replaceChildren(
    el("h2", {}, el("code", {}, detail.conversation_id),
      detail.state ? badge(stateText(detail.state), "neutral") : null),
    detail.state && detail.state.reason
      ? el("p", { class: "muted small" }, `since ${time(detail.state.changed_at)}: ${detail.state.reason}`)
      : null,
    el("ul", { class: "timeline" }, (detail.events || []).map((e) => el("li", {},
      el("div", {}, el("strong", {}, shortEvent(e.event)), " ",
        badge(e.status, STATUS_KIND[e.status] || "neutral"), " ",
        el("span", { class: "when" }, time(e.received_at))),
      el("div", { class: "muted small mono" }, e.key),
      (e.plugins || []).filter((o) => o.outcome !== "filtered").map((o) => el("div", { class: "outcome" },
        el("strong", {}, o.plugin), badge(o.outcome, OUTCOME_KIND[o.outcome] || "neutral"),
        el("span", { class: "muted small" }, `${o.actions} action(s) · ${micros(o.elapsed_us)}`),
        o.reason ? el("span", { class: "error small" }, o.reason) : null,
        (o.rejected || []).map((r) => el("div", { class: "error small" }, r)),
        (o.calls || []).map(callRow),
      )),
      (e.plugins || []).some((o) => (o.calls || []).length > 0) ? journalDetails(e.key) : null,
      (actionsBySeq.get(e.seq) || []).map(actionRow),
    ))),
  );
}

// One outbound HTTP call of a plugin's turn, as the event records it.
function callRow(call) {
  const result = call.refused
    ? el("span", { class: "error small" }, `refused: ${call.refused.kind}: ${call.refused.message}`)
    : badge(String(call.status), call.status < 400 ? "ok" : "warn");
  return el("div", { class: "call-row small" },
    el("span", { class: "mono" }, `#${call.call} ${call.method} ${call.url}`), " ", result,
    el("span", { class: "muted" }, ` ${call.elapsed_ms} ms${call.replayed ? " · replayed from the journal" : ""}`));
}

// The event's journal (requests as written, responses as received; no
// secret is ever in it), fetched when opened.
function journalDetails(key) {
  const body = el("div", {}, el("p", { class: "muted small" }, "loading…"));
  const details = el("details", { class: "journal" }, el("summary", { class: "small" }, "HTTP journal"), body);
  details.addEventListener("toggle", async () => {
    if (!details.open || details.dataset.loaded) return;
    details.dataset.loaded = "1";
    try {
      const journal = await api("GET", "/admin/events/" + encodeURIComponent(key) + "/journal");
      body.replaceChildren(json(journal.calls));
    } catch (err) {
      body.replaceChildren(el("p", { class: "error small" }, String(err.message || err)));
    }
  });
  return details;
}

function describeRequest(action) {
  const body = action.body || {};
  if (action.path.includes("/attach/")) return "hand-off to " + (body.user_id || "an agent");
  const kind = body.type || (body.file ? "file" : "message");
  const to = body.send_to_third === false ? " (internal note)" : "";
  return kind + to;
}

function actionRow(action) {
  return el("div", { class: "action-row" },
    el("div", { class: "line" },
      badge(action.status, STATUS_KIND[action.status] || "neutral"),
      el("code", {}, `${action.method} ${action.path}`),
      el("span", {}, describeRequest(action)),
      el("span", { class: "muted small" }, `by ${action.plugin} · ${action.attempts} attempt(s)`),
      action.last_status ? badge("API " + action.last_status, action.last_status < 300 ? "ok" : "bad") : null,
    ),
    action.last_error ? el("div", { class: "error small" }, action.last_error) : null,
    el("details", {}, el("summary", {}, "request body"), json(action.body)),
  );
}

// ---- dead letters ----------------------------------------------------------

async function loadDeadLetters() {
  const rows = await api("GET", "/admin/dead-letters");
  $("#retry-all").disabled = rows.length === 0;
  fillTable($("#dead-table"), rows.map((d) => el("tr", { dataset: { id: d.id } },
    el("td", { class: "num" }, d.id),
    el("td", { class: "wrap" }, el("code", {}, d.conversation_id)),
    el("td", {}, d.plugin),
    el("td", { class: "wrap" }, el("code", {}, `${d.method} ${d.path}`),
      el("details", {}, el("summary", {}, describeRequest(d)), json(d.body))),
    el("td", { class: "num" }, d.attempts),
    el("td", {}, d.last_status ? badge(String(d.last_status), "bad") : "—"),
    el("td", { class: "wrap small" }, d.last_error || "—"),
    el("td", {}, el("button", {
      class: "small", type: "button",
      onclick: () => retry("/admin/dead-letters/" + d.id + "/retry"),
    }, "Retry")),
  )));
}

async function retry(path) {
  try {
    const result = await api("POST", path);
    toast(`Retrying ${result.retried} action(s).`);
    await loadDeadLetters();
  } catch (error) { fail(error); }
}

// ---- simulator -------------------------------------------------------------

function simName() {
  let name = sessionStorage.getItem(SIM_KEY);
  if (!name) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    name = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem(SIM_KEY, name);
  }
  return name;
}

let simStarted = false;
let simBusy = false;

async function openSimulator() {
  $("#sim-id").textContent = "conversation sim-" + simName();
  if (!simStarted) {
    simStarted = true;
    await newConversation();
  }
  $("#sim-input").focus();
}

async function newConversation() {
  $("#chat").replaceChildren();
  $("#sim-turn").replaceChildren(el("p", { class: "muted" }, "…"));
  const name = $("#sim-name").value.trim() || "Customer";
  chatLine(`New conversation with ${name}`, "ok");
  await simulate({ type: "new_conversation", customer_name: name });
}

function chatLine(text, kind) {
  const chat = $("#chat");
  chat.append(el("div", { class: "msg system" }, el("div", { class: "event-line " + (kind || "") }, text)));
  chat.scrollTop = chat.scrollHeight;
}

function customerSays(content) {
  const chat = $("#chat");
  chat.append(el("div", { class: "msg customer" }, el("div", { class: "bubble" }, content)));
  chat.scrollTop = chat.scrollHeight;
}

async function simulate(input) {
  if (simBusy) return;
  simBusy = true;
  for (const b of document.querySelectorAll("#sim-form button, #sim-new")) b.disabled = true;
  try {
    const turn = await api("POST", `/admin/simulator/${encodeURIComponent(simName())}/events`, input);
    renderTurn(turn);
  } catch (error) {
    chatLine(error.message, "bad");
    fail(error);
  } finally {
    simBusy = false;
    for (const b of document.querySelectorAll("#sim-form button, #sim-new")) b.disabled = false;
  }
}

// The conversation so far as a test file `digibot test` runs (JSON; `digibot
// test --record FILE.toml --simulator NAME` writes TOML or YAML).
async function saveAsTest() {
  const base = `/admin/simulator/${encodeURIComponent(simName())}/test`;
  let doc;
  try {
    doc = await api("GET", base);
  } catch (error) {
    if (!/name the plugin/.test(error.message)) throw error;
    const plugin = window.prompt(error.message.replace(/^.*?: 400 /, "") + "\nPlugin:");
    if (!plugin) return;
    doc = await api("GET", `${base}?plugin=${encodeURIComponent(plugin.trim())}`);
  }
  const blob = new Blob([JSON.stringify(doc, null, 2) + "\n"], { type: "application/json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: `sim-${simName()}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(link.href);
  chatLine(`Saved as sim-${simName()}.json: run it with digibot test PLUGIN.wasm sim-${simName()}.json`, "ok");
}

function choose(type, id, title) {
  customerSays(title);
  simulate({ type, id, title });
}

// One action as the customer (or, for notes and hand-offs, an agent) sees it.
function renderAction(action) {
  switch (action.kind) {
    case "text":
      return el("div", { class: "bubble" },
        action.reply_to ? el("div", { class: "quote" }, "replying to " + action.reply_to) : null,
        action.body);
    case "buttons":
      return [
        el("div", { class: "bubble" },
          action.header ? el("div", { class: "header" }, action.header) : null, action.body),
        el("div", { class: "choices" }, action.buttons.map((b) => el("button", {
          class: "choice", type: "button", dataset: { choice: b.id },
          onclick: () => choose("button_reply", b.id, b.title),
        }, b.title))),
      ];
    case "list":
      return [
        el("div", { class: "bubble" },
          action.header ? el("div", { class: "header" }, action.header) : null, action.body),
        el("div", { class: "list-rows" },
          el("div", { class: "section" }, "☰ " + action.button),
          action.sections.map((s) => [
            s.title ? el("div", { class: "section" }, s.title) : null,
            s.rows.map((r) => el("button", {
              type: "button", dataset: { choice: r.id },
              onclick: () => choose("list_reply", r.id, r.title),
            }, r.title, r.description ? el("span", { class: "desc" }, r.description) : null)),
          ])),
      ];
    case "location": {
      const place = [action.name, action.address].filter(Boolean).join(", ");
      const url = `https://www.openstreetmap.org/?mlat=${action.latitude}&mlon=${action.longitude}`;
      return el("div", { class: "bubble location" }, el("span", { class: "tag" }, "location"),
        place ? el("div", {}, place) : null,
        el("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, `${action.latitude}, ${action.longitude}`));
    }
    case "location_request":
      return [
        el("div", { class: "bubble" }, action.body),
        el("div", { class: "choices" }, el("button", {
          class: "choice", type: "button", onclick: shareLocation,
        }, "Send my location")),
      ];
    case "file": {
      const label = action.file_name || action.url;
      return el("div", { class: "bubble file" }, el("span", { class: "tag" }, action.voice ? "voice note" : "file"),
        /^https?:\/\//.test(action.url)
          ? el("a", { href: action.url, target: "_blank", rel: "noopener noreferrer" }, label)
          : label);
    }
    case "note":
      return el("div", { class: "bubble note" }, el("span", { class: "tag" }, "internal note · agents only"), action.body);
    case "hand_off":
      return null; // shown as an event line
    default:
      return el("div", { class: "bubble" }, json(action));
  }
}

function renderTurn(turn) {
  const chat = $("#chat");
  let replies = 0;
  for (const plugin of turn.plugins) {
    if (plugin.outcome === "failed") {
      chatLine(`${plugin.plugin} failed: ${plugin.reason}`, "bad");
      continue;
    }
    for (const reply of plugin.replies) {
      replies += 1;
      if (reply.rejected) {
        chatLine(`not sent: ${reply.rejected}`, "bad");
        continue;
      }
      if (reply.action.kind === "hand_off") {
        const role = reply.action.as_handler ? "as the handler" : "as a participant";
        chatLine(`Hand-off: agent ${reply.action.user_id} joins ${role}`, "ok");
        continue;
      }
      chat.append(el("div", { class: "msg bot", dataset: { plugin: plugin.plugin, kind: reply.action.kind } },
        el("div", { class: "who" }, plugin.plugin), renderAction(reply.action)));
    }
  }
  if (replies === 0 && !turn.plugins.some((p) => p.outcome === "failed")) chatLine("(no reply)");
  chat.scrollTop = chat.scrollHeight;
  renderTurnDetails(turn);
}

function renderTurnDetails(turn) {
  $("#sim-turn").replaceChildren(el("div", {},
    el("p", { class: "muted small" }, `${shortEvent(turn.event)} in ${turn.conversation_id}`),
    turn.plugins.length === 0 ? el("p", { class: "muted" }, "No plugin is loaded.") : null,
    turn.plugins.map((p) => el("div", { class: "turn-plugin" },
      el("div", { class: "outcome" }, el("strong", {}, p.plugin), badge(p.outcome, OUTCOME_KIND[p.outcome] || "neutral"),
        el("span", { class: "muted small" }, `${p.version} · ${micros(p.elapsed_us)}`)),
      p.reason ? el("div", { class: "error small" }, p.reason) : null,
      p.replies.map((r) => r.request
        ? el("details", { open: true }, el("summary", {}, `${r.action.kind} → ${r.request.method} ${r.request.path}`), json(r.request.body))
        : el("div", { class: "error small" }, `${r.action.kind}: ${r.rejected}`)),
    )),
  ));
}

function shareLocation() {
  customerSays("Location: 33.5731, -7.5898");
  simulate({ type: "location", latitude: 33.5731, longitude: -7.5898 });
}

function sendText(event) {
  event.preventDefault();
  const input = $("#sim-input");
  const text = input.value;
  if (!text.trim() || simBusy) return;
  input.value = "";
  customerSays(text);
  simulate({ type: "text", text });
}

// ---- wiring ------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", signIn);
  $("#logout").addEventListener("click", signOut);
  $("#retry-all").addEventListener("click", () => retry("/admin/dead-letters/retry"));
  $("#sim-form").addEventListener("submit", sendText);
  $("#sim-new").addEventListener("click", () => newConversation().catch(fail));
  $("#sim-save").addEventListener("click", () => saveAsTest().catch((error) => {
    chatLine(error.message, "bad");
    fail(error);
  }));
  $("#sim-location").addEventListener("click", shareLocation);
  for (const button of document.querySelectorAll("[data-refresh]")) {
    button.addEventListener("click", () => load(button.dataset.refresh));
  }
  window.addEventListener("hashchange", () => {
    tokenFromLink();
    route();
  });
  tokenFromLink();
  route();
});

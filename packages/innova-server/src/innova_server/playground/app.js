// The Chatlaya playground: a front end written against the public HTTP API only,
// as one on another origin would be (there, add `credentials: "include"` to every fetch).
// No framework, no build step. Read it as a worked example of the protocol:
// fetch + ReadableStream to read SSE, the last event id kept to resume after a reload,
// stop, regenerate, edit-and-resend with sibling switching, feedback, search.
"use strict";

const RESUME_KEY = "chatlaya-playground:resume";  // {conversationId, messageId, lastEventId, text}
const $ = (id) => document.getElementById(id);

const state = {
  user: null,
  conversations: [],
  conversationId: null,
  messages: [],
  turn: null,            // the reply being streamed: {messageId, lastEventId, text, controller}
  // Routes of the conversation tree may be missing on an older server: learned from the
  // messages' fields, or from a 404 `not_found` / 405 answer, then their buttons hide.
  features: { search: null, tree: null, feedback: null, regenerate: null },
};

// -- HTTP ---------------------------------------------------------------------

function api(method, path, body, headers = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return fetch(path, init);
}

// `{code, message}` of an error answer (422 bodies are a list of field errors).
async function problem(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    const first = detail[0] || {};
    return { code: "validation", message: `${(first.loc || []).join(".")}: ${first.msg}`, fields: detail };
  }
  if (detail && detail.code) return detail;
  return { code: `http_${response.status}`, message: response.statusText };
}

// A route this server does not have (yet): the feature is hidden, nothing else breaks.
function missingRoute(response, detail) {
  return response.status === 405 || (response.status === 404 && detail.code === "not_found");
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function fail(response, what) {
  const detail = await problem(response);
  const retry = response.headers.get("Retry-After");
  say(`${what}: ${response.status} ${detail.code} — ${detail.message}${retry ? ` (retry after ${retry} s)` : ""}`, true);
  return detail;
}

// -- Server-Sent Events over fetch ---------------------------------------------

// Calls `onEvent({name, data, id})` for each event; true once `done` arrived, false when cut.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { name: "message", data: null, id: null };
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;  // `: ping` keeps the connection alive
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event.name = text;
          else if (field === "data") data.push(text);
          else if (field === "id") event.id = text;
        }
        if (!data.length) continue;
        event.data = JSON.parse(data.join("\n"));
        await onEvent(event);
        if (event.name === "done") return true;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// -- streaming a reply ----------------------------------------------------------

function saveTurn() {
  const t = state.turn;
  if (t && t.messageId) {
    localStorage.setItem(RESUME_KEY, JSON.stringify({
      conversationId: state.conversationId, messageId: t.messageId, lastEventId: t.lastEventId, text: t.text,
    }));
  }
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  document.documentElement.dataset.streaming = on ? "yes" : "no";
}

function bubbleText(messageId) {
  const li = document.querySelector(`#messages li[data-id="${messageId}"]`);
  return li ? li.querySelector(".text") : null;
}

// Reads a reply's stream into the page; `known` is the text already shown (a resume).
async function streamInto(response, known = "") {
  const turn = { messageId: null, lastEventId: null, text: known };
  state.turn = turn;
  setStreaming(true);
  let finished = false;
  try {
    finished = await readEvents(response, async (event) => {
      if (event.name === "start") {
        turn.messageId = event.data.message_id;
        $("model-info").textContent = `${event.data.provider} · ${event.data.model}`;
        if (event.data.conversation_id !== state.conversationId) {
          state.conversationId = event.data.conversation_id;
          loadConversations();
        }
        await loadMessages();  // the question and the reply (status `streaming`) are stored already
        const text = bubbleText(turn.messageId);
        if (text) text.textContent = turn.text;
      } else if (event.name === "token") {
        turn.text += event.data.text;
        const text = bubbleText(turn.messageId);
        if (text) text.textContent = turn.text;
      } else if (event.name === "error") {
        say(`The model failed: ${event.data.code} — ${event.data.message}`, true);
      } else if (event.name === "done") {
        say(`Reply ${event.data.finish_reason}` + (event.data.usage
          ? ` (${event.data.usage.prompt_tokens} + ${event.data.usage.completion_tokens} tokens)` : ""));
      }
      if (event.id) {
        turn.lastEventId = event.id;
        saveTurn();
      }
    });
  } catch (error) {
    say(`Connection lost: ${error.message}. Reload the page to resume.`, true);
  } finally {
    state.turn = null;
  }
  try {
    if (finished) {
      localStorage.removeItem(RESUME_KEY);
      await loadMessages();  // the stored reply: its final status, siblings, buttons
    } else if (turn.messageId) {
      say("The connection was cut before the end: reload the page to resume.", true);
    }
  } finally {
    setStreaming(false);  // only now: "not streaming" means the page shows the stored reply
  }
  return finished;
}

// After a reload: the reply we were reading, from the last event id we saw.
async function resumeStored() {
  const stored = JSON.parse(localStorage.getItem(RESUME_KEY) || "null");
  if (!stored || !stored.messageId) return false;
  if (stored.conversationId && stored.conversationId !== state.conversationId) {
    state.conversationId = stored.conversationId;
    renderConversations();
    await loadMessages();
  }
  const headers = stored.lastEventId ? { "Last-Event-ID": stored.lastEventId } : {};
  const response = await api("GET", `/chatlaya/messages/${stored.messageId}/events`, undefined, headers);
  if (!response.ok) {
    localStorage.removeItem(RESUME_KEY);
    await fail(response, "Resume");
    return false;
  }
  document.documentElement.dataset.resumedFrom = stored.lastEventId || "";
  say("Resuming the reply after the reload…");
  await streamInto(response, stored.lastEventId ? stored.text || "" : "");
  return true;
}

// A reply streaming elsewhere (another tab, device or host): follow it from its beginning.
async function followStreaming() {
  const last = state.messages[state.messages.length - 1];
  if (!last || last.role !== "assistant" || last.status !== "streaming" || state.turn) return;
  const response = await api("GET", `/chatlaya/messages/${last.id}/events`);
  if (response.ok) await streamInto(response);
}

async function send(content, editOf = null) {
  const body = { content };
  if (state.conversationId) body.conversation_id = state.conversationId;
  if (editOf) body.edit_of = editOf;
  const response = await api("POST", "/chatlaya/message", body);
  if (!response.ok) {
    const detail = await fail(response, "Send");
    if (editOf && response.status === 422 && (detail.fields || []).some((f) => (f.loc || []).includes("edit_of"))) {
      state.features.tree = false;
      say("This server cannot edit messages yet (no conversation tree).", true);
      renderMessages();
    }
    return false;
  }
  $("content").value = "";
  return streamInto(response);
}

async function regenerate(messageId) {
  const response = await api("POST", `/chatlaya/messages/${messageId}/regenerate`);
  if (!response.ok) {
    const detail = await fail(response, "Regenerate");
    if (missingRoute(response, detail)) { state.features.regenerate = false; renderMessages(); }
    return;
  }
  await streamInto(response);
}

async function stop() {
  if (!state.turn || !state.turn.messageId) return;
  const response = await api("POST", `/chatlaya/messages/${state.turn.messageId}/stop`);
  if (response.status !== 202) await fail(response, "Stop");
}

// -- conversations and messages ---------------------------------------------------

async function loadConversations() {
  const q = $("search").value.trim();
  const query = new URLSearchParams({ limit: "50" });
  if (q && state.features.search) query.set("q", q);
  const response = await api("GET", `/chatlaya/conversations?${query}`);
  if (!response.ok) return fail(response, "Conversations");
  state.conversations = (await response.json()).items;
  renderConversations();
  if (state.features.search === null && state.conversations.length) detectSearch();
}

// `q` is new: a server without it answers 422, or ignores it and lists everything.
async function detectSearch() {
  state.features.search = false;
  const probe = `no-such-title-${Math.random().toString(36).slice(2)}`;
  const response = await api("GET", `/chatlaya/conversations?limit=1&q=${probe}`);
  state.features.search = response.ok && (await response.json()).items.length === 0;
  $("search").hidden = !state.features.search;
  showFeatures();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title || "(sans titre)";
    li.dataset.id = c.id;
    li.classList.toggle("current", c.id === state.conversationId);
    li.addEventListener("click", () => selectConversation(c.id));
    return li;
  }));
}

async function selectConversation(id) {
  if (state.turn) return say("A reply is streaming: stop it or wait.", true);
  state.conversationId = id;
  renderConversations();
  await loadMessages();
  followStreaming();
}

async function loadMessages() {
  if (!state.conversationId) { state.messages = []; renderMessages(); return; }
  const query = new URLSearchParams({ conversation_id: state.conversationId, limit: "100" });
  const response = await api("GET", `/chatlaya/messages?${query}`);
  if (!response.ok) return fail(response, "Messages");
  state.messages = (await response.json()).items;
  const first = state.messages[0];
  if (first) {
    if (state.features.tree === null) state.features.tree = "sibling_ids" in first;
    if (state.features.feedback === null) state.features.feedback = "feedback" in first;
    if (state.features.regenerate === null) state.features.regenerate = state.features.tree;
  }
  renderMessages();
  showFeatures();
}

function button(label, title, onClick, on = false) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.classList.toggle("on", on);
  b.addEventListener("click", onClick);
  return b;
}

// "‹ 2 / 3 ›": the message's siblings (same parent); switching makes that branch current.
function siblingNav(message) {
  const ids = message.sibling_ids || [];
  if (ids.length < 2) return [];
  const at = ids.indexOf(message.id);
  const go = (to) => () => branchTo(ids[to]);
  const prev = button("‹", "previous version", go(at - 1));
  const next = button("›", "next version", go(at + 1));
  prev.disabled = at <= 0;
  next.disabled = at >= ids.length - 1;
  const where = document.createElement("span");
  where.className = "siblings";
  where.textContent = `${at + 1} / ${ids.length}`;
  return [prev, where, next];
}

async function branchTo(messageId) {
  if (state.turn) return;
  const response = await api("POST", `/chatlaya/conversations/${state.conversationId}/branch`, { message_id: messageId });
  if (!response.ok) {
    const detail = await fail(response, "Switch branch");
    if (missingRoute(response, detail)) { state.features.tree = false; renderMessages(); }
    return;
  }
  await loadMessages();
}

async function rate(message, rating) {
  const current = message.feedback && message.feedback.rating;
  const path = `/chatlaya/messages/${message.id}/feedback`;
  const response = current === rating ? await api("DELETE", path) : await api("PUT", path, { rating });
  if (!response.ok) {
    const detail = await fail(response, "Feedback");
    if (missingRoute(response, detail)) { state.features.feedback = false; renderMessages(); }
    return;
  }
  message.feedback = response.status === 204 ? null : (await response.json()).message.feedback;
  renderMessages();
}

function startEdit(li, message) {
  const form = document.createElement("form");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.value = message.content;
  area.rows = 3;
  const save = document.createElement("button");
  save.textContent = "Send edited";
  save.type = "submit";
  const cancel = button("Cancel", "keep the message", () => renderMessages());
  form.append(area, save, cancel);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (area.value.trim()) send(area.value, message.id);
  });
  li.querySelector(".text").replaceWith(form);
  area.focus();
}

function renderMessages() {
  const f = state.features;
  $("messages").replaceChildren(...state.messages.map((m) => {
    const li = document.createElement("li");
    li.className = `message ${m.role}`;
    li.classList.toggle("streaming", m.status === "streaming");
    li.dataset.id = m.id;
    li.dataset.status = m.status;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = m.content;
    const meta = document.createElement("div");
    meta.className = "meta";
    if (f.tree !== false) meta.append(...siblingNav(m));
    if (m.role === "user" && f.tree !== false && m.status !== "streaming") {
      meta.append(button("Edit", "edit and resend (a new branch)", () => startEdit(li, m)));
    }
    if (m.role === "assistant") {
      if (m.provider) meta.append(Object.assign(document.createElement("span"), { textContent: `${m.provider} · ${m.model}` }));
      if (m.status !== "complete") {
        const badge = document.createElement("span");
        badge.className = `badge ${m.status}`;
        badge.textContent = m.finish_reason ? `${m.status} (${m.finish_reason})` : m.status;
        meta.append(badge);
      }
      if (m.status !== "streaming") {
        if (f.regenerate !== false) meta.append(button("↻ Regenerate", "another reply to the same question", () => regenerate(m.id)));
        if (f.feedback !== false) {
          const rating = m.feedback && m.feedback.rating;
          meta.append(button("👍", "good reply", () => rate(m, "up"), rating === "up"),
                      button("👎", "bad reply", () => rate(m, "down"), rating === "down"));
        }
      }
    }
    li.append(text, meta);
    return li;
  }));
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function showFeatures() {
  const f = state.features;
  const off = Object.entries(f).filter(([, v]) => v === false).map(([k]) => k);
  $("features").textContent = off.length ? `not on this server: ${off.join(", ")}` : "";
}

// -- accounts -----------------------------------------------------------------------

async function showSignedIn(user) {
  state.user = user;
  $("user-info").textContent = user.name ? `${user.name} <${user.email}>` : user.email;
  $("auth").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  await loadConversations();
  const stored = JSON.parse(localStorage.getItem(RESUME_KEY) || "null");
  if (stored && stored.conversationId) state.conversationId = stored.conversationId;
  else if (state.conversations.length) state.conversationId = state.conversations[0].id;
  renderConversations();
  await loadMessages();
  document.documentElement.dataset.ready = "yes";
  if (!(await resumeStored())) await followStreaming();
}

function showSignedOut() {
  state.user = null;
  state.conversationId = null;
  $("auth").hidden = false;
  $("chat").hidden = true;
  $("logout").hidden = true;
  $("user-info").textContent = "";
}

async function authenticate(path) {
  const body = { email: $("email").value, password: $("password").value };
  if (path === "/auth/register" && $("name").value.trim()) body.name = $("name").value.trim();
  const response = await api("POST", path, body);
  if (!response.ok) return fail(response, path === "/auth/register" ? "Register" : "Sign in");
  say("");
  await showSignedIn((await response.json()).user);
}

async function start() {
  $("auth-form").addEventListener("submit", (e) => { e.preventDefault(); authenticate("/auth/login"); });
  $("register").addEventListener("click", () => authenticate("/auth/register"));
  $("logout").addEventListener("click", async () => {
    await api("POST", "/auth/logout");
    localStorage.removeItem(RESUME_KEY);
    showSignedOut();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = $("content").value;
    if (content.trim() && !state.turn) send(content);
  });
  $("content").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", stop);
  $("new-conversation").addEventListener("click", async () => {
    const response = await api("POST", "/chatlaya/conversations");
    if (!response.ok) return fail(response, "New conversation");
    state.conversationId = (await response.json()).conversation.id;
    await loadConversations();
    await loadMessages();
  });
  let searching = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searching);
    searching = setTimeout(loadConversations, 250);
  });
  const me = await api("GET", "/auth/me");
  if (me.ok) await showSignedIn((await me.json()).user);
  else showSignedOut();
  document.documentElement.dataset.ready = "yes";
}

start();

// Shared by the chat page and the dashboard: the API key (kept in sessionStorage: this tab only),
// authorised fetch, and a server-sent-events reader over fetch (EventSource cannot send a key).
"use strict";
const RT = window.RT || (window.RT = {});

RT.KEY_ITEM = "rtserve-api-key";
RT.apiKey = () => sessionStorage.getItem(RT.KEY_ITEM) || "";

RT.headers = (extra) => {
  const h = Object.assign({}, extra || {});
  const key = RT.apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
};

RT.fetch = (path, options) => {
  const opts = Object.assign({}, options || {});
  opts.headers = RT.headers(opts.headers);
  return fetch(path, opts);
};

// Resolves once the server accepts the key (asking for one in #key-dialog when it is needed).
// Returns the /v1/models body.
RT.ensureKey = async () => {
  for (;;) {
    const r = await RT.fetch("/v1/models");
    if (r.status !== 401) return r.ok ? r.json() : {data: []};
    await RT.askKey(RT.apiKey() ? "That key was refused. API key:" : "This server needs an API key:");
  }
};

RT.askKey = (message) => new Promise((resolve) => {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  dialog.hidden = false;
  input.value = "";
  input.focus();
  const form = document.getElementById("key-form");
  form.onsubmit = (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(RT.KEY_ITEM, input.value.trim());
    dialog.hidden = true;
    resolve();
  };
});

// Reads `data:` frames of a text/event-stream response body; calls onData(text) per frame.
RT.readSSE = async (response, onData) => {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) onData(data);
    }
  }
};

RT.el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
};

RT.ms = (v) => (v === null || v === undefined ? "–" : (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " ms");

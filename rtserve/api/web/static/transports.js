// How a chat turn reaches the server: SSE over fetch (/v1/chat/completions, Stop aborts the fetch) or the
// Realtime WebSocket (/v1/realtime, Stop sends response.cancel). Both feed a chat.js Turn: token(text),
// then finish(how) or refuse(status, error, retryMs, userText). `conv` is the page's conversation:
// {model, history, link}.
"use strict";
(function () {
  const RT = window.RT || (window.RT = {});

  function messagesFor(conv, system) {
    return (system ? [{role: "system", content: system}] : []).concat(conv.history);
  }

  RT.viaSSE = async function (turn, conv, s, userText) {
    const body = {model: conv.model, messages: messagesFor(conv, s.system), stream: true,
                  stream_options: {include_usage: true}};
    if (s.rt) body.rt = s.rt;
    if (s.maxTokens) body.max_tokens = s.maxTokens;
    const ctrl = new AbortController();
    turn.stop = () => ctrl.abort();
    try {
      const r = await RT.fetch("/v1/chat/completions", {method: "POST", body: JSON.stringify(body),
        headers: {"Content-Type": "application/json"}, signal: ctrl.signal});
      if (!r.ok) {
        const err = ((await r.json().catch(() => ({}))).error) || {};
        const retryMs = parseFloat(r.headers.get("retry-after-ms")) || parseFloat(r.headers.get("retry-after")) * 1000 || 0;
        if (r.status === 401) RT.askKey("This server needs an API key:");
        return turn.refuse(r.status, err, retryMs, userText);
      }
      await RT.readSSE(r, (data) => {
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) { turn.failed = true; return turn.say("Error: " + obj.error.message, "error"); }
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.delta && choice.delta.content) turn.token(choice.delta.content);
        if (choice && choice.finish_reason) turn.finishReason = choice.finish_reason;
        if (obj.usage) turn.cached = (obj.usage.prompt_tokens_details || {}).cached_tokens || 0;
        if (obj.rt) turn.rt = obj.rt;
      });
      turn.finish(turn.failed ? "error" : "done");
    } catch (e) {
      if (ctrl.signal.aborted) return turn.finish("stopped");
      if (turn.numTokens) { turn.say("Connection lost: " + e.message, "error"); return turn.finish("error"); }
      turn.refuse(0, {message: "connection failed: " + e.message}, 0, userText);
    }
  }

  // One WebSocket per conversation; opened (and the history replayed) on first use.
  async function realtimeLink(conv, system) {
    if (conv.link && conv.link.ws.readyState === WebSocket.OPEN && conv.link.system === system) return conv.link;
    if (conv.link) conv.link.ws.close();
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime";
    const key = RT.apiKey();
    const ws = new WebSocket(url, key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
    const link = {ws, system, turn: null};
    await new Promise((resolve, reject) => {
      ws.onmessage = (ev) => { if (JSON.parse(ev.data).type === "session.created") resolve(); };
      ws.onerror = () => reject(new Error("the WebSocket did not open"));
    });
    ws.onmessage = (ev) => onRealtimeEvent(conv, link, JSON.parse(ev.data));
    ws.onclose = () => { if (link.turn && !link.turn.ended) { link.turn.say("The WebSocket closed.", "error"); link.turn.finish("error"); } };
    if (system) ws.send(JSON.stringify({type: "session.update", session: {instructions: system}}));
    conv.link = link;
    return link;
  }

  function itemEvent(role, text) {
    return JSON.stringify({type: "conversation.item.create", item: {type: "message", role,
      content: [{type: role === "assistant" ? "output_text" : "input_text", text}]}});
  }

  function onRealtimeEvent(conv, link, ev) {
    const turn = link.turn;
    if (!turn || turn.ended) return;
    if (ev.type === "response.output_text.delta") turn.token(ev.delta);
    else if (ev.type === "error") {
      const err = ev.error || {};
      if (err.retry_after_ms) turn.pendingRefusal = err;
      else turn.say("Error: " + err.message, "error");
    } else if (ev.type === "response.done") {
      const resp = ev.response;
      turn.rt = resp.rt || null;
      turn.cached = resp.usage ? resp.usage.input_token_details.cached_tokens : null;
      const details = resp.status_details || {};
      // A refused turn left its question in the server's conversation: the next turn starts a new socket.
      if (turn.pendingRefusal || (resp.status === "failed" && (details.error || {}).code === "deadline_exceeded")) {
        link.ws.close();
        conv.link = null;
      }
      if (turn.pendingRefusal) return turn.refuse(429, turn.pendingRefusal, turn.pendingRefusal.retry_after_ms, turn.userText);
      if (resp.status === "failed" && (details.error || {}).code === "deadline_exceeded") {
        return turn.refuse(504, details.error, 0, turn.userText);
      }
      if (resp.status === "incomplete") turn.finishReason = details.reason === "deadline" ? "deadline" : "length";
      if (resp.status === "failed") turn.say("Error: " + ((details.error || {}).message || "failed"), "error");
      turn.finish(resp.status === "cancelled" ? "stopped" : resp.status === "failed" ? "error" : "done");
    }
  }

  RT.viaRealtime = async function (turn, conv, s, userText) {
    let link;
    try {
      const fresh = !(conv.link && conv.link.ws.readyState === WebSocket.OPEN && conv.link.system === s.system);
      link = await realtimeLink(conv, s.system);
      // A new socket starts with an empty conversation: replay everything said so far.
      const items = fresh ? conv.history : conv.history.slice(-1);
      for (const m of items) link.ws.send(itemEvent(m.role, m.content));
    } catch (e) {
      return turn.refuse(0, {message: e.message}, 0, userText);
    }
    link.turn = turn;
    turn.userText = userText;
    turn.stop = () => link.ws.send(JSON.stringify({type: "response.cancel"}));
    const response = {};
    if (s.rt) response.rt = s.rt;
    if (s.maxTokens) response.max_output_tokens = s.maxTokens;
    link.ws.send(JSON.stringify({type: "response.create", response}));
  }

  RT.closeRealtime = function (conv) {
    if (conv.link) { conv.link.ws.close(); conv.link = null; }
  };
})();

// The chat page: multi-turn chat over SSE (/v1/chat/completions) or WebSocket (/v1/realtime), with each
// answer's latency shown as it streams (TTFT, tok/s, the inter-token gaps against the ITL budget) and
// the server's `rt` report when it ends (class, budgets, verdict), plus cached prompt tokens.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = {model: "", history: [], active: null, link: null};

  const REASONS = {
    queue_full: "its queue is full",
    deadline_unattainable: "it predicts it could not meet this request's time budget",
  };

  function settings() {
    const num = (id) => { const v = parseFloat($(id).value); return v > 0 ? v : null; };
    const rt = {};
    if ($("rt-class").value) rt["class"] = $("rt-class").value;
    for (const [key, id] of [["ttft_ms", "ttft-ms"], ["itl_ms", "itl-ms"], ["deadline_ms", "deadline-ms"]]) {
      if (num(id) !== null) rt[key] = num(id);
    }
    return {transport: $("transport").value, rt: Object.keys(rt).length ? rt : null,
            maxTokens: num("max-tokens"), system: $("system").value.trim()};
  }

  function summarize() {
    const s = settings();
    const parts = [s.transport === "ws" ? "WebSocket" : "SSE", (s.rt && s.rt["class"]) || "default class"];
    if (s.rt && s.rt.ttft_ms) parts.push("TTFT ≤ " + s.rt.ttft_ms + " ms");
    if (s.rt && s.rt.itl_ms) parts.push("ITL ≤ " + s.rt.itl_ms + " ms");
    $("settings-summary").textContent = parts.join(" · ");
  }

  function addMessage(role, text) {
    const box = RT.el("article", "msg " + role);
    const body = RT.el("div", "body");
    if (role === "user") body.textContent = text; else RT.renderMarkdown(body, text);
    box.appendChild(body);
    $("messages").appendChild(box);
    box.scrollIntoView({block: "end"});
    return box;
  }

  // One answer: its DOM, its timing, and how it ended.
  class Turn {
    constructor(requested) {
      this.requested = requested || {};
      this.box = addMessage("assistant", "");
      this.box.dataset.state = "waiting";
      this.body = this.box.querySelector(".body");
      this.meta = RT.el("div", "meta");
      this.figs = {};
      for (const [name, label] of [["ttft", "TTFT"], ["tps", "tok/s"], ["tokens", "tokens"], ["itl", "ITL p99"],
                                   ["class", "class"], ["cached", "cached prompt"], ["verdict", "rt"]]) {
        const fig = RT.el("span", "fig fig-" + name);
        fig.appendChild(RT.el("b", null, label + " "));
        this.figs[name] = fig.appendChild(RT.el("span", "value", "–"));
        this.meta.appendChild(fig);
      }
      this.strip = RT.el("canvas", "gaps");
      this.strip.title = "gaps between tokens (bars) and the ITL budget (dashed)";
      this.notice = RT.el("div", "notice");
      this.notice.hidden = true;
      this.box.append(this.meta, this.strip, this.notice);
      this.history = state.history;  // the conversation this turn belongs to (a reset starts a new one)
      this.failed = false;
      this.text = "";
      this.t0 = performance.now();
      this.firstAt = null;
      this.lastAt = null;
      this.numTokens = 0;
      this.gaps = [];
      this.rt = null;
      this.cached = null;
      this.finishReason = null;
      this.ended = false;
      this.showClass(requested);
    }

    showClass(rt) {
      const b = (rt && rt.budget) || rt || {};
      const parts = [(rt && rt["class"]) || "default"];
      if (b.ttft_ms) parts.push("TTFT ≤ " + b.ttft_ms + " ms");
      if (b.itl_ms) parts.push("ITL ≤ " + b.itl_ms + " ms");
      if (b.deadline_ms) parts.push("deadline " + b.deadline_ms + " ms");
      this.figs["class"].textContent = parts.join(" · ");
    }

    itlBudget() {
      return (this.rt && this.rt.budget && this.rt.budget.itl_ms) || this.requested.itl_ms || null;
    }

    token(text) {
      const now = performance.now();
      if (this.firstAt === null) {
        this.firstAt = now;
        this.figs.ttft.textContent = RT.ms(now - this.t0);
        this.box.dataset.state = "streaming";
      } else {
        this.gaps.push(now - this.lastAt);
      }
      this.lastAt = now;
      this.numTokens += 1;
      this.text += text;
      RT.renderMarkdown(this.body, this.text);
      this.figs.tokens.textContent = String(this.numTokens);
      const secs = (now - this.firstAt) / 1000;
      if (secs > 0) this.figs.tps.textContent = ((this.numTokens - 1) / secs).toFixed(1);
      RT.drawGaps(this.strip, this.gaps, this.itlBudget());
      this.box.scrollIntoView({block: "end"});
    }

    say(text, kind) {
      this.notice.hidden = false;
      this.notice.className = "notice " + (kind || "");
      this.notice.textContent = text;
    }

    finish(how) {
      if (this.ended) return;
      this.ended = true;
      this.box.dataset.state = how;
      if (this.cached !== null) this.figs.cached.textContent = this.cached + " tokens";
      if (this.rt) {
        this.showClass(this.rt);
        if (this.rt.ttft_ms !== null) this.figs.ttft.textContent = RT.ms(this.rt.ttft_ms);
        this.figs.itl.textContent = RT.ms(this.rt.itl_ms && this.rt.itl_ms.p99);
        const v = this.figs.verdict;
        v.textContent = this.rt.dropped ? "dropped" : this.rt.deadline_met ? "met" : "missed " + this.rt.missed.join("+");
        v.parentNode.dataset.verdict = this.rt.dropped ? "dropped" : this.rt.deadline_met ? "met" : "missed";
      }
      if (this.finishReason === "deadline") {
        this.say("Cut short by its deadline: the next token could not arrive within this firm request's " +
                 "budget, so the server stopped the answer here rather than deliver it late.", "warn");
      } else if (this.finishReason === "length") {
        this.say("Stopped at the token limit.", "info");
      }
      if (how === "stopped") this.say("Stopped by you.", "info");
      RT.drawGaps(this.strip, this.gaps, this.itlBudget());
      if (this.text) this.history.push({role: "assistant", content: this.text});
      endTurn();
    }

    // A request that failed before any token; `retryMs` counts down before "Retry" is offered.
    refuse(status, error, retryMs, userText) {
      this.history.pop();  // the question goes back to the composer's retry, not into the history
      const code = error.code || "";
      if (status === 429 || status === 529 || retryMs) {
        const why = REASONS[code] || error.message || "it is overloaded";
        this.countdown("The server refused this request for now: " + why + ".", retryMs || 1000, userText);
      } else if (status === 504 || code === "deadline_exceeded") {
        const b = (this.rt && this.rt.budget) || this.requested;
        this.say("Dropped: this firm request could not get its first token within its TTFT budget" +
                 (b.ttft_ms ? " (" + b.ttft_ms + " ms)" : "") + ", so the server dropped it rather than answer " +
                 "late. Nothing was generated. Send it again, or choose the soft class, which answers late " +
                 "instead of not at all.", "error");
        this.offerRetry(userText, 0);
      } else {
        this.say("Error " + (status || "") + ": " + (error.message || "request failed"), "error");
        this.offerRetry(userText, 0);
      }
      this.ended = true;
      this.box.dataset.state = "error";
      endTurn();
    }

    countdown(prefix, retryMs, userText) {
      const until = performance.now() + retryMs;
      const tick = () => {
        const left = Math.max(0, Math.ceil((until - performance.now()) / 1000));
        this.say(prefix + (left > 0 ? " Retry in " + left + " s." : " You can retry now."), "warn");
        this.notice.dataset.retryIn = String(left);
        if (left > 0) setTimeout(tick, 250);
      };
      tick();
      this.offerRetry(userText, retryMs);
    }

    offerRetry(userText, afterMs) {
      const button = RT.el("button", "retry", "Retry");
      button.type = "button";
      button.disabled = afterMs > 0;
      if (afterMs > 0) setTimeout(() => { button.disabled = false; }, afterMs);
      button.onclick = () => { button.remove(); send(userText); };
      this.box.appendChild(button);
    }
  }

  function endTurn() {
    state.active = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }

  function send(text) {
    if (!text.trim() || state.active) return;
    const s = settings();
    addMessage("user", text);
    state.history.push({role: "user", content: text});
    const turn = new Turn(s.rt);
    state.active = turn;
    $("send").disabled = true;
    $("stop").disabled = false;
    (s.transport === "ws" ? RT.viaRealtime : RT.viaSSE)(turn, state, s, text);
  }

  function reset() {
    if (state.active && state.active.stop) state.active.stop();
    state.history = [];
    RT.closeRealtime(state);
    $("messages").replaceChildren();
  }

  async function init() {
    $("composer").onsubmit = (ev) => { ev.preventDefault(); const t = $("prompt").value; $("prompt").value = ""; send(t); };
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
    });
    $("stop").onclick = () => { if (state.active && state.active.stop) state.active.stop(); };
    $("reset").onclick = reset;
    for (const id of ["transport", "rt-class", "ttft-ms", "itl-ms", "deadline-ms"]) $(id).addEventListener("change", summarize);
    $("transport").addEventListener("change", () => { RT.closeRealtime(state); });
    const models = await RT.ensureKey();
    state.model = (models.data && models.data[0] && models.data[0].id) || "";
    $("model").textContent = state.model;
    document.body.dataset.ready = "1";
  }

  init();
})();

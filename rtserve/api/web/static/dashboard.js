// The dashboard: reads /stats/stream (one fetch-based SSE connection, so it can carry the API key) and
// draws the last two minutes of points as small time-series plots.
"use strict";
(function () {
  const MAX_POINTS = 120;
  const points = [];
  const pct = (v) => (v === null || v === undefined ? null : 100 * v);
  const PLOTS = [
    {id: "requests", title: "Requests", series: [["running", (p) => p.running], ["waiting", (p) => p.waiting]]},
    {id: "kv", title: "KV cache use %", max: 100, series: [["used", (p) => pct(p.kv_usage)]]},
    {id: "prefix", title: "Prefix-cache hit rate % (1 min)", max: 100, series: [["hits", (p) => pct(p.prefix_hit_rate)]]},
    {id: "tps", title: "Tokens / s", series: [["generated", (p) => p.tokens_per_s]]},
    {id: "ttft", title: "TTFT ms (1 min)", series: [["p50", (p) => p.ttft_ms.p50], ["p99", (p) => p.ttft_ms.p99]]},
    {id: "itl", title: "ITL ms (1 min)", series: [["p50", (p) => p.itl_ms.p50], ["p99", (p) => p.itl_ms.p99]]},
    {id: "slo", title: "SLO attainment % (1 min)", max: 100,
     series: ["firm", "soft", "batch"].map((c) => [c, (p) => pct(p.slo_attainment[c])])},
    {id: "events", title: "Rejections, drops, preemptions (total)",
     series: [["rejected", (p) => p.rejections], ["dropped", (p) => p.drops], ["preempted", (p) => p.preemptions]]},
  ];

  function fmt(v) {
    return v === null || v === undefined ? "–" : String(+v.toFixed(v >= 100 ? 0 : 2));
  }

  function build() {
    const root = document.getElementById("plots");
    for (const plot of PLOTS) {
      const card = RT.el("section", "plot");
      card.id = "plot-" + plot.id;
      card.appendChild(RT.el("h2", null, plot.title));
      plot.canvas = card.appendChild(RT.el("canvas"));
      const legend = card.appendChild(RT.el("div", "legend"));
      plot.values = plot.series.map(([label], k) => {
        const item = legend.appendChild(RT.el("span", "series"));
        item.style.color = RT.COLORS[k % RT.COLORS.length];
        item.appendChild(RT.el("span", null, label + " "));
        return item.appendChild(RT.el("b", "value", "–"));
      });
      plot.card = card;
      root.appendChild(card);
    }
  }

  function draw() {
    const ts = points.map((p) => p.t);
    for (const plot of PLOTS) {
      const series = plot.series.map(([label, get]) => ({label, values: points.map(get)}));
      RT.drawSeries(plot.canvas, ts, series, plot.max);
      series.forEach((s, k) => { plot.values[k].textContent = fmt(s.values[s.values.length - 1]); });
      plot.card.dataset.points = String(points.length);
    }
  }

  function onPoint(data) {
    const p = JSON.parse(data);
    if (points.length && p.t <= points[points.length - 1].t) return;  // a replayed point already drawn
    points.push(p);
    if (points.length > MAX_POINTS) points.shift();
    draw();
  }

  async function connect() {
    const conn = document.getElementById("conn");
    for (;;) {
      try {
        const r = await RT.fetch("/stats/stream");
        if (r.status === 401) { await RT.askKey("This server needs an API key:"); continue; }
        if (!r.ok) throw new Error("HTTP " + r.status);
        conn.textContent = "live";
        await RT.readSSE(r, onPoint);
      } catch (e) {
        conn.textContent = "reconnecting (" + e.message + ")";
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function init() {
    build();
    const models = await RT.ensureKey();
    document.getElementById("model").textContent = (models.data && models.data[0] && models.data[0].id) || "";
    document.body.dataset.ready = "1";
    connect();
  }

  window.addEventListener("resize", draw);
  init();
})();

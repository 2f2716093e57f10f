// Tiny canvas plots: a time-series chart (dashboard) and an inter-token gap strip (chat page).
"use strict";
(function () {
  const RT = window.RT || (window.RT = {});
  RT.COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];

  function fitCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300, h = canvas.clientHeight || 80;
    if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return {ctx, w, h};
  }

  // series: [{label, values: [number|null]}] over the shared times `ts` (seconds); fixedMax: y-axis top.
  RT.drawSeries = function (canvas, ts, series, fixedMax) {
    const {ctx, w, h} = fitCanvas(canvas);
    const pad = 4, span = Math.max(60, (ts[ts.length - 1] || 0) - (ts[0] || 0));
    let top = fixedMax || 0;
    if (!fixedMax) for (const s of series) for (const v of s.values) if (v !== null && v > top) top = v;
    top = top > 0 ? top * (fixedMax ? 1 : 1.15) : 1;
    ctx.strokeStyle = "#e5e7eb";
    ctx.beginPath(); ctx.moveTo(0, h - pad); ctx.lineTo(w, h - pad); ctx.stroke();
    const t0 = (ts[ts.length - 1] || 0) - span;
    series.forEach((s, k) => {
      ctx.strokeStyle = RT.COLORS[k % RT.COLORS.length];
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        const x = ((ts[i] - t0) / span) * (w - 2 * pad) + pad;
        const y = h - pad - (v / top) * (h - 2 * pad);
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#6b7280";
    ctx.font = "10px sans-serif";
    ctx.fillText(String(+top.toPrecision(3)), 2, 10);
  };

  // gapsMs: client-measured gaps between tokens; budgetMs: the ITL budget (dashed line) or null.
  RT.drawGaps = function (canvas, gapsMs, budgetMs) {
    const {ctx, w, h} = fitCanvas(canvas);
    const top = Math.max(budgetMs ? budgetMs * 1.5 : 0, ...gapsMs, 1);
    const bar = Math.max(1, Math.min(6, w / Math.max(gapsMs.length, 1)));
    const start = Math.max(0, gapsMs.length - Math.floor(w / bar));
    gapsMs.slice(start).forEach((g, i) => {
      ctx.fillStyle = budgetMs && g > budgetMs ? "#dc2626" : "#2563eb";
      const bh = Math.max(1, (Math.min(g, top) / top) * (h - 2));
      ctx.fillRect(i * bar, h - bh, Math.max(1, bar - 1), bh);
    });
    if (budgetMs) {
      const y = h - (budgetMs / top) * (h - 2);
      ctx.strokeStyle = "#f59e0b";
      ctx.setLineDash([4, 3]);
      ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
      ctx.setLineDash([]);
    }
  };
})();

// One metric against step (uPlot). The data comes from the gateway's series endpoint with
// max_points = the plot's width in pixels: buckets of min/max/last from the rollups, so a run of
// a million steps is ~1000 points here and a one-step spike still shows (the min/max band).
// Live points from the metrics stream are appended as they come; once more than twice the
// width has been appended the series is fetched again, so the chart never holds much more than
// a few thousand points. Drag to zoom (the zoomed range is fetched again at full resolution for
// its width), double-click or "reset zoom" to go back to the whole run.
//
// Marks (vertical lines): attempt boundaries (dashed, at the step each attempt resumed from) and
// live changes (solid: a new learning rate, a new number of epochs), from the run page.

import { api } from "./api.js";
import { h, num } from "./dom.js";

export const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
export const MARK_COLORS = { attempt: "#ea580c", lr: "#9333ea", epochs: "#0d9488" };
const HEIGHT = 200;

function alpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

export function keyPath(key) {
  return key.split("/").map(encodeURIComponent).join("/");
}

export class MetricChart {
  // marks(): the run's marks now, [{step, kind: attempt|lr|epochs, label}]
  constructor(runId, key, color, marks) {
    this.runId = runId;
    this.key = key;
    this.color = color;
    this.marks = marks;
    this.x = [];
    this.last = [];
    this.min = [];
    this.max = [];
    this.zoom = null;
    this.pending = [];
    this.loading = 0;
    this.loadSeq = 0;
    this.appended = 0;
    this.source = "";
    this.raf = 0;
    this.reloadTimer = null;
    this.u = null;
    this.caption = h("span", { class: "caption muted" });
    this.resetBtn = h("button", { class: "link reset-zoom", hidden: true, onclick: () => this.resetZoom() }, "reset zoom");
    this.plot = h("div", { class: "plot" });
    this.el = h(
      "div",
      { class: "chart", dataset: { key } },
      h("div", { class: "chart-head" }, h("strong", {}, key), this.caption, this.resetBtn),
      this.plot,
    );
  }

  width() {
    return Math.max(240, Math.floor(this.plot.clientWidth || this.el.clientWidth || 600));
  }

  mount() {
    const w = this.width();
    const opts = {
      width: w,
      height: HEIGHT,
      scales: { x: { time: false } },
      legend: { show: false },
      cursor: {
        drag: { x: true, y: false, setScale: false },
        bind: { dblclick: () => () => (this.resetZoom(), null) },
      },
      series: [
        { label: "step", value: (u, v) => (v == null ? "-" : String(v)) },
        { label: "value", stroke: this.color, width: 1.5, value: (u, v) => num(v) },
        { label: "min", stroke: alpha(this.color, 0.3), width: 1, points: { show: false }, value: (u, v) => num(v) },
        { label: "max", stroke: alpha(this.color, 0.3), width: 1, points: { show: false }, value: (u, v) => num(v) },
      ],
      bands: [{ series: [3, 2], fill: alpha(this.color, 0.12) }],
      axes: [{}, { size: 64, values: (u, vals) => vals.map((v) => num(v)) }],
      hooks: {
        setSelect: [(u) => this.onSelect(u)],
        setCursor: [(u) => this.onCursor(u)],
        draw: [(u) => this.drawMarks(u)],
      },
    };
    this.u = new uPlot(opts, [this.x, this.last, this.min, this.max], this.plot);
    this.resize = new ResizeObserver(() => {
      const nw = this.width();
      if (!this.u || Math.abs(nw - this.u.width) < 2) return;
      const grew = nw > this.u.width * 1.25;
      this.u.setSize({ width: nw, height: HEIGHT });
      if (grew) this.reloadSoon(300);
    });
    this.resize.observe(this.plot);
  }

  destroy() {
    cancelAnimationFrame(this.raf);
    clearTimeout(this.reloadTimer);
    if (this.resize) this.resize.disconnect();
    if (this.u) this.u.destroy();
    this.u = null;
  }

  // Fetch the series for the current view: the whole run, or the zoomed range.
  async load() {
    const seq = ++this.loadSeq;
    this.loading++;
    try {
      const s = await api(`/runs/${this.runId}/metrics/${keyPath(this.key)}/series`, {
        query: {
          max_points: this.width(),
          start: this.zoom ? Math.floor(this.zoom.min) : undefined,
          end: this.zoom ? Math.ceil(this.zoom.max) : undefined,
        },
      });
      if (seq !== this.loadSeq || !this.u) return;
      this.x = s.last_step;
      this.last = s.last;
      this.min = s.min;
      this.max = s.max;
      this.source = s.source;
      this.appended = 0;
    } finally {
      this.loading--;
    }
    if (seq !== this.loadSeq) return;
    const held = this.pending;
    this.pending = [];
    for (const [steps, values] of held) this.append(steps, values, false);
    this.draw(true);
  }

  // Live points, in step order (one history: an attempt's points start after where it resumed).
  append(steps, values, redraw = true) {
    if (this.loading) {
      this.pending.push([steps, values]);
      return;
    }
    if (this.zoom) {
      this.behind = true; // the zoomed view stays put; reset zoom shows the new points
      return;
    }
    let lastStep = this.x.length ? this.x[this.x.length - 1] : -Infinity;
    for (let i = 0; i < steps.length; i++) {
      if (steps[i] <= lastStep) continue;
      const v = typeof values[i] === "number" ? values[i] : null;
      this.x.push(steps[i]);
      this.last.push(v);
      this.min.push(v);
      this.max.push(v);
      lastStep = steps[i];
      this.appended++;
    }
    if (this.appended > 2 * this.width()) this.reloadSoon(500);
    if (redraw) this.draw(false);
  }

  reloadSoon(ms = 1000) {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.load().catch(() => {}), ms);
  }

  // Redraw at most once a frame, however fast points arrive.
  draw(now) {
    const go = () => {
      this.raf = 0;
      if (!this.u) return;
      this.u.setData([this.x, this.last, this.min, this.max], !this.zoom);
      if (this.zoom) this.u.setScale("x", { min: this.zoom.min, max: this.zoom.max });
      this.updateCaption();
    };
    if (now) {
      cancelAnimationFrame(this.raf);
      go();
    } else if (!this.raf) {
      this.raf = requestAnimationFrame(go);
    }
  }

  redrawMarks() {
    if (this.u) this.u.redraw(false, false);
  }

  updateCaption() {
    const n = this.x.length;
    const lastStep = n ? this.x[n - 1] : null;
    const lastValue = n ? this.last[n - 1] : null;
    this.caption.textContent = n
      ? `step ${lastStep} · ${num(lastValue)} · ${n} points${this.source && this.source !== "raw" ? ` (${this.source})` : ""}`
      : "no points yet";
    this.el.dataset.lastStep = lastStep ?? "";
    this.el.dataset.points = String(n);
    this.el.dataset.source = this.source;
    this.el.dataset.zoomed = this.zoom ? "1" : "";
    this.resetBtn.hidden = !this.zoom;
  }

  // Hovering shows the bucket under the cursor (its last value, and its min..max when it holds several).
  onCursor(u) {
    const i = u.cursor.idx;
    if (i == null || i >= this.x.length) return this.updateCaption();
    const lo = this.min[i];
    const hi = this.max[i];
    const band = lo != null && hi != null && lo !== hi ? ` (min ${num(lo)}, max ${num(hi)})` : "";
    this.caption.textContent = `step ${this.x[i]} · ${num(this.last[i])}${band}`;
  }

  onSelect(u) {
    if (u.select.width < 3) return;
    const min = u.posToVal(u.select.left, "x");
    const max = u.posToVal(u.select.left + u.select.width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    if (!(max > min)) return;
    this.zoom = { min, max };
    u.setScale("x", { min, max }); // at once, with the points we have; then the range at full detail
    this.updateCaption();
    this.load().catch(() => {});
  }

  resetZoom() {
    if (!this.zoom) return;
    this.zoom = null;
    this.behind = false;
    this.load().catch(() => {});
  }

  drawMarks(u) {
    const marks = this.marks();
    const drawn = { attempt: [], lr: [], epochs: [] };
    if (!marks.length) {
      this.el.dataset.marks = "";
      return;
    }
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const px = uPlot.pxRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.font = `${Math.round(11 * px)}px system-ui, sans-serif`;
    let row = 0;
    for (const m of marks) {
      const x = Math.round(u.valToPos(m.step, "x", true));
      if (!(x >= left && x <= left + width)) continue;
      const color = MARK_COLORS[m.kind] || "#111";
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = (m.kind === "attempt" ? 2 : 1.5) * px;
      ctx.setLineDash(m.kind === "attempt" ? [6 * px, 4 * px] : []);
      ctx.beginPath();
      ctx.moveTo(x + 0.5, top);
      ctx.lineTo(x + 0.5, top + height);
      ctx.stroke();
      ctx.fillText(m.label, x + 4 * px, top + (12 + 13 * (row++ % 3)) * px);
      drawn[m.kind]?.push(m.step);
    }
    ctx.restore();
    this.el.dataset.marks = Object.entries(drawn)
      .filter(([, v]) => v.length)
      .map(([k, v]) => `${k}:${v.join("/")}`)
      .join(" ");
  }
}

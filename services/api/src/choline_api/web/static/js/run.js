// One run: what it is and costs, live charts of every metric, live logs, the controls, attempts,
// findings and checkpoints.
//
// Live data comes over two EventSource streams opened with a stream token (EventSource cannot
// send the bearer header): the logs from the start of the run, the metrics from the newest point
// already charted (so a long run is never replayed point by point). A stream whose token expired
// is reopened with a new token where it stopped. The run itself (state, cost, attempts) is polled
// every few seconds and at once when a stream reports a new state or a new attempt.

import { api, ApiError } from "./api.js";
import { COLORS, MARK_COLORS, MetricChart, keyPath } from "./chart.js";
import {
  TERMINAL,
  bytes,
  clear,
  clock,
  confirmDialog,
  h,
  money,
  num,
  runDuration,
  section,
  stateBadge,
  table,
  toast,
  when,
  fill,
} from "./dom.js";

const POLL_MS = 4000;
const SLOW_POLL_MS = 10000;
const MAX_LOG_LINES = 3000;
const MARK_KEYS = { "control/lr": "lr", "control/epochs": "epochs" };

function chartOrder(a, b) {
  const rank = (k) => (k.startsWith("train/") ? 0 : k.startsWith("val/") ? 1 : k === "lr" ? 2 : k === "epoch" ? 4 : 3);
  return rank(a) - rank(b) || a.localeCompare(b);
}

export async function render(main, [runId], { navigate }) {
  let run;
  try {
    run = await api(`/runs/${runId}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      main.append(section("No such run", h("p", {}, `There is no run ${runId} (or it is not yours). `), h("a", { href: "/ui/runs", "data-link": true }, "All runs")));
      return null;
    }
    throw e;
  }

  let gone = false;
  const timers = [];
  const charts = new Map();
  const controlMarks = []; // [{step, kind, value}] from control/* points
  let attemptsSig = "";

  // ---------------------------------------------------------------- layout
  const head = h("div", { id: "run-head" });
  const controls = h("div", { id: "controls", class: "controls" });
  const chartGrid = h("div", { class: "charts", id: "charts" }, h("p", { class: "muted", id: "charts-empty" }, "No metrics yet."));
  const markLegend = h("ul", { class: "mark-legend", id: "marks" });
  const logBox = h("div", { class: "logs", id: "logs", tabindex: "0" });
  const logState = h("span", { class: "muted", id: "logs-state" }, "connecting...");
  const attemptsBox = h("div", { id: "attempts" });
  const findingsBox = h("div", { id: "findings" });
  const checkpointsBox = h("div", { id: "checkpoints" });
  const artifactsBox = h("div", { id: "artifacts" });
  main.append(
    h("section", { class: "panel" }, head, controls),
    h("section", { class: "panel" }, h("div", { class: "toolbar" }, h("h2", {}, "Metrics"), markLegend), chartGrid),
    h("section", { class: "panel" }, h("div", { class: "toolbar" }, h("h2", {}, "Logs"), logState), logBox),
    section("Attempts", attemptsBox),
    section("Findings", findingsBox),
    section("Checkpoints", checkpointsBox),
    section("Artifacts", artifactsBox),
  );

  // ---------------------------------------------------------------- the run, controls, attempts
  function renderHead() {
    const spec = run.spec;
    fill(head, 
      h(
        "div",
        { class: "run-title" },
        h("h1", {}, run.name || spec.script),
        stateBadge(run.state),
        h("code", { class: "muted", id: "run-id" }, run.run_id),
      ),
      run.reason ? h("p", { class: "reason", id: "run-reason" }, run.reason) : null,
      h(
        "dl",
        { class: "facts" },
        fact("Script", h("code", {}, [spec.script, ...(spec.args || [])].join(" "))),
        fact("GPUs", run.gpus || spec.gpus || "-"),
        fact("Provider", run.provider || spec.provider || "-"),
        fact("Cost so far", h("span", { id: "run-cost" }, money(run.cost))),
        fact("Duration", runDuration(run)),
        fact("Attempts", String(run.attempts.length)),
        fact("Owner", run.owner),
        fact("Created", when(run.created_at)),
      ),
    );
  }

  function fact(label, value) {
    return [h("dt", {}, label), h("dd", {}, value)];
  }

  const lastCheckpointStep = () => {
    const a = run.attempts;
    return a.length ? a[a.length - 1].last_step : null;
  };

  function renderControls() {
    const s = run.state;
    const ended = TERMINAL.has(s);
    const can = {
      pause: !ended && !["paused", "pausing", "finishing"].includes(s),
      resume: s === "paused",
      stop: !ended && s !== "finishing",
      cancel: !ended,
      set: s === "running",
    };
    const lr = h("input", { id: "lr-input", type: "text", placeholder: "3e-4 or *0.5", size: 10, disabled: !can.set });
    const epochs = h("input", { id: "epochs-input", type: "number", min: 1, step: 1, value: 5, disabled: !can.set, style: "width:5em" });
    const btn = (id, label, ok, onclick, cls = "secondary") =>
      h("button", { id, class: cls, disabled: !ok, onclick }, label);
    fill(controls, 
      h(
        "div",
        { class: "control-row" },
        btn("pause", "Pause", can.pause, () =>
          send("pause", {}, {
            title: `Pause ${run.run_id}?`,
            body: "The box saves a checkpoint and is released, so billing stops. Resume continues from that checkpoint on a new box.",
            confirm: "Pause",
          }),
        ),
        btn("resume", "Resume", can.resume, () =>
          send("resume", {}, {
            title: `Resume ${run.run_id}?`,
            body: `A new attempt rents a box and continues from the last checkpoint${lastCheckpointStep() != null ? ` (step ${lastCheckpointStep()})` : ""}.`,
            confirm: "Resume",
          }), "primary"),
        btn("stop", "Stop", can.stop, () =>
          send("stop", {}, {
            title: `Stop ${run.run_id}?`,
            body: "Training ends now with a final checkpoint; the results come back as for a finished run.",
            confirm: "Stop",
            danger: true,
          }),
        ),
        btn("cancel", "Cancel", can.cancel, () =>
          send("cancel", {}, {
            title: `Cancel ${run.run_id}?`,
            body: "The run stops at once, without a final checkpoint, and the box is destroyed. This cannot be undone.",
            confirm: "Cancel the run",
            danger: true,
          }), "danger"),
      ),
      h(
        "form",
        { class: "control-row", id: "lr-form", onsubmit: (e) => {
          e.preventDefault();
          const v = lr.value.trim();
          const value = /^\*/.test(v) ? v : Number(v);
          if (!(typeof value === "string" ? /^\*\d*\.?\d+(e-?\d+)?$/i.test(v) : isFinite(value) && value > 0)) {
            toast("The learning rate is a positive number (3e-4), or *0.5 to scale it.", "error");
            return;
          }
          send("set", { lr: value }, {
            title: `Change the learning rate of ${run.run_id}?`,
            body: `New learning rate: ${v}. The training library applies it at its next step (and again if the run resumes); the charts mark the step.`,
            confirm: "Change",
          });
        } },
        h("label", { for: "lr-input" }, "Learning rate"),
        lr,
        h("button", { type: "submit", class: "secondary", id: "set-lr", disabled: !can.set }, "Set"),
      ),
      h(
        "form",
        { class: "control-row", id: "epochs-form", onsubmit: (e) => {
          e.preventDefault();
          const n = parseInt(epochs.value, 10);
          if (!(n >= 1)) {
            toast("Extend by a whole number of epochs (1 or more).", "error");
            return;
          }
          send("set", { epochs: `+${n}` }, {
            title: `Extend ${run.run_id} by ${n} epoch${n === 1 ? "" : "s"}?`,
            body: "The training library raises its number of epochs (a schedule that cannot change length refuses; the logs say so).",
            confirm: "Extend",
          });
        } },
        h("label", { for: "epochs-input" }, "Extend by"),
        epochs,
        h("span", {}, "epochs"),
        h("button", { type: "submit", class: "secondary", id: "extend", disabled: !can.set }, "Extend"),
      ),
    );
  }

  async function send(action, params, dialog) {
    if (!(await confirmDialog(dialog))) return;
    try {
      await api(`/runs/${runId}/control`, { method: "POST", body: { action, params } });
      const what = action === "set" ? Object.entries(params).map(([k, v]) => `${k}=${v}`).join(" ") : action;
      toast(`Sent ${what} to ${runId}.`);
      setTimeout(refreshRun, 500);
    } catch (e) {
      toast(e.message, "error");
    }
  }

  function renderAttempts() {
    fill(attemptsBox, 
      table(
        [
          { label: "#", cell: (a) => String(a.attempt), class: "num" },
          { label: "Box", cell: (a) => h("code", {}, a.box_id || "-") },
          { label: "Where", cell: (a) => [a.provider || "-", a.host ? ` · ${a.host}` : ""] },
          { label: "$/h", cell: (a) => (a.price_per_hour == null ? "-" : money(a.price_per_hour)), class: "num" },
          { label: "Started", cell: (a) => clock(a.started_at) },
          { label: "Ended", cell: (a) => clock(a.ended_at) },
          {
            label: "Why it ended",
            cell: (a) => [
              a.end_reason || (a.ended_at ? "-" : "running"),
              a.exit_code != null ? ` (exit ${a.exit_code})` : "",
              a.error ? h("pre", { class: "error-tail" }, a.error) : null,
            ],
          },
          { label: "Resumed from", cell: (a) => (a.resumed_from_step ? `step ${a.resumed_from_step}` : "start"), class: "num" },
          { label: "Last step", cell: (a) => (a.last_step == null ? "-" : String(a.last_step)), class: "num" },
          { label: "Cost", cell: (a) => money(a.cost), class: "num" },
        ],
        run.attempts.map((a) => ({ ...a, _attrs: { "data-attempt": a.attempt } })),
        { empty: "No attempt yet: the run is waiting for a box.", id: "attempts-table" },
      ),
    );
  }

  async function refreshRun() {
    if (gone) return;
    try {
      run = await api(`/runs/${runId}`);
    } catch (e) {
      return;
    }
    if (gone) return;
    renderHead();
    renderControls();
    renderAttempts();
    const sig = run.attempts.map((a) => `${a.attempt}:${a.resumed_from_step}`).join(",");
    if (sig !== attemptsSig) {
      attemptsSig = sig;
      renderMarks();
      logBox.querySelectorAll(".attempt-sep").forEach(labelSeparator);
    }
    main.dataset.state = run.state;
  }

  // ---------------------------------------------------------------- marks and charts
  function marks() {
    const out = [];
    for (const a of run.attempts) {
      if (a.attempt > 1) out.push({ step: a.resumed_from_step || 0, kind: "attempt", label: `attempt ${a.attempt}` });
    }
    for (const m of controlMarks) {
      out.push({ step: m.step, kind: m.kind, label: m.kind === "lr" ? `lr ${num(m.value)}` : `epochs ${num(m.value)}` });
    }
    return out;
  }

  function renderMarks() {
    const all = marks();
    fill(markLegend, 
      all.map((m) =>
        h(
          "li",
          { dataset: { kind: m.kind, step: m.step } },
          h("span", { class: `swatch ${m.kind}`, style: `border-color:${MARK_COLORS[m.kind]}` }),
          m.kind === "attempt" ? `${m.label} from step ${m.step}` : `${m.label} at step ${m.step}`,
        ),
      ),
    );
    for (const c of charts.values()) c.redrawMarks();
  }

  function addControlPoints(key, steps, values) {
    const kind = MARK_KEYS[key];
    for (let i = 0; i < steps.length; i++) {
      if (!controlMarks.some((m) => m.kind === kind && m.step === steps[i])) {
        controlMarks.push({ kind, step: steps[i], value: values[i] });
      }
    }
    controlMarks.sort((a, b) => a.step - b.step);
    renderMarks();
  }

  function ensureChart(key) {
    if (key.startsWith("control/") || charts.has(key)) return charts.get(key);
    const empty = chartGrid.querySelector("#charts-empty");
    if (empty) empty.remove();
    const chart = new MetricChart(runId, key, COLORS[charts.size % COLORS.length], marks);
    charts.set(key, chart);
    const sorted = [...charts.keys()].sort(chartOrder);
    const after = sorted[sorted.indexOf(key) + 1];
    chartGrid.insertBefore(chart.el, after ? charts.get(after).el : null);
    chart.mount();
    return chart;
  }

  async function loadMarks() {
    const keys = Object.keys(MARK_KEYS);
    const page = await api(`/runs/${runId}/metrics`, { query: { key: keys, limit: 10000 } });
    const by = {};
    for (const p of page.points) (by[p.key] ||= [[], []]), by[p.key][0].push(p.step), by[p.key][1].push(p.value);
    for (const [k, [s, v]] of Object.entries(by)) addControlPoints(k, s, v);
  }

  // The newest point's cursor (attempt:seq), so the live stream starts where the charts end.
  async function latestCursor(keys) {
    if (!keys.length) return null;
    const probes = await Promise.all(
      keys.map((k) => api(`/runs/${runId}/metrics/${keyPath(k)}/series`, { query: { max_points: 1 } }).catch(() => null)),
    );
    const lastSteps = probes.filter((p) => p && p.last_step.length).map((p) => p.last_step[p.last_step.length - 1]);
    if (!lastSteps.length) return null;
    const page = await api(`/runs/${runId}/metrics`, { query: { after_step: Math.max(...lastSteps) - 1, limit: 10000 } });
    let best = null;
    for (const p of page.points) if (!best || p.attempt > best[0] || (p.attempt === best[0] && p.seq > best[1])) best = [p.attempt, p.seq];
    return best ? `${best[0]}:${best[1]}` : null;
  }

  async function loadCharts() {
    const { keys } = await api(`/runs/${runId}/metrics/keys`);
    const cursor = await latestCursor(keys);
    await loadMarks();
    const plain = keys.filter((k) => !k.startsWith("control/")).sort(chartOrder);
    for (const k of plain) ensureChart(k);
    await Promise.all(plain.map((k) => charts.get(k).load()));
    return cursor;
  }

  function reloadCharts() {
    for (const c of charts.values()) c.load().catch(() => {});
    loadMarks().catch(() => {});
  }

  // ---------------------------------------------------------------- live streams
  const streams = { logs: null, metrics: null };
  let lastLogId = 0;
  let metricCursor = null;
  let logAttempt = null;
  let ended = { logs: false, metrics: false };

  async function open(which) {
    if (gone || ended[which]) return;
    let st;
    try {
      st = await api(`/runs/${runId}/stream-token`, { method: "POST" });
    } catch (e) {
      timers.push(setTimeout(() => open(which), 3000));
      return;
    }
    if (gone) return;
    const url =
      which === "logs"
        ? `${st.logs_url}&after_id=${lastLogId}`
        : `${st.metrics_url}${metricCursor ? `&after=${metricCursor}` : ""}`;
    const es = new EventSource(url);
    streams[which] = es;
    es.addEventListener("open", () => {
      if (which === "logs") logState.textContent = "live";
    });
    es.addEventListener("error", () => {
      if (gone || ended[which]) return;
      if (which === "logs") logState.textContent = "reconnecting...";
      if (es.readyState === EventSource.CLOSED) {
        // refused (an expired stream token answers 401): a new token, from where we were
        streams[which] = null;
        timers.push(setTimeout(() => open(which), 1000));
      }
    });
    es.addEventListener("state", (e) => {
      const d = JSON.parse(e.data);
      if (d.state !== run.state) refreshRun();
    });
    es.addEventListener("end", () => {
      ended[which] = true;
      es.close();
      if (which === "logs") logState.textContent = "the run has ended";
      refreshRun();
      refreshSlow();
    });
    if (which === "logs") {
      es.addEventListener("line", (e) => {
        lastLogId = Math.max(lastLogId, Number(e.lastEventId) || 0);
        addLine(JSON.parse(e.data));
      });
    } else {
      es.addEventListener("points", (e) => {
        metricCursor = e.lastEventId || metricCursor;
        const pts = JSON.parse(e.data).points;
        for (const [key, col] of Object.entries(pts)) {
          if (key in MARK_KEYS) addControlPoints(key, col.step, col.value);
          else if (!key.startsWith("control/")) {
            const c = charts.get(key) || ensureChart(key);
            if (c.x.length || c.loading) c.append(col.step, col.value);
            else c.load().catch(() => {});
          }
        }
      });
      es.addEventListener("attempt", () => {
        // a new attempt: points after where it resumed are superseded; fetch the charts again
        refreshRun().then(reloadCharts);
      });
    }
  }

  // "attempt 2, resumed from step 275 on local:vm" (filled in once the attempt is known)
  function labelSeparator(sep) {
    const n = Number(sep.dataset.attempt);
    const a = run.attempts.find((x) => x.attempt === n);
    const from = a && a.resumed_from_step ? `, resumed from step ${a.resumed_from_step}` : "";
    const where = a && a.host ? ` on ${a.host}` : "";
    sep.textContent = `attempt ${n}${from}${where}`;
  }

  function addLine(line) {
    const atBottom = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 40;
    if (line.attempt !== logAttempt) {
      const sep = h("div", { class: "attempt-sep", dataset: { attempt: line.attempt } });
      logBox.append(sep);
      labelSeparator(sep);
      logAttempt = line.attempt;
    }
    logBox.append(
      h(
        "div",
        { class: `line ${line.stream}`, dataset: { attempt: line.attempt } },
        h("span", { class: "ts" }, new Date(line.ts).toLocaleTimeString([], { hour12: false })),
        line.text,
      ),
    );
    while (logBox.childElementCount > MAX_LOG_LINES) logBox.firstElementChild.remove();
    if (atBottom) logBox.scrollTop = logBox.scrollHeight;
  }

  // ---------------------------------------------------------------- findings, checkpoints, artifacts
  async function refreshSlow() {
    if (gone) return;
    const [findings, checkpoints] = await Promise.all([
      api(`/runs/${runId}/findings`).catch((e) => ({ error: e.message })),
      api(`/runs/${runId}/checkpoints`).catch((e) => ({ error: e.message })),
    ]);
    if (gone) return;
    fill(findingsBox, 
      findings.error
        ? h("p", { class: "error" }, findings.error)
        : table(
            [
              { label: "Severity", cell: (f) => h("span", { class: `badge sev-${f.severity}` }, f.severity) },
              { label: "Detector", cell: (f) => f.detector },
              { label: "Step", cell: (f) => (f.step == null ? "-" : String(f.step)), class: "num" },
              { label: "Attempt", cell: (f) => (f.attempt == null ? "-" : String(f.attempt)), class: "num" },
              { label: "What", cell: (f) => h("span", { title: JSON.stringify(f.evidence || {}) }, f.message) },
              { label: "When", cell: (f) => when(f.ts || f.created_at) },
            ],
            findings.findings,
            { empty: "The monitor found nothing wrong (divergence, stalls, overfitting, ...).", id: "findings-table" },
          ),
    );
    fill(checkpointsBox, 
      checkpoints.error
        ? h("p", { class: "error" }, checkpoints.error)
        : table(
            [
              { label: "Step", cell: (c) => String(c.step), class: "num" },
              { label: "Attempt", cell: (c) => String(c.attempt), class: "num" },
              { label: "Why", cell: (c) => c.reason || "-" },
              { label: "Size", cell: (c) => bytes(c.size), class: "num" },
              { label: "Files", cell: (c) => String(c.files ?? "-"), class: "num" },
              { label: "Saved", cell: (c) => when(c.created_at) },
            ],
            checkpoints.checkpoints,
            { empty: "No checkpoint yet.", id: "checkpoints-table" },
          ),
    );
    if (TERMINAL.has(run.state) || !artifactsBox.firstChild) {
      const art = await api(`/runs/${runId}/artifacts`).catch((e) => ({ error: e.message }));
      if (gone) return;
      const link = (f, label) => (f.url ? h("a", { href: f.url, rel: "noreferrer", download: "" }, label) : label);
      fill(artifactsBox, 
        art.error
          ? h("p", { class: "error" }, art.error)
          : [
              art.bundle
                ? h("p", { id: "bundle" }, "Model bundle: ", link(art.bundle, art.bundle.path), ` (${bytes(art.bundle.size)})`)
                : h("p", { class: "muted" }, "No model bundle (yet)."),
              table(
                [
                  { label: "File", cell: (f) => link(f, f.path) },
                  { label: "Size", cell: (f) => bytes(f.size), class: "num" },
                  { label: "Attempt", cell: (f) => String(f.attempt ?? "-"), class: "num" },
                ],
                [...art.files, ...art.logs.map((l) => ({ ...l, path: `output of attempt ${l.attempt}` }))],
                { empty: "No files yet: they come back when the run ends." },
              ),
            ],
      );
    }
  }

  // ---------------------------------------------------------------- go
  renderHead();
  renderControls();
  renderAttempts();
  attemptsSig = run.attempts.map((a) => `${a.attempt}:${a.resumed_from_step}`).join(",");
  main.dataset.state = run.state;
  try {
    metricCursor = await loadCharts();
  } catch (e) {
    chartGrid.append(h("p", { class: "error" }, e.message));
  }
  renderMarks();
  if (gone) return null;
  open("logs");
  open("metrics");
  refreshSlow();
  const poll = setInterval(() => !document.hidden && refreshRun(), POLL_MS);
  const slow = setInterval(() => !document.hidden && !TERMINAL.has(run.state) && refreshSlow(), SLOW_POLL_MS);
  void navigate;
  return () => {
    gone = true;
    clearInterval(poll);
    clearInterval(slow);
    timers.forEach(clearTimeout);
    for (const es of Object.values(streams)) if (es) es.close();
    for (const c of charts.values()) c.destroy();
    delete main.dataset.state;
  };
}

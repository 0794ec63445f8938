// Models and deployments: the model registry (GET /v1/models: every version with its card) and the
// deployments (GET /v1/deployments), each with its card and a try-it form generated from the card's
// input schema; a ready deployment's form posts to /v1/deployments/NAME/predict. The model bundles
// your runs produced are listed with download links, and any bundle (.choline-bundle.tar.gz, read in
// the browser, nothing is uploaded) or card.json can be opened to read its card.

import { api, optional } from "./api.js";
import { bytes, clear, fill, h, num, prose, section, table, when } from "./dom.js";

// ------------------------------------------------------------------------------------ the card
export function renderCard(card) {
  const inputs = card.inputs || [];
  const outputs = card.outputs || [];
  const pre = card.preprocessing || [];
  const data = (card.training && card.training.data) || card.data || [];
  const metrics = card.metrics || {};
  const model = card.model || {};
  const training = card.training || {};
  const range = (r) => (r ? `${r[0] ?? "-∞"} .. ${r[1] ?? "∞"}` : "-");
  const shape = (s) => (s ? `[${s.map((d) => (d == null ? "N" : d)).join(", ")}]` : "-");
  const metricRows = [];
  for (const [kind, values] of Object.entries(metrics)) {
    if (values && typeof values === "object") {
      for (const [k, v] of Object.entries(values)) {
        metricRows.push({ kind, key: k, value: v && typeof v === "object" ? v.value ?? JSON.stringify(v) : v, step: v && v.step });
      }
    }
  }
  return h(
    "article",
    { class: "card", id: "model-card", dataset: { name: card.name || "" } },
    h("h2", {}, card.name || "model", card.format ? h("span", { class: "muted small" }, ` ${card.format}`) : null),
    h("p", { class: "purpose", id: "card-purpose" }, card.purpose || "(no purpose stated)"),
    card.description ? h("p", { class: "muted" }, card.description) : null,
    h("h3", {}, "Inputs"),
    table(
      [
        { label: "Name", cell: (i) => h("code", {}, i.name) },
        { label: "Type", cell: (i) => i.dtype },
        { label: "Shape (one sample)", cell: (i) => shape(i.shape) },
        { label: "Range", cell: (i) => range(i.range) },
        { label: "What it is", cell: (i) => i.description || "-" },
      ],
      inputs,
      { empty: "no input schema", id: "card-inputs" },
    ),
    h("h3", {}, "Outputs"),
    table(
      [
        { label: "Name", cell: (o) => h("code", {}, o.name) },
        { label: "Kind", cell: (o) => o.kind || "-" },
        { label: "Shape", cell: (o) => shape(o.shape) },
        { label: "Labels", cell: (o) => (o.labels ? o.labels.join(", ") : "-") },
      ],
      outputs,
      { empty: "not stated" },
    ),
    h("h3", {}, "Preprocessing"),
    pre.length
      ? h(
          "ol",
          { id: "card-preprocessing" },
          pre.map((step) =>
            h(
              "li",
              {},
              h("code", {}, step.op || "?"),
              " ",
              Object.entries(step)
                .filter(([k]) => k !== "op")
                .map(([k, v]) => `${k}: ${Array.isArray(v) ? `${v.length} values` : JSON.stringify(v)}`)
                .join(", "),
            ),
          ),
        )
      : h("p", { class: "muted" }, "none: inputs go to the model as they are"),
    h("h3", {}, "Data"),
    table(
      [
        { label: "Dataset", cell: (d) => d.name },
        { label: "Examples", cell: (d) => (d.examples == null ? "-" : String(d.examples)), class: "num" },
        { label: "Size", cell: (d) => bytes(d.size_bytes), class: "num" },
        { label: "Splits", cell: (d) => Object.entries(d.splits || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "-" },
        { label: "Source", cell: (d) => d.source || "-" },
      ],
      data,
      { empty: "not stated", id: "card-data" },
    ),
    h("h3", {}, "Metrics"),
    table(
      [
        { label: "", cell: (m) => m.kind },
        { label: "Metric", cell: (m) => m.key },
        { label: "Value", cell: (m) => num(m.value), class: "num" },
        { label: "At step", cell: (m) => (m.step == null ? "-" : String(m.step)), class: "num" },
      ],
      metricRows,
      { empty: "none recorded", id: "card-metrics" },
    ),
    h(
      "p",
      { class: "muted small" },
      model.framework ? `${model.framework} · ` : "",
      model.parameters ? `${model.parameters.toLocaleString()} parameters · ` : "",
      training.run_id ? `trained by run ${training.run_id} to step ${training.step}` : "",
      card.created ? ` · created ${card.created}` : "",
    ),
  );
}

// ------------------------------------------------------------------------- the try-it form
const INT = /^(u?int\d+)$/;

function parseValues(text, input) {
  const parts = text.split(/[\s,;]+/).filter(Boolean);
  const values = parts.map((p) => (input.dtype === "bool" ? p === "1" || /^true$/i.test(p) : Number(p)));
  const problems = [];
  if (input.dtype !== "bool") {
    const bad = parts.filter((p, i) => !isFinite(values[i]) || (INT.test(input.dtype) && !Number.isInteger(values[i])));
    if (bad.length) problems.push(`${input.name}: ${bad.slice(0, 3).join(", ")} ${bad.length === 1 ? "is" : "are"} not ${INT.test(input.dtype) ? "integers" : "numbers"}`);
    if (input.range) {
      const [lo, hi] = input.range;
      const out = values.filter((v) => (lo != null && v < lo) || (hi != null && v > hi));
      if (out.length) problems.push(`${input.name}: ${out.length} value(s) outside ${lo} .. ${hi}`);
    }
  }
  return { values, problems };
}

function reshape(flat, shape) {
  if (!shape.length) return flat[0];
  const [first, ...rest] = shape;
  const inner = rest.reduce((a, b) => a * b, 1);
  const n = first == null ? flat.length / inner : first;
  const out = [];
  for (let i = 0; i < n; i++) out.push(reshape(flat.slice(i * inner, (i + 1) * inner), rest));
  return out;
}

// A form with one field per input of the card; `send(body)` posts it (null: preview only).
export function tryItForm(card, send) {
  const inputs = card.inputs || [];
  const fields = inputs.map((input) => {
    const fixed = (input.shape || []).filter((d) => d != null).reduce((a, b) => a * b, 1);
    const varies = (input.shape || []).some((d) => d == null);
    const scalar = !(input.shape || []).length;
    const hint = scalar
      ? input.dtype
      : `${varies ? `a multiple of ${fixed}` : fixed} ${input.dtype} value${fixed === 1 && !varies ? "" : "s"}, separated by commas or spaces`;
    const control = scalar
      ? input.dtype === "bool"
        ? h("input", { type: "checkbox", name: input.name, id: `in-${input.name}` })
        : h("input", { type: "text", name: input.name, id: `in-${input.name}`, inputmode: "decimal" })
      : h("textarea", { name: input.name, id: `in-${input.name}`, rows: 3, placeholder: hint });
    return { input, control, fixed, varies, scalar, hint };
  });
  const problemsEl = h("ul", { class: "error", id: "try-problems" });
  const bodyEl = h("pre", { class: "request", id: "try-body", hidden: true });
  const result = h("pre", { class: "request", id: "try-result", hidden: true });
  const form = h(
    "form",
    { class: "try-it", id: "try-it" },
    fields.map((f) =>
      h(
        "div",
        { class: "field" },
        h("label", { for: f.control.id }, h("code", {}, f.input.name), ` ${f.input.description || ""}`),
        f.control,
        h("div", { class: "muted small" }, `${f.hint}${f.input.range ? `, each in ${f.input.range[0]} .. ${f.input.range[1]}` : ""}`),
      ),
    ),
    h(
      "div",
      { class: "control-row" },
      h("button", { type: "submit", class: "primary", id: "try-send" }, send ? "Send" : "Check the input"),
      send ? null : h("span", { class: "muted" }, "No deployment of this model: the form checks the input and shows the request a deployment would take."),
    ),
    problemsEl,
    bodyEl,
    result,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    const problems = [];
    for (const f of fields) {
      if (f.scalar) {
        const v = f.input.dtype === "bool" ? f.control.checked : Number(f.control.value);
        if (f.input.dtype !== "bool" && (f.control.value.trim() === "" || !isFinite(v))) problems.push(`${f.input.name}: a number`);
        body[f.input.name] = v;
        continue;
      }
      const { values, problems: p } = parseValues(f.control.value, f.input);
      problems.push(...p);
      if (!f.varies && values.length !== f.fixed) problems.push(`${f.input.name}: ${values.length} value(s), the model takes ${f.fixed}`);
      if (f.varies && (values.length === 0 || values.length % f.fixed)) problems.push(`${f.input.name}: ${values.length} value(s), not a multiple of ${f.fixed}`);
      body[f.input.name] = problems.length ? values : reshape(values, f.input.shape);
    }
    fill(problemsEl, problems.map((p) => h("li", {}, p)));
    form.dataset.valid = problems.length ? "no" : "yes";
    if (problems.length) {
      bodyEl.hidden = true;
      return;
    }
    const request = body; // POST /predict takes one sample: {input: value} (docs/serving.md)
    bodyEl.hidden = false;
    bodyEl.textContent = JSON.stringify(request);
    if (send) {
      result.hidden = false;
      result.textContent = "sending...";
      try {
        result.textContent = JSON.stringify(await send(request), null, 1);
      } catch (err) {
        result.textContent = err.message;
      }
    }
  });
  return form;
}

// --------------------------------------------------------------------- reading a bundle here
// The card of a .choline-bundle.tar.gz, read as a stream (a bundle of gigabytes of weights is never
// held in memory: entries are skipped until <name>/card.json).
export async function cardFromFile(file) {
  if (file.name.endsWith(".json")) return JSON.parse(await file.text());
  const reader = file.stream().pipeThrough(new DecompressionStream("gzip")).getReader();
  let buf = new Uint8Array(0);
  let done = false;
  const need = async (n) => {
    while (buf.length < n && !done) {
      const r = await reader.read();
      if (r.done) done = true;
      else {
        const joined = new Uint8Array(buf.length + r.value.length);
        joined.set(buf);
        joined.set(r.value, buf.length);
        buf = joined;
      }
    }
    return buf.length >= n;
  };
  const take = (n) => {
    const out = buf.slice(0, n);
    buf = buf.slice(n);
    return out;
  };
  const text = (b) => new TextDecoder().decode(b).replace(/\0.*$/s, "");
  let paxPath = null;
  try {
    while (await need(512)) {
      const header = take(512);
      if (header.every((b) => b === 0)) break;
      const size = parseInt(text(header.slice(124, 136)).trim() || "0", 8);
      const type = String.fromCharCode(header[156] || 48); // NUL is an old regular file
      const prefix = text(header.slice(345, 500));
      const name = paxPath || (prefix ? `${prefix}/` : "") + text(header.slice(0, 100));
      paxPath = null;
      const padded = Math.ceil(size / 512) * 512;
      if (type === "x") {
        // a PAX header: its path= record names the next entry
        if (!(await need(padded))) break;
        const m = text(take(padded).slice(0, size)).match(/\d+ path=([^\n]*)\n/);
        if (m) paxPath = m[1];
        continue;
      }
      if (type === "0" && /^[^/]+\/card\.json$/.test(name) && size < 16 * 1024 * 1024) {
        if (!(await need(padded))) break;
        return JSON.parse(new TextDecoder().decode(take(padded).slice(0, size)));
      }
      let skip = padded;
      while (skip > 0) {
        if (!(await need(Math.min(skip, 1 << 20)))) throw new Error("the bundle ends early");
        const n = Math.min(skip, buf.length);
        take(n);
        skip -= n;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new Error("no card.json in this file: is it a choline bundle (.choline-bundle.tar.gz)?");
}

function bundlePreview() {
  const out = h("div", { id: "card-preview" });
  const file = h("input", { type: "file", id: "bundle-file", accept: ".gz,.json,application/gzip,application/json" });
  file.addEventListener("change", async () => {
    clear(out);
    const f = file.files && file.files[0];
    if (!f) return;
    try {
      const card = await cardFromFile(f);
      out.append(renderCard(card), h("h3", {}, "Try it"), tryItForm(card, null));
    } catch (e) {
      out.append(h("p", { class: "error", id: "bundle-error" }, `Cannot read ${f.name}: ${e.message}`));
    }
  });
  return section(
    "Read a model card",
    h("p", { class: "muted" }, prose("Open a bundle (.choline-bundle.tar.gz, as `choline pull RUN` brings back) or its card.json: it is read here, in the browser, and nothing is uploaded.")),
    file,
    out,
  );
}

async function bundlesOfRuns() {
  const box = h("div", { id: "run-bundles" }, h("p", { class: "muted" }, "looking at your recent runs..."));
  (async () => {
    try {
      const page = await api("/runs", { query: { state: ["succeeded", "failed", "cancelled"], limit: 20 } });
      const found = await Promise.all(
        page.runs.map((r) => api(`/runs/${r.run_id}/artifacts`).then((a) => ({ run: r, bundle: a.bundle })).catch(() => null)),
      );
      const rows = found.filter((x) => x && x.bundle);
      fill(box, 
        table(
          [
            { label: "Run", cell: (x) => h("a", { href: `/ui/runs/${x.run.run_id}`, "data-link": true }, x.run.name || x.run.run_id) },
            { label: "Bundle", cell: (x) => (x.bundle.url ? h("a", { href: x.bundle.url, rel: "noreferrer", download: "" }, x.bundle.path) : x.bundle.path) },
            { label: "Size", cell: (x) => bytes(x.bundle.size), class: "num" },
            { label: "Finished", cell: (x) => when(x.run.updated_at) },
          ],
          rows,
          { empty: "None of your recent finished runs saved a model bundle.", id: "bundles-table" },
        ),
      );
    } catch (e) {
      fill(box, h("p", { class: "error" }, e.message));
    }
  })();
  return box;
}

function notYet(what, body) {
  return h("section", { class: "panel not-available", id: "not-available" }, h("h1", {}, what), ...body);
}

// Every version of every model (GET /v1/models answers them flat, newest first), grouped by name.
function groupVersions(versions) {
  const byName = new Map();
  for (const v of versions) {
    if (!byName.has(v.name)) byName.set(v.name, []);
    byName.get(v.name).push(v);
  }
  return [...byName.entries()].map(([name, vs]) => ({ name, versions: vs, latest: vs[0], _attrs: { "data-model": name } }));
}

// --------------------------------------------------------------------------------- pages
export async function renderModels(main) {
  const found = await optional("/models", { query: { cards: true } });
  if (found === null) {
    // an older gateway without the model registry: what does exist is still shown
    main.append(
      notYet("Models", [h("p", { class: "empty-state" }, "Models are not available from this gateway.")]),
      section("Model bundles from your runs", await bundlesOfRuns()),
      bundlePreview(),
    );
    return null;
  }
  const models = groupVersions(Array.isArray(found) ? found : found.models || []);
  const detail = h("div", { id: "model-detail" });
  main.append(
    section(
      "Models",
      table(
        [
          { label: "Model", cell: (m) => h("a", { href: "#", class: "model-link", onclick: (e) => (e.preventDefault(), show(m)) }, m.name) },
          { label: "Purpose", cell: (m) => (m.latest.card && m.latest.card.purpose) || "-" },
          { label: "Versions", cell: (m) => m.versions.map((v) => `v${v.version}`).join(", ") },
          {
            label: "From",
            cell: (m) =>
              m.latest.run_id ? h("a", { href: `/ui/runs/${m.latest.run_id}`, "data-link": true }, m.latest.run_id) : m.latest.source || "-",
          },
          { label: "Size", cell: (m) => bytes(m.latest.size), class: "num" },
          { label: "Created", cell: (m) => when(m.latest.created_at) },
        ],
        models,
        { empty: prose("No models yet: a run that saves a bundle registers one, and `choline models push BUNDLE` adds one."), id: "models-table" },
      ),
    ),
    detail,
    section("Model bundles from your runs", await bundlesOfRuns()),
    bundlePreview(),
  );
  async function show(m) {
    clear(detail);
    const v = m.latest;
    const card = v.card && Object.keys(v.card).length ? v.card : null; // listed with ?cards=true
    detail.append(
      section(
        `${m.name} v${v.version}`,
        h("p", { class: "muted" }, prose(`Deploy it with \`choline deploy model ${m.name}\`; sha256 ${v.sha256.slice(0, 12)}...`)),
        card ? [renderCard(card), h("h3", {}, "Try it"), tryItForm(card, null)] : h("p", { class: "muted" }, "This version has no card."),
      ),
    );
  }
  return null;
}

export async function renderDeployments(main) {
  const found = await optional("/deployments");
  if (found === null) {
    main.append(notYet("Deployments", [h("p", { class: "empty-state" }, "Deployments are not available from this gateway.")]));
    return null;
  }
  const list = (Array.isArray(found) ? found : found.deployments || []).map((d) => ({ ...d, _attrs: { "data-deployment": d.name } }));
  const detail = h("div", { id: "deployment-detail" });
  const ready = (d) => (d.replicas || []).filter((r) => r.state === "ready").length;
  main.append(
    section(
      "Deployments",
      table(
        [
          { label: "Name", cell: (d) => h("a", { href: "#", class: "deployment-link", onclick: (e) => (e.preventDefault(), show(d)) }, d.name) },
          { label: "Model", cell: (d) => `${d.model} v${d.version}` },
          { label: "State", cell: (d) => h("span", { class: `badge state-${d.state}` }, d.state) },
          { label: "Replicas ready", cell: (d) => `${ready(d)} / ${(d.replicas || []).length}`, class: "num" },
          { label: "Predict", cell: (d) => h("code", {}, `POST /v1/deployments/${d.name}/predict`) },
          { label: "Updated", cell: (d) => when(d.updated_at) },
        ],
        list,
        { empty: prose("No deployments: `choline deploy model NAME` serves one."), id: "deployments-table" },
      ),
    ),
    detail,
  );
  async function show(d) {
    clear(detail);
    const model = await optional(`/models/${encodeURIComponent(d.model)}`, { query: { version: d.version } });
    const card = model && model.card && Object.keys(model.card).length ? model.card : null;
    const send = (body) => api(`/deployments/${encodeURIComponent(d.name)}/predict`, { method: "POST", body });
    detail.append(
      section(
        `${d.name}: ${d.model} v${d.version}`,
        d.reason ? h("p", { class: "error" }, d.reason) : null,
        card ? [renderCard(card), h("h3", {}, "Try it"), tryItForm(card, d.state === "ready" || d.state === "degraded" ? send : null)] : h("p", { class: "muted" }, "No card for this deployment's model."),
      ),
    );
  }
  return null;
}

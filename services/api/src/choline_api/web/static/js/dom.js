// DOM building and formatting. Text always goes in as text nodes (never as markup): nothing the
// API returns (a run name, a log line, a webhook description) can become markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replace an element's children (null/false skipped, arrays flattened: unlike Element.append).
export function fill(el, ...children) {
  return append(clear(el), children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const ACTIVE = new Set(["provisioning", "syncing", "running", "recovering", "finishing", "pausing"]);

export function stateBadge(state) {
  return h("span", { class: `badge state-${state}`, dataset: { state } }, state);
}

export function money(x) {
  if (x === null || x === undefined) return "-";
  return x < 0.01 && x > 0 ? `$${x.toFixed(4)}` : `$${x.toFixed(2)}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return h("time", { datetime: iso, title: d.toISOString() }, ago(d));
}

export function ago(d) {
  const s = (Date.now() - d.getTime()) / 1000;
  if (s < 5) return "just now";
  if (s < 86400 * 2) return `${duration(s)} ago`;
  return d.toISOString().slice(0, 16).replace("T", " ");
}

export function clock(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return h("time", { datetime: iso, title: d.toISOString() }, d.toLocaleTimeString([], { hour12: false }));
}

export function runDuration(run) {
  const start = new Date(run.created_at).getTime();
  const end = TERMINAL.has(run.state) ? new Date(run.updated_at).getTime() : Date.now();
  return duration((end - start) / 1000);
}

export function num(x) {
  if (x === null || x === undefined) return "-";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3).replace(/\.?0+e/, "e");
  return x.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

export function table(columns, rows, { empty = "nothing yet", id } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", {}, c.label)));
  const body = rows.length
    ? rows.map((r) => h("tr", r._attrs || {}, columns.map((c) => h("td", { class: c.class }, c.cell(r)))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty))];
  return h("table", { class: "grid", id }, h("thead", {}, head), h("tbody", {}, body));
}

// A sentence with `command` spans shown as <code>.
export function prose(text) {
  return text.split(/`([^`]+)`/).map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

export function section(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}

let toastTimer = null;
export function toast(message, kind = "info") {
  const el = document.getElementById("toast");
  clear(el);
  el.append(message);
  el.className = `toast show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.className = "toast"), kind === "error" ? 8000 : 4000);
}

// A confirmation dialog (<dialog>): resolves true only when the user presses the confirm button.
export function confirmDialog({ title, body, confirm = "Confirm", danger = false }) {
  const dlg = document.getElementById("confirm");
  clear(dlg);
  return new Promise((resolve) => {
    const done = (ok) => {
      dlg.close();
      resolve(ok);
    };
    const form = h(
      "form",
      { method: "dialog" },
      h("h3", {}, title),
      h("div", { class: "dialog-body" }, body),
      h(
        "div",
        { class: "dialog-actions" },
        h("button", { type: "button", class: "secondary", id: "confirm-cancel", onclick: () => done(false) }, "Cancel"),
        h("button", { type: "submit", class: danger ? "danger" : "primary", id: "confirm-ok" }, confirm),
      ),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      done(true);
    });
    dlg.append(form);
    dlg.addEventListener("cancel", () => resolve(false), { once: true });
    dlg.showModal();
    dlg.querySelector("#confirm-ok").focus();
  });
}

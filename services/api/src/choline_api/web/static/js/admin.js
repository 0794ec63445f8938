// Webhooks and tokens: list, create (a webhook's secret and a token are shown once, here), test
// a webhook and read its delivery log, remove or revoke (after a confirmation).

import { api, forgetToken } from "./api.js";
import { clear, confirmDialog, fill, h, section, table, toast, when } from "./dom.js";

const EVENTS = [
  "run.started",
  "run.recovered",
  "run.paused",
  "run.succeeded",
  "run.failed",
  "run.cancelled",
  "finding.raised",
  "deployment.ready",
];

function shownOnce(label, value, id) {
  const code = h("code", { id }, value);
  return h(
    "div",
    { class: "once" },
    h("strong", {}, label),
    h("p", { class: "muted" }, "Shown once: store it now. It cannot be shown again."),
    code,
    h(
      "button",
      {
        type: "button",
        class: "link",
        onclick: () => navigator.clipboard.writeText(value).then(() => toast("Copied."), () => toast("Copy it by hand.", "error")),
      },
      "copy",
    ),
  );
}

// ------------------------------------------------------------------------------ webhooks
export async function renderWebhooks(main, _params, { me }) {
  const listBox = h("div", { id: "webhooks" });
  const deliveriesBox = h("div", { id: "deliveries" });
  const created = h("div", { id: "webhook-created" });
  const url = h("input", { type: "url", id: "wh-url", required: true, placeholder: "https://example.com/hooks/choline", size: 40 });
  const fmt = h("select", { id: "wh-format" }, ["choline", "slack", "discord"].map((f) => h("option", { value: f }, f)));
  const desc = h("input", { type: "text", id: "wh-description", placeholder: "what it is for (optional)", maxlength: 256 });
  const boxes = EVENTS.map((e) =>
    h("label", { class: "check" }, h("input", { type: "checkbox", value: e, name: "events", checked: e !== "run.started" }), ` ${e}`),
  );
  const form = h(
    "form",
    { id: "webhook-form", class: "stack" },
    h("label", { for: "wh-url" }, "URL"),
    url,
    h("div", { class: "events" }, boxes),
    h("div", { class: "control-row" }, h("label", { for: "wh-format" }, "Format"), fmt, desc),
    h("button", { type: "submit", class: "primary", id: "wh-add" }, "Add webhook"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const events = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (!events.length) return toast("Pick at least one event.", "error");
    try {
      const hook = await api("/webhooks", {
        method: "POST",
        body: { url: url.value.trim(), events, format: fmt.value, description: desc.value.trim() || null },
      });
      fill(created, shownOnce(`Webhook ${hook.id}: its signing secret`, hook.secret, "wh-secret"));
      form.reset();
      await load();
    } catch (err) {
      toast(err.message, "error");
    }
  });

  async function deliveries(hook) {
    const page = await api(`/webhooks/${hook.id}/deliveries`, { query: { limit: 50 } });
    fill(deliveriesBox, 
      section(
        `Deliveries of ${hook.id}`,
        table(
          [
            { label: "Event", cell: (d) => [d.event_type, h("br"), h("code", { class: "muted small" }, d.event_id)] },
            { label: "State", cell: (d) => h("span", { class: `badge dl-${d.state}` }, d.state) },
            { label: "Tries", cell: (d) => String(d.attempts), class: "num" },
            { label: "Last answer", cell: (d) => (d.last_status ? `HTTP ${d.last_status}` : d.last_error || "-") },
            { label: "Next try", cell: (d) => (d.state === "pending" ? when(d.next_at) : "-") },
            { label: "Created", cell: (d) => when(d.created_at) },
            {
              label: "Each try",
              cell: (d) =>
                h("ol", { class: "tries" }, d.tries.map((t) => h("li", {}, `${t.status ? `HTTP ${t.status}` : t.error || "?"} in ${t.duration_ms} ms`))),
            },
          ],
          page.deliveries,
          { empty: "No delivery yet. 'Test' sends a ping.", id: "deliveries-table" },
        ),
      ),
    );
  }

  async function load() {
    const hooks = await api("/webhooks", { query: { all: me.admin ? "true" : undefined } });
    fill(listBox, 
      table(
        [
          { label: "ID", cell: (w) => h("code", {}, w.id) },
          { label: "URL", cell: (w) => [w.url, w.description ? h("div", { class: "muted small" }, w.description) : null] },
          { label: "Events", cell: (w) => w.events.join(", ") },
          { label: "Format", cell: (w) => w.format },
          { label: "Delivered / pending / failed", cell: (w) => `${w.delivered} / ${w.pending} / ${w.failed}`, class: "num" },
          { label: "Owner", cell: (w) => w.owner },
          {
            label: "",
            cell: (w) => [
              h("button", { class: "link", onclick: () => deliveries(w).catch((e) => toast(e.message, "error")) }, "deliveries"),
              " ",
              h(
                "button",
                {
                  class: "link",
                  onclick: async () => {
                    try {
                      await api(`/webhooks/${w.id}/test`, { method: "POST" });
                      toast(`A ping is on its way to ${w.url}.`);
                      setTimeout(() => deliveries(w).then(load).catch(() => {}), 1500);
                    } catch (e) {
                      toast(e.message, "error");
                    }
                  },
                },
                "test",
              ),
              " ",
              h(
                "button",
                {
                  class: "link danger",
                  onclick: async () => {
                    const ok = await confirmDialog({
                      title: `Remove webhook ${w.id}?`,
                      body: `${w.url} gets no more events; its pending deliveries are cancelled (the log is kept).`,
                      confirm: "Remove",
                      danger: true,
                    });
                    if (!ok) return;
                    try {
                      await api(`/webhooks/${w.id}`, { method: "DELETE" });
                      toast(`Removed ${w.id}.`);
                      await load();
                    } catch (e) {
                      toast(e.message, "error");
                    }
                  },
                },
                "remove",
              ),
            ],
          },
        ],
        hooks.map((w) => ({ ...w, _attrs: { "data-webhook": w.id } })),
        { empty: "No webhooks. Add one below to hear about runs that start, fail, pause or finish.", id: "webhooks-table" },
      ),
    );
  }

  main.append(
    section("Webhooks", listBox, created),
    section("Add a webhook", h("p", { class: "muted" }, "Each delivery is signed (HMAC-SHA256 of the timestamp and the body, see docs/webhooks.md) and retried with backoff."), form),
    deliveriesBox,
  );
  await load();
  return null;
}

// -------------------------------------------------------------------------------- tokens
export async function renderTokens(main, _params, { me, navigate }) {
  const listBox = h("div", { id: "tokens" });
  const created = h("div", { id: "token-created" });
  const name = h("input", { type: "text", id: "tok-name", required: true, maxlength: 128, placeholder: "ci, laptop, ..." });
  const user = h("input", { type: "text", id: "tok-user", maxlength: 64, placeholder: `${me.user} (default)`, pattern: "[A-Za-z0-9_\\-]+" });
  const admin = h("input", { type: "checkbox", id: "tok-admin" });
  const form = h(
    "form",
    { id: "token-form", class: "control-row" },
    h("label", { for: "tok-name" }, "Name"),
    name,
    me.admin ? [h("label", { for: "tok-user" }, "for user"), user, h("label", { class: "check" }, admin, " admin")] : null,
    h("button", { type: "submit", class: "primary", id: "tok-create" }, "Create token"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const body = { name: name.value.trim() };
      if (me.admin && user.value.trim()) body.user = user.value.trim();
      if (me.admin && admin.checked) body.admin = true;
      const tok = await api("/tokens", { method: "POST", body });
      fill(created, shownOnce(`Token ${tok.id} (${tok.name}) for ${tok.user}`, tok.token, "new-token"));
      form.reset();
      await load();
    } catch (err) {
      toast(err.message, "error");
    }
  });

  async function load() {
    const tokens = await api("/tokens", { query: { all: me.admin ? "true" : undefined } });
    fill(listBox, 
      table(
        [
          { label: "ID", cell: (t) => h("code", {}, t.id) },
          { label: "Name", cell: (t) => [t.name, t.id === me.token_id ? h("span", { class: "badge me" }, "this browser") : null] },
          { label: "User", cell: (t) => t.user },
          { label: "Starts with", cell: (t) => h("code", {}, `${t.prefix}...`) },
          { label: "Created", cell: (t) => when(t.created_at) },
          { label: "Last used", cell: (t) => when(t.last_used_at) },
          {
            label: "",
            cell: (t) =>
              h(
                "button",
                {
                  class: "link danger",
                  onclick: async () => {
                    const self = t.id === me.token_id;
                    const ok = await confirmDialog({
                      title: `Revoke token ${t.id} (${t.name})?`,
                      body: self
                        ? "This is the token this browser is logged in with: you will be logged out."
                        : "Anything using it (a CI job, another laptop) is refused from now on.",
                      confirm: "Revoke",
                      danger: true,
                    });
                    if (!ok) return;
                    try {
                      await api(`/tokens/${t.id}`, { method: "DELETE" });
                      toast(`Revoked ${t.id}.`);
                      if (self) {
                        forgetToken();
                        location.assign("/ui/login");
                      }
                      else await load();
                    } catch (e) {
                      toast(e.message, "error");
                    }
                  },
                },
                "revoke",
              ),
          },
        ],
        tokens.map((t) => ({ ...t, _attrs: { "data-token": t.id } })),
        { empty: "No tokens.", id: "tokens-table" },
      ),
    );
  }

  main.append(
    section(
      "Tokens",
      h("p", { class: "muted" }, `Logged in as ${me.user}${me.admin ? " (admin)" : ""} with token ${me.token_id} (${me.token_name}). Tokens are stored hashed: a lost one cannot be shown again, only revoked.`),
      listBox,
      created,
    ),
    section("Create a token", form),
  );
  await load();
  return null;
}

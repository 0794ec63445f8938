// Runs: every run of the user (an admin: everyone's), newest first, refreshed every few seconds.
// Filter by state, search by name (the gateway's `name contains`) or run id; "Load more" pages on.

import { api } from "./api.js";
import { clear, fill, h, money, prose, runDuration, stateBadge, table, when } from "./dom.js";

const STATES = [
  "queued",
  "scheduled",
  "provisioning",
  "syncing",
  "running",
  "pausing",
  "paused",
  "recovering",
  "finishing",
  "succeeded",
  "failed",
  "cancelled",
];
const GROUPS = {
  "": [],
  active: ["queued", "scheduled", "provisioning", "syncing", "running", "pausing", "recovering", "finishing"],
  ended: ["succeeded", "failed", "cancelled"],
};
const REFRESH_MS = 4000;

export async function render(main) {
  const params = new URLSearchParams(location.search);
  const stateSel = h(
    "select",
    { id: "state-filter", "aria-label": "state" },
    h("option", { value: "" }, "all states"),
    h("option", { value: "active" }, "active"),
    h("option", { value: "ended" }, "ended"),
    STATES.map((s) => h("option", { value: s }, s)),
  );
  stateSel.value = params.get("state") || "";
  const search = h("input", {
    type: "search",
    id: "search",
    placeholder: "search name or run id",
    value: params.get("q") || "",
  });
  const count = h("span", { class: "muted", id: "run-count" });
  const holder = h("div", { id: "runs" });
  const more = h("button", { class: "secondary", id: "more", hidden: true }, "Load more");
  main.append(
    h(
      "section",
      { class: "panel" },
      h("div", { class: "toolbar" }, h("h1", {}, "Runs"), stateSel, search, count),
      holder,
      more,
    ),
  );

  let pages = 1; // how many pages the user asked for; a refresh reloads them all
  let timer = null;
  let inflight = null;
  let gone = false;

  async function load() {
    if (inflight) inflight.abort();
    const ctl = new AbortController();
    inflight = ctl;
    const g = stateSel.value;
    const states = g in GROUPS ? GROUPS[g] : [g];
    const q = search.value.trim();
    const looksLikeId = /^r[a-z0-9]{3,}$/.test(q);
    let runs = [];
    let before = null;
    try {
      for (let i = 0; i < pages; i++) {
        const page = await api("/runs", {
          query: { state: states, name: looksLikeId ? undefined : q, limit: 50, before },
          signal: ctl.signal,
        });
        runs = runs.concat(page.runs);
        before = page.next_before;
        if (!before) break;
      }
    } catch (e) {
      if (e.name === "AbortError") return;
      fill(holder, h("p", { class: "error" }, e.message));
      return;
    } finally {
      if (inflight === ctl) inflight = null;
    }
    if (looksLikeId) runs = runs.filter((r) => r.run_id.startsWith(q) || (r.name || "").includes(q));
    more.hidden = !before;
    count.textContent = `${runs.length}${before ? "+" : ""} run${runs.length === 1 ? "" : "s"}`;
    fill(holder, 
      table(
        [
          {
            label: "Run",
            cell: (r) =>
              h(
                "a",
                { href: `/ui/runs/${r.run_id}`, "data-link": true, class: "run-link" },
                h("strong", {}, r.name || r.spec.script),
                h("br"),
                h("code", { class: "muted" }, r.run_id),
              ),
          },
          { label: "State", cell: (r) => [stateBadge(r.state), r.reason ? h("div", { class: "reason" }, r.reason) : null] },
          { label: "GPUs", cell: (r) => r.gpus || r.spec.gpus || "-" },
          { label: "Provider", cell: (r) => r.provider || r.spec.provider || "-" },
          { label: "Cost", cell: (r) => money(r.cost), class: "num" },
          { label: "Duration", cell: (r) => runDuration(r), class: "num" },
          { label: "Attempts", cell: (r) => String(r.attempts.length), class: "num" },
          { label: "Created", cell: (r) => when(r.created_at) },
        ],
        runs.map((r) => ({ ...r, _attrs: { "data-run": r.run_id, "data-state": r.state } })),
        { empty: prose("No runs match. Start one with `choline train.py --1xcpu`."), id: "runs-table" },
      ),
    );
  }

  function schedule() {
    clearTimeout(timer);
    if (!gone) timer = setTimeout(async () => {
      if (!document.hidden) await load();
      schedule();
    }, REFRESH_MS);
  }

  function remember() {
    const p = new URLSearchParams();
    if (stateSel.value) p.set("state", stateSel.value);
    if (search.value.trim()) p.set("q", search.value.trim());
    history.replaceState(null, "", `/ui/runs${p.toString() ? "?" + p : ""}`);
  }

  let typing = null;
  stateSel.addEventListener("change", () => {
    pages = 1;
    remember();
    load();
  });
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      pages = 1;
      remember();
      load();
    }, 250);
  });
  more.addEventListener("click", () => {
    pages += 1;
    load();
  });
  await load();
  schedule();
  return () => {
    gone = true;
    clearTimeout(timer);
    clearTimeout(typing);
    if (inflight) inflight.abort();
  };
}

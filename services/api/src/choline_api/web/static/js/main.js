// The app: a path router over /ui/..., the navigation bar, the login page. Each page module
// exports render(main, params, ctx) and may return a cleanup function (close streams, timers),
// called when the user leaves the page.

import { api, ApiError, forgetToken, getToken, setToken, setUnauthorizedHandler } from "./api.js";
import { clear, fill, h, prose } from "./dom.js";
import * as runs from "./runs.js";
import * as run from "./run.js";
import * as models from "./models.js";
import * as admin from "./admin.js";

const ROUTES = [
  [/^\/ui\/(?:runs\/?)?$/, runs.render, "runs"],
  [/^\/ui\/runs\/([A-Za-z0-9_-]+)\/?$/, run.render, "runs"],
  [/^\/ui\/models\/?$/, models.renderModels, "models"],
  [/^\/ui\/deployments\/?$/, models.renderDeployments, "deployments"],
  [/^\/ui\/webhooks\/?$/, admin.renderWebhooks, "webhooks"],
  [/^\/ui\/tokens\/?$/, admin.renderTokens, "tokens"],
];

const main = document.getElementById("main");
let cleanup = null;
let me = null;
let loginProblem = "";
let generation = 0; // a page whose render finishes after the user left it is cleaned up at once

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  route();
}

function nav(active) {
  const link = (href, name, label) =>
    h("a", { href, "data-link": true, class: active === name ? "active" : "", id: `nav-${name}` }, label);
  const top = document.getElementById("top");
  clear(top);
  top.append(
    h("a", { href: "/ui/", "data-link": true, class: "brand" }, "choline"),
    h(
      "nav",
      {},
      link("/ui/runs", "runs", "Runs"),
      link("/ui/models", "models", "Models"),
      link("/ui/deployments", "deployments", "Deployments"),
      link("/ui/webhooks", "webhooks", "Webhooks"),
      link("/ui/tokens", "tokens", "Tokens"),
    ),
    h(
      "div",
      { class: "who" },
      me ? h("span", { id: "who" }, `${me.user}${me.admin ? " (admin)" : ""} · ${me.token_name}`) : null,
      me ? h("button", { class: "link", id: "logout", onclick: logout }, "Log out") : null,
    ),
  );
}

function logout() {
  forgetToken();
  me = null;
  navigate("/ui/login", { replace: true });
}

function loginPage(next, problem) {
  document.getElementById("top").replaceChildren(h("span", { class: "brand" }, "choline"));
  const input = h("input", {
    type: "password",
    id: "token",
    name: "token",
    autocomplete: "off",
    placeholder: "chl_...",
    required: true,
    spellcheck: "false",
  });
  const remember = h("input", { type: "checkbox", id: "remember" });
  const error = h("p", { class: "error", id: "login-error" }, problem || "");
  const form = h(
    "form",
    { class: "login panel", id: "login-form" },
    h("h1", {}, "Log in"),
    h(
      "p",
      { class: "muted" },
      prose("Paste an API token. `choline up` writes the admin token to `$CHOLINE_HOME/secrets/token.json`; `choline tokens create NAME` makes more."),
    ),
    h("label", { for: "token" }, "Token"),
    input,
    h("label", { class: "check" }, remember, " Remember on this browser (otherwise until the tab closes)"),
    h("button", { type: "submit", class: "primary", id: "login" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    error.textContent = "";
    try {
      me = await api("/me", { token });
    } catch (err) {
      error.textContent =
        err instanceof ApiError && err.status === 401 ? "That token is unknown or revoked." : err.message;
      return;
    }
    setToken(token, remember.checked);
    navigate(next && next.startsWith("/ui/") && !next.startsWith("/ui/login") ? next : "/ui/runs", { replace: true });
  });
  fill(main, form);
  input.focus();
}

async function route() {
  generation++;
  if (cleanup) {
    try {
      cleanup();
    } catch (e) {
      console.error(e);
    }
    cleanup = null;
  }
  const path = location.pathname;
  if (path.startsWith("/ui/login")) {
    const next = new URLSearchParams(location.search).get("next");
    loginPage(next, loginProblem);
    loginProblem = "";
    return;
  }
  if (!getToken()) {
    navigate(`/ui/login?next=${encodeURIComponent(path + location.search)}`, { replace: true });
    return;
  }
  if (!me) {
    try {
      me = await api("/me");
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return; // the handler sent us to the login page
      fill(main, h("p", { class: "error" }, `The gateway did not answer: ${e.message}`));
      return;
    }
  }
  for (const [re, render, name] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    nav(name);
    clear(main);
    document.title = `choline · ${name}`;
    const mine = ++generation;
    try {
      const done = (await render(main, m.slice(1), { me, navigate })) || null;
      if (mine === generation) cleanup = done;
      else if (done) done();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return;
      console.error(e);
      main.append(h("p", { class: "error" }, e.message));
    }
    return;
  }
  nav(null);
  fill(main, h("section", { class: "panel" }, h("h1", {}, "Not found"), h("p", {}, `No page at ${path}.`)));
}

setUnauthorizedHandler(() => {
  forgetToken();
  me = null;
  if (location.pathname.startsWith("/ui/login")) return;
  loginProblem = "Your token is unknown or revoked: log in again.";
  navigate(`/ui/login?next=${encodeURIComponent(location.pathname + location.search)}`, { replace: true });
});

document.addEventListener("click", (e) => {
  const a = e.target.closest && e.target.closest("a[data-link]");
  if (!a || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
route();

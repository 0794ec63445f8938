// The gateway's /v1 API with the user's bearer token. The token lives in sessionStorage (gone when
// the tab closes) or, when the user ticks "remember", in localStorage; it is sent only to this
// origin, in the Authorization header.

const KEY = "choline.token";

export function getToken() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
}

export function setToken(token, remember) {
  forgetToken();
  (remember ? localStorage : sessionStorage).setItem(KEY, token);
}

export function forgetToken() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.type = (body && body.type) || "http_error";
    this.detail = body && body.detail;
  }
}

// Called on a 401: the page goes to the login form (set by main.js).
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export async function api(path, { method = "GET", body, query, token, signal } = {}) {
  const url = new URL(path.startsWith("/v1") ? path : `/v1${path}`, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v === undefined || v === null || v === "") continue;
    for (const one of Array.isArray(v) ? v : [v]) url.searchParams.append(k, String(one));
  }
  const headers = { Accept: "application/json" };
  const bearer = token || getToken();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { type: "unreachable", message: "the gateway is not answering" });
  }
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { message: text.slice(0, 200) };
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 401 && !token) onUnauthorized(err);
    throw err;
  }
  return data;
}

// An endpoint that this gateway may not serve yet (models, deployments): null on 404 not_found
// for the path itself, the answer otherwise.
export async function optional(path, options) {
  try {
    return await api(path, options);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) return null;
    throw e;
  }
}

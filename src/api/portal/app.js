/* capy-webhooks customer portal.
 *
 * Plain ES2020, no dependencies. Served under a strict CSP: no inline script or
 * style, no eval. All untrusted text goes into the DOM through textContent.
 * The session token lives only in the `state` object below: never in storage,
 * cookies or the URL (the fragment is cleared on load).
 */
"use strict";

(function () {
  const TOKEN_PREFIX = "capy_portal_";
  const MSG_NO_TOKEN = "Open the portal from the link your administrator gives you.";
  const MSG_EXPIRED = "Your session has expired. Open a new portal link.";
  const LIST_INTERVAL_MS = 5000;
  const DELIVERY_INTERVAL_MS = 2000;
  const DELIVERY_LIMIT = 100;
  // The chart's counts are hourly: a slower refresh than the deliveries' is plenty.
  const STATS_INTERVAL_MS = 15000;
  // The refreshes share the organization's request budget with its own scripts: they stop while
  // the tab is hidden and back off on errors, as far as Retry-After or this asks.
  const MAX_BACKOFF_MS = 60000;

  /** When the next background refresh should run, after `failures` failures in a row. */
  function nextRefreshDelay(interval, failures, err) {
    if (!failures) return interval;
    const backoff = Math.min(interval * Math.pow(2, failures), MAX_BACKOFF_MS);
    return Math.max(backoff, (err && err.retryAfterMs) || 0);
  }

  const state = {
    token: null,
    org: "",
    exp: null,
    ro: true,
    base: "",
    signedOut: false,
    endpoints: [],
    listSeq: 0,
    listTimer: 0,
    detailId: null,
    detailOpener: null,
    deliveries: null,
    deliverySeq: 0,
    deliveryTimer: 0,
    statsSeq: 0,
    statsTimer: 0,
    statsFailures: 0,
    stats: null,
    // The event-type catalog; null until it is read.
    catalog: null,
    catalogTimer: 0,
    orgBase: "",
    secretReturnFocus: null,
  };

  // ---------------------------------------------------------------- helpers

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    const value = text === undefined || text === null ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setAttr(node, name, value) {
    if (value === undefined || value === null || value === "") {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else if (node.getAttribute(name) !== value) {
      node.setAttribute(name, value);
    }
  }

  function enc(s) {
    return encodeURIComponent(s);
  }

  function classToken(value) {
    return String(value || "").toLowerCase().replace(/[^a-z0-9-]/g, "") || "unknown";
  }

  function parseEventTypes(text) {
    return String(text || "")
      .split(",")
      .map((s) => s.trim())
      .filter((s) => s.length > 0);
  }

  function formatEventTypes(list) {
    return Array.isArray(list) && list.length ? list.join(", ") : "";
  }

  function localTime(value) {
    if (!value) return "";
    const d = new Date(value);
    if (Number.isNaN(d.getTime())) return "";
    return d.toLocaleString();
  }

  // RFC 3339, UTC, without milliseconds.
  function rfc3339(date) {
    return date.toISOString().replace(/\.\d{3}Z$/, "Z");
  }

  function cloneTemplate(id) {
    const tpl = $(id);
    const fragment = tpl.content.cloneNode(true);
    tpl.remove();
    return fragment;
  }

  function removeTemplate(id) {
    const tpl = $(id);
    if (tpl) tpl.remove();
  }

  function focusIfPossible(node) {
    if (node && node.isConnected && !node.closest("[hidden]") && !node.disabled) {
      node.focus();
      return true;
    }
    return false;
  }

  // ----------------------------------------------------------------- notice

  let noticeTimer = 0;
  let noticeSource = "";

  function notify(message, kind, source) {
    const notice = $("notice");
    const isError = kind === "error";
    const src = source || "user";
    const unchanged = notice.textContent === message && notice.classList.contains("error") === isError;
    // Background refreshes repeat the same failure every few seconds: do not
    // re-announce an unchanged message.
    if (!(unchanged && src !== "user")) notice.textContent = message;
    notice.classList.toggle("error", isError);
    notice.classList.toggle("success", kind === "success");
    // Errors interrupt (role="alert") and stay until replaced or cleared; successes are polite.
    notice.setAttribute("role", isError ? "alert" : "status");
    notice.setAttribute("aria-live", isError ? "assertive" : "polite");
    noticeSource = src;
    clearTimeout(noticeTimer);
    if (!isError) noticeTimer = setTimeout(() => clearNotice(), 6000);
  }

  function clearNotice(onlySource) {
    if (onlySource && noticeSource !== onlySource) return;
    const notice = $("notice");
    clearTimeout(noticeTimer);
    notice.textContent = "";
    notice.classList.remove("error", "success");
    noticeSource = "";
  }

  function reportError(err, source) {
    if (err && err.silent) return;
    notify((err && err.message) || "Something went wrong.", "error", source);
  }

  // ------------------------------------------------------------------ token

  function readTokenFromFragment() {
    let token = null;
    const hash = location.hash.replace(/^#/, "");
    if (hash) {
      try {
        token = new URLSearchParams(hash).get("token");
      } catch (_) {
        token = null;
      }
    }
    // Never leave the token in the address bar or history.
    history.replaceState(null, "", location.pathname + location.search);
    return token;
  }

  function base64UrlDecode(text) {
    if (!/^[A-Za-z0-9_-]+$/.test(text)) throw new Error("not base64url");
    let b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    const binary = atob(b64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  }

  // The payload is not secret; the server verifies the signature.
  function decodeToken(token) {
    if (typeof token !== "string" || !token.startsWith(TOKEN_PREFIX)) return null;
    const rest = token.slice(TOKEN_PREFIX.length);
    const dot = rest.indexOf(".");
    if (dot <= 0 || dot === rest.length - 1) return null;
    let payload;
    try {
      payload = JSON.parse(base64UrlDecode(rest.slice(0, dot)));
    } catch (_) {
      return null;
    }
    if (!payload || typeof payload !== "object" || typeof payload.org !== "string" || !payload.org) {
      return null;
    }
    return {
      org: payload.org,
      exp: typeof payload.exp === "number" && Number.isFinite(payload.exp) ? payload.exp : null,
      ro: payload.ro === true || payload.ro === 1 || payload.ro === "true",
    };
  }

  // -------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(message, status, silent) {
      super(message);
      this.status = status;
      this.silent = Boolean(silent);
    }
  }

  /** A request to a route under the organization's endpoints (`path` follows `.../webhook-endpoints`). */
  function api(method, path, body) {
    return request(method, state.base + path, body);
  }

  /** A request to any route of the API (`url` is a path from the server's root). */
  async function request(method, url, body) {
    if (state.signedOut || !state.token) throw new ApiError(MSG_EXPIRED, 401, true);
    const init = {
      method: method,
      headers: {
        "Authorization": "Bearer " + state.token,
        "Content-Type": "application/json",
      },
      cache: "no-store",
      credentials: "same-origin",
      referrerPolicy: "no-referrer",
    };
    if (body !== undefined) init.body = JSON.stringify(body);

    let response;
    try {
      response = await fetch(url, init);
    } catch (_) {
      throw new ApiError("Could not reach the server. Check your connection; the page keeps retrying.", 0);
    }

    let data = null;
    let text = "";
    try {
      text = await response.text();
    } catch (_) {
      text = "";
    }
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }

    if (state.signedOut) throw new ApiError(MSG_EXPIRED, 401, true);
    if (response.status === 401) {
      signOut(MSG_EXPIRED);
      throw new ApiError(MSG_EXPIRED, 401, true);
    }
    if (!response.ok) {
      let message =
        data && typeof data.error === "string" && data.error
          ? data.error
          : "Request failed (HTTP " + response.status + ").";
      const retryAfter = response.headers.get("Retry-After");
      if ((response.status === 429 || response.status === 503) && retryAfter && /^\d+$/.test(retryAfter)) {
        message += " Try again in " + retryAfter + " s.";
      }
      const error = new ApiError(message, response.status);
      if (retryAfter && /^\d+$/.test(retryAfter)) error.retryAfterMs = Number(retryAfter) * 1000;
      throw error;
    }
    return data || {};
  }

  // ---------------------------------------------------------------- session

  function showSignedOut(message) {
    const box = $("signed-out");
    box.textContent = message;
    box.hidden = false;
    // Focus may have been inside what is now hidden: move it to the message (role="alert").
    box.focus();
    $("app").hidden = true;
    $("session").hidden = true;
  }

  function signOut(message) {
    if (state.signedOut) return;
    state.signedOut = true;
    state.token = null;
    state.detailId = null;
    clearTimeout(state.listTimer);
    clearTimeout(state.deliveryTimer);
    clearTimeout(state.statsTimer);
    clearTimeout(state.catalogTimer);
    state.listSeq++;
    state.deliverySeq++;
    state.statsSeq++;
    hideSecret(false);
    clearNotice();
    showSignedOut(message);
  }

  function updateExpires() {
    const node = $("expires");
    if (state.exp === null) {
      setText(node, "");
      return;
    }
    const when = new Date(state.exp * 1000);
    const minutes = Math.round((when.getTime() - Date.now()) / 60000);
    let relative;
    if (minutes <= 0) relative = "now";
    else if (minutes < 60) relative = "in " + minutes + " min";
    else relative = "in " + Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
    setText(node, "Session expires " + when.toLocaleString() + " (" + relative + ")");
    setAttr(node, "title", rfc3339(when));
  }

  // ---------------------------------------------------------- endpoint list

  function endpointById(id) {
    return state.endpoints.find((e) => e.id === id) || null;
  }

  function placeholderRow(table, text) {
    const cols = table.tHead.rows[0].cells.length;
    const tr = el("tr", "placeholder");
    const td = el("td", null, text);
    td.colSpan = cols;
    tr.appendChild(td);
    return tr;
  }

  // Keyed update: reuse rows so focus and open <details> survive refreshes.
  function reconcileRows(tbody, attr, items, createRow, updateRow) {
    const existing = new Map();
    for (const row of Array.from(tbody.rows)) {
      const key = row.getAttribute(attr);
      if (key === null) row.remove();
      else existing.set(key, row);
    }
    const keep = new Set();
    items.forEach((item, index) => {
      const key = String(item.id);
      let row = existing.get(key);
      if (!row || keep.has(key)) row = createRow(item);
      keep.add(key);
      updateRow(row, item);
      const current = tbody.rows[index];
      if (current !== row) tbody.insertBefore(row, current || null);
    });
    while (tbody.rows.length > items.length) tbody.rows[tbody.rows.length - 1].remove();
  }

  function createEndpointRow(ep) {
    const tr = el("tr");
    tr.setAttribute("data-endpoint-id", String(ep.id));
    tr.appendChild(el("td", "url"));
    tr.appendChild(el("td", "description"));
    tr.appendChild(el("td", "event-types"));
    const healthCell = el("td", "health-cell");
    healthCell.appendChild(el("span", "health health-unknown", "unknown"));
    tr.appendChild(healthCell);
    tr.appendChild(el("td", "active"));
    const actions = el("td", "actions");
    const open = el("button", "btn small open", "Open");
    open.type = "button";
    open.addEventListener("click", () => openDetail(tr.getAttribute("data-endpoint-id"), open));
    actions.appendChild(open);
    tr.appendChild(actions);
    return tr;
  }

  function updateEndpointRow(tr, ep) {
    const cells = tr.cells;
    setText(cells[0], ep.url);
    setText(cells[1], ep.description);
    // A filter narrows the types further: said beside them, the expression in the tooltip.
    const types = formatEventTypes(ep.event_types) || "All events";
    setText(cells[2], ep.filter ? types + " (filtered)" : types);
    setAttr(cells[2], "title", ep.filter ? "Filter: " + ep.filter : "");
    cells[2].classList.toggle("muted", !formatEventTypes(ep.event_types) && !ep.filter);
    const health = ep.health || "unknown";
    const badge = cells[3].firstChild;
    const cls = "health health-" + classToken(health);
    if (badge.className !== cls) badge.className = cls;
    setText(badge, health);
    setText(cells[4], ep.is_active ? "Active" : "Inactive");
    cells[4].classList.toggle("inactive", !ep.is_active);
    const open = cells[5].firstChild;
    setAttr(open, "aria-label", "Open " + ep.url);
    tr.classList.toggle("selected", state.detailId === ep.id);
  }

  function renderEndpoints() {
    const table = $("endpoints");
    const tbody = table.tBodies[0];
    if (!state.endpoints.length) {
      tbody.replaceChildren(placeholderRow(table, "No endpoints yet"));
      return;
    }
    reconcileRows(tbody, "data-endpoint-id", state.endpoints, createEndpointRow, updateEndpointRow);
  }

  async function refreshList() {
    if (state.signedOut) return;
    const seq = ++state.listSeq;
    clearTimeout(state.listTimer);
    if (document.hidden) return; // resumed by the visibilitychange handler
    let failed = null;
    try {
      const data = await api("GET", "");
      if (seq !== state.listSeq) return;
      state.endpoints = Array.isArray(data.webhook_endpoints) ? data.webhook_endpoints : [];
      renderEndpoints();
      updateDetailMeta();
      clearNotice("list");
      state.listFailures = 0;
    } catch (err) {
      failed = err;
      if (seq === state.listSeq) {
        state.listFailures = (state.listFailures || 0) + 1;
        reportError(err, "list");
      }
    } finally {
      if (seq === state.listSeq && !state.signedOut) {
        updateExpires();
        const delay = nextRefreshDelay(LIST_INTERVAL_MS, state.listFailures || 0, failed);
        state.listTimer = setTimeout(refreshList, delay);
      }
    }
  }

  // ---------------------------------------------------------------- create

  async function onCreate(event) {
    event.preventDefault();
    if (state.ro) return;
    const form = $("create-form");
    const urlInput = $("create-url");
    const submit = $("create-submit");
    const url = urlInput.value.trim();
    if (!url) {
      notify("Enter the URL of the endpoint.", "error");
      urlInput.focus();
      return;
    }
    const body = {
      url: url,
      description: $("create-description").value.trim(),
      event_types: pickerValue("create"),
    };
    const filter = $("create-filter").value.trim();
    if (filter) body.filter = filter;
    const scheme = $("create-scheme").value;
    if (scheme && scheme !== "hmac-sha256") body.signature_scheme = scheme;
    submit.disabled = true;
    try {
      const data = await api("POST", "", body);
      form.reset();
      $("create-filter-results").replaceChildren();
      notify("Endpoint created.", "success");
      refreshList();
      if (data.plaintext_secret) showSecret(data.plaintext_secret);
    } catch (err) {
      reportError(err);
    } finally {
      submit.disabled = false;
    }
  }

  // ---------------------------------------------------------- secret panel

  function showSecret(secret) {
    const active = document.activeElement;
    state.secretReturnFocus = active && active !== document.body ? active : null;
    $("secret-value").textContent = secret;
    // An ed25519 endpoint answers with its public key: not a secret, but the receiver needs it.
    const publicKey = secret.startsWith("whpk_");
    setText($("secret-title"), publicKey ? "Public key (Ed25519)" : "Signing secret");
    setText(
      $("secret-warning"),
      publicKey
        ? "Receivers verify v1a signatures with this public key. It is shown only now: copy it."
        : "This secret is shown only once. Store it now."
    );
    $("secret-panel").hidden = false;
    $("secret-title").focus();
  }

  function hideSecret(restoreFocus) {
    const panel = $("secret-panel");
    const wasOpen = !panel.hidden;
    panel.hidden = true;
    $("secret-value").textContent = "";
    if (restoreFocus && wasOpen) {
      const target = state.secretReturnFocus;
      if (!focusIfPossible(target)) {
        focusIfPossible(state.detailId ? $("detail-title") : $("create-url")) || focusIfPossible($("endpoints-title"));
      }
    }
    state.secretReturnFocus = null;
  }

  function timeout(ms) {
    return new Promise((_, reject) => setTimeout(() => reject(new Error("timeout")), ms));
  }

  function legacyCopy(node) {
    const selection = window.getSelection();
    if (!selection) return false;
    const range = document.createRange();
    range.selectNodeContents(node);
    selection.removeAllRanges();
    selection.addRange(range);
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (_) {
      ok = false;
    }
    selection.removeAllRanges();
    return ok;
  }

  async function onCopySecret() {
    const node = $("secret-value");
    const secret = node.textContent;
    if (!secret) return;
    if (navigator.clipboard && typeof navigator.clipboard.writeText === "function") {
      try {
        await Promise.race([navigator.clipboard.writeText(secret), timeout(2000)]);
        notify("Copied", "success");
        return;
      } catch (_) {
        // fall through to the legacy path
      }
    }
    if (legacyCopy(node)) notify("Copied", "success");
    else notify("Could not copy automatically. Select the secret and copy it.", "error");
  }

  // ----------------------------------------------------------- detail view

  function fillDetailForm(ep) {
    setText($("detail-title"), ep.url || "Endpoint");
    $("detail-url").value = ep.url || "";
    $("detail-description").value = ep.description || "";
    setPickerValue("detail", Array.isArray(ep.event_types) ? ep.event_types : []);
    $("detail-filter").value = ep.filter || "";
    $("detail-filter-results").replaceChildren();
    $("detail-active").checked = Boolean(ep.is_active);
    fillDetailMeta(ep);
  }

  function fillDetailMeta(ep) {
    setText($("detail-id"), ep.id);
    const health = ep.health || "unknown";
    const badge = $("detail-health");
    const cls = "health health-" + classToken(health);
    if (badge.className !== cls) badge.className = cls;
    setText(badge, health);
    setText($("detail-created"), ep.created_at);
    setAttr($("detail-created"), "title", localTime(ep.created_at));
    setText($("detail-updated"), ep.updated_at);
    setAttr($("detail-updated"), "title", localTime(ep.updated_at));
    setText($("detail-scheme"), ep.signature_scheme === "ed25519" ? "Ed25519 (v1a)" : "HMAC-SHA256 (v1)");
    setText(
      $("detail-ordering"),
      ep.ordering === "fifo" ? "FIFO: one at a time, in ingest order" : "Unordered"
    );
  }

  function updateDetailMeta() {
    if (!state.detailId) return;
    const ep = endpointById(state.detailId);
    if (ep) fillDetailMeta(ep);
  }

  function resetDeleteConfirm() {
    const box = $("detail-delete-box");
    if (!box) return;
    box.hidden = true;
    $("detail-delete-confirm").hidden = true;
    $("detail-delete").setAttribute("aria-expanded", "false");
  }

  function openDetail(id, opener) {
    const ep = endpointById(id);
    if (!ep || state.signedOut) return;
    state.detailId = id;
    state.detailOpener = opener || null;
    state.deliveries = null;
    const section = $("endpoint-detail");
    section.setAttribute("data-endpoint-id", String(id));
    fillDetailForm(ep);
    resetDeleteConfirm();
    const since = $("recover-since");
    if (since) since.value = rfc3339(new Date(Date.now() - 3600 * 1000));
    const result = $("recover-result");
    if (result) result.textContent = "";
    $("delivery-filter").value = "";
    const table = $("deliveries");
    table.tBodies[0].replaceChildren(placeholderRow(table, "Loading…"));
    section.hidden = false;
    for (const row of $("endpoints").tBodies[0].rows) {
      row.classList.toggle("selected", row.getAttribute("data-endpoint-id") === id);
    }
    $("detail-title").focus();
    resetChart();
    refreshDeliveries();
    refreshStats();
  }

  function closeDetail(restoreFocus) {
    state.detailId = null;
    state.deliveries = null;
    state.deliverySeq++;
    clearTimeout(state.deliveryTimer);
    state.statsSeq++;
    clearTimeout(state.statsTimer);
    resetChart();
    const section = $("endpoint-detail");
    section.hidden = true;
    section.removeAttribute("data-endpoint-id");
    resetDeleteConfirm();
    $("deliveries").tBodies[0].replaceChildren();
    for (const row of $("endpoints").tBodies[0].rows) row.classList.remove("selected");
    if (restoreFocus) {
      focusIfPossible(state.detailOpener) || focusIfPossible($("endpoints-title"));
    }
    state.detailOpener = null;
  }

  async function onSave(event) {
    event.preventDefault();
    if (state.ro || !state.detailId) return;
    const id = state.detailId;
    const url = $("detail-url").value.trim();
    if (!url) {
      notify("Enter the URL of the endpoint.", "error");
      $("detail-url").focus();
      return;
    }
    const body = {
      url: url,
      description: $("detail-description").value.trim(),
      event_types: pickerValue("detail"),
      // null removes a filter; the same null when there was none changes nothing.
      filter: $("detail-filter").value.trim() || null,
      is_active: $("detail-active").checked,
    };
    const save = $("detail-save");
    save.disabled = true;
    try {
      const data = await api("PATCH", "/" + enc(id), body);
      const updated = data.webhook_endpoint;
      if (updated && state.detailId === id) {
        const cached = endpointById(id);
        if (cached) Object.assign(cached, updated);
        fillDetailForm(cached || updated);
      }
      notify("Saved.", "success");
      refreshList();
    } catch (err) {
      reportError(err);
    } finally {
      save.disabled = false;
    }
  }

  async function withButton(button, work) {
    button.disabled = true;
    try {
      await work();
    } catch (err) {
      reportError(err);
    } finally {
      button.disabled = false;
    }
  }

  function onTest() {
    const id = state.detailId;
    if (state.ro || !id) return;
    return withButton($("detail-test"), async () => {
      await api("POST", "/" + enc(id) + "/test");
      notify("Test event queued.", "success");
      if (state.detailId === id) refreshDeliveries();
    });
  }

  function onRotate() {
    const id = state.detailId;
    if (state.ro || !id) return;
    return withButton($("detail-rotate"), async () => {
      const data = await api("POST", "/" + enc(id) + "/rotate-secret");
      notify("Secret rotated. The previous secret stays valid for a grace period.", "success");
      refreshList();
      if (data.plaintext_secret) showSecret(data.plaintext_secret);
    });
  }

  function onDelete() {
    if (state.ro || !state.detailId) return;
    $("detail-delete-box").hidden = false;
    const confirm = $("detail-delete-confirm");
    confirm.hidden = false;
    $("detail-delete").setAttribute("aria-expanded", "true");
    confirm.focus();
  }

  function onDeleteCancel() {
    resetDeleteConfirm();
    focusIfPossible($("detail-delete"));
  }

  function onDeleteConfirm() {
    const id = state.detailId;
    if (state.ro || !id) return;
    return withButton($("detail-delete-confirm"), async () => {
      await api("DELETE", "/" + enc(id));
      state.endpoints = state.endpoints.filter((e) => e.id !== id);
      renderEndpoints();
      // The user may have opened another endpoint while this one was being deleted.
      if (state.detailId === id) closeDetail(false);
      notify("Endpoint deleted.", "success");
      focusIfPossible($("endpoints-title"));
      refreshList();
    });
  }

  async function onRecover(event) {
    event.preventDefault();
    const id = state.detailId;
    if (state.ro || !id) return;
    const input = $("recover-since");
    const since = input.value.trim();
    if (!since) {
      notify("Enter a start time in RFC 3339, for example " + rfc3339(new Date()) + ".", "error");
      input.focus();
      return;
    }
    const result = $("recover-result");
    result.textContent = "";
    await withButton($("recover-submit"), async () => {
      const data = await api("POST", "/" + enc(id) + "/recover", { since: since });
      const n = typeof data.recovered === "number" ? data.recovered : 0;
      if (state.detailId !== id) return;
      result.textContent = "Recovered " + n + " deliveries";
      refreshDeliveries();
    });
  }

  // ------------------------------------------------------------ deliveries

  const DELIVERY_COLUMNS = [
    "state",
    "event-type",
    "attempts",
    "max-attempts",
    "response-status",
    "last-error",
    "created-at",
    "delivered-at",
    "next-attempt",
    "delivery-id",
    "payload",
  ];

  function createDeliveryRow(d) {
    const tr = el("tr");
    tr.setAttribute("data-delivery-id", String(d.id));
    for (const name of DELIVERY_COLUMNS) tr.appendChild(el("td", name));
    const payloadCell = tr.cells[DELIVERY_COLUMNS.indexOf("payload")];
    const details = el("details");
    details.appendChild(el("summary", null, "Show"));
    details.appendChild(el("pre"));
    payloadCell.appendChild(details);
    if (!state.ro) tr.appendChild(el("td", "actions"));
    return tr;
  }

  function cell(tr, name) {
    return tr.cells[DELIVERY_COLUMNS.indexOf(name)];
  }

  function setTimeCell(td, value) {
    setText(td, value || "");
    setAttr(td, "title", localTime(value));
  }

  function updateDeliveryRow(tr, d) {
    const stateCell = cell(tr, "state");
    const stateClass = "state state-" + classToken(d.state);
    if (stateCell.className !== stateClass) stateCell.className = stateClass;
    setText(stateCell, d.state);
    setText(cell(tr, "event-type"), d.event_type);
    setText(cell(tr, "attempts"), d.attempts);
    setText(cell(tr, "max-attempts"), d.max_attempts);
    setText(cell(tr, "response-status"), d.response_status === null || d.response_status === undefined ? "" : d.response_status);
    setText(cell(tr, "last-error"), d.last_error || "");
    setTimeCell(cell(tr, "created-at"), d.created_at);
    setTimeCell(cell(tr, "delivered-at"), d.delivered_at);
    setTimeCell(cell(tr, "next-attempt"), d.next_attempt_at);
    setText(cell(tr, "delivery-id"), d.id);

    const payloadCell = cell(tr, "payload");
    const details = payloadCell.firstChild;
    const hasPayload = d.payload !== null && d.payload !== undefined;
    details.hidden = !hasPayload;
    if (hasPayload) {
      let text;
      try {
        text = JSON.stringify(d.payload, null, 2);
      } catch (_) {
        text = String(d.payload);
      }
      setText(details.lastChild, text);
    }

    if (!state.ro) {
      const actions = tr.cells[DELIVERY_COLUMNS.length];
      let retry = actions.querySelector("button.retry");
      if (d.state === "failed") {
        if (!retry) {
          retry = el("button", "btn small retry", "Retry");
          retry.type = "button";
          retry.addEventListener("click", () => onRetry(tr.getAttribute("data-delivery-id"), retry));
          actions.appendChild(retry);
        }
        setAttr(retry, "aria-label", "Retry " + (d.event_type || "delivery") + " " + d.id);
      } else if (retry) {
        const hadFocus = document.activeElement === retry;
        retry.remove();
        if (hadFocus) focusIfPossible($("delivery-filter"));
      }
    }
  }

  function renderDeliveries() {
    const table = $("deliveries");
    const tbody = table.tBodies[0];
    if (state.deliveries === null) return;
    const filter = $("delivery-filter").value;
    const shown = filter ? state.deliveries.filter((d) => d.state === filter) : state.deliveries;
    if (!shown.length) {
      const text = state.deliveries.length ? "No " + filter + " deliveries" : "No deliveries yet";
      const row = tbody.rows.length === 1 ? tbody.rows[0] : null;
      if (!(row && row.classList.contains("placeholder") && row.textContent === text)) {
        tbody.replaceChildren(placeholderRow(table, text));
      }
      return;
    }
    reconcileRows(tbody, "data-delivery-id", shown, createDeliveryRow, updateDeliveryRow);
  }

  async function refreshDeliveries() {
    const id = state.detailId;
    if (!id || state.signedOut) return;
    const seq = ++state.deliverySeq;
    clearTimeout(state.deliveryTimer);
    if (document.hidden) return; // resumed by the visibilitychange handler
    let failed = null;
    try {
      const data = await api("GET", "/" + enc(id) + "/deliveries?limit=" + DELIVERY_LIMIT);
      if (seq !== state.deliverySeq || state.detailId !== id) return;
      state.deliveries = Array.isArray(data.deliveries) ? data.deliveries : [];
      renderDeliveries();
      clearNotice("deliveries");
      state.deliveryFailures = 0;
    } catch (err) {
      failed = err;
      if (seq !== state.deliverySeq || state.detailId !== id) return;
      state.deliveryFailures = (state.deliveryFailures || 0) + 1;
      if (err.status === 404) {
        closeDetail(true);
        notify("This endpoint no longer exists.", "error");
        refreshList();
        return;
      }
      reportError(err, "deliveries");
    } finally {
      if (seq === state.deliverySeq && state.detailId === id && !state.signedOut) {
        const delay = nextRefreshDelay(DELIVERY_INTERVAL_MS, state.deliveryFailures || 0, failed);
        state.deliveryTimer = setTimeout(refreshDeliveries, delay);
      }
    }
  }

  function onRetry(deliveryId, button) {
    const id = state.detailId;
    if (state.ro || !id || !deliveryId) return;
    return withButton(button, async () => {
      await api("POST", "/" + enc(id) + "/deliveries/" + enc(deliveryId) + "/retry");
      notify("Retry queued.", "success");
      if (state.detailId === id) refreshDeliveries();
    });
  }

  // ------------------------------------------------------------------ chart
  //
  // The endpoint's attempts of the last 24 hours (GET .../stats): a bar per hour, succeeded
  // stacked under failed, and the median and 95th-percentile latency of the successful ones as
  // lines on their own scale (right). Inline SVG built here: no library, nothing the CSP forbids
  // (presentation comes from classes in app.css).

  const SVG_NS = "http://www.w3.org/2000/svg";
  const HOUR_MS = 3600 * 1000;
  // Margins and height in CSS pixels: the drawing is as wide as its box (so its text stays
  // readable from a phone to a wide screen), never narrower than CHART_MIN_WIDTH.
  const CHART = { height: 220, left: 40, right: 58, top: 14, bottom: 28 };
  const CHART_MIN_WIDTH = 320;

  function svgEl(tag, className, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    if (className) node.setAttribute("class", className);
    for (const name of Object.keys(attrs || {})) node.setAttribute(name, String(attrs[name]));
    return node;
  }

  function svgText(x, y, text, className, anchor) {
    const node = svgEl("text", className, { x: x, y: y, "text-anchor": anchor || "middle" });
    node.textContent = text;
    return node;
  }

  /** The smallest of 1, 2 or 5 times a power of ten at or above `value` (an axis maximum). */
  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 5, 10]) {
      if (m * power >= value - 1e-9) return m * power;
    }
    return 10 * power;
  }

  function formatMs(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
    if (ms === 0) return "0";
    if (ms >= 10000) return Math.round(ms / 1000) + " s";
    if (ms >= 1000) return (ms / 1000).toFixed(1) + " s";
    if (ms >= 10) return Math.round(ms) + " ms";
    return ms.toFixed(1) + " ms";
  }

  function clockTime(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  /** The totals and latency range of a stats answer, and the sentence that says them. */
  function describeStats(stats) {
    const hours = Array.isArray(stats.hours) ? stats.hours : [];
    let succeeded = 0;
    let failed = 0;
    const medians = [];
    for (const h of hours) {
      succeeded += Number(h.succeeded) || 0;
      failed += Number(h.failed) || 0;
      if (typeof h.latency_p50_ms === "number") medians.push(h.latency_p50_ms);
    }
    const total = succeeded + failed;
    let text;
    if (!total) {
      text = "No attempts in the last 24 hours.";
    } else {
      text = plural(total, "attempt", "attempts") + " in the last 24 hours: " + succeeded + " succeeded, " +
        failed + " failed.";
      if (medians.length) {
        const low = Math.min.apply(null, medians);
        const high = Math.max.apply(null, medians);
        text += low === high
          ? " Median latency of successes " + formatMs(low) + "."
          : " Median latency of successes per hour from " + formatMs(low) + " to " + formatMs(high) + ".";
      }
    }
    return { hours: hours, succeeded: succeeded, failed: failed, total: total, text: text };
  }

  function hourTitle(start, h) {
    const end = new Date(start.getTime() + HOUR_MS);
    let text = clockTime(start) + "–" + clockTime(end) + ": " + (Number(h.succeeded) || 0) + " succeeded, " +
      (Number(h.failed) || 0) + " failed";
    if (typeof h.latency_p50_ms === "number") {
      text += "; latency median " + formatMs(h.latency_p50_ms) + ", 95th percentile " + formatMs(h.latency_p95_ms);
    }
    return text;
  }

  /** A path through the points, broken where an hour has none (no line across a gap). */
  function linePath(points) {
    let d = "";
    let open = false;
    for (const p of points) {
      if (p === null) {
        open = false;
        continue;
      }
      d += (open ? " L" : (d ? " M" : "M")) + p.x.toFixed(1) + " " + p.y.toFixed(1);
      open = true;
    }
    return d;
  }

  function buildChart(stats, summary, boxWidth) {
    const c = Object.assign({ width: Math.max(Math.round(boxWidth) || 0, CHART_MIN_WIDTH) }, CHART);
    const plotWidth = c.width - c.left - c.right;
    const plotHeight = c.height - c.top - c.bottom;
    const bottom = c.top + plotHeight;
    const hours = summary.hours;
    const slot = plotWidth / Math.max(hours.length, 1);
    const barWidth = Math.max(slot * 0.68, 1);
    const countMax = niceCeil(Math.max.apply(null, hours.map((h) => (Number(h.succeeded) || 0) + (Number(h.failed) || 0)).concat([1])));
    const latencies = [];
    for (const h of hours) {
      for (const v of [h.latency_p50_ms, h.latency_p95_ms]) if (typeof v === "number") latencies.push(v);
    }
    const latencyMax = latencies.length ? niceCeil(Math.max.apply(null, latencies)) : 0;
    const yCount = (n) => bottom - (n / countMax) * plotHeight;
    const yLatency = (ms) => bottom - (ms / latencyMax) * plotHeight;

    const root = svgEl("svg", "chart-svg", {
      viewBox: "0 0 " + c.width + " " + c.height,
      role: "img",
      "aria-label": summary.text,
      "data-succeeded": summary.succeeded,
      "data-failed": summary.failed,
    });
    const title = svgEl("title");
    title.textContent = summary.text;
    root.appendChild(title);

    // Hours before counting began: nothing was counted there, which is not "no attempts".
    const first = hours.length ? new Date(hours[0].start) : null;
    const since = new Date(stats.since);
    if (first && !Number.isNaN(since.getTime()) && since > first) {
      const share = Math.min((since - first) / (hours.length * HOUR_MS), 1);
      const width = share * plotWidth;
      root.appendChild(svgEl("rect", "chart-uncounted", { x: c.left, y: c.top, width: width.toFixed(1), height: plotHeight }));
      if (width > 90) {
        root.appendChild(svgText(c.left + width / 2, c.top + plotHeight / 2, "not counted", "chart-uncounted-label"));
      }
    }

    // Grid and both scales.
    for (const share of [0, 0.5, 1]) {
      const y = bottom - share * plotHeight;
      root.appendChild(svgEl("line", "chart-grid", { x1: c.left, x2: c.left + plotWidth, y1: y, y2: y }));
      const count = countMax * share;
      root.appendChild(svgText(c.left - 6, y + 4, Number.isInteger(count) ? String(count) : count.toFixed(1), "chart-axis", "end"));
      if (latencyMax) {
        root.appendChild(svgText(c.left + plotWidth + 6, y + 4, formatMs(latencyMax * share), "chart-axis chart-axis-latency", "start"));
      }
    }

    const p50 = [];
    const p95 = [];
    hours.forEach((h, i) => {
      const start = new Date(h.start);
      const succeeded = Number(h.succeeded) || 0;
      const failed = Number(h.failed) || 0;
      const x = c.left + i * slot + (slot - barWidth) / 2;
      const group = svgEl("g", "chart-hour", {
        "data-start": h.start,
        "data-succeeded": succeeded,
        "data-failed": failed,
      });
      const hourTitleNode = svgEl("title");
      hourTitleNode.textContent = hourTitle(start, h);
      group.appendChild(hourTitleNode);
      // A transparent full-height target, so the hour's title shows wherever it is hovered.
      group.appendChild(svgEl("rect", "chart-hit", { x: (c.left + i * slot).toFixed(1), y: c.top, width: slot.toFixed(1), height: plotHeight }));
      const succeededTop = yCount(succeeded);
      if (succeeded) {
        group.appendChild(svgEl("rect", "bar-succeeded", {
          x: x.toFixed(1), y: succeededTop.toFixed(1), width: barWidth.toFixed(1), height: Math.max(bottom - succeededTop, 1).toFixed(1),
        }));
      }
      if (failed) {
        const failedTop = yCount(succeeded + failed);
        group.appendChild(svgEl("rect", "bar-failed", {
          x: x.toFixed(1), y: failedTop.toFixed(1), width: barWidth.toFixed(1), height: Math.max(succeededTop - failedTop, 1).toFixed(1),
        }));
      }
      root.appendChild(group);
      const center = c.left + (i + 0.5) * slot;
      p50.push(typeof h.latency_p50_ms === "number" ? { x: center, y: yLatency(h.latency_p50_ms) } : null);
      p95.push(typeof h.latency_p95_ms === "number" ? { x: center, y: yLatency(h.latency_p95_ms) } : null);
      // Every sixth hour is labelled, the current one last.
      if ((hours.length - 1 - i) % 6 === 0 && !Number.isNaN(start.getTime())) {
        root.appendChild(svgText(center, c.height - 8, clockTime(start), "chart-axis"));
      }
    });

    if (latencyMax) {
      root.appendChild(svgEl("path", "chart-line-p95", { d: linePath(p95) }));
      root.appendChild(svgEl("path", "chart-line-p50", { d: linePath(p50) }));
      for (const p of p95) if (p) root.appendChild(svgEl("circle", "chart-dot-p95", { cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: 2.5 }));
      for (const p of p50) if (p) root.appendChild(svgEl("circle", "chart-dot-p50", { cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: 3.5 }));
    }
    root.appendChild(svgEl("line", "chart-baseline", { x1: c.left, x2: c.left + plotWidth, y1: bottom, y2: bottom }));
    return root;
  }

  let chartResize = 0;

  // The drawing is as wide as its box: drawn again (from the last answer) when the box changes.
  function onChartResize() {
    cancelAnimationFrame(chartResize);
    chartResize = requestAnimationFrame(() => {
      const drawn = document.querySelector("#chart svg");
      if (!state.stats || !drawn) return;
      const width = $("chart").clientWidth;
      if (width && Math.abs(Math.max(width, CHART_MIN_WIDTH) - drawn.viewBox.baseVal.width) > 1) {
        renderChart(state.stats);
      }
    });
  }

  function resetChart() {
    state.stats = null;
    setText($("chart-summary"), "Loading…");
    $("chart").replaceChildren();
    setText($("chart-note"), "");
    $("chart-section").removeAttribute("data-total");
  }

  function renderChart(stats) {
    state.stats = stats;
    const summary = describeStats(stats);
    const section = $("chart-section");
    setText($("chart-summary"), summary.text);
    section.setAttribute("data-total", String(summary.total));
    const chart = $("chart");
    if (!summary.total) {
      chart.replaceChildren();
    } else {
      chart.replaceChildren(buildChart(stats, summary, chart.clientWidth || $("chart-section").clientWidth));
    }
    const since = new Date(stats.since);
    const first = summary.hours.length ? new Date(summary.hours[0].start) : null;
    let note = "One bar per hour, local time; latency on the right-hand scale. Refreshed every 15 seconds.";
    if (first && !Number.isNaN(since.getTime()) && since > first) {
      note = "Counted since " + since.toLocaleString() + ", when the replica that sends this endpoint's " +
        "deliveries took it over; earlier hours were not counted. " + note;
    }
    setText($("chart-note"), note);
  }

  async function refreshStats() {
    const id = state.detailId;
    if (!id || state.signedOut) return;
    const seq = ++state.statsSeq;
    clearTimeout(state.statsTimer);
    if (document.hidden) return; // resumed by the visibilitychange handler
    let failed = null;
    try {
      const data = await api("GET", "/" + enc(id) + "/stats");
      if (seq !== state.statsSeq || state.detailId !== id) return;
      renderChart(data);
      state.statsFailures = 0;
    } catch (err) {
      failed = err;
      if (seq !== state.statsSeq || state.detailId !== id) return;
      state.statsFailures += 1;
      // Shown in the chart's place: the rest of the page works without it. A gone endpoint is
      // the deliveries refresh's to report.
      if (!err.silent && err.status !== 404) {
        setText($("chart-summary"), "The chart is not available: " + (err.message || "request failed"));
        $("chart").replaceChildren();
      }
    } finally {
      if (seq === state.statsSeq && state.detailId === id && !state.signedOut) {
        const delay = nextRefreshDelay(STATS_INTERVAL_MS, state.statsFailures, failed);
        state.statsTimer = setTimeout(refreshStats, delay);
      }
    }
  }


  // ---------------------------------------------------------------- catalog
  //
  // The event-type catalog (GET .../event-types). When it has types, each endpoint form lists them
  // to pick from, with their descriptions and examples; the text field stays for prefix patterns
  // (`backup.*`) and for types the list does not name. A filter can be tried on the examples
  // before saving (POST .../filters/test): the server evaluates it as ingest would, so what the
  // page says is what delivery will do.

  const CATALOG_RETRY_MS = 5000;
  // Each try is a request that counts against the organization's rate.
  const MAX_FILTER_TRIES = 12;
  const PICKERS = ["create", "detail"];

  function catalogTypes() {
    return Array.isArray(state.catalog) ? state.catalog : [];
  }

  function hasExample(type) {
    return type.example !== null && type.example !== undefined;
  }

  /** Whether an event-type pattern (`a.b` or `a.*`) covers the type `name`, as the server matches. */
  function patternCovers(pattern, name) {
    return pattern === name || (pattern.endsWith(".*") && name.startsWith(pattern.slice(0, -1)));
  }

  async function loadCatalog() {
    if (state.signedOut) return;
    clearTimeout(state.catalogTimer);
    try {
      const data = await request("GET", state.orgBase + "/event-types");
      state.catalog = Array.isArray(data.event_types) ? data.event_types : [];
      for (const prefix of PICKERS) buildPicker(prefix);
    } catch (err) {
      // The forms work without it (free text, as with an empty catalog): tried again quietly.
      if (!err.silent) state.catalogTimer = setTimeout(loadCatalog, CATALOG_RETRY_MS);
    }
  }

  function pickerBox(prefix) {
    const box = $(prefix + "-catalog");
    return box && !box.hidden ? box : null;
  }

  /** The event types a form says: the types picked from the catalog, then the text field's. */
  function pickerValue(prefix) {
    const picked = [];
    const box = pickerBox(prefix);
    if (box) {
      for (const check of box.querySelectorAll("input.catalog-check")) if (check.checked) picked.push(check.value);
    }
    for (const pattern of parseEventTypes($(prefix + "-event-types").value)) {
      if (!picked.includes(pattern)) picked.push(pattern);
    }
    return picked;
  }

  /** Shows `list` in a form: catalog types as ticks, the rest (patterns, unlisted types) as text. */
  function setPickerValue(prefix, list) {
    const listed = new Set();
    const box = pickerBox(prefix);
    if (box) {
      for (const check of box.querySelectorAll("input.catalog-check")) {
        check.checked = list.includes(check.value);
        if (check.checked) listed.add(check.value);
      }
    }
    $(prefix + "-event-types").value = formatEventTypes(list.filter((p) => !listed.has(p)));
  }

  function typeOption(prefix, type, index, readOnly) {
    const id = prefix + "-type-" + index;
    const item = el("div", "catalog-type" + (type.deprecated ? " deprecated" : ""));
    item.setAttribute("data-event-type", type.name);
    const check = el("input", "catalog-check");
    check.type = "checkbox";
    check.id = id;
    check.value = type.name;
    check.disabled = readOnly;
    const label = el("label", "catalog-label");
    label.htmlFor = id;
    label.appendChild(el("code", "catalog-name", type.name));
    if (type.deprecated) label.appendChild(el("span", "badge badge-deprecated", "deprecated"));
    item.appendChild(check);
    item.appendChild(label);
    if (type.description) {
      const description = el("p", "catalog-description", type.description);
      description.id = id + "-description";
      check.setAttribute("aria-describedby", description.id);
      item.appendChild(description);
    }
    if (hasExample(type)) {
      const example = el("details", "catalog-example");
      example.appendChild(el("summary", null, "Example"));
      let text;
      try {
        text = JSON.stringify(type.example, null, 2);
      } catch (_) {
        text = String(type.example);
      }
      example.appendChild(el("pre", null, text));
      item.appendChild(example);
    }
    return item;
  }

  /** Lists the catalog in a form (grouped, ungrouped types last), keeping what it says. */
  function buildPicker(prefix) {
    const box = $(prefix + "-catalog");
    if (!box) return; // a read-only session has no create form
    const value = pickerValue(prefix);
    const types = catalogTypes();
    const label = $(prefix + "-event-types-label");
    const help = $(prefix + "-event-types-help");
    if (!types.length) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const readOnly = prefix === "detail" && state.ro;
    $(prefix + "-filter-try-row").hidden = !types.some(hasExample);
    const groups = new Map();
    for (const type of types) {
      const group = type.group || "";
      if (!groups.has(group)) groups.set(group, []);
      groups.get(group).push(type);
    }
    const order = Array.from(groups.keys()).sort((a, b) => (a === "") - (b === "") || a.localeCompare(b));
    const fieldset = el("fieldset", "catalog-list");
    fieldset.appendChild(el("legend", "catalog-legend", "Event types"));
    let index = 0;
    for (const group of order) {
      const section = el("div", "catalog-group");
      if (group) section.appendChild(el("p", "catalog-group-name", group));
      for (const type of groups.get(group)) section.appendChild(typeOption(prefix, type, index++, readOnly));
      fieldset.appendChild(section);
    }
    box.replaceChildren(fieldset);
    box.hidden = false;
    setText(label, "Other patterns");
    if (help) {
      help.textContent = readOnly
        ? "Patterns and types the list does not name. Nothing chosen means all events."
        : "Comma-separated prefixes such as backup.*, or types the list does not name. With nothing chosen, every event is sent.";
    }
    setPickerValue(prefix, value);
  }

  /** The catalog types a form's filter is tried on: those it subscribes to that have an example. */
  function typesToTry(prefix) {
    const withExample = catalogTypes().filter(hasExample);
    const chosen = pickerValue(prefix);
    if (!chosen.length) return withExample; // every event
    return withExample.filter((type) => chosen.some((pattern) => patternCovers(pattern, type.name)));
  }

  function filterNote(results, text, className) {
    results.replaceChildren(el("p", className || "filter-note", text));
  }

  function onTryFilter(prefix) {
    const results = $(prefix + "-filter-results");
    const filter = $(prefix + "-filter").value.trim();
    if (!filter) {
      filterNote(results, "Enter a filter to try it.");
      return;
    }
    const all = typesToTry(prefix);
    if (!all.length) {
      filterNote(
        results,
        catalogTypes().some(hasExample)
          ? "None of the chosen event types has an example to try the filter on."
          : "The event-type catalog has no examples to try the filter on."
      );
      return;
    }
    const types = all.slice(0, MAX_FILTER_TRIES);
    return withButton($(prefix + "-filter-try"), async () => {
      results.setAttribute("aria-busy", "true");
      try {
        const list = el("ul", "filter-result-list");
        for (const type of types) {
          let result;
          try {
            result = await request("POST", state.orgBase + "/filters/test", { filter: filter, event_type: type.name });
          } catch (err) {
            // The filter itself is refused (syntax, types, cost): the server's words, with the position.
            if (err.status === 400) {
              filterNote(results, err.message, "filter-error");
              return;
            }
            throw err;
          }
          const item = el("li", result.matches ? "filter-match" : "filter-miss");
          item.setAttribute("data-event-type", type.name);
          item.setAttribute("data-matches", String(Boolean(result.matches)));
          item.appendChild(el("span", "filter-verdict", result.matches ? "Sent" : "Not sent"));
          item.appendChild(el("code", null, type.name));
          if (result.evaluation_error) item.appendChild(el("span", "filter-why", result.evaluation_error));
          list.appendChild(item);
        }
        results.replaceChildren(list);
        if (all.length > types.length) {
          results.appendChild(el("p", "muted small", "Tried on the first " + types.length + " of " + all.length + " examples."));
        }
      } finally {
        results.removeAttribute("aria-busy");
      }
    });
  }

  function mountFilterTry(prefix) {
    $(prefix + "-filter-try").addEventListener("click", () => onTryFilter(prefix));
    // A result says what the filter did when it was tried: gone once the filter changes.
    $(prefix + "-filter").addEventListener("input", () => $(prefix + "-filter-results").replaceChildren());
  }

  // ------------------------------------------------------------------ setup

  function mountWriteControls() {
    $("create-slot").appendChild(cloneTemplate("tpl-create"));
    $("detail-save-slot").appendChild(cloneTemplate("tpl-detail-save"));
    $("detail-actions-slot").appendChild(cloneTemplate("tpl-detail-actions"));
    $("recover-slot").appendChild(cloneTemplate("tpl-recover"));

    $("create-form").addEventListener("submit", onCreate);
    $("detail-test").addEventListener("click", onTest);
    $("detail-rotate").addEventListener("click", onRotate);
    $("detail-delete").addEventListener("click", onDelete);
    $("detail-delete-cancel").addEventListener("click", onDeleteCancel);
    $("detail-delete-confirm").addEventListener("click", onDeleteConfirm);
    $("recover-form").addEventListener("submit", onRecover);
    mountFilterTry("create");
  }

  function makeDetailReadOnly() {
    for (const id of ["detail-url", "detail-description", "detail-event-types", "detail-filter"]) {
      $(id).readOnly = true;
    }
    $("detail-active").disabled = true;
    $("detail-save-slot").remove();
    const actionsHeader = $("deliveries-actions-col");
    if (actionsHeader) actionsHeader.remove();
    const help = $("detail-event-types-help");
    if (help) help.textContent = "Empty means all events.";
  }

  function init() {
    const token = readTokenFromFragment();
    // A portal link opened in this tab without a reload (only the fragment
    // changed): start over with its token.
    window.addEventListener("hashchange", () => {
      if (/(^#|&)token=/.test(location.hash)) location.reload();
    });
    // No native form submission ever (the CSP also forbids it).
    document.addEventListener("submit", (event) => event.preventDefault());
    // Refreshes pause while the tab is hidden; catch up as soon as it shows again.
    document.addEventListener("visibilitychange", () => {
      if (document.hidden || state.signedOut || !state.token) return;
      refreshList();
      if (state.detailId) {
        refreshDeliveries();
        refreshStats();
      }
    });

    if (!token) {
      showSignedOut(MSG_NO_TOKEN);
      return;
    }
    const claims = decodeToken(token);
    if (!claims) {
      showSignedOut(MSG_NO_TOKEN);
      return;
    }

    state.token = token;
    state.org = claims.org;
    state.exp = claims.exp;
    state.ro = claims.ro;
    state.orgBase = "/v1/organizations/" + enc(state.org);
    state.base = state.orgBase + "/webhook-endpoints";

    if (state.ro) {
      for (const id of ["tpl-create", "tpl-detail-save", "tpl-detail-actions", "tpl-recover"]) removeTemplate(id);
      makeDetailReadOnly();
    } else {
      mountWriteControls();
      $("detail-form").addEventListener("submit", onSave);
    }

    $("org").textContent = state.org;
    $("read-only-badge").hidden = !state.ro;
    updateExpires();
    $("session").hidden = false;
    $("app").hidden = false;

    $("secret-copy").addEventListener("click", onCopySecret);
    $("secret-dismiss").addEventListener("click", () => hideSecret(true));
    $("detail-close").addEventListener("click", () => closeDetail(true));
    $("delivery-filter").addEventListener("change", renderDeliveries);
    window.addEventListener("resize", onChartResize);
    // Trying a filter only reads: read-only sessions may too.
    mountFilterTry("detail");

    refreshList();
    loadCatalog();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();

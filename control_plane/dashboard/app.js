// The control plane's dashboard: plain JavaScript over the admin API, no framework, no build.
//
// Data comes from the REST API (fleet summary, instances, history, actions, volumes) and
// live from the SSE feed, read with fetch() because EventSource cannot send the
// Authorization header. The feed is resumed after any cut with Last-Event-ID, so no event is
// missed or applied twice. Everything from the server is written with textContent: no data
// ever goes through innerHTML.
"use strict";

(() => {
  const KEY_NAME = "cp.dashboard.apiKey"; // sessionStorage only: gone when the tab closes
  const PAGE_SIZE = 100;
  const ACTIVITY_MAX = 500;
  const FEED_STALE_MS = 45_000; // keep-alives come every 15 s by default
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 10_000;
  const HEALTHY_CONNECTION_MS = 5_000;
  const REFRESH_MS = 5_000; // heartbeats (metrics) are not feed events: poll them
  const HEARTBEAT_STALE_S = 30;
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const STATUSES = ["provisioning", "booting", "ready", "draining", "terminating", "terminated",
    "startup_failed", "provider_deleted", "archived"];
  const BOOTING = new Set(["provisioning", "booting"]);
  const LIVE = new Set(["provisioning", "booting", "ready", "draining", "terminating", "startup_failed"]);
  const TERMINABLE = new Set(["provisioning", "booting", "ready", "draining", "startup_failed",
    "provider_deleted"]);
  const FINAL = new Set(["terminated", "archived"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    key: null,
    session: 0, // bumped on sign-in/out: late answers of an old session are dropped
    instances: new Map(), // id -> instance (the API's InstanceOut, plus _liveAt)
    rows: new Map(), // id -> references to the row's cells
    next: null,
    loaded: false,
    showArchived: false,
    lastEventId: null, // id of the last feed event seen (the resume point)
    feedAbort: null,
    refetching: new Map(), // id -> {timer, running, again}
    timers: {},
    detail: null, // the open instance page: {id, refs, instance}
    clockOffset: 0, // server clock minus this browser's, when they differ noticeably
  };

  // ---------------------------------------------------------------- small DOM helpers

  /** Build an element. `props`: className, text, title, href, type, data (dataset), attrs,
   * on (event listeners). Children: nodes or strings (always text nodes). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      if (props.className) node.className = props.className;
      if (props.text !== undefined && props.text !== null) node.textContent = String(props.text);
      if (props.title) node.title = String(props.title);
      if (props.href) node.setAttribute("href", props.href);
      if (props.type) node.setAttribute("type", props.type);
      for (const [k, v] of Object.entries(props.data || {})) node.dataset[k] = String(v);
      for (const [k, v] of Object.entries(props.attrs || {})) node.setAttribute(k, String(v));
      for (const [k, v] of Object.entries(props.on || {})) node.addEventListener(k, v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  let noticeTimer = null;
  function notice(message, kind = "error") {
    const box = $("notice");
    box.textContent = message;
    box.className = `notice notice-${kind}`;
    show(box, true);
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => show(box, false), 8000);
  }

  // ---------------------------------------------------------------- formatting

  const short = (id) => String(id).slice(0, 8);

  function fmtTime(value) {
    if (!value) return "—";
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
  }

  function fmtClock(value) {
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString();
  }

  function fmtAge(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
    return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
  }

  function fmtMoney(value, currency) {
    if (value === null || value === undefined) return "—";
    return `${Number(value).toFixed(value >= 100 ? 0 : 2)} ${currency || ""}`.trim();
  }

  function fmtPrice(inst) {
    if (inst.hourly_price === null || inst.hourly_price === undefined) return "—";
    return `${fmtMoney(inst.hourly_price, inst.currency)}/h`;
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const gib = (bytes) => (bytes / 2 ** 30).toFixed(bytes >= 10 * 2 ** 30 ? 0 : 1);

  /** Two lines from the latest heartbeat: GPUs (utilisation, memory) and vLLM (queue, KV). */
  function loadSummary(metrics) {
    const gpus = Array.isArray(metrics?.gpus) ? metrics.gpus.filter((g) => g && typeof g === "object") : [];
    const vllm = metrics?.vllm && typeof metrics.vllm === "object" ? metrics.vllm : {};
    let gpuLine = "no GPU data";
    if (gpus.length) {
      const util = gpus.map((g) => g.utilization_percent).filter(isNum);
      const used = gpus.map((g) => g.memory_used_bytes).filter(isNum);
      const total = gpus.map((g) => g.memory_total_bytes).filter(isNum);
      const parts = [`${gpus.length}× GPU`];
      if (util.length) parts.push(`${Math.round(util.reduce((a, b) => a + b, 0) / util.length)} %`);
      if (used.length && total.length) {
        parts.push(`${gib(used.reduce((a, b) => a + b, 0))}/${gib(total.reduce((a, b) => a + b, 0))} GiB`);
      }
      gpuLine = parts.join(" · ");
    }
    const num = (v) => (isNum(v) ? String(Math.round(v)) : "–");
    const kv = isNum(vllm.kv_cache_usage_perc) ? `${Math.round(vllm.kv_cache_usage_perc * 100)} %` : "–";
    const queueLine = `run ${num(vllm.num_requests_running)} · wait ${num(vllm.num_requests_waiting)} · KV ${kv}`;
    return [gpuLine, queueLine];
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** Call the admin API with the session's key; a 401 signs out (the key is refused). */
  async function api(path, { method = "GET", body, key } = {}) {
    const session = state.session;
    const headers = { Authorization: `Bearer ${key || state.key}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, cache: "no-store", credentials: "omit",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, "the control plane cannot be reached");
    }
    noteServerClock(response);
    if (response.status === 401 && !key && session === state.session) {
      signOut("The API key was refused (401): it is wrong or was revoked. Enter a key.");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const answer = await response.json();
        detail = answer.detail || detail;
        if (Array.isArray(answer.extra) && answer.extra.length) {
          detail += `: ${answer.extra.map((e) => e.message || e.key).join("; ")}`;
        }
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, `${response.status} ${detail}`);
    }
    return response.status === 204 ? null : response.json();
  }

  /** Ages are measured on the server's clock: a browser whose clock is off by more than the
   * Date header's one-second resolution is corrected. */
  function noteServerClock(response) {
    const server = Date.parse(response.headers.get("date") || "");
    if (Number.isNaN(server)) return;
    const offset = server - Date.now();
    state.clockOffset = Math.abs(offset) > 2000 ? offset : 0;
  }

  const serverNow = () => Date.now() + state.clockOffset;

  /** Every page of a list route (bounded), oldest first for child lists. */
  async function allPages(path, maxPages = 20) {
    const items = [];
    let cursor = null;
    for (let page = 0; page < maxPages; page += 1) {
      const sep = path.includes("?") ? "&" : "?";
      const url = cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path;
      const answer = await api(url);
      items.push(...answer.items);
      cursor = answer.next;
      if (!cursor) break;
    }
    return items;
  }

  // ---------------------------------------------------------------- sign-in

  function start() {
    $("login-form").addEventListener("submit", onLogin);
    $("signout").addEventListener("click", () => signOut(null));
    $("show-archived").addEventListener("change", (e) => {
      state.showArchived = e.target.checked;
      loadInstances();
    });
    $("load-more").addEventListener("click", () => loadInstances(state.next));
    window.addEventListener("hashchange", route);
    setInterval(tick, 1000);
    setInterval(periodicRefresh, REFRESH_MS);
    const key = sessionStorage.getItem(KEY_NAME);
    if (key) {
      beginSession(key);
    } else {
      showLogin(null);
    }
  }

  function showLogin(message) {
    show($("login"), true);
    show($("fleet-view"), false);
    show($("instance-view"), false);
    show($("live"), false);
    show($("signout"), false);
    const error = $("login-error");
    error.textContent = message || "";
    show(error, Boolean(message));
    const input = $("api-key");
    input.value = "";
    input.focus();
  }

  async function onLogin(event) {
    event.preventDefault();
    const input = $("api-key");
    const key = input.value.trim();
    const error = $("login-error");
    if (!key) return;
    const button = event.target.querySelector("button");
    button.disabled = true;
    try {
      await api("/v1/fleet", { key });
      sessionStorage.setItem(KEY_NAME, key);
      input.value = "";
      beginSession(key);
    } catch (err) {
      error.textContent = err.status === 401
        ? "That API key was refused (401 Unauthorized). Check it and try again."
        : `Could not sign in: ${err.message}`;
      show(error, true);
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  function beginSession(key) {
    state.key = key;
    state.session += 1;
    show($("login"), false);
    show($("signout"), true);
    show($("live"), true);
    resetData();
    route();
    runFeed(state.session);
  }

  /** Forget the key and everything shown; back to the sign-in form. */
  function signOut(message) {
    sessionStorage.removeItem(KEY_NAME);
    state.key = null;
    state.session += 1;
    if (state.feedAbort) state.feedAbort.abort();
    state.feedAbort = null;
    resetData();
    showLogin(message);
  }

  function resetData() {
    state.instances.clear();
    state.rows.clear();
    state.next = null;
    state.loaded = false;
    state.lastEventId = null;
    state.detail = null;
    for (const r of state.refetching.values()) clearTimeout(r.timer);
    state.refetching.clear();
    for (const t of Object.values(state.timers)) clearTimeout(t);
    state.timers = {};
    $("instances").replaceChildren();
    $("activity").replaceChildren();
    $("fleet").replaceChildren();
    $("instance-view").replaceChildren();
  }

  // ---------------------------------------------------------------- the live feed

  function setLive(mode, detail) {
    const node = $("live");
    const text = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[mode];
    node.textContent = text;
    node.className = `live live-${mode}`;
    node.dataset.state = mode;
    node.title = detail || (state.lastEventId !== null ? `last event #${state.lastEventId}` : "");
  }

  /** Keep one SSE connection open for the session: reconnect with backoff and jitter, each
   * time sending Last-Event-ID so the server replays exactly what was missed. */
  async function runFeed(session) {
    let attempt = 0;
    setLive("connecting");
    while (session === state.session) {
      const abort = new AbortController();
      state.feedAbort = abort;
      const opened = Date.now();
      let gotEvents = false;
      let reason = "";
      try {
        const resumed = state.lastEventId !== null;
        const headers = { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" };
        if (resumed) headers["Last-Event-ID"] = String(state.lastEventId);
        const response = await fetch("/v1/events", {
          headers, signal: abort.signal, cache: "no-store", credentials: "omit",
        });
        if (response.status === 401) {
          if (session === state.session) {
            signOut("The API key was refused (401): it is wrong or was revoked. Enter a key.");
          }
          return;
        }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        let snapshotTaken = resumed;
        await readStream(response.body, abort, (frame) => {
          if (session !== state.session) return;
          if (frame.id !== null) {
            const id = Number(frame.id);
            if (Number.isSafeInteger(id)) {
              if (frame.data !== null && state.lastEventId !== null && id <= state.lastEventId) {
                return; // seen already (the server never repeats; belt and braces)
              }
              state.lastEventId = id;
            }
          }
          if (!snapshotTaken) {
            // Connected without a resume point: the stream now holds every later event,
            // so the snapshot taken from here on misses nothing.
            snapshotTaken = true;
            setLive("live");
            reloadAll();
          } else if (frame.data === null) {
            setLive("live");
          }
          if (frame.data !== null) {
            gotEvents = true;
            setLive("live");
            onFeedEvent(frame);
          }
        });
        reason = "the server ended the stream";
      } catch (err) {
        if (session !== state.session) return;
        reason = err && err.name === "AbortError" ? "the stream went silent" : String(err.message || err);
      }
      if (session !== state.session) return;
      if (!state.loaded) reloadAll(); // the feed is down: still show what the API has
      if (gotEvents || Date.now() - opened >= HEALTHY_CONNECTION_MS) attempt = 0;
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt += 1;
      setLive("reconnecting", `${reason}; retrying in ${(delay / 1000).toFixed(1)} s`);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /** Read an SSE body, calling `onFrame({id, event, data})` per dispatched frame; frames
   * with only an id (the server's "connected" comment) come with data === null. */
  async function readStream(body, abort, onFrame) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = sseParser(onFrame);
    let watchdog = setTimeout(() => abort.abort(), FEED_STALE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        clearTimeout(watchdog);
        if (done) {
          parser.end();
          return;
        }
        watchdog = setTimeout(() => abort.abort(), FEED_STALE_MS);
        parser.push(value);
      }
    } finally {
      clearTimeout(watchdog);
      reader.cancel().catch(() => {});
    }
  }

  /** The text/event-stream format (HTML spec): lines end with CRLF, LF or CR; a blank line
   * dispatches; `:` starts a comment; `data` lines join with LF; `id` is remembered. */
  function sseParser(onFrame) {
    let buffer = "";
    let data = [];
    let event = "";
    let id = null;
    const lineEnd = /\r\n|\r|\n/g;

    function line(text) {
      if (text === "") {
        if (data.length || id !== null) {
          onFrame({ id, event: event || "message", data: data.length ? data.join("\n") : null });
        }
        data = [];
        event = "";
        id = null;
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") event = value;
      else if (field === "id" && !value.includes("\0")) id = value;
    }

    return {
      push(chunk) {
        buffer += chunk;
        let start = 0;
        lineEnd.lastIndex = 0;
        for (let m = lineEnd.exec(buffer); m; m = lineEnd.exec(buffer)) {
          // A CR at the very end may be the first half of a CRLF: wait for more.
          if (m[0] === "\r" && m.index === buffer.length - 1) break;
          line(buffer.slice(start, m.index));
          start = m.index + m[0].length;
        }
        buffer = buffer.slice(start);
      },
      end() {
        buffer = ""; // an unterminated frame is incomplete: dropped, as the spec says
      },
    };
  }

  function onFeedEvent(frame) {
    let data;
    try {
      data = JSON.parse(frame.data);
    } catch (_) {
      return;
    }
    if (!data || typeof data !== "object") return;
    const type = frame.event;
    addActivity(Number(frame.id), type, data);
    const id = typeof data.instance_id === "string" && UUID_RE.test(data.instance_id) ? data.instance_id : null;
    if (!id) return;
    const inst = state.instances.get(id);
    if (type === "instance.status" || type === "instance.progress") {
      if (inst) {
        const at = Date.parse(data.at);
        if (typeof data.status === "string") inst.status = data.status;
        if (isNum(data.progress)) inst.progress = Math.max(inst.progress || 0, data.progress);
        if (typeof data.phase === "string") inst.phase = data.phase;
        if (!Number.isNaN(at)) inst._liveAt = Math.max(inst._liveAt || 0, at);
        if (typeof data.message === "string") inst._message = data.message;
        renderInstance(id);
      }
      if (type === "instance.status" || !inst) refetch(id);
      if (type === "instance.status") debounce("fleet", 400, loadFleet);
    } else if (type === "instance.action") {
      if (inst) {
        if (typeof data.message === "string") inst._message = data.message;
        renderInstance(id);
      } else {
        refetch(id);
      }
    } else if (type.startsWith("instance.")) {
      refetch(id); // failover, agent integrity, revoked credential: fields the event lacks
    }
    if (state.detail && state.detail.id === id && type !== "instance.progress") {
      debounce("detail", 400, () => loadDetail(id, false));
    }
  }

  function debounce(name, ms, fn) {
    clearTimeout(state.timers[name]);
    state.timers[name] = setTimeout(fn, ms);
  }

  /** Fetch one instance again soon (coalesced: at most one request in flight per id). */
  function refetch(id) {
    let r = state.refetching.get(id);
    if (!r) {
      r = { timer: null, running: false, again: false };
      state.refetching.set(id, r);
    }
    if (r.running) {
      r.again = true;
      return;
    }
    clearTimeout(r.timer);
    r.timer = setTimeout(async () => {
      const session = state.session;
      r.running = true;
      try {
        const inst = await api(`/v1/instances/${id}`);
        if (session === state.session) upsert(inst);
      } catch (err) {
        if (err.status === 404 && session === state.session) removeInstance(id);
      } finally {
        r.running = false;
        if (r.again) {
          r.again = false;
          refetch(id);
        } else if (state.refetching.get(id) === r) {
          state.refetching.delete(id);
        }
      }
    }, 150);
  }

  // ---------------------------------------------------------------- data loading

  function reloadAll() {
    loadInstances();
    loadFleet();
    if (state.detail) loadDetail(state.detail.id, false);
  }

  async function periodicRefresh() {
    if (!state.key || document.hidden) return;
    if (state.loaded) {
      const count = Math.min(1000, Math.max(PAGE_SIZE, state.instances.size));
      refreshPage(count);
      loadFleet();
    }
    if (state.detail) loadDetail(state.detail.id, false);
  }

  function listPath(limit, cursor) {
    const params = new URLSearchParams({ limit: String(limit) });
    if (!state.showArchived) {
      for (const s of STATUSES) if (s !== "archived") params.append("status", s);
    }
    if (cursor) params.set("cursor", cursor);
    return `/v1/instances?${params}`;
  }

  /** The first page (cursor null: replaces the list) or the page after `cursor`. */
  async function loadInstances(cursor = null) {
    const session = state.session;
    try {
      const page = await api(listPath(PAGE_SIZE, cursor));
      if (session !== state.session) return;
      if (!cursor) {
        const keep = new Set(page.items.map((i) => i.id));
        for (const id of [...state.instances.keys()]) {
          const inst = state.instances.get(id);
          // Older instances loaded before stay, unless now filtered out.
          if (!keep.has(id) && inst.status === "archived" && !state.showArchived) removeInstance(id);
        }
      }
      for (const inst of page.items) upsert(inst);
      if (!cursor || state.next === cursor) state.next = page.next;
      state.loaded = true;
      show($("load-more"), Boolean(state.next));
      updateEmpty();
    } catch (err) {
      if (err.status !== 401) notice(`Could not load instances: ${err.message}`);
    }
  }

  async function refreshPage(limit) {
    const session = state.session;
    try {
      const page = await api(listPath(limit, null));
      if (session === state.session) for (const inst of page.items) upsert(inst);
    } catch (_) { /* the next refresh or event will do */ }
  }

  /** Merge an instance read from the API. The feed may be ahead of it (an event applied
   * after the read began): then status, progress and phase stay those of the feed. */
  function upsert(fresh) {
    if (fresh.status === "archived" && !state.showArchived) {
      removeInstance(fresh.id);
      return;
    }
    const current = state.instances.get(fresh.id);
    if (current) {
      const readAt = Date.parse(fresh.updated_at);
      if (current._liveAt && !(readAt >= current._liveAt)) {
        fresh.status = current.status;
        fresh.phase = current.phase;
      }
      fresh.progress = Math.max(fresh.progress, current.progress || 0); // never backwards
      fresh._liveAt = current._liveAt;
      fresh._message = current._message;
    }
    state.instances.set(fresh.id, fresh);
    renderInstance(fresh.id);
  }

  function removeInstance(id) {
    state.instances.delete(id);
    const row = state.rows.get(id);
    if (row) row.tr.remove();
    state.rows.delete(id);
    updateEmpty();
  }

  function updateEmpty() {
    show($("instances-empty"), state.loaded && state.instances.size === 0);
  }

  async function loadFleet() {
    const session = state.session;
    try {
      const fleet = await api("/v1/fleet");
      if (session === state.session) renderFleet(fleet);
    } catch (err) {
      if (err.status !== 401) notice(`Could not load the fleet summary: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- fleet summary

  function renderFleet(fleet) {
    const statusChips = (counts) => el("div", { className: "chips" },
      STATUSES.filter((s) => counts[s]).map((s) =>
        el("span", { className: `chip status-${s}`, data: { status: s } },
          el("b", { text: counts[s] }), ` ${s.replace("_", " ")}`)));

    const active = Object.entries(fleet.by_status || {})
      .filter(([s]) => LIVE.has(s)).reduce((sum, [, n]) => sum + n, 0);
    const statusCard = el("div", { className: "card stat", data: { testid: "fleet-status" } },
      el("h3", { text: "Instances" }),
      el("div", { className: "big", data: { testid: "fleet-active" } }, String(active)),
      el("div", { className: "muted", text: "active" }),
      statusChips(fleet.by_status || {}));

    const providers = [...new Set([...(fleet.providers || []), ...Object.keys(fleet.by_provider || {})])].sort();
    const providerCard = el("div", { className: "card" },
      el("h3", { text: "Providers" }),
      providers.length
        ? el("ul", { className: "providers" }, providers.map((p) => {
          const counts = (fleet.by_provider || {})[p] || {};
          const configured = (fleet.providers || []).includes(p);
          return el("li", { data: { provider: p } },
            el("span", { className: "provider-name", text: p }),
            configured ? null : el("span", { className: "muted", text: " (not configured)" }),
            Object.keys(counts).length ? statusChips(counts) : el("span", { className: "muted", text: " idle" }));
        }))
        : el("p", { className: "muted", text: "No provider configured." }));

    const money = (obj, suffix) => {
      const entries = Object.entries(obj || {});
      return entries.length
        ? entries.map(([cur, v]) => el("div", { className: "money" }, `${fmtMoney(v, cur)}${suffix}`))
        : [el("div", { className: "money muted", text: "—" })];
    };
    const costCard = el("div", { className: "card" },
      el("h3", { text: "Cost" }),
      el("div", { className: "muted", text: "running now" }),
      el("div", { data: { testid: "cost-rate" } }, money(fleet.cost_rate_per_hour, "/h")),
      el("div", { className: "muted", text: "so far" }),
      el("div", { data: { testid: "cost-so-far" } }, money(fleet.cost_so_far, "")));

    $("fleet").replaceChildren(statusCard, providerCard, costCard);
  }

  // ---------------------------------------------------------------- instance rows

  function progressBar(className) {
    const fill = el("div", { className: "fill" });
    const bar = el("div", {
      className: `bar ${className || ""}`,
      attrs: { role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0 },
    }, fill);
    return { bar, fill };
  }

  function setProgress(refs, inst) {
    const p = Math.max(0, Math.min(100, Number(inst.progress) || 0));
    refs.fill.style.width = `${p}%`;
    refs.bar.setAttribute("aria-valuenow", String(p));
    refs.bar.dataset.status = inst.status;
    refs.pct.textContent = `${p} %`;
    refs.phase.textContent = inst.phase || inst.status;
  }

  function actionButtons(inst, cells) {
    const buttons = [];
    if (inst.status === "ready") {
      buttons.push(el("button", {
        type: "button", className: "btn btn-small", text: "Drain",
        data: { action: "drain" }, title: "Stop new work, then terminate",
        on: { click: (e) => requestAction(e, inst.id, "drain") },
      }));
    }
    if (TERMINABLE.has(inst.status)) {
      buttons.push(el("button", {
        type: "button", className: "btn btn-small btn-danger", text: "Terminate",
        data: { action: "terminate" },
        on: { click: (e) => requestAction(e, inst.id, "terminate") },
      }));
    }
    cells.replaceChildren(...buttons);
  }

  async function requestAction(event, id, action) {
    event.stopPropagation();
    const inst = state.instances.get(id);
    const what = inst ? `${short(id)} (${inst.model}, ${inst.provider} ${inst.instance_type})` : short(id);
    const question = action === "drain"
      ? `Drain instance ${what}? It takes no new work, then it is terminated.`
      : `Terminate instance ${what}? The machine and its disposable volumes are deleted.`;
    if (!window.confirm(question)) return;
    const button = event.currentTarget;
    button.disabled = true;
    try {
      if (action === "drain") await api(`/v1/instances/${id}/drain`, { method: "POST", body: {} });
      else await api(`/v1/instances/${id}`, { method: "DELETE" });
      notice(action === "drain" ? `Drain of ${short(id)} requested.` : `Termination of ${short(id)} requested.`, "info");
    } catch (err) {
      if (err.status === 403) notice("This API key may only read: it cannot terminate or drain.");
      else if (err.status !== 401) notice(`Could not ${action} ${short(id)}: ${err.message}`);
      button.disabled = false;
    }
  }

  function createRow(inst) {
    const open = () => { location.hash = `#/instances/${inst.id}`; };
    const link = el("a", { className: "mono", href: `#/instances/${inst.id}`, text: short(inst.id), title: inst.id });
    const model = el("div", { className: "sub ellipsis" });
    const badge = el("span", { className: "badge" });
    const { bar, fill } = progressBar();
    const pct = el("span", { className: "pct" });
    const phase = el("span", { className: "phase" });
    const message = el("div", { className: "sub ellipsis message" });
    const where = el("span");
    const zone = el("div", { className: "sub" });
    const hb = el("span", { className: "hb" });
    const gpu = el("div", { className: "gpu" });
    const queue = el("div", { className: "sub queue" });
    const price = el("td", { className: "num price" });
    const actions = el("td", { className: "row-actions" });
    const tr = el("tr", {
      className: "row", data: { instanceId: inst.id },
      on: {
        click: (e) => { if (!e.target.closest("button, a")) open(); },
      },
    },
    el("td", null, link, model),
    el("td", null, badge),
    el("td", { className: "cell-progress" }, bar, el("div", { className: "sub" }, pct, " · ", phase), message),
    el("td", null, where, zone),
    el("td", null, hb),
    el("td", { className: "load" }, gpu, queue),
    price,
    actions);
    return { tr, model, badge, bar, fill, pct, phase, message, where, zone, hb, gpu, queue, price, actions, key: "" };
  }

  function renderInstance(id) {
    const inst = state.instances.get(id);
    if (!inst) return;
    let refs = state.rows.get(id);
    if (!refs) {
      refs = createRow(inst);
      state.rows.set(id, refs);
      insertSorted(refs.tr, inst);
      updateEmpty();
    }
    refs.tr.className = `row status-${inst.status}`;
    refs.model.textContent = inst.model;
    refs.model.title = inst.model;
    refs.badge.textContent = inst.status.replace("_", " ");
    refs.badge.className = `badge status-${inst.status}`;
    refs.badge.dataset.status = inst.status;
    setProgress(refs, inst);
    refs.message.textContent = BOOTING.has(inst.status) || inst.status === "terminating" ? inst._message || "" : "";
    refs.where.textContent = `${inst.provider} · ${inst.instance_type}`;
    refs.zone.textContent = inst.zone || "";
    if (inst.status === "ready" || inst.status === "draining") {
      const [gpu, queue] = loadSummary(inst.metrics);
      refs.gpu.textContent = gpu;
      refs.queue.textContent = queue;
    } else {
      refs.gpu.textContent = "";
      refs.queue.textContent = "";
    }
    refs.price.textContent = fmtPrice(inst);
    updateHeartbeat(refs.hb, inst);
    const key = `${inst.status}`;
    if (refs.key !== key) {
      refs.key = key;
      actionButtons(inst, refs.actions);
    }
    if (state.detail && state.detail.id === id) renderDetailHeader(inst);
  }

  function insertSorted(tr, inst) {
    const tbody = $("instances");
    const created = Date.parse(inst.created_at);
    for (const other of tbody.children) {
      const o = state.instances.get(other.dataset.instanceId);
      if (!o) continue;
      const oc = Date.parse(o.created_at);
      if (oc < created || (oc === created && o.id < inst.id)) {
        tbody.insertBefore(tr, other);
        return;
      }
    }
    tbody.append(tr);
  }

  function updateHeartbeat(node, inst) {
    if (!inst.last_heartbeat_at) {
      node.textContent = "—";
      node.className = "hb";
      return;
    }
    const ageMs = serverNow() - Date.parse(inst.last_heartbeat_at);
    node.textContent = fmtAge(ageMs);
    node.title = fmtTime(inst.last_heartbeat_at);
    const stale = LIVE.has(inst.status) && inst.status !== "provisioning" && ageMs > HEARTBEAT_STALE_S * 1000;
    node.className = FINAL.has(inst.status) ? "hb muted" : stale ? "hb stale" : "hb fresh";
  }

  function tick() {
    for (const [id, refs] of state.rows) {
      const inst = state.instances.get(id);
      if (inst) updateHeartbeat(refs.hb, inst);
    }
    if (state.detail && state.detail.refs) {
      const inst = state.instances.get(state.detail.id) || state.detail.instance;
      if (inst) updateHeartbeat(state.detail.refs.hb, inst);
    }
  }

  // ---------------------------------------------------------------- activity

  function eventText(type, d) {
    if (type === "instance.status") {
      return `${d.from_status || "new"} → ${d.status}${d.message ? `: ${d.message}` : ""}`;
    }
    if (type === "instance.progress") return `${d.progress} % ${d.phase || ""}`.trim();
    if (typeof d.message === "string" && d.message) return d.message;
    if (typeof d.reason === "string" && d.reason) return d.reason;
    return "";
  }

  function addActivity(id, type, data) {
    const list = $("activity");
    const instance = typeof data.instance_id === "string" && UUID_RE.test(data.instance_id) ? data.instance_id : null;
    const item = el("li", { data: { eventId: id, type } },
      el("time", { className: "muted", text: fmtClock(data.at) }),
      el("span", { className: "event-type", text: type }),
      instance ? el("a", { className: "mono", href: `#/instances/${instance}`, text: short(instance) }) : null,
      el("span", { className: "event-text", text: eventText(type, data) }));
    list.prepend(item);
    while (list.children.length > ACTIVITY_MAX) list.lastElementChild.remove();
  }

  // ---------------------------------------------------------------- routing

  function route() {
    if (!state.key) return;
    const match = /^#\/instances\/([^/]+)$/.exec(location.hash);
    if (match) {
      const id = decodeURIComponent(match[1]);
      show($("fleet-view"), false);
      show($("instance-view"), true);
      if (!UUID_RE.test(id)) {
        state.detail = null;
        $("instance-view").replaceChildren(el("p", { className: "error", text: "That is not an instance id." }),
          el("a", { href: "#/", text: "← All instances" }));
        return;
      }
      state.detail = { id, refs: null, instance: null };
      $("instance-view").replaceChildren(el("p", { className: "muted", text: "Loading…" }));
      loadDetail(id, true);
      window.scrollTo(0, 0);
    } else {
      state.detail = null;
      show($("instance-view"), false);
      show($("fleet-view"), true);
      $("instance-view").replaceChildren();
    }
  }

  // ---------------------------------------------------------------- instance page

  async function loadDetail(id, first) {
    const session = state.session;
    try {
      const base = `/v1/instances/${id}`;
      const [inst, history, actions, volumes] = await Promise.all([
        api(base), allPages(`${base}/history?limit=1000`), allPages(`${base}/actions?limit=1000`),
        allPages(`${base}/volumes?limit=1000`),
      ]);
      if (session !== state.session || !state.detail || state.detail.id !== id) return;
      upsert(inst);
      renderDetail(state.instances.get(id) || inst, history, actions, volumes);
    } catch (err) {
      if (session !== state.session || !state.detail || state.detail.id !== id) return;
      if (err.status === 404) {
        $("instance-view").replaceChildren(el("p", { className: "error", text: `No instance ${id}.` }),
          el("a", { href: "#/", text: "← All instances" }));
      } else if (err.status !== 401 && first) {
        $("instance-view").replaceChildren(el("p", { className: "error", text: `Could not load the instance: ${err.message}` }),
          el("a", { href: "#/", text: "← All instances" }));
      }
    }
  }

  function table(className, headers, rows, empty) {
    if (!rows.length) return el("p", { className: "muted", text: empty });
    return el("div", { className: "table-wrap" }, el("table", { className },
      el("thead", null, el("tr", null, headers.map((h) => el("th", { text: h })))),
      el("tbody", null, rows)));
  }

  function dl(pairs) {
    return el("dl", { className: "facts" }, pairs.filter(Boolean).map(([k, v]) =>
      el("div", null, el("dt", { text: k }), el("dd", null, v instanceof Node ? v : String(v ?? "—")))));
  }

  function json(value) {
    return el("code", { className: "json", text: JSON.stringify(value) });
  }

  function renderDetail(inst, history, actions, volumes) {
    const view = $("instance-view");
    const { bar, fill } = progressBar("bar-large");
    const refs = {
      title: el("h1", { className: "ellipsis" }),
      badge: el("span", { className: "badge" }),
      bar, fill,
      pct: el("span", { className: "pct" }),
      phase: el("span", { className: "phase" }),
      actions: el("div", { className: "row-actions" }),
      hb: el("span", { className: "hb" }),
      key: "",
    };
    state.detail.refs = refs;
    state.detail.instance = inst;

    const failure = inst.failure_reason
      ? el("div", { className: "alert", attrs: { role: "alert" } }, el("b", { text: "Failure: " }), inst.failure_reason)
      : null;

    const [gpuLine, queueLine] = loadSummary(inst.metrics);
    const agent = inst.agent || {};
    const failovers = actions.filter((a) => a.action_type === "FAILOVER");

    const offers = (inst.offers || []).map((o, i) => {
      let outcome = "not tried";
      if (i < inst.offer_index) {
        const f = failovers[i];
        outcome = `failed${f && f.metadata && f.metadata.reason ? `: ${f.metadata.reason}` : ""}`;
      } else if (i === inst.offer_index) {
        outcome = "current";
      }
      return el("tr", { className: i === inst.offer_index ? "current" : "" },
        el("td", { text: i + 1 }), el("td", { text: o.provider }), el("td", { text: o.instance_type }),
        el("td", { text: o.zone || "—" }), el("td", { className: "num", text: fmtMoney(o.hourly_price, o.currency) }),
        el("td", { text: outcome }));
    });

    view.replaceChildren(...[
      el("a", { href: "#/", className: "back", text: "← All instances" }),
      el("div", { className: "detail-head" },
        el("div", { className: "grow" }, refs.title, el("div", { className: "mono muted", text: inst.id })),
        refs.badge, refs.actions),
      el("div", { className: "card" },
        refs.bar,
        el("div", { className: "sub" }, refs.pct, " · ", refs.phase)),
      failure,
      el("div", { className: "detail-grid" },
        el("section", { className: "card", data: { testid: "facts" } }, el("h2", { text: "Instance" }), dl([
          ["Provider", `${inst.provider} · ${inst.instance_type}`],
          ["Zone", inst.zone || "—"],
          ["Provider id", inst.provider_instance_id || "—"],
          ["IP", inst.ip || "—"],
          ["Price", fmtPrice(inst)],
          ["Desired state", inst.desired_state],
          ["Routable", inst.routable ? "yes" : "no"],
          ["Health", inst.health_reason ? `${inst.health}: ${inst.health_reason}` : inst.health],
          ["Pool", inst.labels && inst.labels.pool ? inst.labels.pool : "—"],
          ["Created", fmtTime(inst.created_at)],
          ["Ready at", fmtTime(inst.ready_at)],
          ["Terminated at", fmtTime(inst.terminated_at)],
          ["Labels", Object.keys(inst.labels || {}).length ? json(inst.labels) : "—"],
          ["Model spec", Object.keys(inst.model_spec || {}).length ? json(inst.model_spec) : "—"],
        ])),
        el("section", { className: "card", data: { testid: "agent" } }, el("h2", { text: "Agent" }), dl([
          ["Last heartbeat", refs.hb],
          ["Version", agent.version || "—"],
          ["Build date", agent.build_date || "—"],
          ["Checksum", agent.checksum ? el("span", { className: "mono", text: agent.checksum, title: agent.checksum }) : "—"],
          ["Integrity", el("span", { className: `integrity integrity-${agent.integrity}`, text: agent.integrity || "—" })],
          agent.integrity_detail ? ["Detail", agent.integrity_detail] : null,
          ["GPUs", gpuLine],
          ["vLLM", queueLine],
        ]))),
      el("section", null, el("h2", { text: "Offers tried" }),
        table("offers", ["#", "Provider", "Type", "Zone", "Price/h", "Outcome"], offers, "No offers recorded.")),
      el("section", null, el("h2", { text: "State history" }),
        table("history", ["At", "From", "To", "Transition", "Reason", "Actor"], history.map((h) => el("tr", null,
          el("td", { text: fmtTime(h.at) }), el("td", { text: h.from_status || "—" }),
          el("td", null, el("span", { className: `badge status-${h.to_status}`, text: h.to_status })),
          el("td", { className: "mono", text: h.transition }), el("td", { text: h.reason || "" }),
          el("td", { text: h.actor }))), "No state changes yet.")),
      el("section", null, el("h2", { text: "Actions" }),
        table("actions", ["Started", "Action", "Status", "Duration", "Error / detail"], actions.map((a) => el("tr", {
          className: `action-${a.status}`,
        },
        el("td", { text: fmtTime(a.started_at) }), el("td", { className: "mono", text: a.action_type }),
        el("td", null, el("span", { className: `badge action-${a.status}`, text: a.status })),
        el("td", { className: "num", text: fmtDuration(a.duration_ms) }),
        el("td", { className: a.error ? "error" : "muted" }, a.error || metadataText(a.metadata)))),
        "No actions yet.")),
      el("section", null, el("h2", { text: "Volumes" }),
        table("volumes", ["Volume", "Type", "Size", "Boot", "Delete on terminate", "Status", "Discovered", "Deleted"],
          volumes.map((v) => el("tr", null,
            el("td", { className: "mono", text: v.provider_volume_id }), el("td", { text: v.volume_type }),
            el("td", { className: "num", text: `${v.size_gb} GB` }), el("td", { text: v.is_boot ? "yes" : "no" }),
            el("td", { text: v.delete_on_terminate ? "yes" : "no (kept)" }),
            el("td", null, el("span", { className: `badge volume-${v.status}`, text: v.status })),
            el("td", { text: fmtTime(v.discovered_at) }), el("td", { text: fmtTime(v.deleted_at) }))),
          "No volumes discovered yet.")),
    ].filter(Boolean));
    renderDetailHeader(inst);
  }

  /** An action's metadata as one line: its message if it has one, else key=value pairs. */
  function metadataText(metadata) {
    if (!metadata || typeof metadata !== "object") return "";
    if (typeof metadata.message === "string") return metadata.message;
    return Object.entries(metadata)
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(" · ");
  }

  function renderDetailHeader(inst) {
    const refs = state.detail && state.detail.refs;
    if (!refs) return;
    state.detail.instance = inst;
    refs.title.textContent = inst.model;
    refs.title.title = inst.model;
    refs.badge.textContent = inst.status.replace("_", " ");
    refs.badge.className = `badge status-${inst.status}`;
    refs.badge.dataset.status = inst.status;
    setProgress(refs, inst);
    updateHeartbeat(refs.hb, inst);
    if (refs.key !== inst.status) {
      refs.key = inst.status;
      actionButtons(inst, refs.actions);
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

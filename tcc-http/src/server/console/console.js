// The tcc coordinator's operator console. Hand-written, no dependencies, no build step.
//
// Rules this file keeps (the server's Content-Security-Policy enforces the first two):
// - no inline script or style, no eval;
// - every value from the server goes into the page as text (textContent, attributes set one by
//   one), never parsed as markup (a unit test greps this file for the markup sinks);
// - the token lives in sessionStorage only (this tab, gone when it closes) and travels only as
//   the Authorization header of an action, never in a URL or a cookie.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const PAGE = 20;
  const TOKEN_KEY = "tcc-console-token";

  const $ = (id) => document.getElementById(id);
  const state = {
    cursors: [null], // the `after` of each page seen, for going back
    page: 0,
    next: null,
    open: null, // the gid shown in detail
    shown: null, // its JSON, to re-render only what changed
    timer: null,
  };

  // ----- building DOM from data, as text only -------------------------------------------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else if (k === "class") e.className = v;
      else if (k === "onclick") e.addEventListener("click", v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function say(text, bad) {
    const s = $("status");
    s.textContent = text;
    s.className = bad ? "status bad" : "status";
  }

  // ----- time ---------------------------------------------------------------------------------

  function span(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function iso(ms) {
    return new Date(ms).toISOString();
  }

  function deadline(tx) {
    const left = tx.deadline_ms - Date.now();
    const text = left > 0 ? "in " + span(left) : "passed " + span(left) + " ago";
    return el("time", { datetime: iso(tx.deadline_ms), title: iso(tx.deadline_ms), text });
  }

  // ----- the API ------------------------------------------------------------------------------

  // Relative URLs: the console works wherever the router is mounted (/console, /tcc/console...).
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") {
      const token = sessionStorage.getItem(TOKEN_KEY);
      if (token) headers.Authorization = "Bearer " + token;
      headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
    });
    let data = null;
    try {
      data = await res.json();
    } catch (_) {
      data = null;
    }
    if (!res.ok) {
      const code = data && data.code ? data.code : "http_" + res.status;
      const message = data && data.message ? data.message : res.statusText;
      const err = new Error(code + ": " + message);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  const txPath = (gid) => "v1/transactions/" + encodeURIComponent(gid);

  // ----- token --------------------------------------------------------------------------------

  function showToken() {
    const has = !!sessionStorage.getItem(TOKEN_KEY);
    $("token-state").textContent = has ? "token set for this tab" : "no token: read only";
    $("token-state").className = has ? "ok" : "muted";
    $("token-forget").hidden = !has;
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("token-input");
    const value = input.value.trim();
    input.value = "";
    if (value) {
      sessionStorage.setItem(TOKEN_KEY, value);
      say("Token kept for this tab only.");
    }
    showToken();
  });

  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
    say("Token forgotten.");
    $("token-input").focus();
  });

  // ----- overview -----------------------------------------------------------------------------

  const ORDER = ["flagged", "trying", "confirming", "cancelling", "confirmed", "cancelled"];

  function showCounts(counts) {
    const ul = $("counts");
    clear(ul);
    for (const name of ORDER) {
      const n = counts[name];
      const loud = name === "flagged" && n > 0;
      const item = el(
        "li",
        { class: "count s-" + name + (loud ? " loud" : "") },
        el("button", {
          type: "button",
          class: "count-button",
          "aria-label": n + " " + name + ": list them",
          onclick: () => filterState(name),
        }, el("span", { class: "n", text: n }), el("span", { class: "label", text: name })),
      );
      ul.append(item);
    }
  }

  function chart(target, slots, series, unit) {
    const W = 300, H = 80, pad = 2;
    const box = $(target);
    clear(box);
    if (slots.length === 0) {
      box.append(el("p", { class: "muted small", text: "collecting: a sample every 5 seconds while this page is open" }));
      return;
    }
    const totals = slots.map((s) => series.reduce((a, k) => a + (s[k.key] || 0), 0));
    const max = Math.max(1, ...totals);
    const bw = (W - pad * 2) / Math.max(slots.length, 12);
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "bars" });
    const label = slots.length + " slots, highest " + fmt(max, unit);
    g.append(Object.assign(svg("title"), { textContent: label }));
    slots.forEach((s, i) => {
      let y = H - pad;
      for (const k of series) {
        const v = s[k.key] || 0;
        if (v <= 0) continue;
        const h = Math.max(1, (v / max) * (H - pad * 2));
        y -= h;
        const r = svg("rect", { x: pad + i * bw, y, width: Math.max(1, bw - 1), height: h, class: k.cls });
        const t = svg("title");
        t.textContent = new Date(s.at_ms).toLocaleTimeString() + ": " + fmt(v, unit) + " " + k.name;
        r.append(t);
        g.append(r);
      }
    });
    box.append(g, el("p", { class: "muted small", text: "max " + fmt(max, unit) }));
  }

  function fmt(v, unit) {
    if (unit === "us") return v >= 1000 ? (v / 1000).toFixed(1) + " ms" : v + " µs";
    return String(v);
  }

  async function refreshOverview() {
    const o = await api("GET", "v1/overview");
    showCounts(o.counts);
    chart("chart-outcomes", o.recent, [
      { key: "confirmed", cls: "k-confirmed", name: "confirmed" },
      { key: "cancelled", cls: "k-cancelled", name: "cancelled" },
      { key: "flagged", cls: "k-flagged", name: "flagged" },
    ]);
    chart("chart-latency", o.recent.map((s) => ({ at_ms: s.at_ms, mean: s.mean_call_us || 0 })),
      [{ key: "mean", cls: "k-latency", name: "mean" }], "us");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  // ----- the list -----------------------------------------------------------------------------

  function filterState(name) {
    $("f-state").value = name;
    $("f-id").value = "";
    state.cursors = [null];
    state.page = 0;
    refreshList().catch(report);
    $("transactions").scrollIntoView();
  }

  function stateBadge(s) {
    return el("span", { class: "badge s-" + s, text: s });
  }

  const finished = (tx) => tx.state === "confirmed" || tx.state === "cancelled";

  function row(tx) {
    const open = el("button", { type: "button", class: "link", onclick: () => openTx(tx.gid) }, tx.gid);
    // A finished transaction's deadline no longer matters, and its last error is history.
    const old = finished(tx);
    return el(
      "tr",
      { "data-gid": tx.gid, class: tx.state === "flagged" ? "flagged-row" : null },
      el("td", { class: "gid" }, open),
      el("td", {}, stateBadge(tx.state)),
      el("td", { text: tx.decision || "–" }),
      el("td", { title: iso(tx.created_at_ms), text: span(Date.now() - tx.created_at_ms) }),
      el("td", {}, old ? "–" : deadline(tx)),
      el("td", { class: "num", text: tx.attempts }),
      el("td", { class: old ? "error old" : "error", title: old && tx.last_error ? "before it finished" : null, text: tx.last_error || "" }),
    );
  }

  async function refreshList() {
    const id = $("f-id").value.trim();
    let items, next = null;
    if (id) {
      try {
        items = [await api("GET", txPath(id))];
      } catch (e) {
        if (e.status !== 404 && e.status !== 400) throw e;
        items = [];
      }
    } else {
      const q = new URLSearchParams({ order: "newest", limit: String(PAGE) });
      if ($("f-state").value) q.set("state", $("f-state").value);
      if ($("f-kind").value) q.set("kind", $("f-kind").value);
      const after = state.cursors[state.page];
      if (after) q.set("after", after);
      const page = await api("GET", "v1/transactions?" + q.toString());
      items = page.items;
      next = page.next || null;
    }
    state.next = next;
    const body = $("tx-rows");
    // Keep the keyboard focus on the same row across a refresh.
    const focused = document.activeElement && body.contains(document.activeElement)
      ? document.activeElement.closest("tr").getAttribute("data-gid") : null;
    clear(body);
    if (items.length === 0) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "no transactions" })));
    }
    for (const tx of items) body.append(row(tx));
    if (focused) {
      const again = Array.from(body.querySelectorAll("tr")).find((r) => r.getAttribute("data-gid") === focused);
      if (again) again.querySelector("button").focus({ preventScroll: true });
    }
    $("page-info").textContent = id ? "one id" : "page " + (state.page + 1);
    $("page-prev").disabled = state.page === 0 || !!id;
    $("page-first").disabled = state.page === 0 || !!id;
    $("page-next").disabled = !next;
  }

  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.cursors = [null];
    state.page = 0;
    refreshList().catch(report);
    const id = $("f-id").value.trim();
    if (id) openTx(id);
  });
  $("page-next").addEventListener("click", () => {
    if (!state.next) return;
    state.cursors[state.page + 1] = state.next;
    state.page += 1;
    refreshList().catch(report);
  });
  $("page-prev").addEventListener("click", () => {
    if (state.page === 0) return;
    state.page -= 1;
    refreshList().catch(report);
  });
  $("page-first").addEventListener("click", () => {
    state.cursors = [null];
    state.page = 0;
    refreshList().catch(report);
  });

  // ----- one transaction ----------------------------------------------------------------------

  function field(dl, name, value) {
    dl.append(el("dt", { text: name }), el("dd", {}, value));
  }

  function happening(h) {
    switch (h.what) {
      case "begun": return "began";
      case "decided": return "decided to " + h.decision;
      case "expired": return "deadline passed while trying: cancelling";
      case "round": return "phase-two round: " + h.done + " done, " + h.failed + " failed";
      case "operator_retry": return "operator retried phase two";
      case "operator_force": return "operator forced " + h.decision;
      default: return h.what;
    }
  }

  function showTx(tx) {
    // Unchanged since shown: keep the page (and the keyboard focus) as it is.
    const json = JSON.stringify(tx);
    if (json === state.shown && !$("detail").hidden) return;
    state.shown = json;
    $("detail").hidden = false;
    $("d-gid").textContent = tx.gid;
    const dl = $("d-fields");
    clear(dl);
    field(dl, "State", stateBadge(tx.state));
    field(dl, "Decision", tx.decision || "none yet");
    field(dl, "Kind", tx.kind || "tcc");
    field(dl, "Began", el("time", { datetime: iso(tx.created_at_ms), text: iso(tx.created_at_ms) + " (" + span(Date.now() - tx.created_at_ms) + " ago)" }));
    field(dl, "Last change", el("time", { datetime: iso(tx.updated_at_ms), text: iso(tx.updated_at_ms) }));
    field(dl, "Deadline", deadline(tx));
    field(dl, "Attempts", String(tx.attempts));
    field(dl, "Last error", el("span", { class: "error", text: tx.last_error || "none" }));
    const o = tx.options || {};
    field(dl, "Options", "retry interval " + (o.retry_interval_ms ? o.retry_interval_ms + " ms" : "default") +
      ", call timeout " + (o.call_timeout_ms ? o.call_timeout_ms + " ms" : "default"));

    const branches = $("d-branches");
    clear(branches);
    for (const b of tx.branches) {
      branches.append(el("tr", {},
        el("td", { class: "gid", text: b.branch }),
        el("td", { class: "target", text: b.target }),
        el("td", {}, el("span", { class: "badge b-" + b.state, text: b.state })),
        el("td", { class: "error", text: b.last_error || "" }),
        el("td", {}, el("pre", { class: "payload", text: b.payload }))));
    }
    if (tx.branches.length === 0) branches.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "no branches" })));

    const hist = $("d-history");
    clear(hist);
    for (const h of tx.history || []) {
      hist.append(el("li", {},
        el("time", { datetime: iso(h.at_ms), text: new Date(h.at_ms).toLocaleString() }), " ",
        happening(h), " → ", stateBadge(h.state),
        h.error ? el("div", { class: "error", text: h.error }) : null));
    }
    if (!tx.history || tx.history.length === 0) hist.append(el("li", { class: "muted", text: "nothing recorded" }));

    const actions = $("d-actions");
    clear(actions);
    if (tx.state === "flagged") {
      actions.append(
        el("button", { type: "button", id: "act-retry", onclick: () => act(tx, "retry") }, "Retry phase two"),
        el("button", { type: "button", id: "act-force", class: "danger", onclick: () => act(tx, "force") },
          "Force " + (tx.decision === "confirm" ? "confirmed" : "cancelled")));
    } else if (tx.state === "trying") {
      actions.append(el("button", { type: "button", id: "act-cancel", class: "danger", onclick: () => act(tx, "cancel") }, "Cancel"));
    } else {
      actions.append(el("span", { class: "muted", text: tx.state === "confirmed" || tx.state === "cancelled" ? "finished: nothing to do" : "phase two is running" }));
    }
  }

  async function openTx(gid) {
    state.open = gid;
    try {
      showTx(await api("GET", txPath(gid)));
      $("detail-title").scrollIntoView();
      $("d-close").focus({ preventScroll: true });
    } catch (e) {
      report(e);
    }
  }

  $("d-close").addEventListener("click", () => {
    state.open = null;
    $("detail").hidden = true;
  });

  // ----- actions, each after a confirmation ---------------------------------------------------

  function confirmDialog(text) {
    return new Promise((resolve) => {
      const d = $("confirm");
      $("confirm-text").textContent = text;
      const done = (yes) => {
        $("confirm-yes").removeEventListener("click", yesH);
        $("confirm-no").removeEventListener("click", noH);
        d.removeEventListener("cancel", noH);
        if (d.open) d.close();
        resolve(yes);
      };
      const yesH = () => done(true);
      const noH = () => done(false);
      $("confirm-yes").addEventListener("click", yesH);
      $("confirm-no").addEventListener("click", noH);
      d.addEventListener("cancel", noH);
      d.showModal();
      $("confirm-no").focus();
    });
  }

  async function act(tx, what) {
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      say("Actions need the operator token: enter it at the top first.", true);
      $("token-input").focus();
      return;
    }
    const outcome = tx.decision === "confirm" ? "confirm" : "cancel";
    const text = {
      retry: "Retry phase two of " + tx.gid + " now, with a fresh retry budget? Its decision (" + tx.decision + ") stays.",
      force: "Declare " + tx.gid + " " + outcome + "ed? Do this only after resolving every pending branch by hand.",
      cancel: "Cancel " + tx.gid + "? Every branch will be cancelled.",
    }[what];
    if (!(await confirmDialog(text))) {
      say("Nothing done.");
      return;
    }
    try {
      let after;
      if (what === "retry") after = await api("POST", txPath(tx.gid) + "/retry");
      else if (what === "force") after = await api("POST", txPath(tx.gid) + "/force", { outcome });
      else after = await api("POST", txPath(tx.gid) + "/cancel?wait_ms=5000");
      say(what + " of " + tx.gid + ": now " + after.state + ".");
      showTx(after);
      refreshAll();
    } catch (e) {
      report(e);
    }
  }

  // ----- refreshing ---------------------------------------------------------------------------

  function report(e) {
    say(String(e && e.message ? e.message : e), true);
  }

  async function refreshAll() {
    try {
      await Promise.all([
        refreshOverview(),
        refreshList(),
        state.open ? api("GET", txPath(state.open)).then(showTx) : null,
      ]);
    } catch (e) {
      report(e);
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(async () => {
      if (!document.hidden) await refreshAll();
      schedule();
    }, REFRESH_MS);
  }

  showToken();
  refreshAll().then(schedule);
})();

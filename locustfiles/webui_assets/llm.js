// The LLM tab's page: polls ./data once a second and draws the numbers and charts (plain canvas, no library).
"use strict";
(function () {
  const POLL_MS = 1000;
  const GAP_S = 5; // a pause longer than this between chart points breaks the line (a new test was started)
  const COLORS = { line: "#1565c0", users: "#8e24aa", slo: "#c62828", kv: "#00897b", waiting: "#ef6c00",
                   pass: "#2e7d32", fail: "#c62828", none: "#b0b7c0", grid: "#d9dee5", text: "#5f6b7a" };
  let seq = 0;
  let history = [];
  let latest = null;

  const $ = (id) => document.getElementById(id);
  const finite = (v) => typeof v === "number" && isFinite(v);

  function fmtNumber(v, digits) {
    return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function fmtRate(v) {
    if (!finite(v)) return "-";
    return Math.abs(v) >= 100 ? fmtNumber(v, 0) + " tokens/s" : fmtNumber(v, 1) + " tokens/s";
  }
  function fmtMs(v) {
    if (!finite(v)) return "-";
    if (Math.abs(v) >= 100) return fmtNumber(v, 0) + " ms";
    return Math.abs(v) >= 1 ? v.toFixed(1) + " ms" : v.toFixed(2) + " ms";
  }
  function fmtMsCell(v) {  // the table's header carries the unit
    if (!finite(v)) return "-";
    if (Math.abs(v) >= 100) return fmtNumber(v, 0);
    return Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(2);
  }
  function fmtInt(v) { return finite(v) ? fmtNumber(v, 0) : "-"; }
  function fmtPct(ratio) { return finite(ratio) ? (ratio * 100).toFixed(1) + " %" : "-"; }
  function fmtClock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false }); }
  function fmtSeconds(s) { return finite(s) ? (Number.isInteger(s) ? s : s.toFixed(1)) + " s" : "-"; }

  function put(id, value, text) {
    const el = $(id);
    if (!el) return;
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }

  function render(d) {
    const w = d.window || {};
    const lat = w.latency_ms || {};
    const state = d.state || "unknown";
    const badge = $("state");
    badge.textContent = state;
    badge.className = "badge " + state;
    const windowText = "last " + fmtSeconds(w.window_s);
    document.querySelectorAll(".w").forEach((el) => { el.textContent = windowText; });

    const sec = $("window");
    sec.dataset.state = state;
    sec.dataset.startUnixS = w.start_unix_s ?? "";
    sec.dataset.endUnixS = w.end_unix_s ?? "";
    sec.dataset.windowS = w.window_s ?? "";
    sec.dataset.windowFullS = w.full_s ?? "";
    sec.dataset.requests = w.requests ?? "";
    sec.dataset.frozen = w.frozen ? "true" : "false";
    sec.dataset.totalRequests = (d.totals || {}).requests ?? "";

    const stage = d.stage;
    const stageText = stage ? (stage.pass_name === stage.stage_name ? stage.stage_name
                                : stage.pass_name + " / " + stage.stage_name) : "none yet";
    const ends = finite(w.end_unix_s) ? fmtClock(w.end_unix_s) : "-";
    const workers = d.workers === null || d.workers === undefined ? "" : " · " + d.workers + " worker(s)";
    $("subtitle").textContent = "Run " + (d.run_id || "-") + " · stage " + stageText + workers +
      " · window: requests completed in the " + windowText + (w.frozen ? " of the test (stopped)" : "") +
      ", up to " + ends;

    let warning = "";
    const gone = d.workers_ended || [];
    if (gone.length) {
      warning = gone.map((g) => "Load generator " + g.worker + (g.status === "lost"
        ? " was lost (no heartbeat) at " : " left at ") + fmtClock(g.ended_unix_s) +
        ": the records it shipped are counted here; the load of the stage it was in fell.").join(" ");
    } else if (d.unreadable_lines > 0) {
      warning = d.unreadable_lines + " unreadable record line(s) skipped.";
    }
    $("warning").hidden = !warning;
    $("warning").textContent = warning;

    put("v-users", d.users, fmtInt(d.users));
    put("v-in-flight", d.in_flight, fmtInt(d.in_flight));
    put("v-output-tokens-per-s", w.output_tokens_per_s, fmtRate(w.output_tokens_per_s));
    put("v-output-tokens", w.output_tokens, fmtInt(w.output_tokens));
    put("v-per-user-tokens-per-s", w.per_user_output_tokens_per_s, fmtRate(w.per_user_output_tokens_per_s));
    put("v-requests", w.requests, fmtInt(w.requests));
    put("v-errors", w.errors, fmtInt(w.errors));
    put("v-error-rate", w.error_rate, fmtPct(w.error_rate));
    for (const m of ["ttft", "tpot", "e2e"]) {
      const x = lat[m] || {};
      put("v-" + m + "-p50", x.p50, fmtMsCell(x.p50));
      put("v-" + m + "-p95", x.p95, fmtMsCell(x.p95));
      put("v-" + m + "-n", x.n, fmtInt(x.n));
    }
    renderSlo(d, stageText);
    renderServer(d.server || {});
    renderErrors(w, d.totals || {});
    renderSearch(d.search || {});
  }

  // ---- SLO search: one block per search pass, built with textContent only (the file's text is never HTML) ----
  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmtLevel(v, unit) {
    if (!finite(v)) return "-";
    return (Number.isInteger(v) ? String(v) : String(Number(v.toFixed(2)))) + " " + unit;
  }
  function fmtShare(ratio) { return finite(ratio) ? (ratio * 100).toFixed(1) + "%" : "-"; }
  function thresholdText(thresholds) {
    return Object.keys(thresholds || {}).map((k) => {
      const m = /^(ttft|tpot|itl|e2e)_ms$/.exec(k);
      return (m ? m[1].toUpperCase() : k) + " ≤ " + fmtMs(thresholds[k]);
    }).join(", ");
  }

  function renderSearch(search) {
    const passes = search.passes || [];
    const section = $("search");
    section.hidden = !passes.length && !search.error;
    $("search-error").hidden = !search.error;
    $("search-error").textContent = search.error ? "search.json could not be read: " + search.error : "";
    const box = $("search-passes");
    box.textContent = "";
    for (const s of passes) box.appendChild(searchBlock(s));
  }

  function searchBlock(s) {
    const unit = s.unit || s.over || "";
    const div = el("div", "search-pass");
    div.dataset.pass = s.pass_name;
    div.dataset.done = s.done ? "true" : "false";
    const conf = finite(s.confidence) ? Math.round(s.confidence * 100) + "% " : "";
    div.appendChild(el("h3", "", "Pass " + s.pass_name + " · searching " + (s.over === "rate" ? "the request rate" : "users") +
      (finite(s.target) ? " · target: " + fmtShare(s.target) + " of requests within " + (thresholdText(s.thresholds) || "the thresholds") : "")));
    const running = el("p", "search-running");
    running.textContent = s.done ? "Finished." : finite(s.running_level) ? "Probing now: " + fmtLevel(s.running_level, unit)
      : "Waiting for the first probe.";
    running.dataset.level = finite(s.running_level) && !s.done ? String(s.running_level) : "";
    div.appendChild(running);

    const table = el("table", "search-probes");
    const head = table.createTHead().insertRow();
    for (const [t, num] of [["Level", true], ["Judged", true], ["Good", true],
                            ["Attainment (" + conf + "CI)", true], ["Verdict", false], ["Decision", false]]) {
      head.appendChild(el("th", num ? "num" : "", t));
    }
    const body = table.createTBody();
    const probes = s.probes || [];
    if (!probes.length) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 6;
      cell.className = "muted";
      cell.textContent = "no probe judged yet";
    }
    for (const p of probes) {
      const row = body.insertRow();
      row.dataset.level = String(p.level);
      row.dataset.verdict = p.verdict;
      const cells = [
        [fmtLevel(p.level, unit), "num"], [fmtInt(p.judged), "num"], [fmtInt(p.good), "num"],
        [fmtShare(p.attainment) + " (" + fmtShare(p.attainment_low) + "–" + fmtShare(p.attainment_high) + ")", "num"],
        [p.verdict, "verdict-" + (["pass", "fail", "unresolved"].includes(p.verdict) ? p.verdict : "unresolved")],
        [p.decision || "", "decision"],
      ];
      for (const [text, cls] of cells) { const c = row.insertCell(); c.className = cls; c.textContent = text; }
    }
    div.appendChild(table);

    if (s.done) {
      div.appendChild(el("p", "search-reason", "Search over: " + (s.reason || "done")));
    }
    div.appendChild(el("p", "search-bracket", s.bracket ? (s.done ? "Result: " : "So far: ") + s.bracket
      : "No bracket yet."));
    return div;
  }

  function renderSlo(d, stageText) {
    const tile = $("slo-tile");
    const results = d.slo_results || [];
    $("slo-stage").textContent = "of stage " + stageText;
    tile.className = "tile" + (d.slo_pass === true ? " pass" : d.slo_pass === false ? " fail" : "");
    if (!results.length) {
      put("v-slo", "", "none set");
      $("slo-detail").textContent = "the stage has no SLOs (give a scenario with --scenario … --manual)";
      return;
    }
    put("v-slo", d.slo_pass === null ? "" : String(d.slo_pass),
        d.slo_pass === true ? "PASS" : d.slo_pass === false ? "FAIL" : "no data");
    $("slo-detail").textContent = results.map((r) => {
      const mark = r.passed === true ? "✓" : r.passed === false ? "✗" : "?";
      const op = r.op === "<=" ? " ≤ " : r.op === ">=" ? " ≥ " : " ? ";
      return mark + " " + sloLabel(r.key) + " " + sloValue(r.key, r.measured) + op + sloValue(r.key, r.threshold) +
        (r.note ? " (" + r.note + ")" : "");
    }).join(" · ");
  }

  // "TTFT p95", "error rate", "output" and the value in that SLO's unit
  function sloLabel(key) {
    const m = /^(ttft|tpot|itl|e2e)_(p[\d.]+)_ms$/.exec(key);
    if (m) return m[1].toUpperCase() + " " + m[2];
    if (key === "attainment_min") return "good requests";
    return key === "error_rate_max" ? "error rate" : key === "min_output_tokens_per_s" ? "output" : key;
  }
  function sloValue(key, v) {
    if (v === null || v === undefined) return "-";
    if (key.endsWith("_ms")) return fmtMs(v);
    if (key === "error_rate_max" || key === "attainment_min") return fmtPct(v);
    return key === "min_output_tokens_per_s" ? fmtRate(v) : String(v);
  }

  function renderServer(s) {
    if (!s.ok) {
      for (const id of ["v-server-running", "v-server-waiting", "v-server-kv", "v-server-preemptions"]) put(id, "", "-");
      $("server-note").textContent = "Server gauges unavailable: " + (s.error || "not read yet");
      return;
    }
    put("v-server-running", s.requests_running, fmtInt(s.requests_running));
    put("v-server-waiting", s.requests_waiting, fmtInt(s.requests_waiting));
    put("v-server-kv", s.kv_cache_usage_ratio, fmtPct(s.kv_cache_usage_ratio));
    const inWindow = finite(s.preemptions_in_window) ? " (+" + fmtInt(s.preemptions_in_window) + ")" : "";
    put("v-server-preemptions", s.preemptions_total, fmtInt(s.preemptions_total) + inWindow);
    $("server-source").textContent = "(" + (s.url || "/metrics") + ")";
    $("server-note").textContent = "read at " + fmtClock(s.t_unix_s);
  }

  function renderErrors(w, totals) {
    const inWin = w.errors_by_category || {};
    const all = totals.errors_by_category || {};
    const cats = Array.from(new Set([...Object.keys(all), ...Object.keys(inWin)]));
    const body = $("errors").tBodies[0];
    body.textContent = "";
    if (!cats.length) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 3;
      cell.className = "muted";
      cell.textContent = "none";
    }
    for (const c of cats) {
      const row = body.insertRow();
      row.dataset.category = c;
      row.insertCell().textContent = c;
      const a = row.insertCell(); a.className = "num"; a.textContent = fmtInt(inWin[c] || 0);
      const b = row.insertCell(); b.className = "num"; b.textContent = fmtInt(all[c] || 0);
    }
    const cancelled = (totals.cancelled || 0);
    $("cancelled-note").textContent = cancelled ? cancelled + " request(s) cancelled by the load generator " +
      "(stopped mid-request; not counted as errors)" : "";
  }

  // ---- charts ----
  function setup(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w, h };
  }

  // An axis maximum and a step from 1, 2, 2.5 or 5 times a power of ten, four or five steps to the top.
  function niceScale(v, integer) {
    if (!finite(v) || v <= 0) v = 1;
    const raw = v / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw);
    if (integer) step = Math.max(1, Math.ceil(step));
    return { max: step * Math.ceil(v / step), step };
  }

  function timeAxis(ctx, pts, x0, x1, y, toX) {
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const n = Math.min(5, pts.length);
    for (let i = 0; i < n; i++) {
      const t = pts[0].t_unix_s + (pts[pts.length - 1].t_unix_s - pts[0].t_unix_s) * (n === 1 ? 0 : i / (n - 1));
      ctx.fillText(fmtClock(t), Math.min(Math.max(toX(t), x0 + 24), x1 - 24), y + 3);
    }
  }

  function lineChart(canvas, pts, o) {
    const { ctx, w, h } = setup(canvas);
    const L = 52, R = o.y2 ? 40 : 10, T = 8, B = 20;
    const x0 = L, x1 = w - R, y0 = h - B, y1 = T;
    if (!pts.length) {
      ctx.fillStyle = COLORS.text;
      ctx.fillText("no data yet: start a test", x0 + 8, T + 14);
      return;
    }
    const tMin = pts[0].t_unix_s, tMax = Math.max(pts[pts.length - 1].t_unix_s, tMin + 1);
    const toX = (t) => x0 + (x1 - x0) * (t - tMin) / (tMax - tMin);
    const vals = pts.map(o.y).filter(finite);
    // a target far above the data would flatten the line: then it is written, not drawn
    const dataMax = Math.max(0, ...vals);
    const drawThreshold = finite(o.threshold) && (o.threshold <= 2 * dataMax || !vals.length);
    if (drawThreshold) vals.push(o.threshold);
    const scale = o.yMax ? { max: o.yMax, step: o.yMax / 4 } : niceScale(Math.max(0, ...vals) * 1.05);
    const yMax = scale.max;
    const toY = (v) => y0 - (y0 - y1) * v / yMax;
    ctx.strokeStyle = COLORS.grid;
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = 0; v <= yMax + scale.step / 2; v += scale.step) {
      const y = toY(v);
      ctx.beginPath(); ctx.moveTo(x0, y); ctx.lineTo(x1, y); ctx.stroke();
      ctx.fillText(o.fmt ? o.fmt(v) : String(v), x0 - 4, y);
    }
    timeAxis(ctx, pts, x0, x1, y0, toX);
    if (finite(o.threshold) && !drawThreshold) {
      ctx.fillStyle = COLORS.slo;
      ctx.textAlign = "right";
      ctx.textBaseline = "top";
      ctx.fillText("SLO target " + (o.fmt ? o.fmt(o.threshold) : o.threshold) + " (above the chart)", x1 - 2, y1 + 2);
    }
    if (drawThreshold) {
      ctx.save();
      ctx.setLineDash([5, 4]);
      ctx.strokeStyle = COLORS.slo;
      ctx.beginPath(); ctx.moveTo(x0, toY(o.threshold)); ctx.lineTo(x1, toY(o.threshold)); ctx.stroke();
      ctx.restore();
    }
    const s2 = o.y2 ? niceScale(Math.max(1, ...pts.map(o.y2).filter(finite)), true) : null;
    if (o.y2) drawSeries(ctx, pts, o.y2, toX, (v) => y0 - (y0 - y1) * v / s2.max, o.y2Color, 1.2);
    drawSeries(ctx, pts, o.y, toX, toY, o.color, 2);
    if (o.y2) {
      ctx.fillStyle = o.y2Color;
      ctx.textAlign = "left";
      for (let v = 0; v <= s2.max; v += s2.step) ctx.fillText(String(v), x1 + 4, y0 - (y0 - y1) * v / s2.max);
    }
  }

  function drawSeries(ctx, pts, get, toX, toY, color, width) {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    let pen = false, prevT = null;
    for (const p of pts) {
      const v = get(p);
      if (!finite(v) || (prevT !== null && p.t_unix_s - prevT > GAP_S)) pen = false;
      if (finite(v)) {
        const x = toX(p.t_unix_s), y = toY(v);
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      }
      prevT = p.t_unix_s;
    }
    ctx.stroke();
    ctx.lineWidth = 1;
  }

  function sloChart(canvas, pts) {
    const { ctx, w, h } = setup(canvas);
    const x0 = 52, x1 = w - 10, y0 = h - 20, top = 22;
    if (!pts.length) {
      ctx.fillStyle = COLORS.text;
      ctx.fillText("no data yet: start a test", x0 + 8, 30);
      return;
    }
    const tMin = pts[0].t_unix_s, tMax = Math.max(pts[pts.length - 1].t_unix_s, tMin + 1);
    const toX = (t) => x0 + (x1 - x0) * (t - tMin) / (tMax - tMin);
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText("SLOs", x0 - 4, (top + y0) / 2);
    for (let i = 0; i < pts.length; i++) {
      const p = pts[i];
      const next = i + 1 < pts.length && pts[i + 1].t_unix_s - p.t_unix_s <= GAP_S ? pts[i + 1].t_unix_s : p.t_unix_s + 1;
      ctx.fillStyle = p.slo_pass === true ? COLORS.pass : p.slo_pass === false ? COLORS.fail : COLORS.none;
      const xa = toX(p.t_unix_s), xb = Math.min(toX(next), x1);
      ctx.fillRect(xa, top, Math.max(xb - xa + 0.5, 1), y0 - top);  // overlap: no hairline gaps
    }
    // stage boundaries and names
    ctx.strokeStyle = COLORS.text;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    let prev = undefined;
    for (const p of pts) {
      if (p.stage_index !== prev) {
        const x = toX(p.t_unix_s);
        ctx.beginPath(); ctx.moveTo(x, 2); ctx.lineTo(x, y0); ctx.stroke();
        ctx.fillStyle = COLORS.text;
        if (p.stage_name) ctx.fillText(p.stage_name, x + 3, 4);
        prev = p.stage_index;
      }
    }
    timeAxis(ctx, pts, x0, x1, y0, toX);
  }

  function drawCharts() {
    const pts = history;
    lineChart($("c-throughput"), pts, {
      y: (p) => p.output_tokens_per_s, color: COLORS.line,
      fmt: (v) => fmtNumber(v, v >= 10 || Number.isInteger(v) ? 0 : 1),
      y2: (p) => p.users, y2Color: COLORS.users,
    });
    const slo = pts.length ? pts[pts.length - 1].ttft_p95_slo_ms : null;
    lineChart($("c-ttft"), pts, { y: (p) => p.ttft_p95_ms, color: COLORS.line, threshold: slo,
                                  fmt: (v) => fmtNumber(v, v >= 10 || Number.isInteger(v) ? 0 : 1) });
    lineChart($("c-kv"), pts, {
      y: (p) => finite(p.kv_cache_usage_ratio) ? p.kv_cache_usage_ratio * 100 : null, color: COLORS.kv, yMax: 100,
      fmt: (v) => v.toFixed(0), y2: (p) => p.requests_waiting, y2Color: COLORS.waiting,
    });
    sloChart($("c-slo"), pts);
  }

  async function poll() {
    try {
      const r = await fetch("data?since=" + seq, { cache: "no-store" });
      if (r.ok) {
        const d = await r.json();
        if (d.history_seq < seq) { history = []; seq = 0; }  // the server restarted
        history = history.concat(d.history || []);
        if (history.length > 7200) history = history.slice(history.length - 7200);
        seq = d.history_seq || seq;
        latest = d;
        if (d.ready) render(d);
        drawCharts();
        document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
      }
    } catch (e) {
      $("state").textContent = "no connection";
      $("state").className = "badge";
    }
    setTimeout(poll, POLL_MS);
  }

  window.addEventListener("resize", () => { if (latest) drawCharts(); });
  poll();
})();

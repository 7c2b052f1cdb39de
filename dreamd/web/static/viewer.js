// The Dream Window page: frames announced by server-sent events, each loaded and
// decoded out of sight, then crossfaded in over the whole frame interval. All state is
// bounded (three <img> layers reused, a fixed ring of latency samples), so a page left
// open for days does not grow. A hidden page (a wallpaper app hiding it, a background
// tab) closes its stream and loads nothing; shown again, it picks up at the frame on
// screen now. The last frame stays up through a pause, a hide or a lost daemon.
"use strict";
(() => {
  const params = new URLSearchParams(location.search);
  const kiosk = params.get("kiosk") === "1";
  // how a frame fills the window: ?fit= for this page, else the server's web.fit
  const FITS = { cover: "cover", contain: "contain", stretch: "fill" };
  const askedFit = params.get("fit");
  const fit = askedFit in FITS ? askedFit : document.body.dataset.fit in FITS ?
              document.body.dataset.fit : "cover";
  if (askedFit !== null && !(askedFit in FITS)) {
    console.warn(`fit=${askedFit} is not a fit mode: expected cover, contain or stretch; ` +
                 `using ${fit}`);
  }
  document.body.dataset.fit = fit;
  const $ = (id) => document.getElementById(id);
  const layers = Array.from(document.querySelectorAll("#stage img"));
  const LATENCY_SAMPLES = 600;

  // the exposed viewer's token comes once in the URL, then lives in this browser only
  let token = params.get("token");
  if (token) {
    localStorage.setItem("dreamd-token", token);
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.size ? "?" + params : ""));
  } else {
    token = localStorage.getItem("dreamd-token");
  }

  // what tests and bench/web.py read: counts and swap-to-screen latencies (ms)
  const stats = { shown: 0, failed: 0, frameId: null, url: null, connected: false,
                  fit, hidden: document.hidden, streams: 0,
                  latencies: new Array(LATENCY_SAMPLES).fill(null), latencyNext: 0 };
  window.dreamdViewer = stats;

  // ------------------------------------------------------------ frames
  let front = null;       // the layer fully on screen
  let fading = null;      // {el, anim}: the layer fading in over it
  let loading = null;     // the layer loading the next frame, out of sight
  let pending = null;     // the newest announced frame not yet loading
  let fps = 4;

  function onFrame(frame) {
    if (frame.url === stats.url) return;      // a reconnect repeats the current frame
    pending = frame;
    pump();
  }

  async function pump() {
    if (loading || !pending || document.hidden) return;
    const frame = pending;
    pending = null;
    const el = layers.find((l) => l !== front && (!fading || l !== fading.el));
    loading = el;
    el.style.opacity = "0";
    el.style.zIndex = "0";
    el.src = frame.url;
    try {
      await el.decode();                      // on screen only once it can paint at once
    } catch (err) {
      loading = null;
      if (document.hidden) return;            // cut short by hiding: the stream says anew
      stats.failed += 1;                      // gone already (a page far behind): skip it
      pump();
      return;
    }
    loading = null;
    if (document.hidden) return;              // hidden meanwhile: shown again, it catches up
    fadeIn(el, frame);
    pump();
  }

  function fadeIn(el, frame) {
    finishFade();                             // a frame still fading is shown whole first
    el.style.zIndex = "3";
    const duration = Math.max(0, 1000 / fps);  // the fade lasts the whole frame interval
    const anim = el.animate([{ opacity: 0 }, { opacity: 1 }], { duration, fill: "forwards" });
    fading = { el, anim };
    anim.onfinish = () => { if (fading && fading.anim === anim) finishFade(); };
    stats.shown += 1;
    stats.frameId = frame.id;
    stats.url = frame.url;
    stats.latencies[stats.latencyNext] = Date.now() - frame.swapped_at;
    stats.latencyNext = (stats.latencyNext + 1) % LATENCY_SAMPLES;
  }

  function finishFade() {
    if (!fading) return;
    const { el, anim } = fading;
    el.style.opacity = "1";
    anim.cancel();                            // the style holds it now; the animation goes
    if (front && front !== el) {
      front.style.opacity = "0";
      front.style.zIndex = "0";
    }
    el.style.zIndex = "2";
    front = el;
    fading = null;
  }

  // ------------------------------------------------------------ status
  let status = null;
  let statusAt = 0;       // performance.now() when the last status arrived
  let lostAt = null;      // when the event stream dropped
  let stopped = false;    // the daemon said it stops
  let historyKey = null;

  function text(id, value) {
    const el = $(id);
    const s = value === null || value === undefined || value === "" ? "–" : String(value);
    if (el.textContent !== s) el.textContent = s;
  }

  function onStatus(s) {
    status = s;
    statusAt = performance.now();
    if (s.fps) fps = s.fps;
    const state = s.status === "paused" ? "paused" : s.status;
    text("f-state", s.daemon_status === "running" || s.daemon_status === state ? state
                                                                          : `${state} (${s.daemon_status})`);
    text("f-buffer", s.buffer_seconds === undefined ? null :
         `${s.buffer_seconds} s of ${s.buffer_target_seconds} s` + (s.is_buffering ? " (buffering)" : ""));
    text("f-theme", s.theme);
    text("f-keyframe", s.keyframe_index);
    text("f-paused", s.paused ? `yes: ${s.pause_reason || "paused"}` : "no");
    const p = s.keyframe_progress;   // the ComfyUI prompt running now (issue 14)
    text("f-backend", s.backend ? s.backend + (s.comfyui_status && s.comfyui_status !== "n/a" ?
         ` (ComfyUI ${s.comfyui_status})` : "") + (s.codec ? `, codec ${s.codec}` : "") +
         (p ? `; keyframe ${p.keyframe}: ${p.node_type || "node " + p.node}` +
              (p.step ? ` step ${p.step} of ${p.steps}` : "") : "") : null);
    text("f-problem", s.problem || "none");
    $("exposed").hidden = !(s.web && s.web.exposed);
    $("controls").hidden = kiosk || !(s.web && s.web.controls);
    text("c-pause", s.paused ? "resume" : "pause");
    sliders(s.knob_ranges || {});
    for (const input of document.querySelectorAll("#knobs input")) {
      const value = s.knobs ? s.knobs[input.dataset.key] : undefined;
      if (value !== undefined && document.activeElement !== input) {
        input.value = value;
        input.previousElementSibling.textContent = value;
      }
    }
    const key = `${s.keyframe_index}`;
    if (key !== historyKey && !kiosk && !$("overlay").classList.contains("hidden")) {
      historyKey = key;
      loadHistory();
    }
  }

  async function loadHistory() {
    try {
      const r = await fetch("/api/history");
      if (!r.ok) return;
      const { keyframes } = await r.json();
      const imgs = keyframes.map((k) => {
        const img = document.createElement("img");
        img.src = k.url;
        img.alt = `keyframe ${k.keyframe} (${k.theme})`;
        img.title = img.alt;
        return img;
      });
      $("history").replaceChildren(...imgs);   // the old ones go: a fixed handful at most
    } catch (err) { /* the daemon is away: the next status retries */ }
  }

  // ------------------------------------------------------------ the connection
  let source = null;

  function connect() {
    if (document.hidden || source) return;    // a hidden page listens to nothing
    stats.streams += 1;
    const es = new EventSource("/api/events");
    source = es;
    es.addEventListener("status", (e) => {
      lostAt = null;
      stopped = false;
      stats.connected = true;
      onStatus(JSON.parse(e.data));
      notice();
    });
    es.addEventListener("frame", (e) => onFrame(JSON.parse(e.data)));
    es.addEventListener("bye", () => { stopped = true; });
    es.onerror = () => {
      if (es !== source) return;              // closed by hiding meanwhile
      stats.connected = false;
      if (lostAt === null) lostAt = performance.now();
      notice();
      if (es.readyState === EventSource.CLOSED) {   // refused for good: start over
        es.close();
        source = null;
        setTimeout(connect, 2000);
      }
    };
  }

  function disconnect() {
    if (!source) return;
    source.close();
    source = null;
    stats.connected = false;
  }

  // hidden: no stream, no frame loading, no timers; the frame on screen stays as it is.
  // Shown: a new stream, whose first events are the status and the frame on screen now.
  function onVisibility() {
    stats.hidden = document.hidden;
    if (document.hidden) {
      disconnect();
      pending = null;
      if (loading) {                          // a frame half-loaded: let it go
        loading.removeAttribute("src");
        loading = null;
      }
      finishFade();
      clearInterval(noticeTimer);
      noticeTimer = null;
    } else {
      lostAt = null;
      if (noticeTimer === null) noticeTimer = setInterval(notice, 500);
      connect();
    }
  }
  document.addEventListener("visibilitychange", onVisibility);

  function staleAfter() {
    return 1000 * ((status && status.stale_after_seconds) || 10);
  }

  // "reconnecting" while the stream is down, "not running" once the daemon said it stops
  // or has been away longer than status.json's stale_after_seconds
  function notice() {
    const now = performance.now();
    let say = null;
    if (lostAt !== null || !stats.connected) {
      const away = lostAt === null ? 0 : now - lostAt;
      say = stopped || away > staleAfter() ? "not running: waiting for the daemon to start"
                                           : "reconnecting…";
    } else if (status && now - statusAt + 1000 * (status.age_seconds || 0) > staleAfter()) {
      say = "not responding: the daemon's status is stale";
    }
    const el = $("notice");
    el.hidden = say === null;
    if (say !== null && el.textContent !== say) el.textContent = say;
    if (say !== null) text("f-state", say);
  }
  let noticeTimer = document.hidden ? null : setInterval(notice, 500);

  // ------------------------------------------------------------ controls
  async function send(body) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers["X-Dreamd-Token"] = token;
    let msg;
    try {
      const r = await fetch("/api/control", { method: "POST", headers, body: JSON.stringify(body) });
      const answer = await r.json().catch(() => ({}));
      msg = r.ok ? `control ${answer.control} sent` : (answer.error || `refused (${r.status})`);
    } catch (err) {
      msg = "not sent: the daemon is not reachable";
    }
    text("message", msg);
  }

  $("c-pause").addEventListener("click", () =>
    send(status && status.paused ? { command: "resume" } : { command: "pause" }));
  $("c-theme").addEventListener("click", () => send({ command: "theme", name: "next" }));
  // one slider per knob the server offers, with the schema's range and step (made once)
  function sliders(ranges) {
    const box = $("knobs");
    if (box.dataset.made || !Object.keys(ranges).length) return;
    box.dataset.made = "1";
    for (const [key, r] of Object.entries(ranges)) {
      const label = document.createElement("label");
      const out = document.createElement("output");
      const input = document.createElement("input");
      label.append(r.label + " ", out, input);
      Object.assign(input, { type: "range", min: r.min, max: r.max, step: r.step });
      input.dataset.key = key;
      input.addEventListener("input", () => { out.textContent = input.value; });
      input.addEventListener("change", () => {
        send({ command: "set", key, value: Number(input.value) });
        input.blur();
      });
      box.append(label);
    }
  }

  // ------------------------------------------------------------ the overlay
  function showOverlay(visible) {
    $("overlay").classList.toggle("hidden", !visible);
    $("show").hidden = visible;
    localStorage.setItem("dreamd-overlay", visible ? "shown" : "hidden");
    if (visible) { historyKey = null; if (status) onStatus(status); }
  }
  $("hide").addEventListener("click", () => showOverlay(false));
  $("show").addEventListener("click", () => showOverlay(true));
  document.addEventListener("keydown", (e) => {
    if (e.key === "h" && !kiosk && !(e.target instanceof HTMLInputElement)) {
      showOverlay($("overlay").classList.contains("hidden"));
    }
  });

  if (kiosk) {
    document.body.classList.add("kiosk");
  } else {
    showOverlay(localStorage.getItem("dreamd-overlay") !== "hidden");
  }
  connect();
})();

// Supervisor console: no build step, no dependencies. Talks to the API with the
// bearer key kept in this browser (localStorage); listens through the call's
// signed listen URL (a WebSocket cannot carry headers).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem("pv_api_key") || "", calls: [], selected: null,
  listAbort: null, ws: null, audio: null, nextTime: 0, listening: false, rate: 8000 };
window.pvStats = { samples: 0, frames: 0, events: 0, listUpdates: 0 };

function showError(text) {
  const el = $("error");
  if (!text) { el.hidden = true; el.textContent = ""; return; }
  el.textContent = text; el.hidden = false;
}
function esc(s) { return String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }
function headers(extra) { return Object.assign({ Authorization: "Bearer " + state.key }, extra || {}); }
async function errorText(resp) {
  try { const j = await resp.json(); if (j.error) return `${resp.status}: ${j.error.reason}`;
    if (j.reason) return `${resp.status}: ${j.status} — ${j.reason}`; } catch (e) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- live list (SSE over fetch)
async function runList() {
  if (state.listAbort) state.listAbort.abort();
  const ctl = new AbortController(); state.listAbort = ctl;
  while (!ctl.signal.aborted) {
    if (!state.key) { setConn(false, "no key"); showError("Enter an API key (scope read) to see calls."); return; }
    try {
      const resp = await fetch("/calls/events", { headers: headers(), signal: ctl.signal });
      if (!resp.ok) {
        setConn(false, "refused"); showError("Live call list refused — " + await errorText(resp));
        if (resp.status === 401 || resp.status === 403) return;   // a new key restarts us
        await sleep(3000); continue;
      }
      setConn(true, "live"); showError("");
      const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i); buf = buf.slice(i + 2);
          let ev = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) ev = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (ev === "calls" && data) { state.calls = JSON.parse(data).calls; window.pvStats.listUpdates++; renderList(); }
          if (ev === "error" && data) showError("Call list: " + JSON.parse(data).reason);
        }
      }
      setConn(false, "reconnecting");
    } catch (e) {
      if (ctl.signal.aborted) return;
      setConn(false, "reconnecting"); showError("Live call list disconnected: " + e.message + " (retrying)");
    }
    await sleep(1500);
  }
}
function setConn(on, text) { const el = $("conn"); el.textContent = text; el.className = "pill " + (on ? "on" : "off"); }

function renderList() {
  const ul = $("calls"); ul.textContent = "";
  $("no-calls").hidden = state.calls.length > 0;
  $("list-count").textContent = state.calls.length ? `(${state.calls.filter((c) => c.state === "live").length} live)` : "";
  for (const c of state.calls) {
    const li = document.createElement("li");
    li.dataset.callId = c.call_id; li.dataset.state = c.state;
    if (state.selected === c.call_id) li.classList.add("selected");
    const talk = c.talking && c.talking !== "none" ? `<span class="talk-${esc(c.talking)}">${esc(c.talking)} talking</span>` : "";
    li.innerHTML = `<span class="id">${esc(c.call_id)}</span><span class="pill ${esc(c.state)}">${esc(c.state)}</span>
      <span class="meta">${esc(c.direction)} ${esc(c.from || "")} → ${esc(c.to || "")} · ${c.rate ? c.rate + " Hz" : ""}
      ${c.mode ? "· " + esc(c.mode) : ""} ${c.duration_s != null ? "· " + c.duration_s.toFixed(0) + " s" : ""}
      ${c.owner ? "· owner " + esc(c.owner) : ""} ${c.gateway ? "· gw " + esc(c.gateway) : ""} ${talk}
      ${c.end_reason ? "· " + esc(c.end_reason) : ""}</span>`;
    li.addEventListener("click", () => selectCall(c.call_id));
    ul.appendChild(li);
  }
  if (state.selected) {
    const c = state.calls.find((x) => x.call_id === state.selected);
    if (c) updateHeader(c);
  }
}

// ---------------------------------------------------------------- one call
function updateHeader(c) {
  $("call-state").textContent = c.state; $("call-state").className = "pill " + c.state;
  const info = { direction: c.direction, from: c.from, to: c.to, rate: c.rate && c.rate + " Hz", mode: c.mode,
    owner: c.owner, gateway: c.gateway, duration: c.duration_s != null && c.duration_s.toFixed(0) + " s",
    talking: c.talking, "end reason": c.end_reason };
  $("call-info").innerHTML = Object.entries(info).filter(([, v]) => v)
    .map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${esc(v)}</dd></div>`).join("");
}
async function selectCall(id) {
  if (state.selected !== id) stopListening("switched call");
  state.selected = id; renderList();
  $("call-pane").hidden = false; $("call-title").textContent = id;
  $("timeline").textContent = ""; $("transcript").textContent = ""; $("result").textContent = "";
  $("handoff").hidden = true;
  try {
    const resp = await fetch(`/calls/${encodeURIComponent(id)}`, { headers: headers() });
    if (!resp.ok) { showError(`Call ${id}: ` + await errorText(resp)); return; }
    const d = await resp.json();
    state.detail = d; updateHeader(d.call);
    for (const t of d.timeline) addTimeline(t);
    for (const s of d.transcript) addTranscript(s);
    if (d.call.state === "live") startListening(d.listen_url);
  } catch (e) { showError(`Call ${id}: ${e.message}`); }
}
function addTimeline(t) {
  const li = document.createElement("li");
  const when = t.t ? new Date(parseFloat(t.t) * 1000).toLocaleTimeString() : "";
  const rest = Object.entries(t).filter(([k]) => !["t", "event", "id", "type"].includes(k)).map(([k, v]) => `${k}=${v}`).join(" ");
  li.textContent = `${when} ${t.event} ${rest}`;
  $("timeline").appendChild(li); li.scrollIntoView({ block: "nearest" });
  if (t.event === "command.transfer") $("handoff").hidden = false;
}
function addTranscript(s) {
  const ol = $("transcript"); const id = `seg-${s.channel}-${s.segment}`;
  let li = document.getElementById(id);
  if (!li) { li = document.createElement("li"); li.id = id; ol.appendChild(li); }
  li.textContent = (s.channel === "conversation" ? "[conversation] " : "") + s.text + (s.final ? "" : " …");
  li.className = s.final ? "" : "muted";
}

// ---------------------------------------------------------------- listening (WebAudio)
$("listen").addEventListener("click", () => {
  if (state.listening) stopListening("stopped"); else if (state.detail) startListening(state.detail.listen_url);
});
function startListening(url) {
  if (!url) { $("listen-state").textContent = "this key has no listen scope"; return; }
  stopListening("");
  if (!state.audio) state.audio = new (window.AudioContext || window.webkitAudioContext)();
  state.audio.resume().catch(() => {});
  state.nextTime = 0;
  const ws = new WebSocket(url); ws.binaryType = "arraybuffer"; state.ws = ws; state.listening = true;
  $("listen").textContent = "■ Stop"; $("listen-state").textContent = "connecting…";
  ws.onmessage = (m) => {
    if (typeof m.data === "string") return onListenText(JSON.parse(m.data));
    playFrame(new Int16Array(m.data));
  };
  ws.onclose = (e) => {
    if (state.ws !== ws) return;
    state.listening = false; $("listen").textContent = "▶ Listen";
    $("listen-state").textContent = e.code === 1000 ? `stopped (${e.reason || "closed"})` : `disconnected (${e.code} ${e.reason})`;
    if (e.code !== 1000 && e.code !== 1005) showError(`Listening to ${state.selected} failed: code ${e.code} ${e.reason || "(refused or unreachable)"}`);
  };
}
function stopListening(why) {
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(1000); }
  state.listening = false; $("listen").textContent = "▶ Listen";
  if (why) $("listen-state").textContent = why;
}
function onListenText(msg) {
  window.pvStats.events++;
  if (msg.type === "hello") { state.rate = msg.rate; $("listen-state").textContent = `listening · ${msg.rate} Hz stereo (left caller, right agent)`; }
  else if (msg.type === "timeline") addTimeline(msg);
  else if (msg.type === "transcript") addTranscript(msg);
  else if (msg.type === "notice") $("listen-state").textContent = `listening (skipped ${msg.skipped} late messages)`;
  else if (msg.type === "event" && msg.event === "call.ended") $("listen-state").textContent = `call ended (${msg.reason})`;
}
function playFrame(pcm) {
  const ctx = state.audio; const n = pcm.length >> 1; if (!n) return;
  const buf = ctx.createBuffer(2, n, state.rate);
  const L = buf.getChannelData(0), R = buf.getChannelData(1);
  let el = 0, er = 0;
  for (let i = 0; i < n; i++) { L[i] = pcm[2 * i] / 32768; R[i] = pcm[2 * i + 1] / 32768; el += L[i] * L[i]; er += R[i] * R[i]; }
  $("lvl-l").value = Math.min(1, Math.sqrt(el / n) * 4); $("lvl-r").value = Math.min(1, Math.sqrt(er / n) * 4);
  const now = ctx.currentTime;
  if (state.nextTime < now + 0.05 || state.nextTime > now + 1.0) state.nextTime = now + 0.15;   // (re)buffer, or skip when far behind
  const src = ctx.createBufferSource(); src.buffer = buf; src.connect(ctx.destination);
  src.start(state.nextTime); state.nextTime += buf.duration;
  window.pvStats.samples += n; window.pvStats.frames++;
  $("samples").textContent = window.pvStats.samples;
}

// ---------------------------------------------------------------- control buttons
for (const b of document.querySelectorAll(".controls button")) b.addEventListener("click", () => control(b.dataset.action, b));
async function control(action, button) {
  if (!state.selected) return;
  let body = { action };
  if (action === "play_music") body.file = $("music").value.trim();
  if (action === "speak") body.text = $("speak-text").value.trim();
  if (action === "transfer") body.to = $("transfer-to").value.trim();
  if (action === "transfer_supervisor") body = { action: "transfer", to: "supervisor" };
  const res = $("result"); res.className = "muted"; res.textContent = `${body.action}…`;
  button.disabled = true;
  try {
    const resp = await fetch(`/calls/${encodeURIComponent(state.selected)}/control`,
      { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (resp.ok) { const j = await resp.json(); res.className = "ok"; res.textContent = `${body.action}: ${j.status} by ${j.gateway_id}`; }
    else { const t = await errorText(resp); res.className = "bad"; res.textContent = `${body.action} failed — ${t}`; showError(`${body.action} on ${state.selected} failed — ${t}`); }
  } catch (e) { res.className = "bad"; res.textContent = `${body.action} failed — ${e.message}`; showError(res.textContent); }
  finally { button.disabled = false; }
}

// ---------------------------------------------------------------- key
$("key").value = state.key;
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault(); state.key = $("key").value.trim(); localStorage.setItem("pv_api_key", state.key);
  showError(""); runList();
});
runList();

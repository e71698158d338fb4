"use strict";
// The browser client: one WebRTC call to the server, its `events` data channel, meters and the log.

const $ = (id) => document.getElementById(id);

const call = {
  pc: null,
  channel: null,
  mic: null,
  audioContext: null,
  timers: [],
  chunks: new Map(),
  sessionId: null,
  turns: new Map(),
  playback: null, // {responseId, audibleSince, pausedMs, pausedAt} for the reply now playing
  agentLevel: 0,
  wanted: false, // the user pressed Call and not Hang up: a dropped call is redialled
  attempts: 0, // redials since the call was last up
  sessionIds: [], // every session of this page, for the transcript download
  typed: 0,
  settingsSent: 0,
};

const REDIAL_LIMIT = 5;
const PONG_TIMEOUT_MS = 5000; // no answer to our pings this long: the call is gone
// Reasons a call ends that a redial can mend (the network, or a server restarting).
const REDIAL_REASONS = new Set(["server_shutdown", "media_timeout", "ping_timeout", "ice_failed", "datachannel_closed", "unreachable"]);

const AUDIBLE_LEVEL = 0.01;
// A server started with --auth-token is opened as /#token=...: the fragment never leaves the browser.
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token");
const AUTH = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

// The server cuts its history at what we actually played: report it while a reply plays. The
// position counts from when the reply first became audible here, less the time it was paused.
function reportPlayback() {
  const p = call.playback;
  if (!p) return;
  const now = performance.now();
  if (p.audibleSince === null && call.agentLevel > AUDIBLE_LEVEL) p.audibleSince = now;
  if (p.audibleSince !== null) {
    const paused = p.pausedMs + (p.pausedAt === null ? 0 : now - p.pausedAt);
    send({ type: "playback.position", response_id: p.responseId, position_ms: Math.round(now - p.audibleSince - paused) });
  }
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setConnection(state) {
  const el = $("connection");
  el.textContent = state;
  el.dataset.state = state;
  document.body.dataset.connection = state;
}

function setAgentState(text) {
  $("agent-state").textContent = text;
}

function logEvent(direction, event) {
  const list = $("events");
  const item = document.createElement("li");
  item.textContent = `${direction} ${event.type}${event.error ? ": " + event.error.message : ""}`;
  list.appendChild(item);
  while (list.children.length > 300) list.removeChild(list.firstChild);
}

function send(event) {
  if (call.channel && call.channel.readyState === "open") {
    call.channel.send(JSON.stringify(event));
  }
}

// Server events over ~1100 bytes arrive as ordered `message.chunk` pieces.
function onServerMessage(text) {
  const message = JSON.parse(text);
  if (message.type !== "message.chunk") return onServerEvent(message);
  const parts = call.chunks.get(message.id) || [];
  parts[message.index] = message.data;
  call.chunks.set(message.id, parts);
  if (parts.filter((p) => p !== undefined).length === message.count) {
    call.chunks.delete(message.id);
    onServerEvent(JSON.parse(parts.join("")));
  }
}

function turnElement(id, role) {
  let el = call.turns.get(id);
  if (!el) {
    el = document.createElement("p");
    el.className = `turn ${role}`;
    $("transcript").appendChild(el);
    call.turns.set(id, el);
  }
  return el;
}

const BAR_SCALE_MS = 3000; // the stage bar's full width

function addMetricsRow(m) {
  const row = document.createElement("tr");
  const cells = [m.turn, m.endpoint_ms, m.asr_ms, m.lm_ttft_ms, m.tts_first_audio_ms, m.server_v2v_ms];
  for (const value of cells) {
    const td = document.createElement("td");
    td.textContent = value === undefined || value === null ? "—" : String(Math.round(value));
    row.appendChild(td);
  }
  const bar = document.createElement("td");
  bar.className = "bar";
  for (const [key, name] of [["endpoint_ms", "endpoint"], ["asr_ms", "asr"], ["lm_ttft_ms", "lm"], ["tts_first_audio_ms", "tts"]]) {
    const stage = document.createElement("span");
    stage.className = `stage ${name}`;
    stage.style.width = `${Math.min(100, (100 * (m[key] || 0)) / BAR_SCALE_MS)}%`;
    stage.title = `${name} ${Math.round(m[key] || 0)} ms`;
    bar.appendChild(stage);
  }
  row.appendChild(bar);
  $("metrics").querySelector("tbody").appendChild(row);
}

// An interrupted reply: what the user heard stays, the rest is struck through.
function showHeard(responseId, heard) {
  const el = turnElement(responseId, "assistant");
  const full = el.dataset.full || el.textContent;
  el.dataset.full = full;
  el.classList.add("interrupted");
  const said = document.createElement("span");
  said.className = "heard";
  said.textContent = heard;
  const cut = document.createElement("span");
  cut.className = "cut";
  cut.textContent = full.startsWith(heard) ? full.slice(heard.length) : ` ${full}`;
  el.replaceChildren(said, cut);
}

// A function's output joins its call's line; an error shows as one.
function showToolOutput(item) {
  const el = turnElement(item.call_id, "tool");
  const output = document.createElement("span");
  output.className = "output";
  let failed = false;
  try {
    failed = Boolean(JSON.parse(item.output).error);
  } catch (err) {
    failed = false; // a tool may answer plain text
  }
  output.textContent = ` → ${item.output}`;
  el.classList.toggle("failed", failed);
  el.appendChild(output);
}

function showSettings(detection) {
  const form = $("settings");
  for (const name of ["type", "eagerness", "commit_ms", "threshold", "idle_timeout_ms"]) {
    if (detection[name] !== undefined) form.elements[name].value = detection[name];
  }
  const manual = detection.type === "manual";
  $("commit").hidden = !manual;
  $("commit").disabled = !manual || !call.channel;
}

function onServerEvent(event) {
  if (event.type === "pong") {
    call.lastPong = performance.now();
    return; // one a second: not worth a line in the log
  }
  logEvent("←", event);
  switch (event.type) {
    case "session.created":
    case "session.updated":
      $("profile").textContent = event.session.profile;
      if (event.session.profile === "loopback") setAgentState(`echoing your voice after ${event.session.delay_ms} ms`);
      $("settings-panel").hidden = !event.session.turn_detection;
      if (event.session.turn_detection) showSettings(event.session.turn_detection);
      if (event.type === "session.updated") $("settings-state").textContent = "applied";
      break;
    case "session.state": // overlap: the agent waits, paused, while your speech over it is judged
      setAgentState(event.state === "overlap" ? "paused, listening" : event.state.replace("_", " "));
      break;
    case "session.closed":
      call.closedReason = event.reason;
      showError(`The server ended the call (${event.reason.replaceAll("_", " ")}).`);
      break;
    case "input_audio_buffer.speech_started":
      turnElement(event.item_id, "user").classList.add("partial");
      break;
    case "input_audio_buffer.timeout_triggered": // you said nothing for a while: the agent asks
      turnElement(event.item_id, "user idle").textContent =
        `(silent for ${((event.audio_end_ms - event.audio_start_ms) / 1000).toFixed(0)} s)`;
      break;
    case "response.audio.started":
      call.playback = { responseId: event.response_id, audibleSince: null, pausedMs: 0, pausedAt: null };
      break;
    case "response.audio.paused":
      if (call.playback && call.playback.pausedAt === null) call.playback.pausedAt = performance.now();
      setAgentState("paused, listening");
      break;
    case "response.audio.resumed": {
      const p = call.playback;
      if (p && p.pausedAt !== null) {
        p.pausedMs += performance.now() - p.pausedAt;
        p.pausedAt = null;
      }
      if (event.item_id) { // that speech was not a turn: show it as a backchannel
        const el = turnElement(event.item_id, "user");
        el.classList.remove("partial");
        el.classList.add("backchannel");
        el.textContent = event.transcript || "(a sound)";
      }
      setAgentState("responding");
      break;
    }
    case "conversation.item.input_audio_transcription.delta": {
      const el = turnElement(event.item_id, "user");
      el.classList.add("partial");
      el.textContent = event.transcript; // each partial replaces the one before
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const el = turnElement(event.item_id, "user");
      el.classList.remove("partial");
      el.textContent = event.transcript;
      break;
    }
    case "response.text.delta":
      turnElement(event.response_id, "assistant").textContent += event.delta;
      break;
    case "response.done":
      call.playback = null;
      if (event.response.status !== "completed") showHeard(event.response.id, event.response.output_text);
      break;
    case "conversation.item.truncated":
      showHeard(event.item_id, event.transcript);
      break;
    case "response.function_call_arguments.done":
      turnElement(event.call_id, "tool").textContent = `${event.name}(${event.arguments})`;
      break;
    case "conversation.item.created":
      if (event.item.type === "function_call_output") showToolOutput(event.item);
      break;
    case "metrics.turn":
      addMetricsRow(event);
      break;
    case "error":
      console.warn("server error event", event.error);
      if ((event.error.event_id || "").startsWith("settings")) $("settings-state").textContent = event.error.message;
      break;
  }
}

function level(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const v of buffer) sum += v * v;
  return Math.min(1, Math.sqrt(sum / buffer.length) * 4);
}

function meter(stream, elementId, onLevel) {
  const source = call.audioContext.createMediaStreamSource(stream);
  const analyser = call.audioContext.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const buffer = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    const value = level(analyser, buffer);
    $(elementId).value = value;
    if (onLevel) onLevel(value);
  }, 50);
  call.timers.push(timer);
  return timer;
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // send what we have: the server still tries every candidate given
  });
}

function micErrorMessage(err) {
  if (err.name === "NotAllowedError" || err.name === "SecurityError") {
    return "Microphone access was denied. Allow the microphone for this page and press Call again.";
  }
  if (err.name === "NotFoundError") return "No microphone was found on this device.";
  if (!navigator.mediaDevices) return "This page needs HTTPS (or localhost) for microphone access.";
  return `Cannot open the microphone: ${err.message}`;
}

function openMicrophone() {
  const device = $("mic-select").value;
  return navigator.mediaDevices.getUserMedia({
    audio: {
      echoCancellation: $("aec").checked, noiseSuppression: true, autoGainControl: true, channelCount: 1,
      ...(device ? { deviceId: { exact: device } } : {}),
    },
  });
}

// Whether the browser cancels the echo of what it plays: what its track says it does, not what was
// asked. The server cancels it when the browser does not (--echo-cancel auto).
function browserCancelsEcho(stream) {
  const track = stream.getAudioTracks()[0];
  const settings = track && track.getSettings ? track.getSettings() : {};
  const cancels = settings.echoCancellation === undefined ? $("aec").checked : Boolean(settings.echoCancellation);
  $("echo-note").hidden = cancels;
  return cancels;
}

async function listMicrophones() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $("mic-select");
  const chosen = select.value;
  const mics = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput" && d.deviceId && d.deviceId !== "default");
  select.replaceChildren(new Option("default", ""), ...mics.map((d, i) => new Option(d.label || `microphone ${i + 1}`, d.deviceId)));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
}

// A microphone chosen during a call replaces the one being sent, without redialling.
async function switchMicrophone() {
  if (!call.pc || !call.mic) return;
  try {
    const stream = await openMicrophone();
    const sender = call.pc.getSenders().find((s) => s.track && s.track.kind === "audio");
    await sender.replaceTrack(stream.getAudioTracks()[0]);
    call.mic.getTracks().forEach((t) => t.stop());
    call.mic = stream;
    send({ type: "session.update", session: { client_echo_cancellation: browserCancelsEcho(stream) } });
    clearInterval(call.micMeter);
    call.micMeter = meter(stream, "mic-level");
  } catch (err) {
    showError(micErrorMessage(err));
  }
}

async function startCall() {
  showError("");
  call.wanted = true;
  call.closedReason = null;
  $("call").disabled = true;
  setConnection("connecting");
  let config;
  try {
    const response = await fetch("/api/config", { headers: AUTH });
    if (response.status === 401) {
      showError("This server needs its token: open this page as /#token=YOUR_TOKEN.");
      return endCall("failed");
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (err) {
    showError(`The server is unreachable (${err.message}). Is it running?`);
    return unreachable();
  }
  try {
    call.mic = await openMicrophone();
    listMicrophones();
  } catch (err) {
    showError(micErrorMessage(err));
    return endCall("failed");
  }

  call.audioContext = new AudioContext();
  call.micMeter = meter(call.mic, "mic-level");
  const pc = new RTCPeerConnection({ iceServers: config.ice_servers });
  call.pc = pc;
  const channel = pc.createDataChannel("events");
  call.channel = channel;
  channel.onmessage = (e) => onServerMessage(e.data);
  channel.onopen = () => {
    call.attempts = 0;
    call.lastPong = performance.now();
    call.timers.push(setInterval(() => {
      send({ type: "ping" });
      if (performance.now() - call.lastPong > PONG_TIMEOUT_MS) dropped("ping_timeout"); // the network went
    }, config.ping_interval_ms));
    call.timers.push(setInterval(reportPlayback, 250));
    for (const id of ["say-text", "say-send"]) $(id).disabled = false;
    $("commit").disabled = $("commit").hidden;
  };
  channel.onclose = () => { if (call.pc) dropped(call.closedReason || "datachannel_closed"); };
  pc.addTrack(call.mic.getAudioTracks()[0], call.mic);
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    $("agent-audio").srcObject = stream;
    meter(stream, "agent-level", (value) => { call.agentLevel = value; });
  };
  pc.onconnectionstatechange = () => {
    if (pc !== call.pc) return;
    setConnection(pc.connectionState);
    if (pc.connectionState === "failed") {
      showError("The connection failed. Behind a NAT or VPN the server needs a TURN server (--ice-server).");
      dropped("ice_failed");
    }
  };

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, 3000);
  let response;
  try {
    response = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...AUTH },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", client_echo_cancellation: browserCancelsEcho(call.mic) }),
    });
  } catch (err) {
    showError(`The server is unreachable (${err.message}).`);
    return unreachable();
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const reason = body.error ? body.error.message : `HTTP ${response.status}`;
    showError(response.status === 503 ? `The server is busy: ${reason}. Try again later.` : `Call refused: ${reason}`);
    return endCall("failed");
  }
  call.sessionId = body.session_id;
  call.sessionIds.push(body.session_id);
  document.body.dataset.sessionId = body.session_id;
  $("download").disabled = false;
  $("download-recording").disabled = false;
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  $("hangup").disabled = false;
  $("mute").disabled = false;
}

// While redialling, a server that does not answer yet (restarting) is tried again.
function unreachable() {
  return call.attempts > 0 ? dropped("unreachable") : endCall("failed");
}

// The call ended without Hang up: redial while the user still wants it and the reason allows.
function dropped(reason) {
  const redial = call.wanted && REDIAL_REASONS.has(reason) && call.attempts < REDIAL_LIMIT;
  endCall(redial ? "reconnecting" : "closed");
  if (!redial) return;
  call.attempts += 1;
  const delay = 1000 * Math.min(8, 2 ** (call.attempts - 1));
  setTimeout(() => {
    if (call.wanted && !call.pc) startCall().catch((err) => { showError(err.message); endCall("failed"); });
  }, delay);
}

function endCall(state) {
  call.wanted = state === "reconnecting";
  for (const timer of call.timers) clearInterval(timer);
  call.timers = [];
  if (call.channel) call.channel.close();
  if (call.pc) call.pc.close();
  if (call.mic) call.mic.getTracks().forEach((t) => t.stop());
  if (call.audioContext) call.audioContext.close();
  Object.assign(call, { pc: null, channel: null, mic: null, audioContext: null, sessionId: null, playback: null });
  call.chunks.clear();
  $("agent-audio").srcObject = null;
  $("mic-level").value = 0;
  $("agent-level").value = 0;
  setConnection(state);
  setAgentState("—");
  $("call").disabled = false;
  $("hangup").disabled = true;
  $("mute").disabled = true;
  $("mute").setAttribute("aria-pressed", "false");
  $("mute").textContent = "Mute";
  for (const id of ["say-text", "say-send", "commit"]) $(id).disabled = true;
}

function sayTyped(event) {
  event.preventDefault();
  const text = $("say-text").value.trim();
  if (!text || !call.channel) return;
  call.typed += 1;
  const el = turnElement(`typed-${call.typed}`, "user");
  el.classList.add("typed");
  el.textContent = text;
  send({ type: "conversation.item.create", item: { role: "user", content: [{ type: "input_text", text }] } });
  $("say-text").value = "";
}

function changeSetting(event) {
  const field = event.target;
  if (!field.name || !call.channel || field.value === "") return;
  const value = field.type === "number" ? Number(field.value) : field.value;
  call.settingsSent += 1;
  $("settings-state").textContent = "…";
  send({ type: "session.update", event_id: `settings-${call.settingsSent}`, session: { turn_detection: { [field.name]: value } } });
}

// Every session of this page (a redial starts a new one), as the server keeps them.
async function downloadTranscript() {
  const sessions = [];
  for (const id of call.sessionIds) {
    const response = await fetch(`/api/sessions/${id}/transcript`, { headers: AUTH });
    if (response.ok) sessions.push(await response.json());
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([JSON.stringify({ sessions }, null, 2)], { type: "application/json" }));
  link.download = `transcript-${call.sessionIds[0] || "none"}.json`;
  link.click();
  URL.revokeObjectURL(link.href);
}

// The latest call's recording (a server started with --record keeps one when the call ends).
async function downloadRecording() {
  const id = call.sessionIds[call.sessionIds.length - 1];
  const response = await fetch(`/api/sessions/${id}/recording`, { headers: AUTH });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `recording-${id}.wav`;
  link.click();
  URL.revokeObjectURL(link.href);
}

function toggleMute() {
  const track = call.mic && call.mic.getAudioTracks()[0];
  if (!track) return;
  track.enabled = !track.enabled;
  $("mute").setAttribute("aria-pressed", String(!track.enabled));
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
}

$("call").addEventListener("click", () => startCall().catch((err) => { showError(err.message); endCall("failed"); }));
$("hangup").addEventListener("click", () => endCall("closed"));
$("mute").addEventListener("click", toggleMute);
$("commit").addEventListener("click", () => send({ type: "input_audio_buffer.commit" }));
$("say").addEventListener("submit", sayTyped);
$("settings").addEventListener("change", changeSetting);
$("download").addEventListener("click", () => downloadTranscript().catch((err) => showError(err.message)));
$("download-recording").addEventListener("click", () => downloadRecording().catch((err) => showError(err.message)));
$("mic-select").addEventListener("change", switchMicrophone);
$("aec").addEventListener("change", switchMicrophone);
if (navigator.mediaDevices) navigator.mediaDevices.addEventListener("devicechange", listMicrophones);
listMicrophones();
setConnection("idle");

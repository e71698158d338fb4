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
};

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

function addMetricsRow(m) {
  const row = document.createElement("tr");
  const cells = [m.turn, m.endpoint_ms, m.asr_ms, m.lm_ttft_ms, m.tts_first_audio_ms, m.server_v2v_ms];
  for (const value of cells) {
    const td = document.createElement("td");
    td.textContent = value === undefined || value === null ? "—" : String(Math.round(value));
    row.appendChild(td);
  }
  $("metrics").querySelector("tbody").appendChild(row);
}

function onServerEvent(event) {
  if (event.type === "pong") return; // one a second: not worth a line in the log
  logEvent("←", event);
  switch (event.type) {
    case "session.created":
    case "session.updated":
      $("profile").textContent = event.session.profile;
      if (event.session.profile === "loopback") setAgentState(`echoing your voice after ${event.session.delay_ms} ms`);
      break;
    case "session.state":
      setAgentState(event.state.replace("_", " "));
      break;
    case "session.closed":
      showError(`The server ended the call (${event.reason.replaceAll("_", " ")}).`);
      break;
    case "input_audio_buffer.speech_started":
      turnElement(event.item_id, "user").classList.add("partial");
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
      if (event.response.status !== "completed") {
        const el = turnElement(event.response.id, "assistant");
        el.classList.add("interrupted");
        el.textContent = event.response.output_text; // only what was heard stays
      }
      break;
    case "metrics.turn":
      addMetricsRow(event);
      break;
    case "error":
      console.warn("server error event", event.error);
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
  call.timers.push(setInterval(() => {
    const value = level(analyser, buffer);
    $(elementId).value = value;
    if (onLevel) onLevel(value);
  }, 50));
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

async function startCall() {
  showError("");
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
    return endCall("failed");
  }
  try {
    call.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    showError(micErrorMessage(err));
    return endCall("failed");
  }

  call.audioContext = new AudioContext();
  meter(call.mic, "mic-level");
  const pc = new RTCPeerConnection({ iceServers: config.ice_servers });
  call.pc = pc;
  const channel = pc.createDataChannel("events");
  call.channel = channel;
  channel.onmessage = (e) => onServerMessage(e.data);
  channel.onopen = () => {
    call.timers.push(setInterval(() => send({ type: "ping" }), config.ping_interval_ms));
    call.timers.push(setInterval(reportPlayback, 250));
  };
  channel.onclose = () => { if (call.pc) endCall("closed"); };
  pc.addTrack(call.mic.getAudioTracks()[0], call.mic);
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    $("agent-audio").srcObject = stream;
    meter(stream, "agent-level", (value) => { call.agentLevel = value; });
  };
  pc.onconnectionstatechange = () => {
    setConnection(pc.connectionState);
    if (pc.connectionState === "failed") {
      showError("The connection failed. Behind a NAT or VPN the server needs a TURN server (--ice-server).");
      endCall("failed");
    }
  };

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, 3000);
  let response;
  try {
    response = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...AUTH },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
    });
  } catch (err) {
    showError(`The server is unreachable (${err.message}).`);
    return endCall("failed");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const reason = body.error ? body.error.message : `HTTP ${response.status}`;
    showError(response.status === 503 ? `The server is busy: ${reason}. Try again later.` : `Call refused: ${reason}`);
    return endCall("failed");
  }
  call.sessionId = body.session_id;
  document.body.dataset.sessionId = body.session_id;
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  $("hangup").disabled = false;
  $("mute").disabled = false;
}

function endCall(state) {
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
setConnection("idle");

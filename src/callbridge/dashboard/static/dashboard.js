// callbridge's dashboard: live updates (server-sent events), the recording's waveform, playing from a line.
// What a call carried is only ever set as textContent: a caller's markup stays text.
"use strict";

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  row.appendChild(td);
  return td;
}

function callsPage() {
  const body = document.querySelector("#live-calls tbody");
  const none = document.getElementById("no-live");
  const rowOf = (sid) => body.querySelector('tr[data-call-sid="' + CSS.escape(sid) + '"]');
  const refresh = () => { none.hidden = body.rows.length > 0; };
  const source = new EventSource("/api/live");
  source.addEventListener("call.started", (message) => {
    const data = JSON.parse(message.data);
    if (rowOf(data.call_sid)) return;
    const row = document.createElement("tr");
    row.dataset.callSid = data.call_sid;
    const link = document.createElement("a");
    link.href = "/dashboard/calls/" + encodeURIComponent(data.call_sid);
    link.textContent = data.call_sid;
    cell(row, "").appendChild(link);
    cell(row, data.from);
    cell(row, data.to);
    cell(row, data.agent);
    cell(row, data.status).className = "status";
    body.prepend(row);
    refresh();
  });
  source.addEventListener("call.updated", (message) => {
    const data = JSON.parse(message.data);
    const row = rowOf(data.call_sid);
    if (row && data.status) row.lastElementChild.textContent = data.status;
  });
  source.addEventListener("call.ended", (message) => {
    const row = rowOf(JSON.parse(message.data).call_sid);
    if (row) row.remove();
    refresh();
  });
}

function transcriptLine(data) {
  const item = document.createElement("li");
  item.className = data.speaker === "agent" ? "agent" : "caller";
  if (data.interrupted) item.classList.add("interrupted");
  item.dataset.startMs = String(data.start_ms);
  for (const [name, text] of [["at", (data.start_ms / 1000).toFixed(1)], ["speaker", data.speaker], ["text", data.text]]) {
    const span = document.createElement("span");
    span.className = name;
    span.textContent = text;
    item.appendChild(span);
  }
  return item;
}

// A live call's stream starts with the call's first event: what the page already shows is not shown twice.
function shown(container, key) {
  for (const element of container.querySelectorAll("[data-key]")) if (element.dataset.key === key) return true;
  return false;
}

function timelineRow(kind, details, data) {
  const body = document.querySelector("#timeline tbody");
  const key = kind + " " + JSON.stringify(data);
  if (shown(body, key)) return;
  const row = document.createElement("tr");
  row.className = "event " + kind;
  row.dataset.key = key;
  cell(row, new Date().toISOString().slice(11, 23));
  cell(row, kind);
  const code = document.createElement("code");
  code.textContent = typeof details === "string" ? details : JSON.stringify(details);
  cell(row, "").appendChild(code);
  body.appendChild(row);
}

function followCall(sid) {
  const list = document.getElementById("transcript");
  const partial = document.getElementById("partial");
  const source = new EventSource("/api/calls/" + encodeURIComponent(sid) + "/live");
  source.addEventListener("transcript.line", (message) => {
    const data = JSON.parse(message.data);
    const key = data.speaker + " " + data.item_id + " " + data.start_ms;
    if (shown(list, key)) return;
    const line = transcriptLine(data);
    line.dataset.key = key;
    list.appendChild(line);
    partial.textContent = "";
  });
  source.addEventListener("transcript.partial", (message) => {
    const data = JSON.parse(message.data);
    partial.textContent = data.text == null ? "" : String(data.text);
  });
  source.addEventListener("call.event", (message) => {
    const data = JSON.parse(message.data);
    timelineRow(data.kind, data.data, data.data);
  });
  source.addEventListener("turn.metrics", (message) => {
    const data = JSON.parse(message.data);
    const kept = { turn_latency_s: data.turn_latency_s };
    timelineRow("turn", "latency " + Math.round(Number(data.turn_latency_s) * 1000) + " ms", kept);
  });
  source.addEventListener("call.updated", (message) => {
    const data = JSON.parse(message.data);
    if (data.status) document.getElementById("call-status").textContent = data.status;
  });
  source.addEventListener("call.ended", (message) => {
    const data = JSON.parse(message.data);
    document.getElementById("call-status").textContent = data.status || "ended";
    document.getElementById("call-end-reason").textContent = data.end_reason || "";
    const hangUp = document.getElementById("hang-up");
    if (hangUp) hangUp.remove();
    source.close();
  });
}

function drawWaveform(canvas, buffer) {
  const context = canvas.getContext("2d");
  const width = canvas.width, height = canvas.height, lane = height / 2;
  context.clearRect(0, 0, width, height);
  const colours = ["#2b6cb0", "#c05621"];
  for (let channel = 0; channel < Math.min(2, buffer.numberOfChannels); channel++) {
    const samples = buffer.getChannelData(channel);
    const step = Math.max(1, Math.floor(samples.length / width));
    const middle = lane * channel + lane / 2;
    context.fillStyle = colours[channel];
    for (let x = 0; x < width; x++) {
      let peak = 0;
      for (let i = x * step; i < Math.min(samples.length, (x + 1) * step); i++) {
        const value = Math.abs(samples[i]);
        if (value > peak) peak = value;
      }
      const half = Math.max(0.5, peak * (lane / 2 - 2));
      context.fillRect(x, middle - half, 1, half * 2);
    }
  }
  canvas.dataset.drawn = "yes";
}

async function recording(sid) {
  const audio = document.getElementById("recording");
  const canvas = document.getElementById("waveform");
  if (!audio || !canvas) return;
  const response = await fetch("/api/calls/" + encodeURIComponent(sid) + "/recording", { credentials: "same-origin" });
  if (!response.ok) return;
  const decoder = new OfflineAudioContext(2, 1, 8000);
  drawWaveform(canvas, await decoder.decodeAudioData(await response.arrayBuffer()));
  canvas.addEventListener("click", (event) => {
    if (!audio.duration) return;
    audio.currentTime = (event.offsetX / canvas.clientWidth) * audio.duration;
    audio.play();
  });
}

function callPage() {
  const section = document.getElementById("call");
  const sid = section.dataset.callSid;
  document.getElementById("transcript").addEventListener("click", (event) => {
    const line = event.target.closest("li[data-start-ms]");
    const audio = document.getElementById("recording");
    if (!line || !audio) return;
    audio.currentTime = Number(line.dataset.startMs) / 1000;
    audio.play();
  });
  if (section.dataset.live === "yes") followCall(sid);
  else recording(sid);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "calls") callsPage();
  else if (page === "call") callPage();
});

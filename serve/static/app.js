// The viewer: upload one record to /v1/score/plot, show the returned PNG and the verdict the service puts in the
// response headers (one request gives both, so the picture and the numbers always belong to the same scoring).
"use strict";

const $ = (id) => document.getElementById(id);
let plotUrl = null;
let diagnosisLevel = null;   // set when the model has a diagnosis head (/v1/model), so /v1/diagnose answers

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function showModel() {
  try {
    const response = await fetch("v1/model", { headers: authHeaders() });
    if (!response.ok) { $("model").textContent = `model: unavailable (HTTP ${response.status})`; return; }
    const info = await response.json();
    const threshold = info.threshold === null ? "not calibrated" : info.threshold.toPrecision(4);
    $("model").textContent = `model ${info.model_version}, ${info.mode} mode, threshold ${threshold}`;
    diagnosisLevel = info.diagnosis ? info.diagnosis.level : null;
  } catch (err) {
    $("model").textContent = `model: unavailable (${err})`;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

async function score(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("submit").disabled = true;
  $("verdict").textContent = "scoring…";
  $("verdict").className = "";
  const body = new FormData();
  for (const file of $("files").files) body.append("files", file, file.name);
  const fs = $("fs").value.trim();
  const url = "v1/score/plot" + (fs ? `?fs=${encodeURIComponent(fs)}` : "");
  try {
    const response = await fetch(url, { method: "POST", body, headers: authHeaders() });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      const detail = payload.detail;
      const reason = detail && detail.reason ? `${detail.reason}: ${detail.message}` : JSON.stringify(detail);
      $("result").hidden = true;
      showError(`Not scored (HTTP ${response.status}). ${reason || response.statusText}`);
      return;
    }
    const scoreValue = Number(response.headers.get("X-ECG-Score"));
    const anomalous = response.headers.get("X-ECG-Label") === "anomalous";
    const threshold = response.headers.get("X-ECG-Threshold");   // "nan" when the model was never calibrated
    if (plotUrl) URL.revokeObjectURL(plotUrl);
    plotUrl = URL.createObjectURL(await response.blob());
    $("plot").src = plotUrl;
    $("verdict").textContent = `score ${scoreValue.toPrecision(4)}: ${anomalous ? "anomalous" : "normal"}`
      + ` (threshold ${threshold === "nan" ? "not calibrated" : threshold})`;
    $("verdict").className = anomalous ? "anomalous" : "normal";
    $("result").hidden = false;
    await showDiagnosis(body, fs);
  } catch (err) {
    showError(`Request failed: ${err}`);
  } finally {
    $("submit").disabled = false;
  }
}

// The diagnoses next to the overlay: the labels above their calibrated thresholds, and the most probable classes.
async function showDiagnosis(body, fs) {
  $("diagnosis").hidden = true;
  if (!diagnosisLevel) return;
  const params = new URLSearchParams({ map: "none" });
  if (fs) params.set("fs", fs);
  const response = await fetch(`v1/diagnose?${params}`, { method: "POST", body, headers: authHeaders() });
  if (!response.ok) return;
  const { diagnosis } = await response.json();
  const top = Object.entries(diagnosis.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5)
    .map(([name, p]) => `${name} ${p.toFixed(2)}`).join(", ");
  $("diagnosis").textContent = `diagnosis (${diagnosis.level}): ${diagnosis.labels.join(", ") || "no label above "
    + "its threshold"}; most probable: ${top}`;
  $("diagnosis").hidden = false;
}

$("upload").addEventListener("submit", score);
$("token").addEventListener("change", showModel);
showModel();

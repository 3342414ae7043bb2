// The try-it page: submit the chosen image as a job, follow its progress, show and offer the result.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
const WORDS = {
  invalid_image: "This file could not be read as an image.",
  image_too_large: "This image is too large for this server.",
  payload_too_large: "This file is too large to upload to this server.",
  unsupported_media_type: "This file type is not supported.",
  invalid_parameter: "A setting is not valid.",
  missing_image: "Choose an image first.",
  unauthorized: "This server needs an access token: enter it in the Access token field.",
  queue_full: "The server is busy. Try again in a few seconds.",
  not_ready: "The model is still loading. Try again in a few seconds.",
  shutting_down: "The server is restarting. Try again in a moment.",
  out_of_memory: "The server ran out of memory on this image. Try a smaller one.",
  timeout: "The job took longer than this server allows.",
  worker_error: "The model failed on this image.",
  job_expired: "The result has expired. Submit the image again.",
  job_not_found: "The job is gone (the server may have restarted). Submit the image again.",
};

let file = null;
let job = null;  // {id, timer}
const urls = [];

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// An error response (or a failed job's error) in words: the plain explanation, then the server's message.
function describe(err, status) {
  if (!err) return `The server answered with HTTP ${status}.`;
  const words = WORDS[err.code] || "Something went wrong.";
  return err.message ? `${words} (${err.message})` : words;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (e) {
    throw new Error("The server cannot be reached. Is it still running?");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    throw new Error(describe(body && body.error, response.status));
  }
  return response;
}

let models = [];
let auto = null;  // {lossy, other}: the ids `auto` picks on this server (GET /v1/models)
let lossy = null;  // whether the chosen file is a JPEG or a lossy WebP (null: no file)
let shown = null;  // the id of the model whose steps the slider shows

// Whether a file is a JPEG or a lossy WebP, from its first bytes: the test of model/choice.py's is_lossy,
// which the server's `auto` applies to the upload.
async function isLossy(f) {
  const b = new Uint8Array(await f.slice(0, 4096).arrayBuffer());
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return true;
  const text = String.fromCharCode(...b);
  if (text.slice(0, 4) !== "RIFF" || text.slice(8, 12) !== "WEBP") return false;
  const vp8 = text.indexOf("VP8 ", 12);
  const vp8l = text.indexOf("VP8L", 12);
  return vp8 >= 0 && (vp8l < 0 || vp8 < vp8l);
}

async function loadModel() {
  try {
    const list = await (await api("/v1/models")).json();
    models = list.models;
    auto = list.auto || null;
    const select = $("model-select");
    const keep = select.value;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (auto) select.prepend(new Option("auto", "auto"));
    select.value = models.some((m) => m.id === keep) || (keep === "auto" && auto) ? keep : list.default;
    $("model").textContent = `${models.length} model${models.length === 1 ? "" : "s"} on ` +
      `${models[0].device} (${models[0].backend}).`;
    showModel(true);
    showError("");
  } catch (e) {
    $("model").textContent = "";
    showError(e.message);
  }
  updateSteps();
}

// The model a request would get: the one selected, or with `auto` the one for the chosen file's kind.
function target() {
  const id = $("model-select").value;
  if (id !== "auto" || !auto) return models.find((x) => x.id === id) || models[0];
  return models.find((x) => x.id === (lossy ? auto.lossy : auto.other)) || models[0];
}

function showModel(resetSteps) {
  const m = target();
  if (!m) return;
  if (resetSteps || m.id !== shown) $("steps").value = m.default_steps;
  $("steps").max = m.max_steps;
  shown = m.id;
  const inputs = m.degradation === "real" ? "real-world (JPEG, noise, blur)" : "clean";
  const card = `${m.id}: ${m.summary}. Trained on ${inputs} inputs; ${(m.parameters / 1e6).toFixed(2)} M ` +
    `parameters; default ${m.default_steps} ${m.default_sampler} step${m.default_steps === 1 ? "" : "s"}.`;
  let text = card;
  if ($("model-select").value === "auto" && auto) {
    text = lossy === null
      ? `auto: JPEG and lossy WebP images go to ${auto.lossy}, other images to ${auto.other}.`
      : `auto: this ${lossy ? "lossy (JPEG or WebP)" : "lossless"} image goes to ${m.id}. ${card}`;
  }
  const measured = figures(m);
  $("model-card").textContent = [text, figuresText(measured)].filter(Boolean).join(" ");
  $("model-card").dataset.model = m.id;
  $("ensemble-best").textContent = measured.best ? `; best for ${m.id}: ${measured.best}` : "";
  updateSteps();
}

// The card's validation figures for the inputs the model is for: PSNR-Y at its default steps (`base`) and with each
// self-ensemble measured at those steps (labels `steps=N` and `ensemble=N`, values [PSNR-Y, SSIM] or PSNR-Y), and
// the self-ensemble that measured highest, above `base` (`best`: the fewest members among equals; null if none).
function figures(m) {
  const real = m.degradation === "real";
  const table = (m.validation || {})[real ? "jpeg75" : "bicubic"] || {};
  const psnr = (v) => (Array.isArray(v) ? v[0] : v);
  const base = psnr(table[`steps=${m.default_steps}`]);  // none where the server changed the default steps
  const ensembles = base === undefined ? [] : Object.keys(table).filter((k) => k.startsWith("ensemble="))
    .map((k) => [Number(k.slice(9)), psnr(table[k])]);
  let best = null;
  for (const [n, v] of ensembles) {
    if (v > (best ? best[1] : base) || (best && v === best[1] && n < best[0])) best = [n, v];
  }
  return { inputs: real ? "saved as JPEG at quality 75" : "clean", base, ensembles, best: best && best[0] };
}

function figuresText({ inputs, base, ensembles }) {
  if (base === undefined) return "";
  const more = ensembles.map(([n, v]) => `; self-ensemble ${n}: ${v.toFixed(2)}`).join("");
  return `On our validation photos (${inputs}): ${base.toFixed(2)} dB PSNR-Y${more}.`;
}

function updateSteps() {
  const n = Number($("steps").value);
  $("steps-value").textContent = n === 0 ? "0 (fidelity: the encoder's output, fastest)" : String(n);
}

async function choose(f) {
  if (!f) return;
  file = f;
  showError("");
  $("drop-text").innerHTML = "";
  $("drop-text").append(Object.assign(document.createElement("strong"), { textContent: f.name }),
    ` (${Math.ceil(f.size / 1024)} KiB) — choose another or drop it here`);
  const url = URL.createObjectURL(f);
  urls.push(url);
  $("thumb").src = url;
  $("thumb").hidden = false;
  $("submit").disabled = false;
  lossy = null;
  let kind = false;
  try { kind = await isLossy(f); } catch (e) { /* unreadable: the server will say */ }
  if (file === f) {
    lossy = kind;
    showModel(false);
  }
}

function setBusy(busy) {
  $("submit").disabled = busy || !file;
  $("cancel").hidden = !busy;
  $("file").disabled = busy;
}

function showProgress(info) {
  const p = info.progress;
  $("progress").value = info.status === "succeeded" ? 1 : p.fraction;
  const steps = p.steps_total ? `${p.steps_done} of ${p.steps_total} denoiser steps` :
    `${p.tiles_done} of ${p.tiles_total} tiles`;
  $("status-text").textContent = `${info.status}: ${steps}, ${p.tiles_total} tiles, ` +
    `${info.timings.total_s.toFixed(1)} s`;
}

async function submit(event) {
  event.preventDefault();
  if (!file) { showError(WORDS.missing_image); return; }
  showError("");
  $("result").hidden = true;
  const form = new FormData();
  form.append("image", file, file.name);
  if ($("model-select").value) form.append("model", $("model-select").value);
  form.append("steps", $("steps").value);
  if ($("seed").value !== "") form.append("seed", $("seed").value);
  if ($("ensemble").value !== "1") form.append("ensemble", $("ensemble").value);
  setBusy(true);
  $("status").hidden = false;
  $("progress").value = 0;
  $("status-text").textContent = "uploading…";
  try {
    const created = await (await api("/v1/jobs?bicubic=true", { method: "POST", body: form })).json();
    job = { id: created.id, timer: null };
    poll(created.id);
  } catch (e) {
    finish(e.message);
  }
}

async function poll(id) {
  if (!job || job.id !== id) return;
  try {
    const info = await (await api(`/v1/jobs/${id}`)).json();
    if (!job || job.id !== id) return;
    showProgress(info);
    if (info.status === "succeeded") {
      await showResult(info);
      finish("");
    } else if (info.status === "failed") {
      finish(describe(info.error, 500));
    } else if (info.status === "cancelled") {
      finish("");
      $("status-text").textContent = "cancelled";
    } else {
      job.timer = setTimeout(() => poll(id), POLL_MS);
    }
  } catch (e) {
    finish(e.message);
  }
}

function finish(error) {
  if (job && job.timer) clearTimeout(job.timer);
  job = null;
  setBusy(false);
  showError(error);
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  urls.push(url);
  return url;
}

function loaded(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("The browser could not show the result."));
    img.src = src;
  });
}

async function showResult(info) {
  while (urls.length > 8) URL.revokeObjectURL(urls.shift());
  const [after, before] = await Promise.all([blobUrl(info.urls.result), blobUrl(info.urls.bicubic)]);
  await Promise.all([loaded($("after"), after), loaded($("before"), before)]);
  const ext = info.params.output_format === "jpeg" ? "jpg" : info.params.output_format;
  const base = file.name.replace(/\.[^.]*$/, "") || "image";
  const name = `${base}_x4.${ext}`;
  $("download").href = after;
  $("download").download = name;
  $("download").textContent = `Download ${name}`;
  const [iw, ih] = info.input_size;
  const [w, h] = info.output_size;
  const ensemble = info.params.ensemble > 1 ? `, ensemble of ${info.params.ensemble}` : "";
  const steps = `${info.params.steps} step${info.params.steps === 1 ? "" : "s"}`;
  $("result-text").textContent = `${iw}×${ih} → ${w}×${h} in ${info.timings.total_s.toFixed(1)} s; ` +
    `model ${info.params.model}, ${steps}, seed ${info.params.seed}${ensemble}`;
  $("result").hidden = false;
}

function slide() {
  const x = $("slider").value;
  $("after").style.clipPath = `inset(0 0 0 ${x}%)`;
  $("divider").style.left = `${x}%`;
}

async function cancel() {
  if (!job) return;
  const id = job.id;
  try {
    await api(`/v1/jobs/${id}`, { method: "DELETE" });
  } catch (e) {
    showError(e.message);
  }
}

function init() {
  $("file").addEventListener("change", () => choose($("file").files[0]));
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => choose(e.dataTransfer.files[0]));
  $("steps").addEventListener("input", updateSteps);
  $("model-select").addEventListener("change", () => showModel(true));
  $("slider").addEventListener("input", slide);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("token").value = sessionStorage.getItem("samdiffsr-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("samdiffsr-token", $("token").value.trim());
    loadModel();
  });
  loadModel();
}

init();

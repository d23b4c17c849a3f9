// The latentdiff page: builds the form from /api/config, posts it, polls the job for the progress bar, shows the
// results. The server checks every value; this script only collects them and shows its answers.
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// One entry per panel: where its form goes and the fields it adds to the shared settings.
const PANELS = {
  txt2img: { url: "/api/txt2img", values: () => ({}) },
  edit: { url: "/api/edit", values: editValues },
};
let panel = "txt2img";
let config = null;

function setStatus(text) { $("status").textContent = text; }

function showError(message, field) {
  $("error").textContent = message;
  $("error").hidden = false;
  if (field && $(field)) $(field).classList.add("invalid");
}

function clearError() {
  $("error").hidden = true;
  document.querySelectorAll(".invalid").forEach((element) => element.classList.remove("invalid"));
}

async function loadConfig() {
  let answer;
  try {
    answer = await (await fetch("/api/config")).json();
  } catch (error) {
    setStatus("The server does not answer; retrying…");
    return setTimeout(loadConfig, 1000);
  }
  $("model").textContent = answer.model;
  if (answer.state === "loading") {
    setStatus("Loading the model…");
    return setTimeout(loadConfig, 300);
  }
  if (answer.state === "failed") {
    setStatus("The model could not be loaded.");
    return showError(answer.error);
  }
  config = answer;
  fillForm(config);
  setStatus("Ready.");
  $("generate").disabled = false;
}

function fillForm({ defaults, samplers, adapters, limits, editing }) {
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.label, s.name)));
  for (const [id, value] of Object.entries(defaults)) if (id !== "seed" && id !== "karras") $(id).value = value;
  $("karras").checked = defaults.karras;
  const takesKarras = () => samplers.find((s) => s.name === $("sampler").value).karras;
  const offerKarras = () => {
    $("karras").disabled = !takesKarras();
    if (!takesKarras()) $("karras").checked = false;
  };
  $("sampler").addEventListener("change", offerKarras);
  offerKarras();
  $("steps").max = limits.max_steps;
  $("num_images").max = limits.max_images;
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: limits.size_multiple, max: limits.max_side, step: limits.size_multiple });
  }
  $("no-adapters").hidden = adapters.length > 0;
  for (const name of adapters) {
    const row = document.createElement("label");
    row.className = "lora";
    row.innerHTML = '<input type="checkbox"> <span></span> scale <input type="number" min="0" max="2" step="0.05" value="1">';
    row.querySelector("span").textContent = name;
    row.dataset.name = name;
    $("loras").append(row);
  }
  const canEdit = editing.img2img || editing.inpaint;
  $("edit-unavailable").hidden = canEdit;
  for (const id of ["image", "brush", "clear-mask", "strength"]) $(id).disabled = !canEdit;
}

function formValues() {
  const value = (id) => $(id).value;
  const loras = [...document.querySelectorAll(".lora")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, scale: row.querySelector("input[type=number]").value }));
  return {
    prompt: value("prompt"), negative_prompt: value("negative_prompt"), sampler: value("sampler"),
    steps: value("steps"), guidance: value("guidance"), seed: value("seed"), width: value("width"),
    height: value("height"), num_images: value("num_images"), karras: $("karras").checked, loras,
  };
}

async function generate(event) {
  event.preventDefault();
  clearError();
  $("generate").disabled = true;
  try {
    const body = { ...formValues(), ...PANELS[panel].values() };
    const response = await fetch(PANELS[panel].url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) {
      setStatus("Not started.");
      return showError(answer.error, answer.field);
    }
    await follow(answer.job);
  } catch (error) {
    setStatus("Failed.");
    showError(`The server did not answer (${error.message}); is latentdiff serve still running?`);
  } finally {
    $("generate").disabled = false;
  }
}

async function follow(jobId) {
  const progress = $("progress");
  progress.value = 0;
  for (;;) {
    const job = await (await fetch(`/api/jobs/${jobId}`)).json();
    if (job.state === "queued") setStatus(`Waiting: ${job.position} request(s) ahead.`);
    if (job.state === "running") {
      progress.max = job.total || 1;
      progress.value = job.step;
      setStatus(job.total ? `Sampling: step ${job.step} of ${job.total}.` : "Starting…");
    }
    if (job.state === "error") {
      setStatus("Failed.");
      return showError(job.error);
    }
    if (job.state === "done") {
      progress.value = progress.max;
      $("used-seed").textContent = job.images.map((image) => image.seed).join(", ");
      showImages(job.images);
      return setStatus("Done.");
    }
    await sleep(200);
  }
}

function showImages(images) {
  for (const image of [...images].reverse()) {
    const figure = document.createElement("figure");
    figure.innerHTML = '<img class="result"><figcaption>seed <span></span> · <a>download PNG</a></figcaption>';
    Object.assign(figure.querySelector("img"), { src: image.url, alt: image.parameters, title: image.parameters });
    figure.querySelector("span").textContent = image.seed;
    Object.assign(figure.querySelector("a"), { href: image.url, download: `latentdiff-${image.seed}.png` });
    $("gallery").prepend(figure);
  }
}

// ------------------------------------------------------------------------------- the edit panel

let upload = null; // the uploaded file as a data URL, sent as is (the server checks its size and type)
let maskPainted = false;

function loadUpload() {
  const file = $("image").files[0];
  if (!file) return;
  if (file.size > config.limits.max_upload_bytes / 2) {
    return showError(`image: the file is ${(file.size / 2 ** 20).toFixed(1)} MiB; send one under ${config.limits.max_upload_bytes / 2 ** 21} MiB.`, "image");
  }
  const reader = new FileReader();
  reader.onload = () => {
    upload = reader.result;
    const picture = new Image();
    picture.onload = () => {
      for (const id of ["image-canvas", "mask-canvas"]) Object.assign($(id), { width: picture.width, height: picture.height });
      $("image-canvas").getContext("2d").drawImage(picture, 0, 0);
      maskPainted = false;
    };
    picture.src = upload;
  };
  reader.readAsDataURL(file);
}

let stroke = null; // the brush's last point in image pixels, while the button is held

function paint(event) {
  if (event.buttons !== 1 || $("brush").disabled) {
    stroke = null;
    return;
  }
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const point = [
    ((event.clientX - box.left) * canvas.width) / box.width,
    ((event.clientY - box.top) * canvas.height) / box.height,
  ];
  const context = canvas.getContext("2d");
  Object.assign(context, { strokeStyle: "#f00", lineWidth: Number($("brush").value), lineCap: "round" });
  context.beginPath();
  context.moveTo(...(stroke || point));
  context.lineTo(...point);
  context.stroke();
  stroke = point;
  maskPainted = true;
}

// The mask as the pipelines read it: white where painted (repaint), black elsewhere, the image's size.
function maskDataUrl() {
  const painted = $("mask-canvas");
  const mask = Object.assign(document.createElement("canvas"), { width: painted.width, height: painted.height });
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  const pixels = painted.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const out = context.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < pixels.data.length; i += 4) if (pixels.data[i + 3] > 0) out.data.fill(255, i, i + 3);
  context.putImageData(out, 0, 0);
  return mask.toDataURL("image/png");
}

function editValues() {
  return { image: upload, mask: maskPainted ? maskDataUrl() : null, strength: $("strength").value };
}

function showPanel(name) {
  panel = name;
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab.dataset.panel === name));
  $("panel-edit").hidden = name !== "edit";
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => showPanel(tab.dataset.panel)));
  $("image").addEventListener("change", loadUpload);
  $("mask-canvas").addEventListener("pointerdown", paint);
  $("mask-canvas").addEventListener("pointermove", paint);
  $("mask-canvas").addEventListener("pointerup", () => {
    stroke = null;
  });
  $("clear-mask").addEventListener("click", () => {
    const canvas = $("mask-canvas");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    maskPainted = false;
  });
  loadConfig();
});

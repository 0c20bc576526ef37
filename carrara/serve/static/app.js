// carrara serve's page: a model menu and a form → POST /api/generate, progress over server-sent events, a gallery
// from /api/gallery whose "reuse settings" puts an image's settings (model included) back into the form.
// User text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const FINISHED = ["done", "cancelled", "failed"];
const SETTING_KEYS = ["prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "n", "size", "model"];
let galleryTotal = 0;
let modelList = [];  // GET /api/models: [{name, ref, loaded}]

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = body.message || (typeof body.detail === "string" ? body.detail : response.statusText);
    const retry = response.headers.get("Retry-After");
    throw new Error(detail + (retry ? ` (retry in ${retry} s)` : ""));
  }
  return body;
}

function formSettings() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value,
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    seed: $("random").checked ? "random" : Number($("seed").value),
    n: Number($("n").value),
    width: Number($("size").value),
    height: Number($("size").value),
    model: $("model-choice").value,
  };
}

function describe(s) {
  return (s.model ? `${s.model} · ` : "") + `${s.sampler} · ${s.steps} steps · guidance ${s.guidance} · seed ${s.seed}` +
    (s.negative_prompt ? ` · negative “${s.negative_prompt}”` : "");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API (or no permission): the old way
    const area = el("textarea", { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function flash(button, text) {
  const old = button.textContent;
  button.textContent = text;
  setTimeout(() => { button.textContent = old; }, 1200);
}

function card(item) {
  const s = item.settings;
  const settings = Object.fromEntries(SETTING_KEYS.map((k) => [k, s[k]]));
  const copy = el("button", { type: "button", className: "copy", textContent: "copy settings" });
  copy.onclick = async () => { await copyText(JSON.stringify(settings, null, 2)); flash(copy, "copied"); };
  const reuse = el("button", { type: "button", className: "reuse", textContent: "reuse settings" });
  reuse.onclick = () => reuseSettings(item, reuse).catch(showError);
  const download = el("a", { href: item.url, download: `carrara-${s.seed}.png`, className: "download",
                              textContent: "download PNG" });
  return el("figure", { className: "card", id: `image-${item.id}` },
    el("img", { src: item.url, alt: s.prompt, loading: "lazy", width: 200, height: 200 }),
    el("figcaption", {}, el("div", { className: "prompt", textContent: s.prompt }),
      el("div", { className: "muted", textContent: describe(s) })),
    el("div", { className: "actions" }, copy, download, reuse));
}

async function reuseSettings(item, button) {
  // the model first (its defaults would overwrite the fields), found by the name it ran under, else by its folder
  const s = item.settings;
  const choice = modelList.find((m) => m.name === s.model && m.ref === item.model) ||
    modelList.find((m) => m.ref === item.model);
  if (!choice) throw new Error(`the model that made this image (${item.model}) is not offered by this server`);
  if (choice.name !== $("model-choice").value) await selectModel(choice.name);
  $("prompt").value = s.prompt;
  $("negative_prompt").value = s.negative_prompt;
  $("sampler").value = s.sampler;
  $("steps").value = s.steps;
  $("guidance").value = s.guidance;
  $("seed").value = s.seed;
  $("random").checked = false;
  $("seed").disabled = false;
  $("n").value = 1;
  $("size").value = s.size ?? item.size[0];
  $("prompt").focus();
  flash(button, `reused · seed ${s.seed}`);
}

function applyModel(model) {
  // the chosen model's sizes and the server's sampler names and defaults (carrara/diffusion/settings.py)
  const [w, h] = model.image_size;
  $("model").textContent = `${model.name} · ${model.model_hash} · ${w}×${h}`;
  $("size").replaceChildren(...model.sizes.map((s) => el("option", { value: s, textContent: `${s}×${s}` })));
  $("size").value = model.sizes[model.sizes.length - 1];  // a cascade's upsampled size by default
  $("size").disabled = model.sizes.length < 2;
  $("sampler").replaceChildren(...model.samplers.map((name) => el("option", { value: name, textContent: name })));
  $("sampler").value = model.defaults.sampler;
  $("steps").value = model.defaults.steps;
  $("guidance").value = model.defaults.guidance;
  $("prompt").placeholder = model.example_prompt;  // a prompt the chosen model was trained to draw
  $("steps").max = model.limits.steps;
  $("n").max = model.limits.n;
  $("seed").max = model.limits.seed;
}

async function selectModel(name) {
  // asking for a model that is not in memory loads it on the server: the menu waits for it
  $("model-choice").value = name;
  $("model-choice").disabled = true;
  $("model").textContent = `loading ${name}…`;
  try {
    applyModel(await api(`/api/model?name=${encodeURIComponent(name)}`));
  } finally {
    $("model-choice").disabled = false;
  }
}

function setCount(total) {
  galleryTotal = total;
  $("count").textContent = `(${total})`;
}

async function loadGallery() {
  const page = await api("/api/gallery?limit=500");
  $("gallery").replaceChildren(...page.items.map(card));
  setCount(page.total);
}

function counterText(job) {
  if (job.status === "queued") return `queued · position ${job.position ?? "?"}`;
  if (job.status === "running") return `step ${job.step} / ${job.total}`;
  return `${job.status} · step ${job.step} / ${job.total}`;
}

function watch(job) {
  const counter = el("span", { className: "step-counter", textContent: counterText(job) });
  const preview = el("img", { className: "preview", alt: "denoising preview", width: 200, height: 200 });
  const cancel = el("button", { type: "button", textContent: "cancel" });
  const panel = el("div", { className: "job", id: `job-${job.id}` }, el("div", { className: "frame" }, preview),
    counter, el("span", { className: "muted", textContent: job.settings.prompt }), cancel);
  cancel.onclick = () => api(`/api/jobs/${job.id}/cancel`, { method: "POST" }).catch(showError);
  $("jobs").prepend(panel);
  const events = new EventSource(job.events_url);
  events.addEventListener("job", (event) => {
    const j = JSON.parse(event.data);
    counter.textContent = counterText(j);
    if (j.preview) preview.src = j.preview;
    if (!FINISHED.includes(j.status)) return;
    events.close();
    cancel.remove();
    if (j.status === "failed") showError(new Error(j.error));
    for (const item of j.images) $("gallery").prepend(card(item));
    if (j.images.length) setCount(galleryTotal + j.images.length);
    setTimeout(() => panel.remove(), j.status === "done" ? 1500 : 5000);
  });
  events.onerror = () => { if (events.readyState === EventSource.CLOSED) counter.textContent = "connection lost"; };
}

function showError(error) {
  $("message").textContent = error.message;
}

async function generate(event) {
  event.preventDefault();
  $("message").textContent = "";
  try {
    watch(await api("/api/generate", { method: "POST", body: JSON.stringify(formSettings()) }));
  } catch (error) {
    showError(error);
  }
}

async function start() {
  $("form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  $("random").addEventListener("change", () => { $("seed").disabled = $("random").checked; });
  $("model-choice").addEventListener("change", () => selectModel($("model-choice").value).catch(showError));
  try {
    const listed = await api("/api/models");
    modelList = listed.models;
    $("model-choice").replaceChildren(...modelList.map((m) => el("option", { value: m.name, textContent: m.name })));
    $("model-choice").value = listed.default;
    applyModel(await api("/api/model"));
    await loadGallery();
  } catch (error) {
    showError(error);
  }
}

start();

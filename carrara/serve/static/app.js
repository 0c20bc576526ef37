// carrara serve's page: a model menu and a form → POST /api/generate, progress over server-sent events, a gallery
// from /api/gallery whose "reuse settings" puts an image's settings (model included) back into the form, and an
// editor: a picture (a file, or "use this image" from the gallery) on a canvas with a brush for the inpainting mask;
// with `serve --index`, a search box over the training images (words or a picture → POST /api/search), also asked
// by "nearest training images" on a gallery picture; with an unCLIP model, variations, interpolation strips and text
// diffs of pictures (POST /api/unclip): "variations" and "pick" on gallery pictures, or uploads, fill slots A and B.
// While the prompt is typed, a live preview: after each pause a draft (one image at the model's smallest size and
// fast steps, POST /api/generate with draft: true, run before queued jobs, not kept in the gallery); a newer pause
// cancels the draft it supersedes.
// User text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const FINISHED = ["done", "cancelled", "failed"];
const SETTING_KEYS = ["prompt", "negative_prompt", "steps", "sampler", "guidance", "seed", "n", "size", "model"];
let galleryTotal = 0;
let currentModel = null;  // GET /api/model of the chosen model
const DRAFT_PAUSE_MS = 400;  // the pause in typing after which a preview is asked for
const draft = { timer: null, job: null, events: null, token: 0 };  // the live preview in flight
let modelList = [];  // GET /api/models: [{name, ref, loaded}]
let searchInfo = { available: false };  // GET /api/search: {available, images, k, max_k}
// The picture being edited: its <img>, the gallery id it came from (null: a file), the brush strokes (each
// {radius, points}, in fractions of the side, so they survive a change of size) and whether strength was set.
const edit = { picture: null, galleryId: null, strokes: [], drawing: null, strengthSet: false };
// unCLIP's two pictures: each {ref (a gallery id or the file's data URL, sent as is), src, name}, or null.
const slots = { a: null, b: null };

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
    ...editSettings(),
    ...(document.body.classList.contains("prior") && $("prior_guidance").value !== ""
      ? { prior_guidance: Number($("prior_guidance").value) } : {}),
  };
}

function unclipLabel(u) {
  // how a job or an image of POST /api/unclip is described (u: its `unclip` record)
  const theta = u.theta !== undefined && u.mode !== "variations" ? ` θ ${u.theta}` : "";
  if (u.mode === "text_diff") return `text diff → “${u.new_caption}”${theta}`;
  return u.mode === "interpolate" ? `interpolation${theta}` : "variations";
}

function setSlot(name, picture) {
  slots[name] = picture;
  const img = $(`slot-${name}`);
  if (picture) img.src = picture.src; else img.removeAttribute("src");
  img.alt = `picture ${name.toUpperCase()}: ${picture ? picture.name : "none"}`;
  $("run-variations").disabled = $("run-text-diff").disabled = !slots.a;
  $("run-interpolate").disabled = !(slots.a && slots.b);
}

function pick(picture) {
  // A first, then B; with both full, B moves to A and the new picture is B (the last two picked, in order)
  if (!slots.a) setSlot("a", picture);
  else if (!slots.b) setSlot("b", picture);
  else { setSlot("a", slots.b); setSlot("b", picture); }
}

async function runUnclip(body, what) {
  // the form's settings (the prompt is the decoder's text, or a text diff's old caption) and one manipulation
  const status = $("unclip-status");
  status.classList.remove("error");
  const seed = $("random").checked ? "random" : Number($("seed").value);
  try {
    const job = await api("/api/unclip", { method: "POST", body: JSON.stringify({
      prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler: $("sampler").value,
      steps: Number($("steps").value), guidance: Number($("guidance").value), seed, model: $("model-choice").value,
      ...body }) });
    status.textContent = `queued: ${what}`;
    watch(job);
  } catch (error) {
    status.classList.add("error");
    status.textContent = error.message;
  }
}

function setUpUnclip() {
  for (const name of ["a", "b"]) {
    const input = $(`file-${name}`);
    input.addEventListener("change", () => {
      const file = input.files[0];
      if (!file) return;
      const reader = new FileReader();  // the file's own bytes: the PNG records their SHA-256, as the CLI does
      reader.onload = () => setSlot(name, { ref: reader.result, src: reader.result, name: file.name });
      reader.readAsDataURL(file);
    });
  }
  $("slots-swap").addEventListener("click", () => { const a = slots.a; setSlot("a", slots.b); setSlot("b", a); });
  $("amount").addEventListener("input", () => { $("amount-value").textContent = Number($("amount").value).toFixed(2); });
  $("run-variations").addEventListener("click", () =>
    runUnclip({ variations: slots.a.ref, n: Number($("n").value) }, `variations of ${slots.a.name}`));
  $("run-interpolate").addEventListener("click", () =>
    runUnclip({ interpolate: [slots.a.ref, slots.b.ref], n: Number($("strip-n").value) },
      `${slots.a.name} → ${slots.b.name}`));
  $("run-text-diff").addEventListener("click", () =>
    runUnclip({ variations: slots.a.ref, text_diff: $("text-diff").value, amount: Number($("amount").value),
      n: Number($("strip-n").value) }, `${slots.a.name} → “${$("text-diff").value}”`));
}

function editSettings() {
  // the picture as the canvas shows it (the model's size), or its gallery id when that is the same picture
  if (!edit.picture) return {};
  const side = $("init-canvas").width;
  const same = edit.galleryId && edit.picture.naturalWidth === side && edit.picture.naturalHeight === side;
  return {
    ...(same ? { init_image_id: edit.galleryId } : { init_image: $("init-canvas").toDataURL("image/png") }),
    ...(edit.strokes.length ? { mask: maskDataURL() } : {}),
    strength: Number($("strength").value),
  };
}

function drawStrokes(ctx, side, color) {
  ctx.strokeStyle = ctx.fillStyle = color;
  ctx.lineCap = ctx.lineJoin = "round";
  for (const stroke of edit.strokes) {
    ctx.lineWidth = 2 * stroke.radius * side;
    ctx.beginPath();
    for (const [x, y] of stroke.points) ctx.lineTo(x * side, y * side);
    ctx.stroke();
    const [x, y] = stroke.points[0];
    ctx.beginPath();  // a click without a move is a dot
    ctx.arc(x * side, y * side, stroke.radius * side, 0, 2 * Math.PI);
    ctx.fill();
  }
}

function maskDataURL() {
  // the mask the API takes: the canvas's size, white = regenerate, black = keep
  const side = $("init-canvas").width;
  const canvas = el("canvas", { width: side, height: side });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, side, side);
  drawStrokes(ctx, side, "#fff");
  return canvas.toDataURL("image/png");
}

function drawMask() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  drawStrokes(ctx, canvas.width, "#e00");
  updateEditMode();
}

function drawPicture() {
  // centre-cropped to a square at the chosen size, as the server would crop it
  if (!edit.picture) return;
  const side = Number($("size").value);
  const { naturalWidth: w, naturalHeight: h } = edit.picture;
  const crop = Math.min(w, h);
  for (const id of ["init-canvas", "mask-canvas"]) Object.assign($(id), { width: side, height: side });
  const ctx = $("init-canvas").getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(edit.picture, (w - crop) / 2, (h - crop) / 2, crop, crop, 0, 0, side, side);
  drawMask();
}

function updateEditMode() {
  const mode = !edit.picture ? "none: text to image" : edit.strokes.length ? "inpainting" : "img2img";
  $("edit-mode").textContent = `(${mode})`;
  if (edit.picture && !edit.strengthSet) setStrength(edit.strokes.length ? 1.0 : 0.8);  // the API's defaults
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

async function usePicture(src, galleryId) {
  const picture = new Image();
  picture.src = src;
  await picture.decode();
  Object.assign(edit, { picture, galleryId, strokes: [], strengthSet: false });
  if (galleryId) $("init-file").value = "";  // the file chooser no longer names the picture shown
  $("canvas-stack").hidden = false;
  $("init-remove").disabled = false;
  $("edit-panel").open = true;
  drawPicture();
  scheduleDraft();  // an edit is not previewed
}

function removePicture() {
  Object.assign(edit, { picture: null, galleryId: null, strokes: [] });
  $("canvas-stack").hidden = true;
  $("init-remove").disabled = true;
  $("init-file").value = "";
  updateEditMode();
  scheduleDraft();
}

function brushPoint(event) {
  const canvas = $("mask-canvas");
  return [event.offsetX / canvas.clientWidth, event.offsetY / canvas.clientHeight];
}

function setUpEditor() {
  $("init-file").addEventListener("change", () => {
    const file = $("init-file").files[0];
    if (!file) return;
    const reader = new FileReader();  // a data: URL (the page's Content-Security-Policy allows no blob: images)
    reader.onload = () => usePicture(reader.result, null).catch(() => showError(new Error(`cannot read ${file.name}`)));
    reader.readAsDataURL(file);
  });
  $("init-remove").addEventListener("click", removePicture);
  $("strength").addEventListener("input", () => { edit.strengthSet = true; setStrength($("strength").value); });
  $("mask-undo").addEventListener("click", () => { edit.strokes.pop(); drawMask(); });
  $("mask-clear").addEventListener("click", () => { edit.strokes = []; drawMask(); });
  $("size").addEventListener("change", drawPicture);
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    edit.drawing = { radius: Number($("brush").value) / canvas.width, points: [brushPoint(event)] };
    edit.strokes.push(edit.drawing);
    drawMask();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!edit.drawing) return;
    edit.drawing.points.push(brushPoint(event));
    drawMask();
  });
  for (const name of ["pointerup", "pointercancel"]) canvas.addEventListener(name, () => { edit.drawing = null; });
}

function describe(s, u) {
  return (s.model ? `${s.model} · ` : "") + (u ? `${unclipLabel(u)} · ` : "") + (s.edit ? `${s.edit} ${s.strength} · ` : "") +
    `${s.sampler} · ${s.steps} steps · guidance ${s.guidance} · seed ${s.seed}` +
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
  const use = el("button", { type: "button", className: "use", textContent: "use this image" });
  use.onclick = () => usePicture(item.url, item.id).then(() => flash(use, "in the editor")).catch(showError);
  const download = el("a", { href: item.url, download: `carrara-${s.seed}.png`, className: "download",
                              textContent: "download PNG" });
  const actions = el("div", { className: "actions" }, copy, download, reuse, use);
  const picture = { ref: item.id, src: item.url, name: s.prompt ? `“${s.prompt}” (seed ${s.seed})` : `seed ${s.seed}` };
  const variations = el("button", { type: "button", className: "variations unclip-only", textContent: "variations",
                                    title: "unCLIP: images like this one (it becomes picture A)" });
  variations.onclick = () => { setSlot("a", picture); runUnclip({ variations: item.id, n: Number($("n").value) },
                                                                `variations of ${picture.name}`); };
  const chosen = el("button", { type: "button", className: "pick unclip-only", textContent: "pick",
                                title: "unCLIP: make this picture A, or B, for an interpolation or a text diff" });
  chosen.onclick = () => { pick(picture); flash(chosen, slots.b === picture ? "picked as B" : "picked as A"); };
  actions.append(variations, chosen);
  if (searchInfo.available) {  // a memorisation check: is this picture a copy of a training image?
    const nearest = el("button", { type: "button", className: "nearest", textContent: "nearest training images" });
    nearest.onclick = () => runSearch({ image_id: item.id }, `this picture (“${s.prompt}”)`);
    actions.append(nearest);
  }
  return el("figure", { className: "card", id: `image-${item.id}` },
    el("img", { src: item.url, alt: s.prompt, loading: "lazy", width: 200, height: 200 }),
    el("figcaption", {}, el("div", { className: "prompt", textContent: s.prompt }),
      el("div", { className: "muted", textContent: describe(s, item.unclip) })),
    actions);
}

function thumb(hit) {
  // one search result: the indexed image (a link to it, full size), its file name and cosine similarity
  const name = hit.file.split("/").pop();
  const link = el("a", { href: hit.url, target: "_blank", rel: "noopener", title: `${hit.file}: ${hit.text}` },
    el("img", { src: hit.url, alt: hit.text, width: 96, height: 96 }));
  return el("li", { className: "thumb" }, el("figure", {}, link,
    el("figcaption", {}, el("span", { className: "file", textContent: name }),
      el("span", { className: "score", textContent: hit.score.toFixed(3) }))));
}

async function runSearch(query, what) {
  // POST /api/search; the status line says what was searched for and how long the query took on the server
  const status = $("search-status");
  status.classList.remove("error");
  status.textContent = `searching for ${what}…`;
  $("search").hidden = false;
  try {
    const found = await api("/api/search", {
      method: "POST", body: JSON.stringify({ ...query, k: Number($("search-k").value) }) });
    $("search-results").replaceChildren(...found.results.map(thumb));
    status.textContent = `${found.results.length} training images nearest to ${what} · ${found.ms.toFixed(1)} ms`;
    if (query.image_id) {  // asked from the gallery: bring the results into view, and the keyboard with them
      $("search").scrollIntoView({ block: "start" });
      $("search-results").focus({ preventScroll: true });
    }
  } catch (error) {
    $("search-results").replaceChildren();
    status.classList.add("error");
    status.textContent = error.message;
  }
}

function setUpSearch(info) {
  searchInfo = info;
  if (!info.available) return;  // the server has no index: no search box, no "nearest" buttons
  $("search").hidden = false;
  $("search-size").textContent = `(${info.images} images)`;
  $("search-k").value = info.k;
  $("search-k").max = info.max_k;
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("search-text").value;
    runSearch({ text }, `“${text}”`);
  });
  $("search-file").addEventListener("change", () => {
    const file = $("search-file").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => runSearch({ image: reader.result }, file.name);
    reader.readAsDataURL(file);
  });
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
  const source = s.init_image?.startsWith("gallery:") ? s.init_image.slice(8) : null;
  if (!s.edit) removePicture();  // made from text alone
  if (source) await usePicture(`/api/images/${source}.png`, source);  // a mask is not kept: paint it again
  if (s.strength) {
    edit.strengthSet = true;
    setStrength(s.strength);
  }
  drawPicture();
  $("prompt").focus();
  flash(button, `reused · seed ${s.seed}`);
}

function draftSettings() {
  // the form's settings as one small, fast image: the model's smallest size, at most its draft steps (a distilled
  // student's own; else 10, which match 20 on FD_clip), a fixed seed when the form's is random (the picture then
  // changes with the words, not with the dice). A model with its student beside it previews with the student
  // (draft.model, its own steps and sampler).
  const s = formSettings();
  const d = currentModel.draft;
  const student = d.model ? { model: d.model, sampler: d.sampler, steps: d.steps } : {};
  return { ...s, n: 1, draft: true, width: d.size, height: d.size, steps: Math.min(s.steps, d.steps),
           seed: s.seed === "random" ? 0 : s.seed, ...student };
}

function cancelDraft() {
  // forget the draft in flight: its stream closed, the job cancelled on the server (queued: at once)
  clearTimeout(draft.timer);
  draft.token += 1;
  if (draft.events) draft.events.close();
  if (draft.job) api(`/api/jobs/${draft.job}`, { method: "DELETE" }).catch(() => {});
  draft.events = draft.job = null;
}

function previewable() {
  // text to image with a prompt, on a model that draws from text (an unCLIP decoder alone does not)
  return $("live").checked && currentModel && $("prompt").value.trim() && !edit.picture &&
    (!currentModel.unclip || currentModel.unclip.prior);
}

function scheduleDraft() {
  cancelDraft();
  if (!previewable()) {
    $("draft").hidden = true;
    $("draft-status").textContent = "";
    return;
  }
  draft.timer = setTimeout(runDraft, DRAFT_PAUSE_MS);
}

async function runDraft() {
  const token = draft.token;
  const body = draftSettings();
  const status = $("draft-status");
  $("draft").hidden = false;
  status.classList.remove("error");
  status.textContent = "preview…";
  let job;
  try {
    job = await api("/api/generate", { method: "POST", body: JSON.stringify(body) });
  } catch (error) {
    if (token !== draft.token) return;
    status.classList.add("error");
    status.textContent = `preview: ${error.message}`;
    return;
  }
  if (token !== draft.token) {  // superseded while the request was on its way
    api(`/api/jobs/${job.id}`, { method: "DELETE" }).catch(() => {});
    return;
  }
  draft.job = job.id;
  const events = draft.events = new EventSource(job.events_url);
  events.onerror = () => {
    if (events.readyState !== EventSource.CLOSED || token !== draft.token) return;
    status.classList.add("error");
    status.textContent = "preview: connection lost";
  };
  events.addEventListener("job", (event) => {
    const j = JSON.parse(event.data);
    if (!FINISHED.includes(j.status)) return;
    events.close();
    if (token !== draft.token) return;
    draft.job = draft.events = null;
    if (j.status === "done") {
      $("draft-image").src = j.draft_image;
      status.textContent = `preview · ${body.width}×${body.height} · ${j.settings.steps} steps · seed ${j.settings.seed}`;
    } else if (j.status === "failed") {
      status.classList.add("error");
      status.textContent = `preview: ${j.error}`;
    }
  });
}

function applyModel(model) {
  // the chosen model's sizes and the server's sampler names and defaults (carrara/diffusion/settings.py; a
  // distilled student's own steps and sampler)
  currentModel = model;
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
  document.body.classList.toggle("unclip", Boolean(model.unclip));  // shows the unCLIP actions on gallery pictures
  document.body.classList.toggle("prior", Boolean(model.unclip?.prior));
  $("unclip").hidden = !model.unclip;
  $("prompt").required = !model.unclip || model.unclip.prior;  // a decoder alone draws only from pictures
  $("steps").max = model.limits.steps;
  $("n").max = model.limits.n;
  $("seed").max = model.limits.seed;
  drawPicture();  // an open picture at the new model's size
  scheduleDraft();
}

async function selectModel(name) {
  // asking for a model that is not in memory loads it on the server: the menu waits for it (and no preview is
  // asked for meanwhile: the old model's draft settings do not fit the new one)
  cancelDraft();
  currentModel = null;
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
    counter, el("span", { className: "muted",
                          textContent: job.unclip?.mode ? unclipLabel(job.unclip) : job.settings.prompt }), cancel);
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
  for (const id of ["prompt", "negative_prompt", "steps", "guidance", "seed"]) $(id).addEventListener("input", scheduleDraft);
  for (const id of ["sampler", "random", "live"]) $(id).addEventListener("change", scheduleDraft);
  setUpEditor();
  setUpUnclip();
  $("model-choice").addEventListener("change", () => selectModel($("model-choice").value).catch(showError));
  try {
    const listed = await api("/api/models");
    modelList = listed.models;
    $("model-choice").replaceChildren(...modelList.map((m) => el("option", { value: m.name, textContent: m.name })));
    $("model-choice").value = listed.default;
    applyModel(await api("/api/model"));
    setUpSearch(await api("/api/search"));
    await loadGallery();
  } catch (error) {
    showError(error);
  }
}

start();

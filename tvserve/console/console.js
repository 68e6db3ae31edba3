// tvserve console: the models the service runs, trying them, and live figures from its metrics.
// Plain JavaScript served by the service itself (tvserve/ops/plugin/ConsoleEndpoint.java); every
// request goes to the service's own routes with the headers any client sends. The inference key,
// when the server asks for one, is kept in this tab only (sessionStorage).
"use strict";

const KEY_STORE = "tvserve-inference-key";
const LIVE_EVERY_MS = Number(new URLSearchParams(location.search).get("every") || 5000);
const TOKEN_REFUSAL = /Token Authori[sz]ation failed/i; // TorchServe's answer to a missing or wrong key
const DETECTING = ["detection", "instance_segmentation", "keypoints"];
const VIDEO = "video_classification"; // one clip a request (MP4, WebM, GIF)
const FLOW = "optical_flow"; // two images a request, sent as multipart fields image1, image2 (tvserve predict --pairs)
const CLIP = /\.(mp4|webm)$/i; // the samples that are clips (GET /console/api/samples lists images and clips)
// What each kind of model is sent: the file picker's accept list, and the words for the drop zone.
const INPUTS = {
  [VIDEO]: { accept: "video/*,.gif,image/gif", multiple: false, drop: "a clip (MP4, WebM, GIF)", pick: "a file" },
  [FLOW]: { accept: "image/*", multiple: true, drop: "two images (first and second frame)", pick: "two files" },
  image: { accept: "image/*", multiple: false, drop: "an image", pick: "a file" },
};
const COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
  "#ffd8b1", "#000075", "#808080"];
// COCO's person skeleton, by keypoint name (torchvision's keypointrcnn order)
const SKELETON = [["left_ankle", "left_knee"], ["left_knee", "left_hip"], ["right_ankle", "right_knee"],
  ["right_knee", "right_hip"], ["left_hip", "right_hip"], ["left_shoulder", "left_hip"],
  ["right_shoulder", "right_hip"], ["left_shoulder", "right_shoulder"], ["left_shoulder", "left_elbow"],
  ["right_shoulder", "right_elbow"], ["left_elbow", "left_wrist"], ["right_elbow", "right_wrist"],
  ["left_eye", "right_eye"], ["nose", "left_eye"], ["nose", "right_eye"], ["left_eye", "left_ear"],
  ["right_eye", "right_ear"], ["left_ear", "left_shoulder"], ["right_ear", "right_shoulder"]];

const $ = (id) => document.getElementById(id);
const state = { models: [], samples: [], samplesKind: null, image: null, lastMetrics: null, keyPrompt: null, scale: 1 };

// --- talking to the service ----------------------------------------------------------------------

/** fetch() with the tab's inference key; a token refusal asks for the key, then tries once more. */
async function call(url, options = {}) {
  const response = await fetch(url, withKey(options));
  if (!(await refusedForKey(response))) return response;
  await askForKey(sessionStorage.getItem(KEY_STORE) ? "The server refused this key." : "");
  return fetch(url, withKey(options));
}

function withKey(options) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = new Headers(options.headers || {});
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return { ...options, headers };
}

async function refusedForKey(response) {
  if (response.status !== 400 && response.status !== 401) return false;
  return TOKEN_REFUSAL.test(await response.clone().text());
}

/** Shows the key prompt (one at a time, whichever calls were refused); resolves once a key is entered. */
function askForKey(why) {
  if (state.keyPrompt) return state.keyPrompt;
  $("key-why").textContent = why;
  $("key").value = "";
  $("key-dialog").showModal();
  state.keyPrompt = new Promise((resolve) => {
    $("key-form").onsubmit = () => {
      sessionStorage.setItem(KEY_STORE, $("key").value.trim());
      $("key-forget").hidden = false;
      state.keyPrompt = null;
      resolve();
    };
  });
  return state.keyPrompt;
}

// --- the models ------------------------------------------------------------------------------------

async function loadModels() {
  const response = await call("/console/api/models");
  if (!response.ok) {
    $("server-state").textContent = `models: HTTP ${response.status}`;
    return;
  }
  state.models = (await response.json()).models;
  const ready = state.models.filter((m) => m.ready).length;
  $("server-state").textContent = `${ready} of ${state.models.length} model versions ready`;
  renderModelTable();
  renderModelChoice();
}

function task(model) {
  return (model.record && model.record.task) || "classification";
}

function renderModelTable() {
  const body = $("models").tBodies[0];
  body.replaceChildren(...state.models.map((model) => {
    const row = document.createElement("tr");
    row.dataset.model = model.name;
    row.dataset.version = model.version;
    const record = model.record || {};
    const backend = record.backend || {};
    const cells = [model.name, model.version + (model.default ? " (default)" : ""), task(model),
      backend.name ? `${backend.name}, ${backend.precision || "fp32"}` : "—",
      `${model.ready_workers} of ${model.min_workers} ready`,
      `${model.batch_size} per batch, ${model.max_batch_delay_ms} ms`,
      model.ready ? "READY" : "not ready", costs(record), weights(record)];
    cells.forEach((text, i) => {
      const cell = row.insertCell();
      cell.textContent = text;
      cell.className = ["name", "version", "task", "backend", "workers", "batching", "state", "costs", "weights"][i];
    });
    row.cells[6].classList.add(model.ready ? "ready" : "not-ready");
    if (record.weights && record.weights.random_init) row.cells[8].classList.add("warn");
    return row;
  }));
}

/** What the archive recorded it costs: the chosen backend's forward and the measured serving load. */
function costs(record) {
  const parts = [];
  const selection = (record.backend || {}).selection || {};
  const chosen = (selection.candidates || []).find((c) => c.name === (record.backend || {}).name);
  if (chosen && chosen.ms_batch_1 != null) parts.push(`forward ${chosen.ms_batch_1.toFixed(1)} ms (batch 1)`);
  const measured = (record.sizing || {}).measured;
  const winner = measured && measured.chosen != null ? measured.candidates[measured.chosen] : null;
  if (winner) parts.push(`c=1 p50 ${winner.c1_p50_ms} ms, ${winner.load_rps} req/s at c=${measured.concurrency}`);
  return parts.join("; ") || "—";
}

function weights(record) {
  const w = record.weights;
  if (!w) return "—";
  return w.random_init ? "random (untrained)" : w.origin;
}

function renderModelChoice() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.default ? model.name : `${model.name}/${model.version}`;
    option.textContent = model.default ? model.name : `${model.name} ${model.version}`;
    return option;
  }));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  showOptions();
}

function chosenModel() {
  const [name, version] = $("model").value.split("/");
  return state.models.find((m) => m.name === name && (version ? m.version === version : m.default));
}

function showOptions() {
  const model = chosenModel();
  const current = model ? task(model) : "";
  document.querySelectorAll(".option").forEach((label) => {
    label.hidden = !label.dataset.tasks.split(" ").includes(current);
  });
  const inputs = INPUTS[current] || INPUTS.image;
  $("file").accept = inputs.accept;
  $("file").multiple = inputs.multiple;
  $("drop-what").textContent = inputs.drop;
  $("pick-what").textContent = inputs.pick;
  if (current !== state.samplesKind) renderSamples(current);
}

// --- trying a model -------------------------------------------------------------------------------

async function loadSamples() {
  const response = await call("/console/api/samples");
  if (!response.ok) return;
  state.samples = (await response.json()).samples;
  renderSamples(task(chosenModel() || {}));
}

/** The samples that fit a task, each a list of file names: the clips for a video model, the pairs
 * NAME-1.EXT + NAME-2.EXT for optical flow, the images for the others. */
function samplesFor(kind, names) {
  const images = names.filter((name) => !CLIP.test(name));
  if (kind === VIDEO) return names.filter((name) => CLIP.test(name)).map((name) => [name]);
  if (kind !== FLOW) return images.map((name) => [name]);
  return images.map((name) => /^(.+)-1(\.\w+)$/.exec(name))
    .filter((match) => match && images.includes(`${match[1]}-2${match[2]}`))
    .map((match) => [match[0], `${match[1]}-2${match[2]}`]);
}

function renderSamples(kind) {
  state.samplesKind = kind;
  const fitting = samplesFor(kind, state.samples);
  $("samples").replaceChildren(...fitting.map((names) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = names.join(" + ");
    button.dataset.sample = button.textContent;
    button.onclick = async () => send(await Promise.all(names.map(async (name) => {
      const sample = await call(`/console/samples/${encodeURIComponent(name)}`);
      return new File([await sample.blob()], name, { type: sample.headers.get("Content-Type") });
    })));
    return button;
  }));
  if (!fitting.length) $("samples").textContent = state.samples.length ? "none for this task" : "none on this server";
}

/** The request's options as tvserve reads them from headers (X-TopK, X-Threshold, X-Max_Detections). */
function optionHeaders(kind) {
  // a flow pair is multipart: the browser writes its Content-Type, with the boundary
  const headers = kind === FLOW ? {} : { "Content-Type": "application/octet-stream" };
  if (kind === "classification" || kind === VIDEO) headers["X-TopK"] = $("topk").value;
  if (DETECTING.includes(kind)) headers["X-Threshold"] = $("threshold").value;
  if (DETECTING.includes(kind) && $("max-detections").value) headers["X-Max_Detections"] = $("max-detections").value;
  return headers;
}

/** Sends `files` (picked, dropped or a sample's: one, or an optical-flow model's two) to the chosen model. */
async function send(files) {
  const model = chosenModel();
  if (!model || !files.length) return;
  const kind = task(model);
  const path = model.default ? model.name : `${model.name}/${model.version}`;
  clearResult();
  if (kind === FLOW && files.length !== 2) {
    showProblem(`An optical-flow model takes two images, the first and the second frame: pick or drop two `
      + `at once (${files.length} given).`);
    return;
  }
  const sent = kind === FLOW ? files : files.slice(0, 1);
  const name = sent.map((file) => file.name).join(" + ");
  showInput(kind, sent[0]);
  $("status").textContent = `sending ${name} (${sent.reduce((n, file) => n + file.size, 0)} bytes) to /predictions/${path} ...`;
  const started = performance.now();
  const response = await call(`/predictions/${path}`, { method: "POST", body: body(kind, sent), headers: optionHeaders(kind) });
  const text = await response.text();
  const ms = performance.now() - started;
  $("answer").textContent = pretty(text);
  $("status").textContent = `${name}: HTTP ${response.status} from /predictions/${path} in ${ms.toFixed(0)} ms`;
  if (!response.ok) {
    showError(response.status, text);
    return;
  }
  if (kind !== VIDEO) await pictureLoaded();
  draw(kind, JSON.parse(text));
  if (kind === "classification" && $("explain").checked) await explain(path, sent[0]);
}

/** The request body: the file itself, or for a flow pair multipart fields image1 and image2, in order. */
function body(kind, files) {
  if (kind !== FLOW) return files[0];
  const form = new FormData();
  files.forEach((file, i) => form.append(`image${i + 1}`, file, file.name));
  return form;
}

async function explain(path, file) {
  const response = await call(`/explanations/${path}`, { method: "POST", body: file,
    headers: { "Content-Type": "application/octet-stream" } });
  const text = await response.text();
  if (!response.ok) {
    showError(response.status, text);
    return;
  }
  drawHeatmap(JSON.parse(text));
}

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (err) {
    return text;
  }
}

/** The service's error as it sent it: its status, type and message ({"code", "type", "message"} or {"error"}). */
function showError(status, text) {
  let body = {};
  try {
    body = JSON.parse(text);
  } catch (err) {
    body = { message: text };
  }
  const box = $("error");
  box.hidden = false;
  box.dataset.status = status;
  box.textContent = `HTTP ${status}${body.type ? ` ${body.type}` : ""}: ${body.message || body.error || text}`;
}

/** A mistake the page sees before sending anything, in the error box. */
function showProblem(text) {
  $("error").hidden = false;
  delete $("error").dataset.status;
  $("error").textContent = text;
}

function clearResult() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("answer").textContent = "";
  $("bars").replaceChildren();
  $("legend").replaceChildren();
  $("overlay").replaceChildren();
  $("heatmap-figure").hidden = true;
  $("flow-figure").hidden = true;
}

/** What was sent, on the stage: a clip in the <video> (muted, with controls), an image (or a flow
 * pair's first frame, or a GIF clip) in the <img>. */
function showInput(kind, file) {
  if (state.image) URL.revokeObjectURL(state.image);
  state.image = URL.createObjectURL(file);
  const moving = kind === VIDEO && !file.type.startsWith("image/");
  $("picture").hidden = moving;
  $("clip").hidden = !moving;
  if (!moving) $("clip").removeAttribute("src");
  $(moving ? "clip" : "picture").src = state.image;
}

function pictureLoaded() {
  const picture = $("picture");
  if (picture.complete && picture.naturalWidth) return Promise.resolve();
  return new Promise((resolve) => { picture.onload = resolve; picture.onerror = resolve; });
}

// --- drawing answers ------------------------------------------------------------------------------

function draw(kind, answer) {
  if (kind === VIDEO) return drawClipAnswer(answer);
  if (kind === FLOW) return drawFlow(answer);
  const picture = $("picture");
  // the overlay is in the image's pixels; text and marks are sized in screen pixels
  state.scale = picture.naturalWidth / Math.max(picture.getBoundingClientRect().width, 1);
  $("overlay").setAttribute("viewBox", `0 0 ${picture.naturalWidth} ${picture.naturalHeight}`);
  $("overlay").setAttribute("preserveAspectRatio", "none");
  if (kind === "classification") drawBars(answer);
  else if (kind === "semantic_segmentation") drawClassMap(answer);
  else drawDetections(answer);
}

/** A clip's top-k (bars) and how many windows of how many frames the model read. */
function drawClipAnswer(answer) {
  drawBars(answer.predictions);
  const legend = $("legend");
  legend.dataset.windows = answer.windows;
  legend.dataset.frames = answer.frames;
  legend.textContent = `${answer.windows} window${answer.windows === 1 ? "" : "s"} over ${answer.frames} frames`
    + " (the probabilities averaged over the windows)";
}

/** Optical flow: the service's colour picture of the flow (flow_to_image), beside the first frame. */
function drawFlow(answer) {
  const [height, width] = answer.size;
  $("flow").src = `data:image/png;base64,${answer.png}`;
  $("flow-caption").textContent = `the flow from the first frame to the second, ${width}x${height}: `
    + "hue is the direction, saturation the length (relative to the longest)";
  $("flow-figure").dataset.size = `${width}x${height}`;
  $("flow-figure").hidden = false;
}

function drawBars(answer) {
  $("bars").replaceChildren(...answer.map((item) => {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.label = item.label;
    bar.innerHTML = '<span class="label"></span><span><div class="fill"></div></span><span class="value"></span>';
    bar.querySelector(".label").textContent = item.label;
    bar.querySelector(".fill").style.width = `${(100 * item.probability).toFixed(1)}%`;
    bar.querySelector(".value").textContent = `${(100 * item.probability).toFixed(1)}%`;
    return bar;
  }));
}

function svg(name, attributes, text) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  Object.entries(attributes).forEach(([key, value]) => element.setAttribute(key, value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawDetections(answer) {
  const overlay = $("overlay");
  answer.forEach((item, i) => {
    const color = COLORS[item.index % COLORS.length];
    if (item.mask) overlay.append(maskImage(item.mask, color));
    const [x1, y1, x2, y2] = item.box;
    overlay.append(svg("rect", { class: "box", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: color,
      "data-label": item.label }));
    const px = state.scale;
    overlay.append(svg("text", { class: "box-label", x: x1 + 2 * px, y: Math.max(y1 - 3 * px, 12 * px),
      "font-size": 12 * px, "stroke-width": 3 * px }, `${item.label} ${item.score.toFixed(2)}`));
    if (item.keypoints) drawKeypoints(overlay, item.keypoints);
    if (i === 0) $("legend").textContent = `${answer.length} detections above the threshold`;
  });
  if (!answer.length) $("legend").textContent = "no detection above the threshold";
}

function drawKeypoints(overlay, keypoints) {
  const seen = Object.fromEntries(keypoints.filter((k) => k.score > 0).map((k) => [k.name, k]));
  SKELETON.forEach(([a, b]) => {
    if (seen[a] && seen[b]) overlay.append(svg("line", { class: "bone", x1: seen[a].x, y1: seen[a].y, x2: seen[b].x, y2: seen[b].y }));
  });
  Object.values(seen).forEach((k) => overlay.append(svg("circle", { class: "keypoint", cx: k.x, cy: k.y, r: 3 * state.scale,
    "data-name": k.name })));
}

/** COCO's compressed RLE string -> run lengths (maskApi.c's rleFrString). */
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** An instance's mask (COCO RLE, column-major) as a tinted SVG image over the picture. */
function maskImage(mask, color) {
  const [height, width] = mask.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  let position = 0;
  rleCounts(mask.counts).forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = position; j < position + run; j += 1) {
        const offset = 4 * ((j % height) * width + Math.floor(j / height));
        pixels.data.set([r, g, b, 110], offset);
      }
    }
    position += run;
  });
  context.putImageData(pixels, 0, 0);
  return svg("image", { class: "mask", href: canvas.toDataURL(), x: 0, y: 0, width, height, preserveAspectRatio: "none" });
}

/** Semantic segmentation: the class-index PNG tinted over the picture, and the classes present. */
function drawClassMap(answer) {
  const [height, width] = answer.size;
  const source = new Image();
  source.onload = () => {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.drawImage(source, 0, 0);
    const pixels = context.getImageData(0, 0, width, height);
    for (let offset = 0; offset < pixels.data.length; offset += 4) {
      const index = pixels.data[offset];
      const color = COLORS[index % COLORS.length];
      pixels.data.set(index === 0 ? [0, 0, 0, 0] : [...[1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16)), 120], offset);
    }
    context.putImageData(pixels, 0, 0);
    $("overlay").append(svg("image", { class: "classmap", href: canvas.toDataURL(), x: 0, y: 0, width, height,
      preserveAspectRatio: "none" }));
  };
  source.src = `data:image/png;base64,${answer.png}`;
  $("legend").replaceChildren(...answer.classes.map((c) => {
    const line = document.createElement("div");
    line.className = "class";
    line.dataset.label = c.label;
    line.innerHTML = '<span class="swatch"></span>';
    line.firstChild.style.background = c.index === 0 ? "transparent" : COLORS[c.index % COLORS.length];
    line.append(`${c.label}: ${(100 * c.fraction).toFixed(1)}% of the pixels`);
    return line;
  }));
}

/** An explanation's heatmap ([h][w] in [0, 1], over the model's input) in its own panel. */
function drawHeatmap(explanation) {
  const [height, width] = explanation.shape;
  const canvas = $("heatmap");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  explanation.heatmap.forEach((row, y) => row.forEach((value, x) => {
    pixels.data.set([255 * value, 64 * value, 255 * (1 - value), 255], 4 * (y * width + x));
  }));
  context.putImageData(pixels, 0, 0);
  const target = explanation.target.label ?? explanation.target.index;
  $("heatmap-caption").textContent = `${explanation.method}, class ${target}: where the model looked `
    + `(over its ${width}x${height} input, red most)`;
  $("heatmap-figure").hidden = false;
}

// --- live figures from the metrics ----------------------------------------------------------------

/** Prometheus text -> [{name, labels, value}] (comments and blank lines left out). */
function parseMetrics(text) {
  const samples = [];
  const line = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
  text.split("\n").forEach((raw) => {
    const match = raw.startsWith("#") ? null : line.exec(raw);
    if (!match) return;
    const labels = {};
    (match[2] || "").replace(/(\w+)="((?:[^"\\]|\\.)*)"/g, (_, key, value) => { labels[key] = value; });
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  });
  return samples;
}

/** {model: {requests, errors: {type: n}, buckets: {le: n}}} summed over every other label. */
function byModel(samples) {
  const models = {};
  const entry = (name) => (models[name] = models[name] || { requests: 0, errors: {}, buckets: {} });
  samples.forEach((s) => {
    const model = s.labels.ModelName;
    if (!model) return;
    if (s.name === "tvserve_requests_total") {
      entry(model).requests += s.value;
      if (Number(s.labels.status) >= 400) {  // error_type is "none" on answered requests
        const type = `${s.labels.status} ${s.labels.error_type}`;
        entry(model).errors[type] = (entry(model).errors[type] || 0) + s.value;
      }
    } else if (s.name === "tvserve_request_seconds_bucket") {
      const buckets = entry(model).buckets;
      buckets[s.labels.le] = (buckets[s.labels.le] || 0) + s.value;
    }
  });
  return models;
}

/** histogram_quantile(q, ...) over cumulative bucket counts {le: n}: linear within the bucket, in ms. */
function quantile(q, buckets) {
  const bounds = Object.keys(buckets).map((le) => [le === "+Inf" ? Infinity : Number(le), buckets[le]])
    .sort((a, b) => a[0] - b[0]);
  const total = bounds.length ? bounds[bounds.length - 1][1] : 0;
  if (!total) return null;
  const rank = q * total;
  let [lower, below] = [0, 0];
  for (const [bound, count] of bounds) {
    if (count >= rank) {
      if (bound === Infinity) return 1000 * lower;
      return 1000 * (lower + (bound - lower) * ((rank - below) / Math.max(count - below, 1e-12)));
    }
    [lower, below] = [bound, count];
  }
  return null;
}

function delta(now, before) {
  const out = { requests: now.requests - (before ? before.requests : 0), errors: {}, buckets: {} };
  Object.entries(now.errors).forEach(([type, n]) => { out.errors[type] = n - ((before && before.errors[type]) || 0); });
  Object.entries(now.buckets).forEach(([le, n]) => { out.buckets[le] = n - ((before && before.buckets[le]) || 0); });
  return out;
}

async function loadLive() {
  const response = await call("/console/api/metrics");
  if (!response.ok) return;
  const now = { at: performance.now(), models: byModel(parseMetrics(await response.text())) };
  const before = state.lastMetrics;
  const seconds = before ? (now.at - before.at) / 1000 : null;
  $("live").tBodies[0].replaceChildren(...Object.keys(now.models).sort().map((name) => {
    const window = before ? delta(now.models[name], before.models[name]) : null;
    const row = document.createElement("tr");
    row.dataset.model = name;
    const p50 = window && quantile(0.5, window.buckets), p99 = window && quantile(0.99, window.buckets);
    const errors = Object.entries(now.models[name].errors).filter(([, n]) => n > 0)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([t, n]) => `${t}: ${n}`);
    [name, String(now.models[name].requests), window ? (window.requests / seconds).toFixed(2) : "—",
      p50 == null ? "—" : p50.toFixed(1), p99 == null ? "—" : p99.toFixed(1), errors.join(", ") || "none"]
      .forEach((text, i) => {
        const cell = row.insertCell();
        cell.textContent = text;
        cell.className = ["name", "requests num", "rate num", "p50 num", "p99 num", "errors"][i];
      });
    return row;
  }));
  $("live-when").textContent = before ? `(over the last ${seconds.toFixed(1)} s)` : "(first read)";
  state.lastMetrics = now;
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("model").onchange = showOptions;
  $("file").onchange = () => send([...$("file").files]);
  const drop = $("drop");
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    send([...event.dataTransfer.files]);
  };
  $("key-forget").hidden = !sessionStorage.getItem(KEY_STORE);
  $("key-forget").onclick = () => { sessionStorage.removeItem(KEY_STORE); $("key-forget").hidden = true; };
}

async function start() {
  wire();
  await loadModels();
  await loadSamples();
  await loadLive();
  setInterval(loadModels, 2 * LIVE_EVERY_MS);
  setInterval(loadLive, LIVE_EVERY_MS);
  document.body.dataset.loaded = "true";
}

start();

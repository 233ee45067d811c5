// nemt viewer: upload an image, see the predictions and the maps of NEMt and one baseline side by side.
// The maps come once per upload as raw arrays (every label); switching the label or moving the opacity
// slider re-blends them over the image on the canvas, with the colour map /v1/model gives, so neither
// needs the server again. The blend is the server's: round((1 - alpha) * image + alpha * lut[round(255 m)]).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, file: null, image: null, results: { primary: null, baseline: null }, seq: 0, renders: 0 };

  function setState(s) { document.body.dataset.state = s; }
  function status(text) { $("status").textContent = text; }
  function showError(text) { const e = $("error"); e.textContent = text; e.hidden = !text; }

  async function init() {
    try {
      const r = await fetch("v1/model");
      if (!r.ok) throw new Error(`GET /v1/model: ${r.status}`);
      state.info = await r.json();
    } catch (err) {
      showError(`cannot reach the service (${err.message})`);
      setState("error");
      return;
    }
    const info = state.info;
    $("model-info").textContent = `${info.card.arch} · ${info.task} · ${info.labels.length} label(s) · ` +
      `input ${info.input_size.join("×")} · ${info.channels} channel(s) · methods: ${info.methods.join(", ")}`;
    for (const name of info.labels) $("label").add(new Option(name, name));
    const others = info.methods.filter((m) => m !== info.default_method);
    for (const m of others) $("baseline").add(new Option(m, m));
    $("baseline").add(new Option("none", ""));
    $("baseline").value = others.includes("gradcam++") ? "gradcam++" : (others[0] || "");
    $("caption-primary").textContent = info.default_method;
    $("baseline-figure").hidden = !$("baseline").value;
    drawColorbar();
    bind();
    setState("idle");
    status("choose or drop an image");
  }

  function drawColorbar() {
    const c = $("colorbar"), ctx = c.getContext("2d"), img = ctx.createImageData(256, 1);
    state.info.colormap.lut.forEach((rgb, i) => { img.data.set([...rgb, 255], 4 * i); });
    ctx.putImageData(img, 0, 0);
  }

  function bind() {
    $("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
    const drop = $("drop");
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
    // a file dropped beside the zone must not make the browser leave the page
    for (const ev of ["dragover", "drop"]) window.addEventListener(ev, (e) => e.preventDefault());
    $("label").addEventListener("change", render);
    $("alpha").addEventListener("input", () => { $("alpha-value").textContent = Number($("alpha").value).toFixed(2); render(); });
    $("baseline").addEventListener("change", () => { $("baseline-figure").hidden = !$("baseline").value; explainBaseline(); });
    for (const which of ["primary", "baseline"]) {
      const a = $(`download-${which}`);
      a.addEventListener("click", () => {  // the overlay as drawn now (label and opacity included)
        a.href = $(`overlay-${which}`).toDataURL("image/png");
        const stem = (state.file ? state.file.name : "image").replace(/\.[^.]*(\.gz)?$/, "");
        a.download = `${stem}__${state.results[which].method}__${$("label").value}.png`;
      });
    }
  }

  async function explain(method, file) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("method", method);
    form.append("format", "array");
    // no labels field: every label (a model may call a label "all", which labels=all would not name)
    const r = await fetch("v1/explain", { method: "POST", body: form });
    let body = null;
    try { body = await r.json(); } catch (_) { body = { detail: r.statusText }; }
    if (!r.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new Error(`${method}: ${r.status} ${detail}`);
    }
    return decode(body);
  }

  function decode(body) {
    const maps = {};
    for (const [label, entry] of Object.entries(body.explanations)) maps[label] = slice(entry.map);
    return { method: body.method, body, maps };
  }

  // raw float32 little-endian map -> Float32Array of the 2D plane shown (3D: the middle slice, as the server)
  function slice(raw) {
    const bytes = Uint8Array.from(atob(raw.data), (c) => c.charCodeAt(0));
    const view = new DataView(bytes.buffer);
    const shape = raw.shape;
    const h = shape[shape.length - 2], w = shape[shape.length - 1];
    const offset = shape.length === 3 ? Math.floor(shape[0] / 2) * h * w : 0;
    const out = new Float32Array(h * w);
    for (let i = 0; i < h * w; i++) out[i] = view.getFloat32((offset + i) * 4, true);
    return out;
  }

  async function loadImage(b64) {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    return ctx.getImageData(0, 0, c.width, c.height);
  }

  async function upload(file) {
    const seq = ++state.seq;
    state.file = file;
    showError("");
    setState("busy");
    status(`explaining ${file.name}…`);
    const baseline = $("baseline").value;
    try {
      const [primary, base] = await Promise.all([
        explain(state.info.default_method, file), baseline ? explain(baseline, file) : Promise.resolve(null)]);
      if (seq !== state.seq) return;  // a newer upload took over
      state.image = await loadImage(primary.body.image.png);
      state.results = { primary, baseline: base };
      showPredictions(primary.body);
      render();
      status(`${file.name}: ${primary.body.image.modality}, ${primary.body.image.shape.join("×")}`);
      // what makes the image unlike the training images (the service's notes): shown, not hidden in the JSON
      const notes = primary.body.notes || [];
      $("notes").hidden = !notes.length;
      $("notes").textContent = notes.length ? `Unlike the training images: ${notes.join("; ")}` : "";
      setState("ready");
    } catch (err) {
      if (seq !== state.seq) return;
      state.image = null;
      state.results = { primary: null, baseline: null };
      clearViews();
      showError(err.message);
      status("");
      setState("error");
    }
  }

  async function explainBaseline() {
    const method = $("baseline").value;
    if (!state.file || !state.image) return;
    if (!method) { state.results.baseline = null; render(); return; }
    const seq = ++state.seq;
    setState("busy");
    try {
      const res = await explain(method, state.file);
      if (seq !== state.seq) return;
      state.results.baseline = res;
      render();
      setState("ready");
    } catch (err) {
      if (seq !== state.seq) return;
      showError(err.message);
      setState("error");
    }
  }

  function showPredictions(body) {
    const tbody = $("predictions").tBodies[0];
    tbody.replaceChildren();
    const probs = body.task !== "regression";
    for (const [label, p] of Object.entries(body.predictions)) {
      const tr = tbody.insertRow();
      tr.dataset.label = label;
      if (body.predicted.includes(label)) tr.classList.add("predicted");
      tr.insertCell().textContent = label;
      const barCell = tr.insertCell();
      barCell.className = "bar-cell";
      if (probs) {
        const bar = document.createElement("div");
        bar.className = "bar";
        bar.style.width = `${Math.round(100 * p)}%`;
        barCell.append(bar);
      }
      const v = tr.insertCell();
      v.className = "value";
      v.textContent = probs ? p.toFixed(3) : p.toPrecision(4);
    }
    if (body.predicted.length && body.task === "multiclass") $("label").value = body.predicted[0];
  }

  function composite(canvas, image, map, alpha) {
    canvas.width = image.width; canvas.height = image.height;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(image.width, image.height);
    const src = image.data, dst = out.data, lut = state.info.colormap.lut;
    for (let i = 0; i < map.length; i++) {
      const v = map[i];
      const c = lut[Number.isFinite(v) ? Math.min(255, Math.max(0, Math.round(v * 255))) : 0];
      for (let k = 0; k < 3; k++) dst[4 * i + k] = Math.round((1 - alpha) * src[4 * i + k] + alpha * c[k]);
      dst[4 * i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  }

  function render() {
    if (!state.image) return;
    const img = $("image-canvas");
    img.width = state.image.width; img.height = state.image.height;
    img.getContext("2d").putImageData(state.image, 0, 0);
    const label = $("label").value, alpha = Number($("alpha").value);
    for (const which of ["primary", "baseline"]) {
      const res = state.results[which];
      const a = $(`download-${which}`);
      if (which === "baseline") $("baseline-figure").hidden = !res;
      if (!res) { a.setAttribute("aria-disabled", "true"); continue; }
      composite($(`overlay-${which}`), state.image, res.maps[label], alpha);
      $(`caption-${which}`).textContent = `${res.method}: ${label}`;
      $(`timing-${which}`).textContent = `(${res.body.ms.explain.toFixed(1)} ms)`;
      a.setAttribute("aria-disabled", "false");
    }
    renderPrototypes(state.results.primary, label);
    for (const tr of $("predictions").tBodies[0].rows) tr.classList.toggle("explained", tr.dataset.label === label);
    document.body.dataset.label = label;
    document.body.dataset.renders = String(++state.renders);
  }

  // a prototype model (Pantypes): the label's nearest prototypes, decoded, as the service returns them
  function renderPrototypes(res, label) {
    const protos = res && res.body.prototypes && res.body.prototypes[label];
    $("prototypes").hidden = !protos;
    const list = $("prototype-list");
    list.replaceChildren();
    if (!protos) return;
    $("prototype-label").textContent = label;
    for (const p of protos) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${p.png}`;
      img.alt = `prototype ${p.index}`;
      img.className = "prototype";
      const cap = document.createElement("figcaption");
      cap.textContent = `p${p.index}: s = ${p.similarity.toFixed(2)}, w = ${p.weight.toFixed(2)}`;
      fig.append(img, cap);
      list.append(fig);
    }
  }

  function clearViews() {
    $("prototypes").hidden = true;
    $("notes").hidden = true;
    $("notes").textContent = "";
    $("prototype-list").replaceChildren();
    for (const id of ["image-canvas", "overlay-primary", "overlay-baseline"]) { const c = $(id); c.width = 1; c.height = 1; }
    $("predictions").tBodies[0].replaceChildren();
  }

  init();
})();

// tokvis viewer: token reduction patterns of several traces side by side, on a canvas per panel.
// One module for the Jupyter widget (widget.js) and the HTML report (report.js); no dependencies.
//
// createViewer(root, cfg) draws into `root`:
//   cfg.panels    [{title, grid: [gh, gw], depth, layers: [block...], kinds: [...]}]
//   cfg.numImages number of images; cfg.imageName(i) -> string
//   cfg.data(k, i)  -> Promise<{labels: Int16Array(S*P), depth: Int16Array(P), weight: Uint8Array(S*P) | null}>
//   cfg.image(i)    -> Promise<ImageBitmap | HTMLImageElement | null> (null: a grey grid is drawn)
//   cfg.note      one warning line shown above the panels (or "")
//   cfg.state     initial {block, image, selectedPanel, selectedPatch}
//   cfg.onChange(state) after every change made in the page
//   cfg.pickers   optional: (k, headerElement) -> void, to put pickers into panel k's header
// Slots: slot 0 = before any recorded block, slot s = after the s-th recorded block; block b shows the slot of
// the last recorded block <= b.

const TV_RAMP = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
];

function tvRamp(t) {
  const x = Math.max(0, Math.min(1, t)) * (TV_RAMP.length - 1);
  const i = Math.min(TV_RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const a = TV_RAMP[i], b = TV_RAMP[i + 1];
  return [0, 1, 2].map((c) => Math.round(a[c] + f * (b[c] - a[c])));
}

const TV_WHITE = [255, 255, 255];
const TV_BLACK = [0, 0, 0];
const TV_COLOURS = new Map();

function tvRgb(n) {
  // a stable colour per patch index: golden-angle hues, saturation 85 %, lightness 55 % (HSL to RGB)
  if (TV_COLOURS.has(n)) return TV_COLOURS.get(n);
  const h = ((n * 137.508) % 360) / 360, s = 0.85, l = 0.55;
  const q = l + s - l * s, p = 2 * l - q;
  const f = (t) => {
    t = (t + 1) % 1;
    const v = t < 1 / 6 ? p + (q - p) * 6 * t : t < 1 / 2 ? q : t < 2 / 3 ? p + (q - p) * (2 / 3 - t) * 6 : p;
    return Math.round(v * 255);
  };
  const rgb = [f(h + 1 / 3), f(h), f(h - 1 / 3)];
  TV_COLOURS.set(n, rgb);
  return rgb;
}

function tvSlot(layers, block) {
  let s = 0;
  for (let i = 0; i < layers.length; i++) if (layers[i] <= block) s = i + 1;
  return s;
}

function tvEl(tag, cls, parent, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function createViewer(root, cfg) {
  const panels = cfg.panels.map((p) => ({ ...p }));
  const maxDepth = Math.max(...panels.map((p) => p.depth));
  const state = {
    block: -1, image: 0, selectedPanel: -1, selectedPatch: -1, hover: -1, ...(cfg.state || {}),
  };
  const cache = new Map(); // `${k}:${version}:${image}` -> data
  const images = new Map(); // image -> bitmap or null
  const versions = panels.map(() => 0);
  let lastDrawMs = 0;

  root.classList.add("tv-viewer");
  root.tabIndex = 0;
  root.dataset.lmSuppressShortcuts = "true"; // JupyterLab / Notebook 7: the arrow keys are the viewer's
  root.innerHTML = "";
  const bar = tvEl("div", "tv-bar", root);
  tvEl("span", "tv-label", bar, "block");
  const slider = tvEl("input", "tv-slider", bar);
  slider.type = "range";
  slider.min = -1;
  slider.max = maxDepth - 1;
  slider.step = 1;
  const blockText = tvEl("span", "tv-block", bar);
  const prev = tvEl("button", "tv-btn", bar, "▲ image");
  const next = tvEl("button", "tv-btn", bar, "▼ image");
  const imageText = tvEl("span", "tv-image", bar);
  const save = tvEl("button", "tv-btn tv-save", bar, "save view as PNG");
  const note = tvEl("div", "tv-note", root, cfg.note || "");
  if (!cfg.note) note.style.display = "none";
  const body = tvEl("div", "tv-body", root);
  const thumbs = tvEl("div", "tv-thumbs", body);
  const grid = tvEl("div", "tv-panels", body);
  const legend = tvEl("div", "tv-legend", root);

  const views = panels.map((p, k) => makePanel(p, k));

  function makePanel(p, k) {
    const box = tvEl("div", "tv-panel", grid);
    const head = tvEl("div", "tv-head", box);
    const title = tvEl("div", "tv-title", head, p.title);
    if (cfg.pickers) cfg.pickers(k, head);
    const canvas = tvEl("canvas", "tv-canvas", box);
    const info = tvEl("div", "tv-info", box, "\u00a0");
    const v = { box, title, canvas, info, ctx: canvas.getContext("2d"), cell: 0 };
    sizePanel(p, v);
    canvas.addEventListener("mousemove", (e) => {
      const patch = patchAt(p, v, e);
      if (patch !== state.hover) {
        state.hover = patch;
        drawAll();
      }
    });
    canvas.addEventListener("mouseleave", () => {
      state.hover = -1;
      drawAll();
    });
    canvas.addEventListener("click", (e) => {
      const patch = patchAt(p, v, e);
      if (patch < 0) return;
      const same = state.selectedPanel === k && sameToken(k, patch, state.selectedPatch);
      state.selectedPanel = same ? -1 : k;
      state.selectedPatch = same ? -1 : patch;
      drawAll();
      changed();
      root.focus({ preventScroll: true });
    });
    return v;
  }

  function sizePanel(p, v) {
    const [gh, gw] = p.grid;
    v.cell = Math.max(4, Math.floor(Math.min(320 / gw, 320 / gh)));
    v.canvas.width = gw * v.cell;
    v.canvas.height = gh * v.cell;
  }

  function patchAt(p, v, e) {
    const r = v.canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * v.canvas.width;
    const y = ((e.clientY - r.top) / r.height) * v.canvas.height;
    const c = Math.floor(x / v.cell), row = Math.floor(y / v.cell);
    const [gh, gw] = p.grid;
    if (c < 0 || row < 0 || c >= gw || row >= gh) return -1;
    return row * gw + c;
  }

  function dataOf(k) {
    return cache.get(`${k}:${versions[k]}:${state.image}`);
  }

  function labelsAt(k, block) {
    const d = dataOf(k);
    if (!d) return null;
    const P = panels[k].grid[0] * panels[k].grid[1];
    const s = tvSlot(panels[k].layers, Math.min(block, panels[k].depth - 1));
    return { lab: d.labels.subarray(s * P, (s + 1) * P), w: d.weight ? d.weight.subarray(s * P, (s + 1) * P) : null, s };
  }

  function sameToken(k, a, b) {
    if (a < 0 || b < 0) return false;
    const L = labelsAt(k, state.block);
    return L ? L.lab[a] === L.lab[b] : a === b;
  }

  // the token selected in panel k: its label there (-1: the dropped patches), or null for none
  function selectedToken(k) {
    if (state.selectedPatch < 0 || state.selectedPanel < 0) return null;
    const L = labelsAt(k, state.block);
    if (!L) return null;
    return L.lab[state.selectedPatch];
  }

  function highlighted() {
    // patches highlighted per panel (selection if any, else hover), read by tests
    const anchor = state.selectedPatch >= 0 ? state.selectedPatch : state.hover;
    return panels.map((p, k) => {
      const L = labelsAt(k, state.block);
      if (!L || anchor < 0) return [];
      const t = L.lab[anchor];
      const out = [];
      for (let i = 0; i < L.lab.length; i++) if (L.lab[i] === t) out.push(i);
      return out;
    });
  }

  function dropBlock(k, patch) {
    const d = dataOf(k);
    const p = panels[k];
    const P = p.grid[0] * p.grid[1];
    for (let s = 1; s <= p.layers.length; s++) if (d.labels[s * P + patch] < 0) return p.layers[s - 1];
    return null;
  }

  function describe(k, patch) {
    const p = panels[k];
    const L = labelsAt(k, state.block);
    const d = dataOf(k);
    if (!L || patch < 0) return "\u00a0";
    const gw = p.grid[1];
    const where = `patch (${Math.floor(patch / gw)}, ${patch % gw})`;
    const t = L.lab[patch];
    if (t < 0) return `${where}: dropped at block ${dropBlock(k, patch)}`;
    let size = 0;
    for (let i = 0; i < L.lab.length; i++) if (L.lab[i] === t) size++;
    const own = d.depth[patch] > state.block;
    const how = own ? "its own token" : `joined at block ${d.depth[patch]}`;
    const w = L.w ? `, weight ${(L.w[patch] / 255).toFixed(2)}` : "";
    return `${where} → token ${t} (${size} patch${size === 1 ? "" : "es"}): ${how}${w}`;
  }

  function drawPanel(k) {
    const p = panels[k], v = views[k], ctx = v.ctx;
    const [gh, gw] = p.grid;
    const P = gh * gw, c = v.cell, W = v.canvas.width, H = v.canvas.height;
    const img = images.get(state.image);
    if (img) {
      ctx.drawImage(img, 0, 0, W, H);
    } else {
      ctx.fillStyle = "#8c8c8c";
      ctx.fillRect(0, 0, W, H);
      ctx.strokeStyle = "#a8a8a8";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let i = 0; i <= gw; i++) { ctx.moveTo(i * c + 0.5, 0); ctx.lineTo(i * c + 0.5, H); }
      for (let i = 0; i <= gh; i++) { ctx.moveTo(0, i * c + 0.5); ctx.lineTo(W, i * c + 0.5); }
      ctx.stroke();
    }
    const L = labelsAt(k, state.block);
    if (!L) {
      v.info.textContent = "loading …";
      return;
    }
    const d = dataOf(k);
    const lab = L.lab, w = L.w, block = Math.min(state.block, p.depth - 1);
    // token sizes and a stable colour per token: its own patch (or its first patch)
    const size = new Map(), rep = new Map();
    for (let i = 0; i < P; i++) {
      const t = lab[i];
      if (t < 0) continue;
      size.set(t, (size.get(t) || 0) + 1);
      if (!rep.has(t) || d.depth[i] > block) if (!rep.has(t) || d.depth[rep.get(t)] <= block) rep.set(t, i);
    }
    // region fills, the selection's shading and dropped patches: one RGBA pixel per patch, drawn scaled up
    const selT = selectedToken(k);
    if (!v.overlay || v.overlay.width !== gw || v.overlay.height !== gh) {
      v.overlay = document.createElement("canvas");
      v.overlay.width = gw;
      v.overlay.height = gh;
      v.octx = v.overlay.getContext("2d");
      v.pixels = v.octx.createImageData(gw, gh);
    }
    const px = v.pixels.data;
    for (let i = 0; i < P; i++) {
      const t = lab[i], o = 4 * i;
      let rgb, a;
      if (selT !== null && t === selT) {
        // the selected token's source patches, shaded by the block at which each was merged in (or dropped)
        const blk = selT < 0 ? dropBlock(k, i) : d.depth[i];
        rgb = blk > block ? TV_WHITE : tvRamp((blk + 1) / Math.max(1, p.depth));
        a = w && selT >= 0 ? Math.max(0.1, w[i] / 255) : 0.85;
      } else if (t < 0) {
        rgb = TV_BLACK;
        a = 0.72;
      } else {
        rgb = tvRgb(rep.get(t));
        a = w ? 0.08 + 0.42 * (w[i] / 255) : 0.3;
      }
      px[o] = rgb[0];
      px[o + 1] = rgb[1];
      px[o + 2] = rgb[2];
      px[o + 3] = Math.round(a * 255);
    }
    v.octx.putImageData(v.pixels, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(v.overlay, 0, 0, W, H);
    ctx.imageSmoothingEnabled = true;
    // region borders
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 0; i < P; i++) {
      const col = i % gw, row = Math.floor(i / gw);
      if (col + 1 < gw && lab[i] !== lab[i + 1]) { ctx.moveTo((col + 1) * c + 0.5, row * c); ctx.lineTo((col + 1) * c + 0.5, (row + 1) * c); }
      if (row + 1 < gh && lab[i] !== lab[i + gw]) { ctx.moveTo(col * c, (row + 1) * c + 0.5); ctx.lineTo((col + 1) * c, (row + 1) * c + 0.5); }
    }
    ctx.stroke();
    // a mark on each merged token's own patch
    ctx.fillStyle = "#ffffff";
    ctx.strokeStyle = "#000000";
    ctx.beginPath();
    const rad = Math.max(1.5, c * 0.14);
    for (let i = 0; i < P; i++) {
      const t = lab[i];
      if (t < 0 || d.depth[i] <= block || size.get(t) < 2) continue;
      const x = (i % gw) * c + c / 2, y = Math.floor(i / gw) * c + c / 2;
      ctx.moveTo(x + rad, y);
      ctx.arc(x, y, rad, 0, 2 * Math.PI);
    }
    ctx.fill();
    ctx.stroke();
    // hover: outline the token holding the patch
    if (state.hover >= 0) {
      const t = lab[state.hover];
      ctx.strokeStyle = t < 0 ? "#ff4040" : "#ffe600";
      ctx.lineWidth = 2;
      ctx.beginPath();
      for (let i = 0; i < P; i++) {
        if (t < 0 ? i !== state.hover : lab[i] !== t) continue;
        const col = i % gw, row = Math.floor(i / gw), x = col * c, y = row * c;
        const out = (j, ok) => !ok || (t < 0 ? j !== state.hover : lab[j] !== t);
        if (out(i - gw, row > 0)) { ctx.moveTo(x, y + 1); ctx.lineTo(x + c, y + 1); }
        if (out(i + gw, row + 1 < gh)) { ctx.moveTo(x, y + c - 1); ctx.lineTo(x + c, y + c - 1); }
        if (out(i - 1, col > 0)) { ctx.moveTo(x + 1, y); ctx.lineTo(x + 1, y + c); }
        if (out(i + 1, col + 1 < gw)) { ctx.moveTo(x + c - 1, y); ctx.lineTo(x + c - 1, y + c); }
      }
      ctx.stroke();
    }
    const focus = state.hover >= 0 ? state.hover : state.selectedPatch;
    v.info.textContent = describe(k, focus);
  }

  function drawAll() {
    const t0 = performance.now();
    slider.value = state.block;
    blockText.textContent = state.block < 0 ? "-1 (input)" : `${state.block} / ${maxDepth - 1}`;
    imageText.textContent = `${state.image + 1} / ${cfg.numImages}: ${cfg.imageName(state.image)}`;
    for (let k = 0; k < panels.length; k++) drawPanel(k);
    lastDrawMs = performance.now() - t0;
    root.dataset.block = state.block;
    root.dataset.image = state.image;
  }

  function drawLegend() {
    legend.innerHTML = "";
    tvEl("span", "tv-label", legend, "merged in / dropped at block:");
    const n = maxDepth;
    for (let b = 0; b < n; b++) {
      const [r, g, bl] = tvRamp((b + 1) / Math.max(1, n));
      const sw = tvEl("span", "tv-swatch", legend, String(b));
      sw.style.background = `rgb(${r}, ${g}, ${bl})`;
      sw.style.color = b < n / 2 ? "#fff" : "#000";
    }
    const own = tvEl("span", "tv-swatch", legend, "own");
    own.style.background = "#fff";
    tvEl("span", "tv-label", legend, "· hover a patch: its token · click: the token's source patches · ←/→ block · ↑/↓ image");
  }

  let thumbToken = 0;
  function drawThumbs() {
    const my = ++thumbToken;
    thumbs.innerHTML = "";
    const n = cfg.numImages, half = 4;
    const lo = Math.max(0, Math.min(state.image - half, n - 2 * half - 1)), hi = Math.min(n, lo + 2 * half + 1);
    for (let i = lo; i < hi; i++) {
      const t = tvEl("canvas", "tv-thumb" + (i === state.image ? " tv-current" : ""), thumbs);
      t.width = t.height = 48;
      t.title = cfg.imageName(i);
      t.addEventListener("click", () => setImage(i, true));
      const tctx = t.getContext("2d");
      tctx.fillStyle = "#8c8c8c";
      tctx.fillRect(0, 0, 48, 48);
      tctx.fillStyle = "#fff";
      tctx.font = "11px sans-serif";
      tctx.fillText(String(i + 1), 3, 44);
      loadImage(i).then((img) => {
        if (img && my === thumbToken) { tctx.drawImage(img, 0, 0, 48, 48); tctx.fillText(String(i + 1), 3, 44); }
      });
    }
  }

  function loadImage(i) {
    if (images.has(i)) return Promise.resolve(images.get(i));
    return Promise.resolve(cfg.image(i)).then((img) => {
      images.set(i, img || null);
      return img || null;
    }, () => null);
  }

  function ensure(i) {
    const jobs = panels.map((p, k) => {
      const key = `${k}:${versions[k]}:${i}`;
      if (cache.has(key)) return null;
      return Promise.resolve(cfg.data(k, i)).then((d) => cache.set(key, d));
    });
    jobs.push(loadImage(i));
    return Promise.all(jobs);
  }

  function changed() {
    if (cfg.onChange) cfg.onChange(api.state());
  }

  function setBlock(b, fromUser) {
    b = Math.max(-1, Math.min(maxDepth - 1, b | 0));
    if (b === state.block) return;
    state.block = b;
    drawAll();
    if (fromUser) changed();
  }

  function setImage(i, fromUser) {
    i = Math.max(0, Math.min(cfg.numImages - 1, i | 0));
    if (i === state.image && dataOf(0)) return Promise.resolve();
    state.image = i;
    drawAll();
    drawThumbs();
    if (fromUser) changed();
    return ensure(i).then(() => { if (state.image === i) drawAll(); });
  }

  slider.addEventListener("input", () => setBlock(parseInt(slider.value, 10), true));
  prev.addEventListener("click", () => setImage(state.image - 1, true));
  next.addEventListener("click", () => setImage(state.image + 1, true));
  save.addEventListener("click", () => api.savePNG());
  root.addEventListener("keydown", (e) => {
    if (e.target && e.target.tagName === "SELECT") return;
    const d = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    const im = { ArrowUp: -1, ArrowDown: 1 }[e.key];
    if (d !== undefined) {
      e.preventDefault();
      e.stopPropagation();
      setBlock(state.block + d, true);
    } else if (im !== undefined) {
      e.preventDefault();
      e.stopPropagation();
      setImage(state.image + im, true);
    }
  });

  const api = {
    root,
    state() {
      const k = state.selectedPanel;
      const tok = k >= 0 ? selectedToken(k) : null;
      return {
        block: state.block, image: state.image, selectedPanel: k, selectedPatch: state.selectedPatch,
        selectedToken: tok === null ? -1 : tok, hover: state.hover,
      };
    },
    setState(s) {
      if (s.selectedPanel !== undefined) state.selectedPanel = s.selectedPanel;
      if (s.selectedPatch !== undefined) state.selectedPatch = s.selectedPatch;
      if (s.selectedToken !== undefined) api.selectToken(state.selectedPanel < 0 ? 0 : state.selectedPanel, s.selectedToken);
      if (s.block !== undefined && s.block !== state.block) state.block = Math.max(-1, Math.min(maxDepth - 1, s.block | 0));
      if (s.image !== undefined && s.image !== state.image) return setImage(s.image, false);
      drawAll();
      return Promise.resolve();
    },
    selectToken(k, token) {
      // select token `token` of panel k at the current block by its own patch (or first patch); -1: none
      const L = labelsAt(k, state.block);
      if (token === null || token < 0 || !L) { state.selectedPanel = -1; state.selectedPatch = -1; return; }
      const d = dataOf(k);
      let best = -1;
      for (let i = 0; i < L.lab.length; i++) {
        if (L.lab[i] !== token) continue;
        if (best < 0 || (d.depth[i] > state.block && d.depth[best] <= state.block)) best = i;
      }
      state.selectedPanel = best < 0 ? -1 : k;
      state.selectedPatch = best;
    },
    setPanel(k, desc) {
      panels[k] = { ...desc };
      versions[k]++;
      views[k].title.textContent = desc.title;
      sizePanel(panels[k], views[k]);
      return ensure(state.image).then(() => drawAll());
    },
    highlighted,
    setNote(text) {
      note.textContent = text || "";
      note.style.display = text ? "" : "none";
    },
    lastDrawMs: () => lastDrawMs,
    ready: () => ensure(state.image).then(() => drawAll()),
    redraw: drawAll,
    canvases: () => views.map((v) => v.canvas),
    savePNG(download = true) {
      const pad = 8, head = 18;
      const W = views.reduce((a, v) => a + v.canvas.width + pad, pad);
      const H = Math.max(...views.map((v) => v.canvas.height)) + head + 2 * pad;
      const out = document.createElement("canvas");
      out.width = W;
      out.height = H;
      const ctx = out.getContext("2d");
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, W, H);
      ctx.fillStyle = "#000";
      ctx.font = "12px sans-serif";
      let x = pad;
      views.forEach((v, k) => {
        ctx.fillText(`${panels[k].title} | block ${state.block} | ${cfg.imageName(state.image)}`, x, pad + 11);
        ctx.drawImage(v.canvas, x, pad + head);
        x += v.canvas.width + pad;
      });
      const url = out.toDataURL("image/png");
      if (download) {
        const a = document.createElement("a");
        a.href = url;
        a.download = `tokvis_image${state.image}_block${state.block}.png`;
        document.body.appendChild(a);
        a.click();
        a.remove();
      }
      return url;
    },
  };
  drawLegend();
  drawAll();
  drawThumbs();
  return api;
}

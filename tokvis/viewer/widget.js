// anywidget glue: the viewer (viewer.js, prepended by tokvis.explore) fed by the Python Explorer.
// Labels and images come as binary buffers of custom messages, for the images on screen only.

function tvBytes(dv) {
  return new Uint8Array(dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength));
}

function render({ model, el }) {
  const cfg = model.get("_config");
  const waiting = new Map(); // key -> [resolve]
  function ask(key, msg) {
    return new Promise((resolve) => {
      if (!waiting.has(key)) {
        waiting.set(key, []);
        model.send(msg);
      }
      waiting.get(key).push(resolve);
    });
  }
  function answer(key, value) {
    (waiting.get(key) || []).forEach((r) => r(value));
    waiting.delete(key);
  }
  const dataCache = new Map();
  function onMsg(msg, buffers) {
    if (msg.type === "data") {
      let b = 0;
      const panels = msg.panels.map((p) => {
        const labels = new Int16Array(tvBytes(buffers[b++]).buffer);
        const depth = new Int16Array(tvBytes(buffers[b++]).buffer);
        const weight = p.weight ? tvBytes(buffers[b++]) : null;
        return { labels, depth, weight };
      });
      dataCache.set(msg.image, panels);
      answer(`d${msg.image}`, panels);
    } else if (msg.type === "image") {
      if (msg.note) viewer.setNote(msg.note);
      if (!buffers.length) return answer(`i${msg.image}`, null);
      const blob = new Blob([tvBytes(buffers[0])], { type: "image/jpeg" });
      createImageBitmap(blob).then((img) => answer(`i${msg.image}`, img), () => answer(`i${msg.image}`, null));
    }
  }
  model.on("msg:custom", onMsg);
  let fromModel = false;
  const viewer = createViewer(el, {
    panels: cfg.panels,
    numImages: cfg.num_images,
    imageName: (i) => String(cfg.image_names[i] !== undefined ? cfg.image_names[i] : i),
    note: cfg.note,
    state: { block: model.get("block"), image: model.get("image") },
    data: (k, i) =>
      dataCache.has(i)
        ? dataCache.get(i)[k]
        : ask(`d${i}`, { type: "need", image: i }).then((panels) => panels[k]),
    image: (i) => (cfg.has_images ? ask(`i${i}`, { type: "need_image", image: i }) : null),
    onChange: (s) => {
      if (fromModel) return;
      model.set("block", s.block);
      model.set("image", s.image);
      model.set("selected_panel", s.selectedPanel < 0 ? 0 : s.selectedPanel);
      model.set("selected_token", s.selectedToken);
      model.save_changes();
    },
  });
  el.tokvisViewer = viewer;
  function fromPython(s) {
    fromModel = true;
    Promise.resolve(viewer.setState(s)).finally(() => {
      fromModel = false;
    });
  }
  const onBlock = () => fromPython({ block: model.get("block") });
  const onImage = () => fromPython({ image: model.get("image") });
  const onToken = () => {
    const cur = viewer.state();
    const want = model.get("selected_token");
    if (cur.selectedToken === want && (want < 0 || cur.selectedPanel === model.get("selected_panel"))) return;
    fromPython({ selectedPanel: model.get("selected_panel"), selectedToken: want });
  };
  model.on("change:block", onBlock);
  model.on("change:image", onImage);
  model.on("change:selected_token", onToken);
  model.on("change:selected_panel", onToken);
  viewer.ready();
  return () => {
    model.off("msg:custom", onMsg);
    model.off("change:block", onBlock);
    model.off("change:image", onImage);
    model.off("change:selected_token", onToken);
    model.off("change:selected_panel", onToken);
  };
}

export default { render };

// tokvis report glue: the viewer (viewer.js, inlined before this) fed by the data inlined in the page, plus the
// sortable run table.  No network: labels are zlib-deflated and base64-encoded in the page, inflated with
// DecompressionStream.

function tvInflate(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Response(stream).arrayBuffer();
}

function tvSortable(table) {
  const ths = table.querySelectorAll("thead th");
  ths.forEach((th, col) => {
    th.addEventListener("click", () => {
      const asc = th.dataset.sort !== "asc";
      ths.forEach((o) => delete o.dataset.sort);
      th.dataset.sort = asc ? "asc" : "desc";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = (r) => {
        const t = r.cells[col].dataset.value !== undefined ? r.cells[col].dataset.value : r.cells[col].textContent;
        const n = parseFloat(t);
        return t.trim() === "" ? null : Number.isFinite(n) && /^[-+0-9.eE]+$/.test(t.trim()) ? n : t;
      };
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === null || y === null) return x === null ? (y === null ? 0 : 1) : -1;
        const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

function tvGroupViewer(root, group) {
  const runs = group.runs;
  const P = group.grid[0] * group.grid[1];
  const decoded = new Map(); // run -> Promise<ArrayBuffer>
  const images = group.images.map((im) => im.src);
  const chosen = group.panels.slice(); // run index per panel
  const methods = Array.from(new Set(runs.map((r) => r.method)));

  function bytes(r) {
    if (!decoded.has(r)) decoded.set(r, tvInflate(runs[r].data));
    return decoded.get(r);
  }
  function desc(r) {
    const run = runs[r];
    return { title: run.title, grid: group.grid, depth: run.depth, layers: run.layers, kinds: run.kinds };
  }
  function slice(buf, r, i) {
    const run = runs[r], S = run.layers.length + 1;
    const per = S * P * 2 + P * 2 + (run.weight ? S * P : 0);
    const o = i * per;
    return {
      labels: new Int16Array(buf.slice(o, o + S * P * 2)),
      depth: new Int16Array(buf.slice(o + S * P * 2, o + S * P * 2 + P * 2)),
      weight: run.weight ? new Uint8Array(buf.slice(o + S * P * 2 + P * 2, o + per)) : null,
    };
  }
  let viewer = null;
  function pickers(k, head) {
    const m = tvEl("select", "tv-pick-method", head);
    const s = tvEl("select", "tv-pick-schedule", head);
    methods.forEach((name) => { const o = tvEl("option", "", m, name); o.value = name; });
    function fillSchedules() {
      s.innerHTML = "";
      runs.forEach((run, r) => {
        if (run.method !== m.value) return;
        const o = tvEl("option", "", s, run.schedule + (run.backbone_label ? " · " + run.backbone_label : ""));
        o.value = r;
      });
    }
    m.value = runs[chosen[k]].method;
    fillSchedules();
    s.value = chosen[k];
    m.addEventListener("change", () => { fillSchedules(); pick(k, parseInt(s.value, 10)); });
    s.addEventListener("change", () => pick(k, parseInt(s.value, 10)));
  }
  function pick(k, r) {
    chosen[k] = r;
    viewer.setPanel(k, desc(r));
  }
  const imgCache = new Map();
  viewer = createViewer(root, {
    panels: chosen.map(desc),
    numImages: group.images.length,
    imageName: (i) => group.images[i].name,
    note: group.note,
    data: (k, i) => bytes(chosen[k]).then((buf) => slice(buf, chosen[k], i)),
    image: (i) => {
      if (!images[i]) return null;
      if (!imgCache.has(i)) {
        imgCache.set(i, new Promise((resolve) => {
          const im = new Image();
          im.onload = () => resolve(im);
          im.onerror = () => resolve(null);
          im.src = images[i];
        }));
      }
      return imgCache.get(i);
    },
    pickers,
  });
  return viewer;
}

function tvReport() {
  const data = JSON.parse(document.getElementById("tokvis-data").textContent);
  document.querySelectorAll("table.tv-sortable").forEach(tvSortable);
  window.tokvisViewers = data.groups.map((g, n) => tvGroupViewer(document.getElementById(`tv-viewer-${n}`), g));
  window.tokvisReady = Promise.all(window.tokvisViewers.map((v) => v.ready()));
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", tvReport);
else tvReport();

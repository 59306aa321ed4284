// medanomaly report viewer: the case list beside one NiiVue panel (scan + anomaly map + outline).
// Served with the report (medanomaly view OUT); a file:// page keeps its note and loads nothing.
// State for tests and timing: #mv[data-state] = offline | loading | ready | error,
// #mv[data-case] = the open case's id, #mv[data-open-ms] = ms from opening a case to drawn.
(function () {
  "use strict";
  var root = document.getElementById("mv");
  if (!root) { return; }
  if (location.protocol !== "http:" && location.protocol !== "https:") { return; }
  var cases = JSON.parse(document.getElementById("mv-cases").textContent);
  var rows = Array.prototype.slice.call(root.querySelectorAll(".mv-list tbody tr"));
  var colormap = document.getElementById("mv-colormap");
  var opacity = document.getElementById("mv-opacity");
  var threshold = document.getElementById("mv-threshold");
  var shown = document.getElementById("mv-threshold-value");
  var planes = document.getElementById("mv-planes");
  var facts = document.getElementById("mv-facts");
  var nv = null;
  var current = -1;
  var pending = null;

  function fail(error) {
    root.setAttribute("data-state", "error");
    console.error("viewer: " + error);
  }

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      var script = document.createElement("script");
      script.src = src;
      script.onload = resolve;
      script.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(script);
    });
  }

  function text(value) { return String(value === undefined || value === null ? "" : value); }

  function showFacts(entry) {
    var run = Number(root.getAttribute("data-threshold"));
    var items = [
      ["case", entry.id],
      ["score", entry.score.toPrecision(5)],
      ["threshold", isFinite(run) ? run.toPrecision(5) : "n/a"],
      ["flagged", entry.flagged ? "yes (score > threshold)" : "no"],
      ["label", entry.label === -1 ? "unknown" : entry.label],
      ["map range", entry.map_min.toPrecision(4) + " to " + entry.map_max.toPrecision(4)],
      ["shown on", entry.grid === "source" ? "the scan's own grid" : "the model's grid"]
    ];
    facts.textContent = "";
    var list = document.createElement("dl");
    list.className = "facts";
    items.forEach(function (item) {
      var term = document.createElement("dt");
      term.textContent = item[0];
      var value = document.createElement("dd");
      value.textContent = text(item[1]);
      list.appendChild(term);
      list.appendChild(value);
    });
    facts.appendChild(list);
  }

  function sliceType(entry) {
    if (entry.dims !== 3) { return nv.sliceTypeAxial; }
    return {
      multi: nv.sliceTypeMultiplanar,
      axial: nv.sliceTypeAxial,
      coronal: nv.sliceTypeCoronal,
      sagittal: nv.sliceTypeSagittal
    }[planes.value];
  }

  function applyThreshold() {
    var value = Number(threshold.value);
    shown.textContent = value.toPrecision(4);
    if (!nv || nv.volumes.length < 2) { return; }
    var map = nv.volumes[1];
    map.cal_min = value;
    map.cal_max = Math.max(value, cases[current].map_max) + 1e-6 * (1 + Math.abs(value));
    nv.updateGLVolume();
  }

  function layout(entry) {
    nv.opts.crosshairWidth = entry.dims === 3 ? 0.4 : 0;
    nv.opts.sliceType = sliceType(entry);
    document.getElementById("mv-planes-label").hidden = entry.dims !== 3;
  }

  // The case's volumes in place of the open ones, drawn into textures once: NiiVue redraws
  // every layer for each volume added or removed, which without a GPU costs seconds.
  function replaceVolumes(options) {
    return Promise.all(options.map(function (o) { return niivue.NVImage.loadFromUrl(o); }))
      .then(function (images) {
        var update = nv.updateGLVolume;
        nv.updateGLVolume = function () {};
        try {
          while (nv.volumes.length) { nv.removeVolume(nv.volumes[nv.volumes.length - 1]); }
          images.forEach(function (image) { nv.addVolume(image); });
        } finally {
          nv.updateGLVolume = update;
        }
        nv.updateGLVolume();
      });
  }

  function open(k) {
    var entry = cases[k];
    var started = performance.now();
    current = k;
    rows.forEach(function (row) { row.classList.toggle("open", Number(row.dataset.k) === k); });
    root.setAttribute("data-state", "loading");
    showFacts(entry);
    var volumes = [
      { url: "viewer/" + entry.scan, colormap: "gray" },
      {
        url: "viewer/" + entry.map,
        colormap: colormap.value,
        opacity: Number(opacity.value),
        cal_min: Number(threshold.value),
        cal_max: Math.max(Number(threshold.value), entry.map_max) + 1e-6
      }
    ];
    if (entry.outline) {
      volumes.push({ url: "viewer/" + entry.outline, colormap: "green", cal_min: 0.5, cal_max: 1 });
    }
    layout(entry);
    var loading = replaceVolumes(volumes).then(function () {
      if (current !== k) { return; }
      shown.textContent = Number(threshold.value).toPrecision(4);
      if (entry.dims === 3 && entry.peak_mm) {  // open the planes through the map's peak
        nv.scene.crosshairPos = nv.mm2frac(entry.peak_mm);
      }
      nv.drawScene();
      // reading one pixel waits for the drawing itself, so that data-open-ms is honest
      nv.gl.readPixels(0, 0, 1, 1, nv.gl.RGBA, nv.gl.UNSIGNED_BYTE, new Uint8Array(4));
      root.setAttribute("data-case", entry.id);
      root.setAttribute("data-open-ms", String(Math.round(performance.now() - started)));
      root.setAttribute("data-state", "ready");
    });
    pending = loading.catch(fail);
    return pending;
  }

  function start() {
    nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      crosshairColor: [0.3, 0.8, 1.0, 0.6],
      crosshairWidth: 0.4,
      crosshairWidthUnit: "percent", // thin whatever the voxel size
      show3Dcrosshair: false,
      multiplanarShowRender: 0, // no volume rendering tile: slow in software WebGL, not needed
      isColorbar: false,
      logLevel: "error",
      loadingText: ""
    });
    return nv.attachToCanvas(document.getElementById("mv-canvas")).then(function () {
      rows.forEach(function (row) {
        var k = Number(row.dataset.k);
        row.addEventListener("click", function () { open(k); });
        row.addEventListener("keydown", function (event) {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(k); }
        });
      });
      threshold.addEventListener("input", applyThreshold);
      opacity.addEventListener("input", function () {
        if (nv.volumes.length > 1) { nv.setOpacity(1, Number(opacity.value)); }
      });
      colormap.addEventListener("change", function () {
        if (nv.volumes.length > 1) { nv.setColormap(nv.volumes[1].id, colormap.value); }
      });
      planes.addEventListener("change", function () {
        if (current >= 0) { layout(cases[current]); nv.setSliceType(nv.opts.sliceType); }
      });
      var wanted = new URLSearchParams(location.search).get("case");
      var first = 0;
      cases.forEach(function (entry, k) { if (entry.id === wanted) { first = k; } });
      return open(first);
    });
  }

  document.getElementById("mv-offline").hidden = true;
  root.setAttribute("data-state", "loading");
  window.medanomalyViewer = { open: open };
  var began = performance.now();
  loadScript("viewer/niivue.umd.js").then(function () {
    root.setAttribute("data-script-ms", String(Math.round(performance.now() - began)));
    return start();
  }).catch(fail);
})();

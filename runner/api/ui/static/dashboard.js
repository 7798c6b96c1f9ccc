// agent-orchestrator dashboard: draws the charts from their data-chart attributes (JSON the server wrote).
// The only script of ours; htmx and uPlot are vendored (VENDORED.md). No inline script anywhere.
(function () {
  "use strict";
  var PALETTE = ["#0969da", "#1a7f37", "#cf222e", "#9a6700", "#8250df", "#bf3989", "#57606a", "#0a7ea4"];

  function draw(el) {
    if (el.dataset.drawn || typeof uPlot === "undefined") return;
    var spec;
    try { spec = JSON.parse(el.dataset.chart); } catch (e) { return; }
    if (!spec.series || spec.series.length === 0) {
      el.textContent = "No data in this period.";
      el.dataset.drawn = "1";
      return;
    }
    var width = Math.max(280, el.clientWidth || 600);
    var series = [{}].concat(spec.series.map(function (s, i) {
      return { label: s.label, stroke: PALETTE[i % PALETTE.length], width: 2, points: { show: spec.x.length < 60 } };
    }));
    var data = [spec.x].concat(spec.series.map(function (s) { return s.values; }));
    var opts = { width: width, height: 240, series: series, scales: { x: { time: !!spec.time } },
                 axes: [{}, { label: spec.unit || "" }] };
    el.dataset.drawn = "1";
    var plot = new uPlot(opts, data, el);
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(280, el.clientWidth || 600), height: 240 });
    });
  }

  function drawAll(root) {
    var charts = (root || document).querySelectorAll("[data-chart]");
    for (var i = 0; i < charts.length; i++) draw(charts[i]);
  }

  document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  document.addEventListener("htmx:afterSwap", function (ev) { drawAll(ev.target); });
})();

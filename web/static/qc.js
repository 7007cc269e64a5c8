/* Quality control (质控): indicator cards, trend with the target line, breakdown, histograms
   with P50/P90 and the limit line, and the cases behind every figure. Charts: Apache ECharts,
   served by RDC itself (web/static/vendor/echarts). */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var lang = (R.config && R.config.lang) || "zh-CN";
  var form = document.getElementById("qc-filters");
  var message = document.getElementById("message");
  var cards = document.getElementById("cards");
  var detail = document.getElementById("detail");
  var subset = document.getElementById("subset");
  var charts = {};
  var current = null; // the indicator open in the detail panel
  var HISTOGRAM = /^(TAT-|RRC-02|RCV-04|ECG-02|CL-15|ECG-01)/;

  function isoDay(d) {
    return d.getFullYear() + "-" + String(d.getMonth() + 1).padStart(2, "0") + "-" + String(d.getDate()).padStart(2, "0");
  }

  function filters() {
    var f = form.elements;
    return {
      from: f.from.value,
      to: f.to.value,
      discipline: f.discipline.value,
      clinic: f.clinic.value,
      modality: f.modality.value,
      priority: f.priority.value,
    };
  }

  function withExtra(extra) {
    return Object.assign(filters(), extra || {});
  }

  function name(ind) {
    return lang === "en" ? ind.name_en : ind.name_zh;
  }

  function fmtValue(value, unit) {
    if (value === null || value === undefined) return t("qc.no_data");
    var text = unit === "" ? String(Math.round(value)) : Number(value).toFixed(1);
    return text + (unit === "%" ? " %" : unit === "min" ? " " + t("qc.min") : "");
  }

  function chart(id) {
    var node = document.getElementById(id);
    if (!charts[id]) charts[id] = window.echarts.init(node, null, { renderer: "canvas" });
    return charts[id];
  }

  function showError(err) {
    message.textContent = t("err.failed", { detail: err.message });
    message.hidden = false;
  }

  function updateLinks() {
    var all = R.query(withExtra({ indicator: "all", group_by: form.elements.group_by.value }));
    document.getElementById("export-csv").href = "/api/v1/qc/export.csv" + all;
    document.getElementById("export-xlsx").href = "/api/v1/qc/export.xlsx" + all;
    var month = document.getElementById("report-month").value;
    document.getElementById("report-pdf").href = "/api/v1/qc/report.pdf" + R.query({ month: month });
  }

  function card(ind) {
    var change = ind.change === null || ind.change === undefined ? "" : (ind.change > 0 ? "+" : "") + ind.change.toFixed(1);
    return el("button", { type: "button", class: "qc-card status-" + ind.status, dataset: { code: ind.code }, onclick: function () { open(ind); } }, [
      el("span", { class: "qc-code", text: ind.code }),
      el("span", { class: "qc-name", text: name(ind) }),
      el("strong", { class: "qc-value", text: fmtValue(ind.value, ind.unit) }),
      el("span", { class: "qc-status", text: t("qc.status." + ind.status) }),
      el("span", { class: "qc-meta muted", text:
        (ind.status === "no_data" ? "" : ind.denominator !== null && ind.denominator !== undefined ? ind.numerator + " / " + ind.denominator + " · " : ind.numerator !== null ? t("qc.n", { n: ind.numerator }) + " · " : "") +
        t("qc.target") + " " + (ind.target === null || ind.target === undefined ? "—" : ind.target + (ind.unit === "%" ? " %" : "")) +
        (change ? " · " + t("qc.change") + " " + change : "") }),
    ]);
  }

  function load() {
    message.hidden = true;
    updateLinks();
    document.getElementById("period").textContent = filters().from + " — " + filters().to;
    R.api("GET", "/api/v1/qc/indicators" + R.query(filters()))
      .then(function (data) {
        cards.textContent = "";
        var family = null;
        data.indicators.forEach(function (ind) {
          if (ind.family !== family) {
            family = ind.family;
            cards.appendChild(el("h2", { class: "qc-family", text: t("qc.family." + family) }));
          }
          cards.appendChild(card(ind));
        });
        if (current) {
          var again = data.indicators.filter(function (i) { return i.code === current.code; })[0];
          if (again) open(again);
        }
      })
      .catch(showError);
    histogram("cv-hist", "RCV-04");
  }

  function histogram(id, code) {
    return R.api("GET", "/api/v1/qc/indicators/" + code + "/histogram" + R.query(filters()))
      .then(function (h) {
        var c = chart(id);
        var labels = h.counts.map(function (_, i) { return h.edges[i].toFixed(0) + "–" + h.edges[i + 1].toFixed(0); });
        var lines = [];
        function at(x) { // the category index of minute x
          for (var i = 0; i < h.counts.length; i++) if (x < h.edges[i + 1]) return labels[i];
          return labels[labels.length - 1];
        }
        if (h.p50 !== null) lines.push({ xAxis: at(h.p50), name: "P50 " + h.p50, lineStyle: { color: "#2e7d32" }, label: { position: "insideEndTop", formatter: "P50 " + h.p50 } });
        if (h.p90 !== null) lines.push({ xAxis: at(h.p90), name: "P90 " + h.p90, lineStyle: { color: "#ef6c00" }, label: { position: "insideMiddleTop", formatter: "P90 " + h.p90 } });
        if (h.threshold !== null && h.counts.length) lines.push({ xAxis: at(h.threshold - 1e-9), lineStyle: { color: "#c62828", type: "dashed" }, label: { position: "insideStartTop", formatter: t("qc.limit", { n: h.threshold }) } });
        c.setOption({
          animation: false,
          title: h.n ? undefined : { text: t("qc.no_data"), left: "center", top: "middle", textStyle: { color: "#888", fontSize: 13 } },
          grid: { left: 40, right: 16, top: 28, bottom: 40 },
          tooltip: { trigger: "axis" },
          xAxis: { type: "category", data: labels, name: t("qc.min"), axisLabel: { fontSize: 9 } },
          yAxis: { type: "value", minInterval: 1 },
          series: [{ type: "bar", data: h.counts, itemStyle: { color: "#5b8ac7" }, markLine: { symbol: "none", data: lines } }],
        }, true);
        c.off("click");
        c.on("click", function () { if (code) openCode(code); });
      })
      .catch(showError);
  }

  function openCode(code) {
    R.api("GET", "/api/v1/qc/indicators" + R.query(withExtra({ code: code }))).then(function (data) {
      if (data.indicators.length) open(data.indicators[0]);
    }).catch(showError);
  }

  function open(ind) {
    current = ind;
    detail.hidden = false;
    document.getElementById("detail-title").textContent = ind.code + " · " + name(ind) + " — " + fmtValue(ind.value, ind.unit);
    targetForm(ind);
    trend(ind);
    breakdown(ind);
    var box = document.getElementById("hist-box");
    box.hidden = !HISTOGRAM.test(ind.code);
    if (!box.hidden) histogram("hist", ind.code);
    cases(ind);
    detail.scrollIntoView({ block: "start" });
  }

  function targetForm(ind) {
    var form = document.getElementById("target-form");
    form.hidden = !!ind.note; // no data of this kind yet: nothing to target
    document.getElementById("target-value").value = ind.target === null || ind.target === undefined ? "" : ind.target;
    document.getElementById("target-margin").value = ind.warn_margin || 0;
    document.getElementById("target-note").value = "";
    R.api("GET", "/api/v1/qc/targets/" + ind.code).then(function (versions) {
      var v = versions[0];
      document.getElementById("target-version").textContent = v
        ? t("qc.target_version", { v: v.version, who: v.changed_by, at: R.fmt(v.changed_at) })
        : t("qc.target_default");
    }).catch(showError);
  }

  function saveTarget(ev) {
    ev.preventDefault();
    if (!current) return;
    var raw = document.getElementById("target-value").value;
    var body = {
      target: raw === "" ? null : Number(raw),
      warn_margin: Number(document.getElementById("target-margin").value || 0),
      note: document.getElementById("target-note").value,
    };
    R.api("PUT", "/api/v1/qc/targets/" + current.code, body)
      .then(function () {
        R.toast(t("qc.target_saved"), "ok");
        load();
      })
      .catch(showError);
  }

  function trend(ind) {
    var to = new Date(filters().to + "T00:00:00");
    var from = new Date(to.getFullYear(), to.getMonth() - 11, 1);
    var months = [];
    for (var i = 0; i < 12; i++) {
      var d = new Date(from.getFullYear(), from.getMonth() + i, 1);
      months.push(d.getFullYear() + "-" + String(d.getMonth() + 1).padStart(2, "0"));
    }
    var q = withExtra({ from: isoDay(from), code: ind.code, group_by: "month" });
    R.api("GET", "/api/v1/qc/indicators" + R.query(q)).then(function (data) {
      var groups = (data.indicators[0] && data.indicators[0].groups) || [];
      var byMonth = {};
      groups.forEach(function (g) { byMonth[g.key] = g.value; });
      var series = [{ type: "line", name: ind.code, data: months.map(function (m) { return byMonth[m] === undefined ? null : byMonth[m]; }), connectNulls: false }];
      if (ind.target !== null && ind.target !== undefined) {
        series[0].markLine = { symbol: "none", lineStyle: { color: "#c62828", type: "dashed" }, data: [{ yAxis: ind.target, label: { formatter: t("qc.target") + " " + ind.target } }] };
      }
      chart("trend").setOption({
        animation: false,
        grid: { left: 48, right: 72, top: 24, bottom: 32 },
        tooltip: { trigger: "axis" },
        xAxis: { type: "category", data: months },
        yAxis: { type: "value", name: ind.unit, max: ind.unit === "%" ? 100 : null },
        series: series,
      }, true);
    }).catch(showError);
  }

  function breakdown(ind) {
    var group = form.elements.group_by.value;
    document.getElementById("breakdown-key").textContent = t("qc.group." + group);
    var q = withExtra({ code: ind.code, group_by: group });
    var xq = R.query(withExtra({ indicator: ind.code, group_by: group }));
    document.getElementById("breakdown-csv").href = "/api/v1/qc/export.csv" + xq;
    document.getElementById("breakdown-xlsx").href = "/api/v1/qc/export.xlsx" + xq;
    R.api("GET", "/api/v1/qc/indicators" + R.query(q)).then(function (data) {
      var body = document.querySelector("#breakdown tbody");
      body.textContent = "";
      var groups = (data.indicators[0] && data.indicators[0].groups) || [];
      if (!groups.length) body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: "7", text: t("qc.no_data") })]));
      groups.forEach(function (g) {
        body.appendChild(el("tr", {}, [
          el("td", { text: g.key === null ? "—" : g.key }),
          el("td", { text: String(g.numerator) }),
          el("td", { text: g.denominator === null ? "—" : String(g.denominator) }),
          el("td", { text: fmtValue(g.value, ind.unit) }),
          el("td", { text: g.p50 === null ? "—" : String(g.p50) }),
          el("td", { text: g.p90 === null ? "—" : String(g.p90) }),
          el("td", { class: "status-" + g.status, text: t("qc.status." + g.status) }),
        ]));
      });
    }).catch(showError);
  }

  function cases(ind) {
    var q = withExtra({ subset: subset.value, limit: 200 });
    var xq = R.query(withExtra({ cases: ind.code, subset: subset.value }));
    document.getElementById("cases-csv").href = "/api/v1/qc/export.csv" + xq;
    document.getElementById("cases-xlsx").href = "/api/v1/qc/export.xlsx" + xq;
    R.api("GET", "/api/v1/qc/indicators/" + ind.code + "/cases" + R.query(q)).then(function (page) {
      document.getElementById("cases-total").textContent = t("qc.n", { n: page.total });
      var body = document.querySelector("#cases tbody");
      body.textContent = "";
      if (!page.items.length) body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: "10", text: page.note || t("qc.no_cases") })]));
      page.items.forEach(function (c) {
        var link = c.exam_id ? el("a", { href: "/ui/report/" + encodeURIComponent(c.exam_id), text: c.accession || c.exam_id }) : c.case_id;
        body.appendChild(el("tr", { dataset: { case: c.case_id } }, [
          el("td", {}, [link]),
          el("td", { text: c.clinic || "—" }),
          el("td", { text: c.modality || "—" }),
          el("td", { text: c.priority ? t("qc.priority." + c.priority) : "—" }),
          el("td", { text: c.reader || "—" }),
          el("td", { text: c.start_at ? R.fmt(c.start_at, "datetime") : "—" }),
          el("td", { text: c.end_at ? R.fmt(c.end_at, "datetime") : "—" }),
          el("td", { text: c.minutes === null ? "—" : String(c.minutes) }),
          el("td", { text: c.in_numerator ? "✓" : "✗" }),
          el("td", { text: (c.reason || "").split(",").filter(Boolean).map(function (r) { var k = "qc.reason." + r; var s = t(k); return s === k ? r : s; }).join("; ") }),
        ]));
      });
    }).catch(showError);
  }

  // Start: this month to date, last month's report.
  var now = new Date();
  form.elements.from.value = isoDay(new Date(now.getFullYear(), now.getMonth(), 1));
  form.elements.to.value = isoDay(now);
  var last = new Date(now.getFullYear(), now.getMonth() - 1, 1);
  document.getElementById("report-month").value = last.getFullYear() + "-" + String(last.getMonth() + 1).padStart(2, "0");
  var params = new URLSearchParams(location.search);
  ["from", "to", "discipline", "clinic", "modality", "priority", "group_by"].forEach(function (k) {
    if (params.get(k)) form.elements[k].value = params.get(k);
  });
  form.addEventListener("submit", function (ev) { ev.preventDefault(); load(); });
  document.getElementById("target-form").addEventListener("submit", saveTarget);
  subset.addEventListener("change", function () { if (current) cases(current); });
  document.getElementById("report-month").addEventListener("change", updateLinks);
  document.getElementById("detail-close").addEventListener("click", function () { detail.hidden = true; current = null; });
  window.addEventListener("resize", function () { Object.keys(charts).forEach(function (k) { charts[k].resize(); }); });
  load();
  if (params.get("code")) openCode(params.get("code"));
})();

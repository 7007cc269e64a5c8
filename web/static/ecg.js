/* ECG reading console: the 12 leads drawn on the standard grid (canvas), calipers, median
   beats, the measurements by source with the reader's edits, the statement library and the
   prior ECG side by side. The report pane is reading.js's: this script hooks into it through
   window.RDCReadingExtension (the chosen statements travel in the report's structured data
   under "ecg_statements") and must load before it. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var cfg = R.config;
  var examId = cfg.examId;
  var ecgUrl = "/api/v1/ecg/" + encodeURIComponent(examId);
  var KEYS = [
    "heart_rate_bpm", "rr_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms", "qtc_fridericia_ms",
    "p_axis_deg", "qrs_axis_deg", "t_axis_deg",
  ];
  var LAYOUTS = {
    "3x4": [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]],
    "6x2": [["I", "V1"], ["II", "V2"], ["III", "V3"], ["aVR", "V4"], ["aVL", "V5"], ["aVF", "V6"]],
    "12x1": [["I"], ["II"], ["III"], ["aVR"], ["aVL"], ["aVF"], ["V1"], ["V2"], ["V3"], ["V4"], ["V5"], ["V6"]],
  };
  var ROW_MM = { "3x4": 36, "6x2": 28, "12x1": 20 };
  var PAPER_MM = 250;

  var view = { layout: "3x4", speed: 25, gain: 10, caliper: true };
  var state = {
    study: null, // GET /api/v1/ecg/{id}
    signal: null, // GET /api/v1/ecg/{id}/signal
    prior: null, // {id, study, signal, deltas}
    library: {}, // code -> statement
    picked: [], // statement codes in report order
    editable: false,
    reader: {}, // the reader's edited measurements
  };

  function $(id) {
    return document.getElementById(id);
  }
  function fail(err) {
    R.toast(t("err.failed", { detail: err && err.message ? err.message : String(err) }), "error");
  }
  function lang() {
    return cfg.lang === "en" ? "en" : "zh";
  }

  // --- drawing --------------------------------------------------------------------------------
  /** Page geometry in mm, as ecg_service.render lays it out. */
  function geometry(signal) {
    var rows = LAYOUTS[view.layout];
    var withRhythm = view.layout === "3x4";
    var pulseW = 0.2 * view.speed;
    var left = Math.ceil((pulseW + 6) / 5) * 5;
    var rowMm = ROW_MM[view.layout] * Math.max(1, view.gain / 10);
    var nRows = rows.length + (withRhythm ? 1 : 0);
    return {
      rows: withRhythm ? rows.concat([[rhythmLead(signal)]]) : rows,
      left: left,
      rowMm: rowMm,
      width: left + PAPER_MM + 4,
      height: nRows * rowMm + 4,
      pulseW: pulseW,
    };
  }
  function rhythmLead(signal) {
    return signal && signal.leads.indexOf("II") >= 0 ? "II" : (signal && signal.leads[0]) || "II";
  }

  function drawGrid(ctx, w, h, ppm) {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    var nx = Math.ceil(w / ppm), ny = Math.ceil(h / ppm);
    [false, true].forEach(function (major) {
      ctx.beginPath();
      ctx.strokeStyle = major ? "#ec8c8c" : "#ffd6d6";
      ctx.lineWidth = major ? 1 : 0.6;
      for (var i = 0; i <= nx; i++) {
        if ((i % 5 === 0) !== major) continue;
        var x = Math.round(i * ppm) + 0.5;
        ctx.moveTo(x, 0);
        ctx.lineTo(x, h);
      }
      for (var j = 0; j <= ny; j++) {
        if ((j % 5 === 0) !== major) continue;
        var y = Math.round(j * ppm) + 0.5;
        ctx.moveTo(0, y);
        ctx.lineTo(w, y);
      }
      ctx.stroke();
    });
  }

  /** A trace panel: canvas, its signal and its geometry (for the calipers). */
  function Panel(root) {
    this.root = root;
    this.canvas = root.querySelector("canvas");
    this.msg = root.querySelector(".ecg-msg");
    this.signal = null;
    this.geo = null;
    this.ppm = 4;
    this.caliper = null; // {x0, y0, x1, y1} in mm
    var self = this;
    var dragging = false;
    function mm(event) {
      var rect = self.canvas.getBoundingClientRect();
      return { x: (event.clientX - rect.left) / self.ppm, y: (event.clientY - rect.top) / self.ppm };
    }
    this.canvas.addEventListener("mousedown", function (event) {
      if (!view.caliper || !self.signal) return;
      var p = mm(event);
      self.caliper = { x0: p.x, y0: p.y, x1: p.x, y1: p.y };
      dragging = true;
      event.preventDefault();
      self.draw();
    });
    window.addEventListener("mousemove", function (event) {
      if (!dragging) return;
      var p = mm(event);
      self.caliper.x1 = p.x;
      self.caliper.y1 = p.y;
      self.draw();
      showReadout(self.caliper);
    });
    window.addEventListener("mouseup", function () {
      if (!dragging) return;
      dragging = false;
      showReadout(self.caliper);
    });
  }

  Panel.prototype.setSignal = function (signal) {
    this.signal = signal;
    this.msg.hidden = true;
    this.draw();
  };
  Panel.prototype.fail = function (text) {
    this.msg.hidden = false;
    this.msg.textContent = text;
  };
  Panel.prototype.draw = function () {
    var signal = this.signal;
    if (!signal) return;
    var geo = (this.geo = geometry(signal));
    var cssWidth = Math.max(300, this.root.querySelector(".ecg-canvas-wrap").clientWidth - 2);
    var ppm = (this.ppm = cssWidth / geo.width);
    var dpr = window.devicePixelRatio || 1;
    var w = Math.round(geo.width * ppm), h = Math.round(geo.height * ppm);
    this.canvas.width = w * dpr;
    this.canvas.height = h * dpr;
    this.canvas.style.width = w + "px";
    this.canvas.style.height = h + "px";
    var ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawGrid(ctx, w, h, ppm);
    var fs = signal.sampling_rate_hz;
    var seconds = PAPER_MM / view.speed;
    ctx.strokeStyle = "#000";
    ctx.lineWidth = Math.max(1, ppm * 0.25);
    ctx.lineJoin = "round";
    ctx.fillStyle = "#000";
    ctx.font = Math.max(10, Math.round(3.2 * ppm)) + "px sans-serif";
    geo.rows.forEach(function (names, r) {
      var base = (r + 0.6) * geo.rowMm;
      // 1 mV calibration pulse
      var p0 = 2, cal = view.gain;
      ctx.beginPath();
      ctx.moveTo(p0 * ppm, base * ppm);
      ctx.lineTo((p0 + 1.5) * ppm, base * ppm);
      ctx.lineTo((p0 + 1.5) * ppm, (base - cal) * ppm);
      ctx.lineTo((p0 + 1.5 + geo.pulseW) * ppm, (base - cal) * ppm);
      ctx.lineTo((p0 + 1.5 + geo.pulseW) * ppm, base * ppm);
      ctx.lineTo((p0 + 3 + geo.pulseW) * ppm, base * ppm);
      ctx.stroke();
      var colS = seconds / names.length;
      names.forEach(function (name, c) {
        var x0 = geo.left + (c * PAPER_MM) / names.length;
        ctx.fillText(name, (x0 + 1) * ppm, (base - Math.min(9, geo.rowMm * 0.4)) * ppm);
        if (c > 0) {
          ctx.beginPath();
          ctx.moveTo(x0 * ppm, (base - 3) * ppm);
          ctx.lineTo(x0 * ppm, (base + 3) * ppm);
          ctx.stroke();
        }
        var li = signal.leads.indexOf(name);
        if (li < 0) return;
        var data = signal.signals[li];
        var i0 = Math.round(c * colS * fs), i1 = Math.min(data.length, Math.round((c + 1) * colS * fs));
        if (i1 - i0 < 2) return;
        var seg = data.slice(i0, i1);
        var sorted = seg.slice().sort(function (a, b) {
          return a - b;
        });
        var mid = sorted[Math.floor(sorted.length / 2)];
        ctx.beginPath();
        for (var i = 0; i < seg.length; i++) {
          var x = (x0 + (i / fs) * view.speed) * ppm;
          var y = (base - ((seg[i] - mid) / 1000) * view.gain) * ppm;
          if (i === 0) ctx.moveTo(x, y);
          else ctx.lineTo(x, y);
        }
        ctx.stroke();
      });
    });
    var cal = this.caliper;
    if (cal) {
      ctx.save();
      ctx.strokeStyle = "#0057b8";
      ctx.lineWidth = 1.5;
      ctx.setLineDash([5, 3]);
      ctx.beginPath();
      [cal.x0, cal.x1].forEach(function (x) {
        ctx.moveTo(x * ppm, 0);
        ctx.lineTo(x * ppm, h);
      });
      [cal.y0, cal.y1].forEach(function (y) {
        ctx.moveTo(Math.min(cal.x0, cal.x1) * ppm - 20, y * ppm);
        ctx.lineTo(Math.max(cal.x0, cal.x1) * ppm + 20, y * ppm);
      });
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#0057b8";
      ctx.font = "bold " + Math.max(11, Math.round(3.4 * ppm)) + "px sans-serif";
      ctx.fillText(caliperText(cal), Math.max(cal.x0, cal.x1) * ppm + 6, Math.min(cal.y0, cal.y1) * ppm + 14);
      ctx.restore();
    }
  };

  function caliperValues(cal) {
    var ms = (Math.abs(cal.x1 - cal.x0) / view.speed) * 1000;
    var mv = Math.abs(cal.y1 - cal.y0) / view.gain;
    return { ms: ms, bpm: ms > 0 ? 60000 / ms : null, mv: mv };
  }
  function caliperText(cal) {
    var v = caliperValues(cal);
    return (
      Math.round(v.ms) + " ms" + (v.bpm && v.ms >= 150 ? " · " + Math.round(v.bpm) + " bpm" : "") + " · " + v.mv.toFixed(2) + " mV"
    );
  }
  function showReadout(cal) {
    $("caliper-readout").textContent = cal ? caliperText(cal) : t("ecg.caliper_hint");
  }

  var panels = { current: new Panel($("ecg-current")), prior: new Panel($("ecg-prior")) };

  function redraw() {
    panels.current.draw();
    if (state.prior) panels.prior.draw();
    drawMedian();
  }

  /** The median beats of the 12 leads, 3 columns x 4, at 50 mm/s with the fiducials. */
  function drawMedian() {
    var canvas = $("ecg-median");
    var median = state.signal && state.signal.median;
    var wrap = canvas.parentNode;
    var cssWidth = Math.max(240, wrap.clientWidth - 16);
    if (!median) {
      canvas.width = cssWidth;
      canvas.height = 40;
      var c0 = canvas.getContext("2d");
      c0.clearRect(0, 0, canvas.width, canvas.height);
      c0.fillStyle = "#666";
      c0.font = "13px sans-serif";
      c0.fillText(t("ecg.median_none"), 8, 24);
      return;
    }
    var fs = median.sampling_rate_hz;
    var n = median.signals.length ? median.signals[0].length : 0;
    var beatMm = (n / fs) * 50; // 50 mm/s
    var cols = 4, rows = 3, rowMm = 30;
    var ppm = cssWidth / (cols * beatMm);
    var w = Math.round(cols * beatMm * ppm), h = Math.round(rows * rowMm * ppm);
    var dpr = window.devicePixelRatio || 1;
    canvas.width = w * dpr;
    canvas.height = h * dpr;
    canvas.style.width = w + "px";
    canvas.style.height = h + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawGrid(ctx, w, h, ppm);
    var f = median.fiducials_ms || {};
    var layout = LAYOUTS["3x4"];
    ctx.font = "11px sans-serif";
    layout.forEach(function (names, r) {
      names.forEach(function (name, c) {
        var li = median.leads.indexOf(name);
        var x0 = c * beatMm, base = (r + 0.6) * rowMm;
        ctx.fillStyle = "#000";
        ctx.fillText(name, (x0 + 1) * ppm, (r * rowMm + 4) * ppm);
        // fiducials: P on, QRS on/off, T end (ms from the start of the beat window)
        ctx.strokeStyle = "rgba(0, 87, 184, 0.55)";
        ctx.lineWidth = 1;
        ["p_on", "qrs_on", "qrs_off", "t_end"].forEach(function (k) {
          if (f[k] === null || f[k] === undefined) return;
          var x = (x0 + (f[k] / 1000) * 50) * ppm;
          ctx.beginPath();
          ctx.moveTo(x, r * rowMm * ppm + 2);
          ctx.lineTo(x, (r + 1) * rowMm * ppm - 2);
          ctx.stroke();
        });
        if (li < 0) return;
        var data = median.signals[li];
        ctx.strokeStyle = "#000";
        ctx.lineWidth = 1.2;
        ctx.beginPath();
        for (var i = 0; i < data.length; i++) {
          var x = (x0 + (i / fs) * 50) * ppm;
          var y = (base - (data[i] / 1000) * 10) * ppm;
          if (i === 0) ctx.moveTo(x, y);
          else ctx.lineTo(x, y);
        }
        ctx.stroke();
      });
    });
  }

  // --- measurements ---------------------------------------------------------------------------
  function num(v) {
    return v === null || v === undefined ? "" : String(Math.round(v));
  }

  /** QTc recomputed from the reader's QT/RR/rate, as the report will state it
      (ecg_service.reading.reported_measurements). */
  function reportedQtc(machine) {
    var r = state.reader, out = {};
    if (r.qt_ms === undefined && r.rr_ms === undefined && r.heart_rate_bpm === undefined) return out;
    var qt = r.qt_ms !== undefined ? r.qt_ms : machine.qt_ms;
    var rr = r.rr_ms !== undefined || r.heart_rate_bpm === undefined ? (r.rr_ms !== undefined ? r.rr_ms : machine.rr_ms) : 60000 / r.heart_rate_bpm;
    if (qt === null || qt === undefined || !rr) return out;
    out.qtc_bazett_ms = qt / Math.pow(rr / 1000, 0.5);
    out.qtc_fridericia_ms = qt / Math.pow(rr / 1000, 1 / 3);
    return out;
  }

  function deviceValues(study) {
    var out = {};
    (study.device_measurements || []).forEach(function (d) {
      if (d.key && out[d.key] === undefined && d.value !== null) out[d.key] = d;
    });
    return out;
  }

  function renderMeasurements() {
    var study = state.study;
    var body = document.querySelector("#ecg-meas tbody");
    body.textContent = "";
    if (!study) return;
    var machine = study.measurements || {};
    var missing = study.missing_reasons || {};
    var device = deviceValues(study);
    var deltas = {};
    if (state.prior && state.prior.deltas) {
      state.prior.deltas.forEach(function (d) {
        deltas[d.key] = d;
      });
    }
    document.querySelectorAll("#ecg-meas .prior-col").forEach(function (th) {
      th.hidden = !state.prior;
    });
    KEYS.forEach(function (key) {
      var label = t("ecg.m." + key);
      var input = el("input", {
        type: "number",
        step: "1",
        class: "ecg-reader-input",
        "aria-label": label + " " + t("ecg.col.reader"),
        dataset: { key: key },
      });
      input.value = num(state.reader[key]);
      var derived = reportedQtc(machine)[key];
      if (derived !== undefined && state.reader[key] === undefined) input.placeholder = num(derived);
      input.readOnly = !state.editable;
      input.addEventListener("change", readerChanged);
      var d = deltas[key];
      var dev = device[key];
      body.appendChild(
        el("tr", { dataset: { key: key } }, [
          el("th", { text: label }),
          el("td", {
            class: "num machine",
            text: machine[key] === null || machine[key] === undefined ? "—" : num(machine[key]),
            title: missing[key] || "",
          }),
          el("td", { class: "num", text: dev ? num(dev.value) : "—", title: dev ? dev.source || dev.label : "" }),
          el("td", { class: "reader" }, [input]),
          state.prior ? el("td", { class: "num", text: d && d.prior !== null ? num(d.prior) : "—" }) : null,
          state.prior
            ? el("td", {
                class: "num" + (d && d.notable ? " notable" : ""),
                text: d && d.delta !== null ? (d.delta > 0 ? "+" : "") + num(d.delta) : "—",
              })
            : null,
        ])
      );
    });
  }

  var saveReader = R.debounce(function () {
    var values = {};
    KEYS.forEach(function (key) {
      values[key] = state.reader[key] === undefined ? null : state.reader[key];
    });
    $("ecg-meas-state").textContent = t("rp.saving");
    R.api("PUT", ecgUrl + "/reader-measurements", { measurements: values }).then(
      function (study) {
        state.study = Object.assign(state.study || {}, study);
        $("ecg-meas-state").textContent = t("ecg.reader_saved");
        loadSerial();
      },
      function (err) {
        $("ecg-meas-state").textContent = t("rp.save_failed", { detail: err.message });
      }
    );
  }, 500);

  function readerChanged(event) {
    if (!state.editable) return;
    var key = event.target.dataset.key;
    var raw = event.target.value.trim();
    if (raw === "") delete state.reader[key];
    else state.reader[key] = Number(raw);
    saveReader();
    var derived = reportedQtc((state.study && state.study.measurements) || {});
    document.querySelectorAll("#ecg-meas .ecg-reader-input").forEach(function (input) {
      var k = input.dataset.key;
      input.placeholder = derived[k] !== undefined && state.reader[k] === undefined ? num(derived[k]) : "";
    });
  }

  function renderFlags() {
    var study = state.study;
    var box = $("ecg-flags");
    box.textContent = "";
    if (!study) return;
    var items = [];
    if (study.unreliable) items.push(t("ecg.unreliable"));
    (study.flags || []).forEach(function (f) {
      items.push(f);
    });
    var pre = study.prescreen;
    (Array.isArray(pre) ? pre : (pre && pre.matches) || []).forEach(function (m) {
      items.push(t("ecg.prescreen") + ": " + (lang() === "en" ? m.label_en || m.code : m.label_zh || m.code));
    });
    box.hidden = !items.length;
    items.forEach(function (text) {
      box.appendChild(el("span", { class: "ecg-flag", text: text }));
    });
  }

  // --- statements -----------------------------------------------------------------------------
  function statementText(st) {
    return lang() === "en" ? st.en : st.zh;
  }

  function renderPicked() {
    var list = $("stmt-picked");
    list.textContent = "";
    state.picked.forEach(function (code, i) {
      var st = state.library[code] || { code: code, zh: code, en: code };
      list.appendChild(
        el("li", { class: "ecg-stmt", dataset: { code: code } }, [
          el("span", { class: "stmt-code", text: code }),
          el("span", { text: st.zh + " · " + st.en }),
          state.editable
            ? el("button", {
                type: "button",
                class: "stmt-remove",
                title: t("ecg.statement_remove"),
                "aria-label": t("ecg.statement_remove"),
                text: "×",
                onclick: function () {
                  state.picked.splice(i, 1);
                  renderPicked();
                  window.RDCReading && window.RDCReading.changed();
                },
              })
            : null,
        ])
      );
    });
    $("stmt-none").hidden = state.picked.length > 0;
    $("stmt-search").disabled = !state.editable;
    $("stmt-category").disabled = !state.editable;
    document.querySelector(".ecg-stmt-search").hidden = cfg.mode !== "read";
  }

  function pick(st) {
    if (!state.editable) return;
    state.library[st.code] = st;
    if (state.picked.indexOf(st.code) < 0) state.picked.push(st.code);
    // The statement also goes into the impression, in the report's language.
    var impression = document.getElementById("impression");
    if (impression) {
      var text = statementText(st);
      var lines = impression.value ? impression.value.split("\n") : [];
      if (lines.indexOf(text) < 0) {
        lines.push(text);
        impression.value = lines.join("\n").replace(/^\n+/, "");
      }
    }
    if (st.maps_to_critical) {
      // A confirmed critical statement goes through the critical-value loop.
      var critical = document.getElementById("critical");
      if (critical && !critical.checked) {
        critical.checked = true;
        R.toast(t("ecg.critical_statement"), "error");
      }
    }
    renderPicked();
    $("stmt-results").textContent = "";
    $("stmt-search").value = "";
    window.RDCReading && window.RDCReading.changed();
  }

  var search = R.debounce(function () {
    var q = $("stmt-search").value.trim();
    var category = $("stmt-category").value;
    var list = $("stmt-results");
    if (!q && !category) {
      list.textContent = "";
      return;
    }
    R.api("GET", "/api/v1/ecg-statements" + R.query({ q: q, category: category || null, limit: 30 })).then(function (items) {
      list.textContent = "";
      items.forEach(function (st) {
        state.library[st.code] = st;
        list.appendChild(
          el(
            "li",
            {},
            [
              el("button", {
                type: "button",
                class: "stmt-hit sev-" + st.severity,
                dataset: { code: st.code },
                title: t("ecg.statement_add"),
                onclick: function () {
                  pick(st);
                },
              }, [
                el("span", { class: "stmt-code", text: st.code }),
                el("span", { text: st.zh + " · " + st.en }),
                el("span", { class: "muted small", text: t("ecg.category." + st.category) }),
              ]),
            ]
          )
        );
      });
    }, fail);
  }, 200);

  // --- prior ECG ------------------------------------------------------------------------------
  function loadPriors() {
    R.api("GET", "/api/v1/exams/" + encodeURIComponent(examId) + "/priors").then(
      function (priors) {
        var select = $("ecg-prior-select");
        var list = (Array.isArray(priors) ? priors : []).filter(function (p) {
          return p.discipline === "ecg";
        });
        if (!list.length) {
          select.options[0].textContent = t("ecg.prior.none");
          select.disabled = true;
          return;
        }
        list.forEach(function (p) {
          select.appendChild(
            el("option", {
              value: p.id,
              text: R.fmt(p.performed_at || p.first_received_at, "date") + " · " + (p.description || p.modality),
            })
          );
        });
      },
      function () {
        $("ecg-prior-select").disabled = true;
      }
    );
  }

  function showPrior(priorId) {
    if (!priorId) {
      state.prior = null;
      $("ecg-prior").hidden = true;
      $("ecg-traces").classList.remove("split");
      redraw();
      renderMeasurements();
      return;
    }
    state.prior = { id: priorId, deltas: null };
    $("ecg-prior").hidden = false;
    $("ecg-traces").classList.add("split");
    panels.current.draw();
    var priorUrl = "/api/v1/ecg/" + encodeURIComponent(priorId);
    R.api("GET", priorUrl + "/signal").then(
      function (signal) {
        if (!state.prior || state.prior.id !== priorId) return;
        panels.prior.setSignal(signal);
      },
      function (err) {
        panels.prior.fail(t("ecg.load_failed", { detail: err.message }));
      }
    );
    R.api("GET", priorUrl).then(function (study) {
      var title = $("ecg-prior").querySelector(".vp-title");
      title.textContent = t("ecg.prior.label", { date: R.fmt(study.acquired_at || study.analysed_at, "date") });
    }, function () {});
    loadSerial();
  }

  function loadSerial() {
    if (!state.prior) return;
    var priorId = state.prior.id;
    R.api("GET", ecgUrl + "/serial" + R.query({ prior: priorId })).then(function (serial) {
      if (!state.prior || state.prior.id !== priorId) return;
      state.prior.deltas = serial.deltas;
      renderMeasurements();
    }, fail);
  }

  // --- report hook (reading.js) ---------------------------------------------------------------
  window.RDCReadingExtension = {
    keys: ["ecg_statements"],
    structured: function () {
      return { ecg_statements: state.picked.slice() };
    },
    fill: function (report) {
      var codes = (report && report.structured && report.structured.ecg_statements) || [];
      state.picked = Array.isArray(codes) ? codes.slice() : [];
      renderPicked();
    },
    editable: function (on) {
      state.editable = !!on;
      renderPicked();
      renderMeasurements();
    },
  };

  // --- controls -------------------------------------------------------------------------------
  function syncButtons() {
    document.querySelectorAll("[data-layout]").forEach(function (b) {
      b.classList.toggle("on", b.dataset.layout === view.layout);
    });
    document.querySelectorAll("[data-speed]").forEach(function (b) {
      b.classList.toggle("on", Number(b.dataset.speed) === view.speed);
    });
    document.querySelectorAll("[data-gain]").forEach(function (b) {
      b.classList.toggle("on", Number(b.dataset.gain) === view.gain);
    });
    var cal = $("caliper-toggle");
    cal.classList.toggle("on", view.caliper);
    cal.setAttribute("aria-pressed", view.caliper ? "true" : "false");
    document.body.classList.toggle("ecg-caliper-on", view.caliper);
  }
  function clearCalipers() {
    panels.current.caliper = panels.prior.caliper = null;
    showReadout(null);
  }
  document.querySelectorAll("[data-layout]").forEach(function (b) {
    b.addEventListener("click", function () {
      view.layout = b.dataset.layout;
      clearCalipers();
      syncButtons();
      redraw();
    });
  });
  document.querySelectorAll("[data-speed]").forEach(function (b) {
    b.addEventListener("click", function () {
      view.speed = Number(b.dataset.speed);
      clearCalipers();
      syncButtons();
      redraw();
    });
  });
  document.querySelectorAll("[data-gain]").forEach(function (b) {
    b.addEventListener("click", function () {
      view.gain = Number(b.dataset.gain);
      clearCalipers();
      syncButtons();
      redraw();
    });
  });
  $("caliper-toggle").addEventListener("click", function () {
    view.caliper = !view.caliper;
    syncButtons();
  });
  $("caliper-clear").addEventListener("click", function () {
    clearCalipers();
    redraw();
  });
  $("ecg-prior-select").addEventListener("change", function () {
    showPrior(this.value);
    this.blur();
  });
  $("stmt-search").addEventListener("input", search);
  $("stmt-category").addEventListener("change", search);
  $("stmt-search").addEventListener("keydown", function (event) {
    if (event.key === "Enter") {
      event.preventDefault();
      var first = document.querySelector("#stmt-results .stmt-hit");
      if (first) first.click();
    }
  });
  window.addEventListener("resize", R.debounce(redraw, 150));

  // --- start ----------------------------------------------------------------------------------
  function start() {
    syncButtons();
    renderPicked();
    R.api("GET", "/api/v1/ecg-statements" + R.query({ limit: 500 })).then(function (items) {
      items.forEach(function (st) {
        state.library[st.code] = st;
      });
      renderPicked();
    }, function () {});
    R.api("GET", ecgUrl).then(
      function (study) {
        state.study = study;
        state.reader = Object.assign({}, study.reader_measurements || {});
        var info = [study.source_format, study.sampling_rate_hz + " Hz", (study.duration_s || 0).toFixed(1) + " s"];
        $("ecg-current").querySelector(".ecg-trace-info").textContent = info.join(" · ");
        renderFlags();
        renderMeasurements();
      },
      function (err) {
        panels.current.fail(t("ecg.load_failed", { detail: err.message }));
      }
    );
    R.api("GET", ecgUrl + "/signal").then(
      function (signal) {
        state.signal = signal;
        panels.current.setSignal(signal);
        drawMedian();
      },
      function (err) {
        panels.current.fail(t("ecg.load_failed", { detail: err.message }));
      }
    );
    loadPriors();
  }
  start();
})();

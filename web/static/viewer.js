/* Image viewport: server-rendered frames (WADO-RS /rendered), frame scrolling, window/level,
   zoom/pan, cine and the DICOM header of the shown instance. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var PRESETS = {
    lung: { c: -600, w: 1500 },
    mediastinum: { c: 50, w: 350 },
    bone: { c: 300, w: 2000 },
    brain: { c: 40, w: 80 },
  };
  var FALLBACK_WINDOW = { c: 40, w: 400 };
  var ZOOM_MIN = 0.25;
  var ZOOM_MAX = 10;

  var metadataCache = {}; // "study/series/sop" -> Promise<DICOM JSON dataset>
  var keywordCache = {}; // "00100010" -> "PatientName"

  function enc(value) {
    return encodeURIComponent(value);
  }

  function instancePath(study, series, sop) {
    return "/dicomweb/studies/" + enc(study) + "/series/" + enc(series) + "/instances/" + enc(sop);
  }

  /** The instance's metadata (DICOM JSON), fetched once. */
  function metadata(study, series, sop) {
    var key = study + "/" + series + "/" + sop;
    if (!metadataCache[key]) {
      metadataCache[key] = R.api("GET", instancePath(study, series, sop) + "/metadata", null, {
        accept: "application/dicom+json, application/json;q=0.9",
      }).then(
        function (body) {
          return Array.isArray(body) ? body[0] || {} : body || {};
        }
      );
      metadataCache[key].catch(function () {
        delete metadataCache[key];
      });
    }
    return metadataCache[key];
  }

  function firstNumber(dataset, tag) {
    var element = dataset && dataset[tag];
    if (!element || !element.Value || !element.Value.length) return null;
    var value = parseFloat(element.Value[0]);
    return isNaN(value) ? null : value;
  }

  /** Group an exam's instances into series, each with its stack of frames. */
  function buildSeries(exam) {
    var byUid = {};
    var list = [];
    (exam.instances || []).forEach(function (inst) {
      var uid = inst.series_instance_uid;
      if (!byUid[uid]) {
        byUid[uid] = { uid: uid, number: inst.series_number, modality: inst.modality, instances: [] };
        list.push(byUid[uid]);
      }
      byUid[uid].instances.push(inst);
    });
    function num(value) {
      return value === null || value === undefined ? Infinity : value;
    }
    list.sort(function (a, b) {
      return num(a.number) - num(b.number) || (a.uid < b.uid ? -1 : 1);
    });
    list.forEach(function (series) {
      series.instances.sort(function (a, b) {
        return (
          num(a.instance_number) - num(b.instance_number) ||
          (a.sop_instance_uid < b.sop_instance_uid ? -1 : 1)
        );
      });
      series.stack = [];
      series.instances.forEach(function (inst) {
        var frames = Math.max(1, inst.frame_count || 1);
        for (var f = 1; f <= frames; f++) {
          series.stack.push({
            study: exam.study_instance_uid,
            series: series.uid,
            sop: inst.sop_instance_uid,
            frame: f,
            frames: frames,
            instanceNumber: inst.instance_number,
          });
        }
      });
    });
    return list;
  }

  function seriesLabel(series) {
    return (
      t("rd.series_label", { n: series.number === null || series.number === undefined ? "?" : series.number }) +
      " · " +
      series.modality +
      " · " +
      t("rd.frames", { n: series.stack.length })
    );
  }

  /** The rendered URL of one frame with the given window (null: the header's window);
      `size` asks the server for a thumbnail that fits size x size. */
  function frameUrl(entry, win, size) {
    var url =
      instancePath(entry.study, entry.series, entry.sop) + "/frames/" + entry.frame + "/rendered";
    var params = [];
    if (win) params.push("window=" + Math.round(win.c) + "," + Math.max(1, Math.round(win.w)) + ",linear");
    if (size) params.push("viewport=" + size + "," + size);
    return params.length ? url + "?" + params.join("&") : url;
  }

  function Viewport(root, options) {
    var self = this;
    this.root = root;
    this.options = options || {};
    this.stage = root.querySelector(".vp-stage");
    this.img = root.querySelector(".vp-image");
    this.slider = root.querySelector(".vp-slider");
    this.frameLabel = root.querySelector(".vp-frame");
    this.seriesSelect = root.querySelector(".vp-series");
    this.msg = root.querySelector(".vp-msg");
    this.overlay = {
      tl: root.querySelector(".vp-overlay.tl"),
      tr: root.querySelector(".vp-overlay.tr"),
      bl: root.querySelector(".vp-overlay.bl"),
      br: root.querySelector(".vp-overlay.br"),
    };
    this.exam = null;
    this.series = [];
    this.seriesIndex = 0;
    this.stack = [];
    this.index = 0;
    this.window = null;
    this.headerWindow = null;
    this.preset = "default";
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.tool = "wl";
    this.cineTimer = null;
    this.loadingImage = false;
    this.loadImageSoon = R.debounce(function () {
      self.loadImage();
    }, 120);
    this.readHeaderSoon = R.debounce(function () {
      self.readHeader();
    }, 300);
    this.bind();
  }

  Viewport.prototype.bind = function () {
    var self = this;
    this.img.addEventListener("load", function () {
      self.loadingImage = false;
      self.msg.hidden = true;
      self.img.classList.remove("failed");
    });
    this.img.addEventListener("error", function () {
      self.loadingImage = false;
      if (!self.img.getAttribute("src")) return;
      self.img.classList.add("failed");
      self.showMessage(t("rd.image_error"));
    });
    this.slider.addEventListener("input", function () {
      self.setIndex(parseInt(self.slider.value, 10) - 1);
    });
    if (this.seriesSelect) {
      this.seriesSelect.addEventListener("change", function () {
        self.setSeries(parseInt(self.seriesSelect.value, 10));
      });
    }
    this.stage.addEventListener(
      "wheel",
      function (event) {
        event.preventDefault();
        self.activate();
        if (event.ctrlKey || event.metaKey) {
          self.setZoom(self.zoom * (event.deltaY < 0 ? 1.15 : 1 / 1.15));
        } else if (event.deltaY) {
          self.step(event.deltaY > 0 ? 1 : -1);
        }
      },
      { passive: false }
    );
    this.stage.addEventListener("contextmenu", function (event) {
      event.preventDefault();
    });
    this.stage.addEventListener("pointerdown", function (event) {
      self.activate();
      // Leave any text field, so the keyboard drives the viewer again.
      var focused = document.activeElement;
      if (focused && focused !== document.body && focused.blur) focused.blur();
      var mode = event.button === 2 ? "wl" : event.button === 1 ? "pan" : self.tool;
      if (event.button === 0 && event.shiftKey) mode = "pan";
      if (event.button > 2) return;
      event.preventDefault();
      self.stage.setPointerCapture(event.pointerId);
      var start = { x: event.clientX, y: event.clientY, panX: self.panX, panY: self.panY };
      var base = self.window || self.headerWindow || FALLBACK_WINDOW;
      var startWin = { c: base.c, w: base.w };
      self.stage.classList.add(mode === "pan" ? "panning" : "windowing");
      function move(e) {
        var dx = e.clientX - start.x;
        var dy = e.clientY - start.y;
        if (mode === "pan") {
          self.panX = start.panX + dx;
          self.panY = start.panY + dy;
          self.applyTransform();
        } else {
          var sensitivity = Math.max(0.5, startWin.w / 300);
          self.preset = "custom";
          self.setWindow(startWin.c + dy * sensitivity, startWin.w + dx * sensitivity, true);
        }
      }
      function up(e) {
        self.stage.releasePointerCapture(e.pointerId);
        self.stage.removeEventListener("pointermove", move);
        self.stage.removeEventListener("pointerup", up);
        self.stage.removeEventListener("pointercancel", up);
        self.stage.classList.remove("panning", "windowing");
      }
      self.stage.addEventListener("pointermove", move);
      self.stage.addEventListener("pointerup", up);
      self.stage.addEventListener("pointercancel", up);
    });
    this.root.addEventListener("pointerdown", function () {
      self.activate();
    });
  };

  Viewport.prototype.activate = function () {
    if (this.options.onactivate) this.options.onactivate(this);
  };

  Viewport.prototype.showMessage = function (text) {
    this.msg.textContent = text;
    this.msg.hidden = !text;
  };

  /** Show `exam` (an ExamDetail); starts at its first series. */
  Viewport.prototype.load = function (exam) {
    this.exam = exam;
    this.series = buildSeries(exam);
    if (this.seriesSelect) {
      this.seriesSelect.textContent = "";
      var select = this.seriesSelect;
      this.series.forEach(function (series, i) {
        select.appendChild(el("option", { value: i, text: seriesLabel(series) }));
      });
      select.hidden = this.series.length < 2 && !this.options.alwaysShowSeries;
    }
    if (!this.series.length) {
      this.stack = [];
      this.img.removeAttribute("src");
      this.showMessage(t("rd.no_images"));
      this.updateLabels();
      return;
    }
    this.setSeries(0);
  };

  Viewport.prototype.setSeries = function (i) {
    if (!this.series[i]) return;
    this.stop();
    this.seriesIndex = i;
    this.stack = this.series[i].stack;
    if (this.seriesSelect) this.seriesSelect.value = String(i);
    this.slider.max = String(Math.max(1, this.stack.length));
    this.slider.disabled = this.stack.length < 2;
    this.index = -1;
    this.setIndex(0);
    if (this.options.onseries) this.options.onseries(this, i);
  };

  Viewport.prototype.current = function () {
    return this.stack[this.index] || null;
  };

  Viewport.prototype.setIndex = function (i) {
    if (!this.stack.length) return;
    var index = Math.max(0, Math.min(this.stack.length - 1, i));
    if (index === this.index) return;
    this.index = index;
    this.slider.value = String(index + 1);
    this.loadImage();
    this.readHeaderSoon();
    this.updateLabels();
    if (this.options.onframe) this.options.onframe(this, this.current());
  };

  /** Show the frame of instance `sop` (1-based `frame`); false when it is not in any series. */
  Viewport.prototype.goTo = function (sop, frame) {
    for (var s = 0; s < this.series.length; s++) {
      var stack = this.series[s].stack;
      for (var i = 0; i < stack.length; i++) {
        if (stack[i].sop === sop && stack[i].frame === (frame || 1)) {
          if (s !== this.seriesIndex) this.setSeries(s);
          this.setIndex(i);
          return true;
        }
      }
    }
    return false;
  };

  /** The stack entry of instance `sop`, frame `frame` (for thumbnails), or null. */
  Viewport.prototype.find = function (sop, frame) {
    for (var s = 0; s < this.series.length; s++) {
      var stack = this.series[s].stack;
      for (var i = 0; i < stack.length; i++) {
        if (stack[i].sop === sop && stack[i].frame === (frame || 1)) return stack[i];
      }
    }
    return null;
  };

  Viewport.prototype.step = function (delta) {
    this.setIndex(this.index + delta);
  };

  Viewport.prototype.first = function () {
    this.setIndex(0);
  };

  Viewport.prototype.last = function () {
    this.setIndex(this.stack.length - 1);
  };

  Viewport.prototype.loadImage = function () {
    var entry = this.current();
    if (!entry) return;
    var url = frameUrl(entry, this.window);
    if (this.img.getAttribute("src") === url) return;
    this.loadingImage = true;
    this.img.dataset.frame = String(this.index + 1);
    this.img.dataset.window = this.window
      ? Math.round(this.window.c) + "," + Math.round(this.window.w)
      : "default";
    this.img.src = url;
  };

  /** Fetch the shown instance's header: default window for the overlay and the drag base. */
  Viewport.prototype.readHeader = function () {
    var self = this;
    var entry = this.current();
    if (!entry) return;
    metadata(entry.study, entry.series, entry.sop).then(
      function (dataset) {
        if (self.current() !== entry) return;
        var c = firstNumber(dataset, "00281050");
        var w = firstNumber(dataset, "00281051");
        self.headerWindow = c !== null && w !== null ? { c: c, w: w } : null;
        self.headerInfo = dataset;
        self.updateLabels();
        if (self.options.onheader) self.options.onheader(self, dataset, entry);
      },
      function () {
        /* the overlay just lacks header values */
      }
    );
  };

  /** Window centre/width; `debounced` for drags (one request when the pointer rests). */
  Viewport.prototype.setWindow = function (c, w, debounced) {
    this.window = { c: c, w: Math.max(1, w) };
    this.updateLabels();
    if (debounced) this.loadImageSoon();
    else this.loadImage();
  };

  Viewport.prototype.applyPreset = function (name) {
    this.preset = name;
    if (name === "default") {
      this.window = null;
      this.updateLabels();
      this.loadImage();
      return;
    }
    var preset = PRESETS[name];
    if (preset) this.setWindow(preset.c, preset.w, false);
  };

  Viewport.prototype.setZoom = function (zoom) {
    this.zoom = Math.max(ZOOM_MIN, Math.min(ZOOM_MAX, zoom));
    this.applyTransform();
  };

  Viewport.prototype.resetView = function () {
    this.zoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.applyTransform();
  };

  Viewport.prototype.applyTransform = function () {
    this.img.style.transform =
      "translate(" + this.panX + "px, " + this.panY + "px) scale(" + this.zoom + ")";
    this.updateLabels();
  };

  Viewport.prototype.playing = function () {
    return this.cineTimer !== null;
  };

  Viewport.prototype.play = function (fps) {
    var self = this;
    this.stop();
    if (this.stack.length < 2) return;
    this.cineTimer = setInterval(function () {
      if (self.loadingImage) return; // never queue frames faster than they arrive
      self.setIndex(self.index + 1 >= self.stack.length ? 0 : self.index + 1);
    }, 1000 / Math.max(1, Math.min(30, fps || 8)));
    if (this.options.oncine) this.options.oncine(this, true);
  };

  Viewport.prototype.stop = function () {
    if (this.cineTimer === null) return;
    clearInterval(this.cineTimer);
    this.cineTimer = null;
    if (this.options.oncine) this.options.oncine(this, false);
  };

  Viewport.prototype.updateLabels = function () {
    var n = this.stack.length;
    var entry = this.current();
    this.frameLabel.textContent = n ? t("rd.frame", { i: this.index + 1, n: n }) : "";
    var exam = this.exam || {};
    var patient = exam.patient || {};
    this.overlay.tl.textContent = "";
    if (exam.id) {
      this.overlay.tl.appendChild(el("div", { text: R.personName(patient.name) + " · " + (patient.patient_id || "") }));
      this.overlay.tl.appendChild(el("div", { text: (exam.description || "") + " · " + R.fmt(exam.performed_at || exam.first_received_at, "date") }));
      var series = this.series[this.seriesIndex];
      if (series) this.overlay.tl.appendChild(el("div", { text: seriesLabel(series) }));
    }
    this.overlay.tr.textContent = n ? t("rd.frame", { i: this.index + 1, n: n }) : "";
    if (entry && entry.frames > 1 && entry.frames < n) {
      this.overlay.tr.textContent += " (" + entry.frame + "/" + entry.frames + ")";
    }
    var win = this.window || this.headerWindow;
    var wl = win
      ? t("rd.window", { w: Math.round(win.w), c: Math.round(win.c) })
      : t("rd.window_default");
    this.overlay.bl.textContent = wl + " · " + t("rd.zoom", { z: Math.round(this.zoom * 100) });
    this.overlay.br.textContent = entry && entry.instanceNumber !== null && entry.instanceNumber !== undefined ? "IM " + entry.instanceNumber : "";
  };

  // --- DICOM header table -------------------------------------------------------------------

  function valueText(element) {
    if (!element) return "";
    if (element.vr === "SQ") {
      return "(" + ((element.Value || []).length) + ")";
    }
    if (element.InlineBinary !== undefined || element.BulkDataURI !== undefined) return "[binary]";
    return (element.Value || [])
      .map(function (v) {
        if (v && typeof v === "object") {
          return [v.Alphabetic, v.Ideographic, v.Phonetic].filter(Boolean).join(" = ");
        }
        return String(v);
      })
      .join(" \\ ")
      .slice(0, 300);
  }

  /** Flatten a DICOM JSON dataset to rows (sequence items indented with ">"). */
  function headerRows(dataset, depth, rows) {
    Object.keys(dataset || {})
      .sort()
      .forEach(function (tag) {
        var element = dataset[tag];
        rows.push({ tag: tag, depth: depth, vr: element.vr, value: valueText(element) });
        if (element.vr === "SQ" && depth < 4) {
          (element.Value || []).forEach(function (item) {
            headerRows(item, depth + 1, rows);
          });
        }
      });
    return rows;
  }

  function keywords(tags) {
    var missing = tags.filter(function (tag) {
      return !(tag in keywordCache);
    });
    if (!missing.length) return Promise.resolve(keywordCache);
    return R.api("GET", "/ui/dicom-keywords?tags=" + missing.join(","))
      .then(function (names) {
        Object.assign(keywordCache, names);
        return keywordCache;
      })
      .catch(function () {
        return keywordCache;
      });
  }

  /** Fill `tbody` with the header of `dataset`. */
  function renderHeader(tbody, dataset) {
    var rows = headerRows(dataset, 0, []);
    var tags = rows.map(function (row) {
      return row.tag.toUpperCase();
    });
    return keywords(tags).then(function (names) {
      tbody.textContent = "";
      rows.forEach(function (row) {
        var tag = row.tag.toUpperCase();
        var prefix = new Array(row.depth + 1).join(">");
        tbody.appendChild(
          el("tr", { dataset: { search: (tag + " " + (names[tag] || "") + " " + row.value).toLowerCase() } }, [
            el("td", { class: "num", text: prefix + "(" + tag.slice(0, 4) + "," + tag.slice(4) + ")" }),
            el("td", { text: names[tag] || "" }),
            el("td", { text: row.vr || "" }),
            el("td", { class: "val", text: row.value, title: row.value }),
          ])
        );
      });
    });
  }

  window.RDCViewer = {
    PRESETS: PRESETS,
    Viewport: Viewport,
    metadata: metadata,
    renderHeader: renderHeader,
    frameUrl: frameUrl,
  };
})();

/* Reading page: viewer + report side by side, the work-item lease, autosave, submit/verify,
   re-scan, and the keyboard shortcuts. Also the read-only report view (mode "report"). */
(function () {
  "use strict";
  var R = window.RDC;
  var V = window.RDCViewer;
  var t = R.t;
  var el = R.el;
  var cfg = R.config;
  var user = cfg.user || {};
  var examId = cfg.examId;
  var reading = cfg.mode === "read";
  var isReader = user.role === "reader" || user.role === "senior_reader";
  var canVerify = user.role === "senior_reader" || user.level === "attending" || user.level === "chief";
  var examUrl = "/api/v1/exams/" + encodeURIComponent(examId);
  var reportUrl = examUrl + "/report";
  var PRESET_KEYS = { 1: "lung", 2: "mediastinum", 3: "bone", 4: "brain", 0: "default" };
  var MAX_KEY_IMAGES = 12; // worklist.schemas.MAX_KEY_IMAGES
  var clinicUser = user.org_kind === "clinic";

  var state = {
    exam: null,
    report: null,
    templates: [],
    template: null,
    lease: null,
    editable: false,
    dirty: false,
    busy: false,
    closed: false, // submitted, released, re-scan requested or lost: no more lease renewals
    keyImages: [], // [{sop_instance_uid, frame}] marked on the current exam, saved with the draft
    detail: null, // GET /api/v1/reports/{id} of the version shown: versions, signature, HR
    viewing: null, // an older version shown read-only (its detail), else null
  };
  var saveChain = Promise.resolve(null);

  function $(id) {
    return document.getElementById(id);
  }

  function fail(err) {
    R.toast(t("err.failed", { detail: err && err.message ? err.message : String(err) }), "error");
  }

  // --- viewer -------------------------------------------------------------------------------
  var active = null;
  var viewports = {};
  function setActive(viewport) {
    if (active === viewport) return;
    if (active) {
      active.root.classList.remove("active");
      active.stop();
    }
    active = viewport;
    active.root.classList.add("active");
    syncToolbar();
    syncKeyToggle();
    if (!$("header-panel").hidden) active.readHeader();
  }
  var viewportOptions = {
    onactivate: setActive,
    onframe: function (viewport) {
      if (viewport === viewports.main) syncKeyToggle();
    },
    oncine: function (viewport) {
      if (viewport === active) syncToolbar();
    },
    onheader: function (viewport, dataset, entry) {
      if (viewport === active && !$("header-panel").hidden) showHeader(dataset, entry);
    },
    onseries: function (viewport, index) {
      if (viewport === viewports.main) {
        document.querySelectorAll("#series-list .series").forEach(function (node) {
          node.classList.toggle("on", node.dataset.index === String(index));
        });
      }
    },
  };
  // A page without the imaging viewer (the ECG console, web/static/ecg.js) keeps the report
  // flow and gets inert viewports; it hooks in through window.RDCReadingExtension:
  // {keys: [structured keys it owns], structured(): {...}, fill(report), editable(on)}.
  var imaging = !!$("vp-main");
  var extension = window.RDCReadingExtension || null;
  function InertViewport() {
    this.series = [];
    this.zoom = 1;
  }
  ["load", "stop", "play", "step", "first", "last", "readHeader", "setZoom", "resetView", "applyPreset", "setSeries"].forEach(
    function (name) {
      InertViewport.prototype[name] = function () {};
    }
  );
  InertViewport.prototype.playing = function () {
    return false;
  };
  InertViewport.prototype.current = InertViewport.prototype.find = function () {
    return null;
  };
  InertViewport.prototype.goTo = function () {
    return false;
  };
  viewports.main = imaging ? new V.Viewport($("vp-main"), viewportOptions) : new InertViewport();
  viewports.prior = imaging ? new V.Viewport($("vp-prior"), viewportOptions) : new InertViewport();
  active = viewports.main;

  function syncToolbar() {
    document.querySelectorAll("[data-preset]").forEach(function (button) {
      button.classList.toggle("on", button.dataset.preset === active.preset);
    });
    document.querySelectorAll("[data-tool]").forEach(function (button) {
      button.classList.toggle("on", button.dataset.tool === active.tool);
    });
    var cine = $("cine");
    if (!cine) return;
    cine.textContent = active.playing() ? cine.dataset.pause : cine.dataset.play;
    cine.classList.toggle("on", active.playing());
  }

  function renderSeriesList(viewport) {
    var list = $("series-list");
    if (!list) return;
    list.textContent = "";
    viewport.series.forEach(function (series, i) {
      var entry = series.stack[0];
      list.appendChild(
        el(
          "button",
          {
            type: "button",
            class: "series" + (i === viewport.seriesIndex ? " on" : ""),
            dataset: { index: i },
            title: series.uid,
            onclick: function () {
              viewports.main.setSeries(i);
              setActive(viewports.main);
              this.blur();
            },
          },
          [
            el("img", {
              src: V.frameUrl(entry, null, 96),
              alt: "",
              loading: "lazy",
              draggable: "false",
              onerror: function () {
                this.classList.add("failed");
              },
            }),
            el("span", {
              text:
                t("rd.series_label", { n: series.number === null || series.number === undefined ? "?" : series.number }) +
                " " +
                series.modality,
            }),
            el("span", { class: "muted", text: t("rd.frames", { n: series.stack.length }) }),
          ]
        )
      );
    });
  }

  function showHeader(dataset, entry) {
    $("header-sop").textContent = entry ? entry.sop : "";
    V.renderHeader(document.querySelector("#header-table tbody"), dataset).then(filterHeader);
  }

  function filterHeader() {
    var needle = $("header-filter").value.trim().toLowerCase();
    document.querySelectorAll("#header-table tbody tr").forEach(function (row) {
      row.hidden = needle && row.dataset.search.indexOf(needle) < 0;
    });
  }

  function toggleHeader(force) {
    var panel = $("header-panel");
    if (!panel) return;
    var open = force === undefined ? panel.hidden : force;
    panel.hidden = !open;
    $("header-toggle").classList.toggle("on", open);
    $("header-toggle").setAttribute("aria-pressed", open ? "true" : "false");
    if (!open) return;
    var entry = active.current();
    if (!entry) return;
    document.querySelector("#header-table tbody").textContent = "";
    V.metadata(entry.study, entry.series, entry.sop).then(
      function (dataset) {
        showHeader(dataset, entry);
      },
      function (err) {
        var body = document.querySelector("#header-table tbody");
        body.textContent = "";
        body.appendChild(el("tr", {}, [el("td", { colspan: 4, text: t("rd.header.failed", { detail: err.message }) })]));
      }
    );
  }

  function toggleCine() {
    if (active.playing()) active.stop();
    else active.play(parseInt($("fps").value, 10) || 8);
    syncToolbar();
  }

  function preset(name) {
    active.applyPreset(name);
    syncToolbar();
  }

  function loadPriors() {
    if (!imaging) return;
    R.api("GET", examUrl + "/priors").then(
      function (priors) {
        var select = $("prior-select");
        var list = Array.isArray(priors) ? priors : (priors && priors.items) || [];
        if (!list.length) {
          select.options[0].textContent = t("rd.prior.none");
          select.disabled = true;
          return;
        }
        list.forEach(function (prior) {
          select.appendChild(
            el("option", {
              value: prior.id,
              text:
                R.fmt(prior.performed_at || prior.first_received_at, "date") +
                " · " +
                prior.modality +
                " · " +
                (prior.description || ""),
            })
          );
        });
      },
      function () {
        var select = $("prior-select");
        select.options[0].textContent = t("rd.prior.none");
        select.disabled = true;
      }
    );
  }

  function showPrior(priorId) {
    var container = $("viewports");
    if (!priorId) {
      viewports.prior.stop();
      $("vp-prior").hidden = true;
      container.classList.remove("split");
      setActive(viewports.main);
      return;
    }
    R.api("GET", "/api/v1/exams/" + encodeURIComponent(priorId)).then(function (prior) {
      $("vp-prior").hidden = false;
      container.classList.add("split");
      $("vp-prior").querySelector(".vp-title").textContent = t("rd.prior.label", {
        date: R.fmt(prior.performed_at || prior.first_received_at, "date"),
        desc: prior.description || prior.modality,
      });
      viewports.prior.load(prior);
    }, fail);
  }

  // --- exam header --------------------------------------------------------------------------
  function renderExam(exam) {
    var patient = exam.patient || {};
    var badge = $("ei-priority");
    badge.className = "badge prio-" + exam.priority;
    badge.textContent = t("priority." + exam.priority);
    $("ei-name").textContent = R.personName(patient.name) || patient.patient_id;
    var demo = [];
    if (patient.sex) demo.push(R.label("sex", patient.sex));
    if (patient.birth_date) demo.push(R.dicomDate(patient.birth_date));
    $("ei-demo").textContent = demo.join(" · ");
    var pid = $("ei-pid");
    pid.textContent = patient.patient_id || "";
    pid.title = patient.patient_id || ""; // a long ID is cut with an ellipsis
    var person = $("ei-person");
    person.textContent = "";
    if (patient.patient_id && patient.issuer) {
      // The person across the alliance: identifiers at every clinic and their exams.
      person.appendChild(document.createTextNode(" "));
      person.appendChild(el("a", {
        class: "patient-link",
        // A national ID is shown masked: the link then names the person, not the ID.
        href: exam.patient_id_masked && exam.person_id
          ? "/ui/patients/" + encodeURIComponent(exam.person_id)
          : "/ui/patients?identifier=" + encodeURIComponent(patient.issuer + "|" + patient.patient_id),
        text: t("pp.open"),
      }));
    }
    $("ei-accession").textContent = exam.accession_number || t("common.none");
    $("ei-clinic").textContent = exam.clinic_name || exam.clinic_code;
    $("ei-desc").textContent = [exam.modality, exam.body_part, exam.description].filter(Boolean).join(" · ");
    $("ei-performed").textContent = R.fmt(exam.performed_at);
    $("ei-received").textContent = R.fmt(exam.first_received_at);
    $("ei-state").textContent = R.label("exam_state", exam.state);
    renderDue();
  }

  /** The SLA deadline with a live countdown while the exam is still being read. */
  function renderDue() {
    var exam = state.exam, cell = $("ei-due");
    if (!exam || !exam.due_at) { cell.textContent = t("common.none"); return; }
    var open = exam.state === "READY" || exam.state === "PRELIMINARY";
    var left = new Date(exam.due_at).getTime() - Date.now();
    var text = R.fmt(exam.due_at);
    if (open) text += " (" + (left < 0 ? t("dur.overdue", { t: R.duration(left) }) : R.duration(left)) + ")";
    cell.textContent = text;
    cell.classList.toggle("overdue", open && left < 0);
  }
  setInterval(renderDue, 1000);

  /** Read the exam again (its state moves on with the report). */
  function refreshExam() {
    R.api("GET", examUrl).then(function (exam) {
      state.exam = exam;
      renderExam(exam);
    }, function () {});
  }

  // --- report form --------------------------------------------------------------------------
  var form = $("report-form");

  function templateName(tpl) {
    return (cfg.lang === "en" ? tpl.name_en : tpl.name_zh) || tpl.name_zh || tpl.name_en || tpl.code;
  }

  function renderTemplates() {
    var select = $("template-select");
    state.templates.forEach(function (tpl) {
      select.appendChild(el("option", { value: tpl.code, text: templateName(tpl) }));
    });
  }

  function structuredValues() {
    var values = extension && extension.structured ? extension.structured() : {};
    document.querySelectorAll("#structured-fields [data-key]").forEach(function (input) {
      var key = input.dataset.key;
      if (input.type === "checkbox") values[key] = input.checked;
      else if (input.type === "number") values[key] = input.value === "" ? null : Number(input.value);
      else values[key] = input.value;
    });
    return values;
  }

  /** Inputs for the template's structured fields (or the stored keys without a template). */
  function renderStructured(values) {
    var box = $("structured-fields");
    box.textContent = "";
    var fields = state.template
      ? state.template.fields || []
      : Object.keys(values || {}).filter(function (key) {
          return !(extension && extension.keys && extension.keys.indexOf(key) >= 0);
        }).map(function (key) {
          return { key: key, label_zh: key, label_en: key, type: "text" };
        });
    $("structured").hidden = !fields.length;
    fields.forEach(function (field) {
      var value = values ? values[field.key] : undefined;
      var labelText = (cfg.lang === "en" ? field.label_en : field.label_zh) || field.key;
      var input;
      if (field.type === "select") {
        input = el("select", {}, [el("option", { value: "", text: t("common.none") })]);
        (field.options || []).forEach(function (option) {
          input.appendChild(el("option", { value: option, text: option }));
        });
        input.value = value === undefined || value === null ? "" : String(value);
      } else if (field.type === "bool") {
        input = el("input", { type: "checkbox" });
        input.checked = !!value;
      } else {
        input = el("input", { type: field.type === "number" ? "number" : "text", step: "any" });
        input.value = value === undefined || value === null ? "" : String(value);
      }
      input.dataset.key = field.key;
      input.name = "s." + field.key;
      box.appendChild(
        el("label", { class: field.type === "bool" ? "sf check" : "sf" }, field.type === "bool" ? [input, " " + labelText] : [labelText, input])
      );
    });
    applyEditable();
  }

  function chooseTemplate(code, prefill) {
    state.template =
      state.templates.filter(function (tpl) {
        return tpl.code === code;
      })[0] || null;
    var keep = structuredValues();
    if (state.report && state.report.structured) keep = Object.assign({}, state.report.structured, keep);
    renderStructured(keep);
    if (prefill && state.template) {
      ["findings", "impression", "recommendation"].forEach(function (name) {
        var area = form.elements[name];
        if (!area.value.trim() && state.template[name]) area.value = state.template[name];
      });
    }
  }

  function formBody() {
    var grade = form.querySelector("input[name=quality_grade]:checked");
    return {
      template_code: form.elements.template_code.value || null,
      findings: form.elements.findings.value,
      impression: form.elements.impression.value,
      recommendation: form.elements.recommendation.value,
      structured: structuredValues(),
      quality_grade: grade ? grade.value : null,
      quality_reason: form.elements.quality_reason.value,
      critical: form.elements.critical.checked,
      key_images: state.keyImages.map(function (k) {
        return { sop_instance_uid: k.sop_instance_uid, frame: k.frame || 1 };
      }),
    };
  }

  function fillForm(report) {
    form.elements.template_code.value = report.template_code || "";
    state.template =
      state.templates.filter(function (tpl) {
        return tpl.code === report.template_code;
      })[0] || null;
    if (report.template_code && !state.template) {
      // A template that is no longer offered still shows its stored choice.
      $("template-select").appendChild(el("option", { value: report.template_code, text: report.template_code }));
      form.elements.template_code.value = report.template_code;
    }
    form.elements.findings.value = report.findings || "";
    form.elements.impression.value = report.impression || "";
    form.elements.recommendation.value = report.recommendation || "";
    form.querySelectorAll("input[name=quality_grade]").forEach(function (radio) {
      radio.checked = radio.value === report.quality_grade;
    });
    form.elements.quality_reason.value = report.quality_reason || "";
    form.elements.critical.checked = !!report.critical;
    state.keyImages = (report.key_images || []).map(function (k) {
      return { sop_instance_uid: k.sop_instance_uid, frame: k.frame || 1 };
    });
    renderStructured(report.structured || {});
    renderKeyImages();
    if (extension && extension.fill) extension.fill(report);
    if (!reading) renderReportView(report);
  }

  /** The report page shows the report as text, the way it was signed, not the edit form. */
  function renderReportView(report) {
    var view = $("report-view");
    if (!view) return;
    view.hidden = false;
    $("rv-findings").textContent = report.findings || t("common.none");
    $("rv-impression").textContent = report.impression || t("common.none");
    $("rv-recommendation").textContent = report.recommendation || "";
    $("rv-recommendation-head").hidden = !report.recommendation;
    $("rv-quality").textContent = report.quality_grade ? t("rp.quality") + ": " + t("quality." + report.quality_grade) : "";
    $("rv-critical").hidden = !report.critical;
  }

  function applyEditable() {
    var on = state.editable;
    form.classList.toggle("readonly", !on);
    form.querySelectorAll("textarea, input, select").forEach(function (field) {
      if (field.tagName === "TEXTAREA" || (field.tagName === "INPUT" && ["text", "number", "search"].indexOf(field.type) >= 0)) {
        field.readOnly = !on;
      } else {
        field.disabled = !on;
      }
    });
    var rescan = $("rescan");
    if (rescan) rescan.hidden = !on;
    if (extension && extension.editable) extension.editable(on);
    renderButtons();
    renderKeyImages();
  }

  function setEditable(on) {
    state.editable = !!on;
    applyEditable();
  }

  function renderButtons() {
    if (!reading) return;
    var report = state.report;
    var submit = $("submit-btn");
    submit.hidden = !state.editable || !!(report && report.status === "preliminary");
    submit.firstChild.textContent = (user.level === "resident" ? t("rp.submit_prelim") : t("rp.submit")) + " ";
    submit.disabled = state.busy;
    var verify = $("verify-btn");
    verify.hidden = !(
      report &&
      report.status === "preliminary" &&
      !report.locked &&
      canVerify &&
      report.author !== user.username
    );
    verify.disabled = state.busy;
    $("release-btn").hidden = !(state.lease && !state.closed);
  }

  function renderReport() {
    var report = state.viewing || state.report;
    var status = $("rp-status");
    status.className = "status-badge st-" + (report ? report.status : "none");
    status.textContent = report ? t("report_status." + report.status) : t("rp.none_yet");
    status.dataset.status = report ? report.status : "";
    $("rp-version").textContent = report && report.version ? t("rp.version", { n: report.version }) : "";
    var locked = !!(report && (report.locked || report.status === "final"));
    $("rp-locked").hidden = !locked;
    var notice = $("rp-notice");
    var noticeText = report ? report.notice || (report.status === "preliminary" ? t("rp.prelim_notice") : "") : "";
    notice.textContent = noticeText;
    notice.hidden = !noticeText;
    var signed = report && report.status !== "draft";
    $("rp-sign").hidden = !signed;
    if (signed) {
      $("rp-author").textContent = (report.author_name || report.author || "") + (report.author_level ? " (" + R.label("level", report.author_level) + ")" : "");
      $("rp-submitted").textContent = R.fmt(report.submitted_at);
      $("rp-verifier").textContent = report.verified_by_name || report.verified_by || t("common.none");
      $("rp-final").textContent = R.fmt(report.final_at);
    }
    renderButtons();
  }

  function setSaveState(text, error) {
    var node = $("save-state");
    if (!node) return;
    node.textContent = text;
    node.classList.toggle("error", !!error);
  }

  function doSave() {
    if (!state.editable || (!state.dirty && state.report)) return Promise.resolve(state.report);
    state.dirty = false;
    setSaveState(t("rp.saving"));
    return R.api("PUT", reportUrl, formBody()).then(
      function (report) {
        state.report = report;
        renderReport();
        setSaveState(t("rp.saved", { time: R.fmt(report.updated_at || new Date(), "time") }));
        return report;
      },
      function (err) {
        state.dirty = true;
        setSaveState(t("rp.save_failed", { detail: err.message }), true);
        if (err.status === 409) leaseLost();
        throw err;
      }
    );
  }

  /** Save now (after any save in flight); resolves to the saved report. */
  function save() {
    saveSoon.cancel();
    saveChain = saveChain.catch(function () {}).then(doSave);
    return saveChain;
  }
  var saveSoon = R.debounce(function () {
    save().catch(function () {});
  }, 1000);

  /** For a page extension: its own inputs changed the report (saved like a form edit). */
  window.RDCReading = {
    changed: function () {
      if (!state.editable) return;
      state.dirty = true;
      setSaveState(t("rp.unsaved"));
      saveSoon();
    },
    editable: function () {
      return state.editable;
    },
    exam: function () {
      return state.exam;
    },
  };

  function onEdit(event) {
    if (!state.editable) return;
    if (event.target === form.elements.template_code) chooseTemplate(event.target.value, true);
    state.dirty = true;
    setSaveState(t("rp.unsaved"));
    saveSoon();
  }
  form.addEventListener("input", onEdit);
  form.addEventListener("change", function (event) {
    if (event.target.type === "checkbox" || event.target.type === "radio" || event.target.tagName === "SELECT") onEdit(event);
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
  });

  function submit() {
    if (!state.editable || state.busy) return;
    var body = formBody();
    var problem = null;
    if (!body.findings.trim() && !body.impression.trim()) problem = "rp.need_text";
    else if (!body.quality_grade) problem = "rp.need_grade";
    else if ((body.quality_grade === "丙" || body.quality_grade === "废") && !body.quality_reason.trim()) {
      problem = "rp.need_grade_reason";
    }
    if (problem) {
      R.toast(t(problem), "error");
      return;
    }
    state.busy = true;
    state.dirty = true;
    renderButtons();
    save()
      .then(function (saved) {
        state.busy = false;
        renderReport();
        openSigning("submit", saved, function (password) {
          return R.api("POST", reportUrl + "/submit", { signing_password: password }).then(function (report) {
            state.report = report;
            state.closed = true;
            stopRenewing();
            setEditable(false);
            setLeaseText(t("ls.submitted"));
            R.toast(t("rp.submitted", { status: t("report_status." + report.status) }), "ok");
            refreshExam();
            afterSigning(report);
            renderReport();
          });
        });
      })
      .catch(function (err) {
        state.busy = false;
        renderReport();
        fail(err);
      });
  }

  function verify() {
    var report = state.report;
    if (!report || state.busy) return;
    state.busy = true;
    renderButtons();
    (state.dirty && state.editable ? save() : Promise.resolve(report))
      .then(function (saved) {
        state.busy = false;
        renderReport();
        var target = saved || report;
        openSigning("verify", target, function (password) {
          return R.api("POST", "/api/v1/reports/" + encodeURIComponent(target.id) + "/verify-by-senior", {
            signing_password: password,
          }).then(function (verified) {
            state.report = verified;
            state.closed = true;
            stopRenewing();
            setEditable(false);
            fillForm(verified);
            setLeaseText(t("rp.locked"));
            R.toast(t("rp.verified"), "ok");
            refreshExam();
            afterSigning(verified);
            renderReport();
          });
        });
      })
      .catch(function (err) {
        state.busy = false;
        renderReport();
        fail(err);
      });
  }

  // --- the signing dialog -------------------------------------------------------------------
  // Every signature (submit, verify, amend) goes through this dialog: it shows what is signed
  // and needs the signer's password. Keyboard shortcuts open it; only its Sign button signs.
  var signing = null;

  function openSigning(action, report, run, shown) {
    if (!report || $("sign-dialog").open) return;
    shown = shown || {};
    signing = { run: run };
    var exam = state.exam || {};
    var patient = exam.patient || {};
    $("sd-title").textContent = t("sd.title") + " · " + t("sd.action." + action);
    $("sd-patient").textContent = [R.personName(patient.name) || "", patient.patient_id || ""].filter(Boolean).join(" · ");
    $("sd-exam").textContent = [
      [exam.modality, exam.body_part, exam.description].filter(Boolean).join(" · "),
      exam.accession_number,
      exam.clinic_name || exam.clinic_code,
    ]
      .filter(Boolean)
      .join(" — ");
    var impression = shown.impression !== undefined ? shown.impression : report.impression;
    $("sd-impression").textContent = impression || t("common.none");
    var critical = shown.critical !== undefined ? shown.critical : report.critical;
    var crit = $("sd-critical");
    crit.textContent = critical ? t("sd.critical_yes") : t("sd.critical_no");
    crit.className = critical ? "sd-critical-yes" : "";
    $("sd-outcome").textContent = t("sd.loading");
    $("sd-hr").textContent = t("sd.loading");
    $("sd-error").hidden = true;
    $("sd-password").value = "";
    $("sd-sign").disabled = false;
    $("sign-dialog").showModal();
    $("sd-password").focus();
    R.api("GET", "/api/v1/reports/" + encodeURIComponent(report.id) + "/signing-preview" + R.query({ action: action })).then(
      function (preview) {
        var outcome = $("sd-outcome");
        outcome.textContent = t(preview.outcome === "final" ? "sd.final" : "sd.preliminary");
        outcome.dataset.outcome = preview.outcome;
        var rec = preview.recognition;
        var hr = $("sd-hr");
        if (!rec) hr.textContent = t("sd.hr_pending");
        else if (rec.granted) {
          hr.textContent = (rec.mark || "HR") + " · " + t("hr.until", { date: rec.recognizable_until || t("common.none") });
        } else {
          hr.textContent =
            t("hr.not") +
            ": " +
            (rec.reasons || [])
              .filter(function (reason) {
                return !reason.passed;
              })
              .map(function (reason) {
                return cfg.lang === "en" ? reason.text_en || reason.text : reason.text_zh || reason.text;
              })
              .join("; ");
        }
        hr.dataset.granted = rec ? String(!!rec.granted) : "";
      },
      function (err) {
        $("sd-outcome").textContent = t("err.failed", { detail: err.message });
        $("sd-hr").textContent = "";
      }
    );
  }

  function closeSigning() {
    signing = null;
    $("sd-password").value = "";
    if ($("sign-dialog").open) $("sign-dialog").close();
  }

  function sign(event) {
    event.preventDefault();
    if (!signing) return;
    var password = $("sd-password").value;
    var error = $("sd-error");
    if (!password) {
      error.textContent = t("sd.need_password");
      error.hidden = false;
      $("sd-password").focus();
      return;
    }
    var current = signing;
    $("sd-sign").disabled = true;
    state.busy = true;
    renderButtons();
    current
      .run(password)
      .then(
        function () {
          closeSigning();
        },
        function (err) {
          $("sd-password").value = "";
          if (err.status === 429) error.textContent = t("sd.locked", { n: (err.problem && err.problem.retry_after) || "" });
          else if (err.status === 403 && err.problem && err.problem.title === "Signature refused") error.textContent = t("sd.wrong");
          else error.textContent = t("err.failed", { detail: err.message });
          error.hidden = false;
          $("sd-password").focus();
        }
      )
      .then(function () {
        $("sd-sign").disabled = false;
        state.busy = false;
        renderReport();
      });
  }

  function submitOrSign() {
    if (!reading) return;
    if (!$("verify-btn").hidden) verify();
    else if (!$("submit-btn").hidden) submit();
  }

  function rescan() {
    var reason = $("rescan-reason").value.trim();
    if (!reason) {
      R.toast(t("rp.rescan_need_reason"), "error");
      $("rescan-reason").focus();
      return;
    }
    if (!window.confirm(t("rp.rescan_confirm"))) return;
    R.api("POST", examUrl + "/rescan", { reason: reason }).then(function (exam) {
      state.exam = Object.assign({}, state.exam, exam);
      renderExam(state.exam);
      state.closed = true;
      stopRenewing();
      setEditable(false);
      setLeaseText(t("rp.rescan_done"));
      R.toast(t("rp.rescan_done"), "ok");
    }, fail);
  }

  // --- key images -----------------------------------------------------------------------------
  function keyIndex(sop, frame) {
    for (var i = 0; i < state.keyImages.length; i++) {
      var k = state.keyImages[i];
      if (k.sop_instance_uid === sop && (k.frame || 1) === (frame || 1)) return i;
    }
    return -1;
  }

  /** `k`: mark or unmark the frame shown in the current exam's viewport as a key image. */
  function toggleKeyImage() {
    if (!reading || state.viewing) return;
    if (!state.editable) {
      R.toast(t("ki.locked"), "error");
      return;
    }
    if (active !== viewports.main) {
      R.toast(t("ki.current_only"), "error");
      return;
    }
    var entry = viewports.main.current();
    if (!entry) return;
    var i = keyIndex(entry.sop, entry.frame);
    if (i >= 0) state.keyImages.splice(i, 1);
    else if (state.keyImages.length >= MAX_KEY_IMAGES) {
      R.toast(t("ki.max", { n: MAX_KEY_IMAGES }), "error");
      return;
    } else state.keyImages.push({ sop_instance_uid: entry.sop, frame: entry.frame });
    R.toast(t(i >= 0 ? "ki.removed" : "ki.added"), "info");
    keyImagesChanged();
  }

  function keyImagesChanged() {
    state.dirty = true;
    setSaveState(t("rp.unsaved"));
    saveSoon();
    renderKeyImages();
  }

  function syncKeyToggle() {
    var entry = viewports.main.current();
    var on = !!(entry && keyIndex(entry.sop, entry.frame) >= 0);
    var button = $("key-toggle");
    if (!button) return;
    button.hidden = !reading || !isReader;
    button.disabled = !state.editable || active !== viewports.main;
    button.classList.toggle("on", on);
    button.setAttribute("aria-pressed", on ? "true" : "false");
    $("vp-key").hidden = !on;
  }

  /** Where a marked frame sits in the viewer: series number and position in its stack. */
  function keyPlace(mark) {
    var entry = viewports.main.find(mark.sop_instance_uid, mark.frame);
    if (!entry) return null;
    var series = viewports.main.series.filter(function (s) {
      return s.uid === entry.series;
    })[0];
    return {
      entry: entry,
      series: series && series.number !== null && series.number !== undefined ? series.number : "?",
      index: series ? series.stack.indexOf(entry) + 1 : entry.frame,
    };
  }

  function renderKeyImages() {
    var list = $("ki-list");
    if (!list) return;
    list.textContent = "";
    var removable = reading && state.editable && !state.viewing;
    state.keyImages.forEach(function (mark, i) {
      var place = keyPlace(mark);
      var text = place
        ? t("ki.label", { series: place.series, i: place.index })
        : mark.sop_instance_uid.slice(-12) + " #" + mark.frame;
      list.appendChild(
        el("li", { class: "ki-item", dataset: { sop: mark.sop_instance_uid, frame: mark.frame } }, [
          el(
            "button",
            {
              type: "button",
              class: "ki-thumb",
              title: t("ki.jump"),
              onclick: function () {
                if (viewports.main.goTo(mark.sop_instance_uid, mark.frame)) setActive(viewports.main);
                this.blur();
              },
            },
            [
              place
                ? el("img", { src: V.frameUrl(place.entry, null, 96), alt: text, loading: "lazy", draggable: "false" })
                : null,
              el("span", { class: "ki-label", text: text }),
            ]
          ),
          removable
            ? el("button", {
                type: "button",
                class: "ki-remove",
                title: t("ki.remove"),
                "aria-label": t("ki.remove"),
                text: "×",
                onclick: function () {
                  state.keyImages.splice(i, 1);
                  keyImagesChanged();
                },
              })
            : null,
        ])
      );
    });
    $("ki-empty").hidden = state.keyImages.length > 0;
    $("ki-empty").textContent = reading && state.editable ? t("ki.empty") : t("ki.none");
    $("ki-count").textContent = state.keyImages.length ? t("ki.count", { n: state.keyImages.length, max: MAX_KEY_IMAGES }) : "";
    syncKeyToggle();
  }

  // --- signature, recognition (HR), versions ------------------------------------------------
  function reportPath(id, action) {
    return "/api/v1/reports/" + encodeURIComponent(id) + (action ? "/" + action : "");
  }

  /** The bilingual "中文 / English" text of the page's language. */
  function inLang(text) {
    if (!text) return "";
    var halves = String(text).split(" / ");
    if (halves.length !== 2) return String(text);
    return cfg.lang === "en" ? halves[1] : halves[0];
  }

  function loadDetail(reportId) {
    return R.api("GET", reportPath(reportId)).then(
      function (detail) {
        state.detail = detail;
        renderDetail();
        return detail;
      },
      function (err) {
        if (err.status !== 404) fail(err);
        return null;
      }
    );
  }

  function renderDetail() {
    var d = state.detail;
    if (!d) return;
    renderSignature(d);
    renderRecognition(d.recognition);
    renderVersions(d);
    var old = $("old-version");
    old.hidden = !state.viewing;
    if (state.viewing) $("old-version-text").textContent = t("vs.viewing_old", { n: d.version });
    var reason = $("amend-reason");
    reason.hidden = !d.amendment_kind;
    if (d.amendment_kind) {
      reason.textContent = t("vs.amendment", {
        kind: t("am.kind." + d.amendment_kind),
        reason: d.amendment_reason || "",
      });
    }
    var amend = $("amend-btn");
    amend.hidden = !(
      isReader &&
      canVerify &&
      !clinicUser &&
      !state.viewing &&
      d.status === "final" &&
      d.id === d.current_id
    );
    if (!clinicUser && d.critical && d.status === "final") loadAlertStatus(d);
    else $("critical-sent").hidden = true;
  }

  function renderSignature(d) {
    var sig = d.signature;
    $("sig-panel").hidden = !sig;
    $("sig-result").hidden = true;
    if (!sig) return;
    var who = sig.signer_name && sig.signer_name !== sig.signer ? sig.signer_name + " (" + sig.signer + ")" : sig.signer;
    $("sig-signer").textContent = who + (sig.stage === "preliminary" ? " · " + t("sg.preliminary") : "");
    $("sig-time").textContent = R.fmt(sig.signed_at) + ":" + R.fmt(sig.signed_at, "time").slice(-2);
    $("sig-serial").textContent = sig.certificate_serial || t("common.none");
    $("sig-serial").title = sig.certificate_serial || "";
    $("sig-issuer").textContent = sig.certificate_issuer || t("common.none");
    $("sig-issuer").title = sig.certificate_issuer || "";
    $("sig-pdf").href = reportPath(d.id, "pdf");
    $("sig-verify").disabled = false;
  }

  function verifySignature() {
    var d = state.detail;
    if (!d) return;
    var box = $("sig-result");
    $("sig-verify").disabled = true;
    box.hidden = false;
    box.className = "sig-result";
    box.textContent = t("sg.verifying");
    R.api("GET", reportPath(d.id, "verify"))
      .then(function (result) {
        box.textContent = "";
        box.className = "sig-result " + (result.valid ? "ok" : "bad");
        box.dataset.valid = result.valid ? "true" : "false";
        box.appendChild(el("strong", { text: result.valid ? "✓ " + t("sg.valid") : "✗ " + t("sg.invalid") }));
        if (result.valid) box.appendChild(el("span", { text: " " + t("sg.valid_detail") }));
        var reasons = result.reasons || [];
        if (reasons.length) {
          box.appendChild(
            el(
              "ul",
              {},
              reasons.map(function (reason) {
                return el("li", { text: reason });
              })
            )
          );
        }
      }, function (err) {
        box.className = "sig-result bad";
        box.textContent = t("err.failed", { detail: err.message });
      })
      .then(function () {
        $("sig-verify").disabled = false;
      });
  }

  function renderRecognition(rec) {
    var panel = $("hr-panel");
    panel.hidden = !rec;
    if (!rec) return;
    panel.classList.toggle("granted", !!rec.granted);
    panel.classList.toggle("refused", !rec.granted);
    panel.dataset.granted = rec.granted ? "true" : "false";
    var mark = $("hr-mark");
    mark.textContent = rec.granted ? rec.mark || "HR" : "—";
    var item = cfg.lang === "en" ? rec.item_name_en || rec.item_name : rec.item_name;
    var reasons = $("hr-reasons");
    reasons.textContent = "";
    if (rec.granted) {
      $("hr-title").textContent = t("hr.granted") + (item ? " · " + item : "");
      $("hr-detail").textContent = "";
      $("hr-detail").appendChild(el("div", { text: inLang(rec.scope) || rec.scope_note || "" }));
      $("hr-detail").appendChild(
        el("div", { class: "hr-until", text: t("hr.until", { date: rec.recognizable_until || t("common.none") }) })
      );
    } else {
      $("hr-title").textContent = t("hr.not") + (item ? " · " + item : "");
      $("hr-detail").textContent = "";
      (rec.reasons || [])
        .filter(function (reason) {
          return !reason.passed;
        })
        .forEach(function (reason) {
          var text = cfg.lang === "en" ? reason.text_en || reason.text : reason.text_zh || reason.text;
          reasons.appendChild(el("li", { text: text }));
        });
    }
  }

  function renderVersions(d) {
    var list = $("version-list");
    list.textContent = "";
    var versions = (d.versions || []).slice().reverse(); // newest first
    $("versions").hidden = !versions.length;
    versions.forEach(function (v) {
      var bits = [
        el("strong", { text: t("rp.version", { n: v.version }) }),
        R.reportBadge(v.status),
        v.kind ? el("span", { class: "vs-kind", text: t("am.kind." + v.kind) }) : null,
        el("span", { class: "muted num", text: v.final_at ? R.fmt(v.final_at) : "" }),
        v.current ? el("span", { class: "vs-current", text: t("vs.current") }) : null,
      ];
      var shown = v.id === d.id;
      list.appendChild(
        el(
          "li",
          {
            class: "version" + (shown ? " shown" : "") + (v.current ? " current" : ""),
            dataset: { version: v.version, reportId: v.id, current: v.current ? "true" : "false" },
          },
          [
            shown
              ? el("div", { class: "vs-line" }, bits)
              : el(
                  "button",
                  {
                    type: "button",
                    class: "vs-line btn-link",
                    title: t("vs.show"),
                    onclick: function () {
                      showVersion(v.id);
                    },
                  },
                  bits
                ),
            v.reason ? el("div", { class: "muted vs-reason", text: v.reason }) : null,
          ]
        )
      );
    });
  }

  /** Show one version of the report (older ones read-only); the current one is the default. */
  function showVersion(id) {
    if (state.editable) return;
    R.api("GET", reportPath(id)).then(function (detail) {
      state.detail = detail;
      state.viewing = detail.id === detail.current_id ? null : detail;
      if (!state.viewing && state.report && state.report.id !== detail.id) state.report = detail;
      fillForm(detail);
      renderReport();
      renderDetail();
      renderKeyImages();
    }, fail);
  }

  /** After signing: the signature, HR and versions; a critical report says its alert went out. */
  function afterSigning(report) {
    state.viewing = null;
    loadDetail(report.id);
    if (report.status === "final" && report.critical) R.toast(t("cv.sent"), "ok");
  }

  /** For lead staff: the critical-value alert of this report version, sent and (maybe) read back. */
  function loadAlertStatus(d) {
    var box = $("critical-sent");
    box.hidden = false;
    box.className = "critical-sent";
    box.textContent = t("cv.sent");
    var clinic = state.exam && state.exam.clinic_code;
    R.api("GET", "/api/v1/critical-alerts" + R.query({ clinic: clinic, limit: 100 })).then(function (page) {
      var alert = (page.items || []).filter(function (a) {
        return a.report_id === d.id;
      })[0];
      if (!alert) return;
      box.dataset.state = alert.state;
      if (alert.state === "acknowledged") {
        box.classList.add("acked");
        var who = (alert.acknowledged_by && alert.acknowledged_by.name) || alert.receiver_name || "";
        box.textContent = t("cv.sent_acked", { who: who, time: R.fmt(alert.acknowledged_at) });
      } else {
        box.textContent = t("cv.sent_open", {
          clinic: alert.clinic_name || alert.clinic_code,
          time: R.fmt(alert.notified_at || alert.raised_at),
        });
      }
    }, function () {});
  }

  // --- amend (a new signed version) -----------------------------------------------------------
  var amendPrefill = null;
  function amendFields() {
    return { findings: $("amend-findings"), impression: $("amend-impression"), recommendation: $("amend-recommendation") };
  }

  function openAmend() {
    var report = state.report;
    if (!report) return;
    var f = $("amend-form");
    f.reset();
    amendPrefill = {
      findings: report.findings || "",
      impression: report.impression || "",
      recommendation: report.recommendation || "",
    };
    var fields = amendFields();
    Object.keys(fields).forEach(function (name) {
      fields[name].value = amendPrefill[name];
    });
    $("amend-critical").checked = !!report.critical;
    $("amend-error").hidden = true;
    amendKindChanged();
    $("amend-dialog").showModal();
    $("amend-reason-input").focus();
  }

  function closeAmend() {
    $("amend-dialog").close();
  }

  function amendKind() {
    var checked = $("amend-form").querySelector("input[name=kind]:checked");
    return checked ? checked.value : "amended";
  }

  /** An addendum only adds text: its fields start empty; the others start from the report. */
  function amendKindChanged() {
    var appended = amendKind() === "appended";
    var fields = amendFields();
    Object.keys(fields).forEach(function (name) {
      var area = fields[name];
      if (appended && area.value === amendPrefill[name]) area.value = "";
      if (!appended && !area.value) area.value = amendPrefill[name];
      area.placeholder = appended ? t("am.append_placeholder") : "";
    });
    $("amend-hint").textContent = t("am.hint." + amendKind());
  }

  function submitAmend(event) {
    event.preventDefault();
    var report = state.report;
    var error = $("amend-error");
    var kind = amendKind();
    var reason = $("amend-reason-input").value.trim();
    var body = { kind: kind, reason: reason };
    var fields = amendFields();
    var changed = false;
    Object.keys(fields).forEach(function (name) {
      var value = fields[name].value;
      if (kind === "appended" ? value.trim() : value !== amendPrefill[name]) {
        body[name] = value;
        changed = true;
      }
    });
    if ($("amend-critical").checked !== !!report.critical) {
      body.critical = $("amend-critical").checked;
      changed = true;
    }
    var problem = !reason ? "am.need_reason" : !changed ? "am.need_change" : null;
    if (problem) {
      error.textContent = t(problem);
      error.hidden = false;
      return;
    }
    var shown = {
      impression: body.impression === undefined ? report.impression : kind === "appended" ? report.impression + "\n" + body.impression : body.impression,
      critical: body.critical === undefined ? report.critical : body.critical,
    };
    error.hidden = true;
    openSigning(
      "amend",
      report,
      function (password) {
        return R.api("POST", reportPath(report.id, "amend"), Object.assign({}, body, { signing_password: password })).then(
          function (amended) {
            closeAmend();
            state.report = amended;
            state.viewing = null;
            fillForm(amended);
            renderReport();
            R.toast(t("am.done", { n: amended.version }), "ok");
            loadDetail(amended.id);
            if (amended.critical) R.toast(t("cv.sent"), "ok");
          }
        );
      },
      shown
    );
  }

  // --- lease (R.workItemLease) ------------------------------------------------------------
  var lease = R.workItemLease(state, {
    itemId: function () {
      return state.exam.work_item_id;
    },
    onLease: function () {
      var report = state.report;
      // A senior holding a preliminary report may correct it before verifying.
      setEditable(
        !report ||
          (!report.locked && (report.status === "draft" || (report.status === "preliminary" && canVerify)))
      );
      renderButtons();
    },
    onLost: function () {
      setEditable(false);
    },
  });
  var setLeaseText = lease.setText;
  var workItemPath = lease.path;
  var stopRenewing = lease.stop;
  var leaseLost = lease.lost;

  function showTaken(err) {
    var holder = err && err.problem && err.problem.claimed_by;
    function show(name) {
      setLeaseText(name ? t("ls.taken", { user: name }) : t("ls.readonly"), "taken");
    }
    if (holder) return show(holder);
    show(null);
    R.api("GET", "/api/v1/worklist?limit=500").then(function (page) {
      (page.items || []).forEach(function (item) {
        if (item.id === state.exam.work_item_id && item.claimed_by) show(item.claimed_by);
      });
    }, function () {});
  }

  function claimOnOpen() {
    var report = state.report;
    var itemId = state.exam.work_item_id;
    if (report && (report.locked || report.status === "final")) {
      setLeaseText(t("rp.locked"), "locked");
      return;
    }
    if (!isReader || !itemId || (report && report.status === "preliminary" && !canVerify)) {
      setLeaseText(t("ls.readonly"));
      return;
    }
    lease.claim(showTaken);
  }

  function release() {
    var done = function () {
      return lease.release().then(function () {
        setEditable(false);
        location.href = cfg.home || "/ui/worklist";
      }, fail);
    };
    (state.dirty ? save() : Promise.resolve()).then(done, done);
  }

  function next() {
    if (!isReader) return;
    // Claim the next exam first (this one, still mine, is not a candidate), then give this
    // one back to the queue unless it is done; its draft is kept.
    var go = function () {
      R.api("POST", "/api/v1/worklist/next").then(
        function (claimed) {
          var open = function () {
            location.href = "/ui/read/" + encodeURIComponent(claimed.exam_id);
          };
          if (!state.lease || state.closed || claimed.exam_id === examId) return open();
          state.closed = true;
          stopRenewing();
          R.api("POST", workItemPath("release")).then(open, open);
        },
        function (err) {
          if (err.status === 404) R.toast(t("wl.nothing_left"), "info");
          else fail(err);
        }
      );
    };
    (state.dirty && state.editable ? save() : Promise.resolve()).then(go, go);
  }

  // --- keyboard -----------------------------------------------------------------------------
  function toggleHelp(force) {
    var help = $("help");
    if (!help) return;
    help.hidden = force === undefined ? !help.hidden : !force;
  }

  document.addEventListener("keydown", function (event) {
    var key = event.key;
    if ((event.ctrlKey || event.metaKey) && key === "Enter") {
      event.preventDefault();
      submitOrSign();
      return;
    }
    if (R.typingIn(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    var handled = true;
    if ($("help") && !$("help").hidden && (key === "Escape" || key === "?")) toggleHelp(false);
    else if (key === "?") toggleHelp(true);
    else if (key === "Escape") toggleHeader(false);
    else if (key === "n") next();
    else if (key === "s") submitOrSign();
    else if (Object.prototype.hasOwnProperty.call(PRESET_KEYS, key)) preset(PRESET_KEYS[key]);
    else if (key === "ArrowDown" || key === "ArrowRight") active.step(1);
    else if (key === "ArrowUp" || key === "ArrowLeft") active.step(-1);
    else if (key === "PageDown") active.step(10);
    else if (key === "PageUp") active.step(-10);
    else if (key === "Home") active.first();
    else if (key === "End") active.last();
    else if (key === " ") toggleCine();
    else if (key === "k" || key === "K") toggleKeyImage();
    else handled = false;
    if (handled) event.preventDefault();
  });

  // --- toolbar and buttons ------------------------------------------------------------------
  document.querySelectorAll("[data-preset]").forEach(function (button) {
    button.addEventListener("click", function () {
      preset(button.dataset.preset);
      button.blur();
    });
  });
  document.querySelectorAll("[data-tool]").forEach(function (button) {
    button.addEventListener("click", function () {
      viewports.main.tool = viewports.prior.tool = button.dataset.tool;
      syncToolbar();
      button.blur();
    });
  });
  function onClick(id, fn) {
    var node = $(id);
    if (node)
      node.addEventListener("click", function () {
        fn();
        if (node.tagName === "BUTTON") node.blur();
      });
  }
  onClick("zoom-in", function () {
    active.setZoom(active.zoom * 1.25);
  });
  onClick("zoom-out", function () {
    active.setZoom(active.zoom / 1.25);
  });
  onClick("view-reset", function () {
    active.resetView();
  });
  onClick("cine", toggleCine);
  onClick("header-toggle", function () {
    toggleHeader();
  });
  onClick("help-toggle", function () {
    toggleHelp();
  });
  onClick("help-close", function () {
    toggleHelp(false);
  });
  onClick("prior-close", function () {
    $("prior-select").value = "";
    showPrior("");
  });
  onClick("submit-btn", submit);
  onClick("verify-btn", verify);
  if ($("sign-form")) {
    $("sign-form").addEventListener("submit", sign);
    $("sd-password").addEventListener("input", function () {
      $("sd-error").hidden = true;
    });
    onClick("sd-cancel", closeSigning);
    $("sign-dialog").addEventListener("close", function () {
      signing = null;
      $("sd-password").value = "";
    });
  }
  onClick("release-btn", release);
  onClick("rescan-btn", rescan);
  onClick("key-toggle", toggleKeyImage);
  onClick("sig-verify", verifySignature);
  onClick("amend-btn", openAmend);
  onClick("amend-cancel", closeAmend);
  onClick("back-to-current", function () {
    if (state.detail) showVersion(state.detail.current_id);
  });
  $("amend-form").addEventListener("submit", submitAmend);
  $("amend-form").addEventListener("input", function () {
    $("amend-error").hidden = true;
  });
  $("amend-form").addEventListener("change", function (event) {
    if (event.target.name === "kind") amendKindChanged();
  });
  onClick("print-btn", function () {
    // Print the signed PDF (what the clinic files), not the web page.
    var pdf = $("sig-pdf").getAttribute("href");
    if (!pdf || pdf === "#") {
      window.print();
      return;
    }
    var frame = $("print-frame");
    if (frame) frame.remove();
    frame = el("iframe", { id: "print-frame", class: "print-frame", src: pdf, title: "PDF" });
    frame.addEventListener("load", function () {
      try {
        frame.contentWindow.focus();
        frame.contentWindow.print();
      } catch (e) {
        window.open(pdf, "_blank", "noopener");
      }
    });
    document.body.appendChild(frame);
  });
  if (imaging) {
    $("fps").addEventListener("change", function () {
      if (active.playing()) active.play(parseInt($("fps").value, 10) || 8);
    });
    $("prior-select").addEventListener("change", function () {
      showPrior(this.value);
      this.blur();
    });
    $("header-filter").addEventListener("input", filterHeader);
  }
  if ($("help"))
    $("help").addEventListener("click", function (event) {
      if (event.target === this) toggleHelp(false);
    });
  window.addEventListener("beforeunload", function () {
    if (state.dirty && state.editable) {
      R.api("PUT", reportUrl, formBody(), { keepalive: true }).catch(function () {});
    }
  });

  // --- start --------------------------------------------------------------------------------
  function optional(promise) {
    return promise.then(
      function (value) {
        return value;
      },
      function (err) {
        if (err.status === 404) return null;
        throw err;
      }
    );
  }

  function start() {
    setEditable(false);
    renderReport();
    R.api("GET", examUrl)
      .then(function (exam) {
        state.exam = exam;
        renderExam(exam);
        viewports.main.load(exam);
        renderSeriesList(viewports.main);
        syncToolbar();
        loadPriors();
        var templates = R.api(
          "GET",
          "/api/v1/report-templates" + R.query({ modality: exam.modality, body_part: exam.body_part })
        ).catch(function () {
          return [];
        });
        // No report yet: nothing to ask for (a 404 per exam only fills the console).
        var report = exam.report_status ? optional(R.api("GET", reportUrl)) : Promise.resolve(null);
        return Promise.all([report, templates]);
      })
      .then(function (results) {
        state.report = results[0];
        state.templates = Array.isArray(results[1]) ? results[1] : [];
        renderTemplates();
        if (state.report) fillForm(state.report);
        else renderStructured({});
        renderReport();
        renderKeyImages();
        if (reading) claimOnOpen();
        if (state.report && state.report.status !== "draft") loadDetail(state.report.id);
      })
      .catch(function (err) {
        fail(err);
        setLeaseText(t("err.failed", { detail: err.message }), "lost");
      });
  }
  if (clinicUser) R.criticalAlerts($("critical-alerts"), {});
  start();
})();

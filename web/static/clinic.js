/* Clinic view: the organisation's own exams (the API scopes them) and their reports. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var PAGE = 50;
  var REFRESH_MS = 30000;
  var form = document.getElementById("filters");
  var body = document.getElementById("exams-body");
  var message = document.getElementById("message");
  var paging = null; // set by R.pager below, before the first load
  var total = 0;
  var timer = null;

  function params() {
    return {
      modality: form.elements.modality.value,
      priority: form.elements.priority.value,
      limit: PAGE,
      offset: paging.offset,
    };
  }

  var latest = 0;
  function load() {
    clearTimeout(timer);
    var seq = ++latest;
    R.api("GET", "/api/v1/exams" + R.query(params()))
      .then(function (page) {
        if (seq !== latest) return; // a newer request (other filters or page) is on its way
        total = page.total || 0;
        render(page.items || []);
        message.hidden = true;
        document.getElementById("updated").textContent = t("common.updated", {
          time: R.fmt(new Date(), "time"),
        });
      })
      .catch(function (err) {
        message.textContent = t("err.failed", { detail: err.message });
        message.hidden = false;
      })
      .then(function () {
        if (seq === latest) timer = setTimeout(load, REFRESH_MS);
      });
  }

  function render(exams) {
    body.textContent = "";
    if (!exams.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 10, text: t("cl.empty") })]));
    }
    exams.forEach(function (exam) {
      var final = exam.report_status === "final";
      var reportUrl = "/ui/report/" + encodeURIComponent(exam.id);
      var patient = exam.patient || {};
      body.appendChild(
        el(
          "tr",
          {
            class: exam.state === "RESCAN_REQUESTED" ? "rescan-row" : "",
            dataset: { examId: exam.id, clinic: exam.clinic_code, priority: exam.priority },
          },
          [
            el("td", {}, [R.priorityBadge(exam.priority)]),
            el("td", { class: "num", text: R.fmt(exam.first_received_at) }),
            el("td", { class: "patient" }, [
              el("strong", { text: R.personName(patient.name) || patient.patient_id }),
              el("span", { class: "muted pid", text: patient.patient_id }),
            ]),
            el("td", { class: "num", text: exam.accession_number || t("common.none") }),
            el("td", { class: "clinic", text: exam.clinic_code }),
            el("td", {}, [
              el("span", { class: "modality", text: exam.modality }),
              " ",
              el("span", { class: "muted", text: exam.body_part || "" }),
            ]),
            el("td", { class: "desc", text: exam.description || "", title: exam.description || "" }),
            el("td", { class: "state", text: R.label("exam_state", exam.state) }),
            el("td", {}, [R.reportBadge(exam.report_status)]),
            el("td", { class: "actions" }, [
              final
                ? el("a", { class: "btn small primary", href: reportUrl, text: t("cl.view_report") })
                : el("span", { class: "muted", text: t("cl.pending") }),
            ]),
          ]
        )
      );
    });
    paging.show(total);
  }

  paging = R.pager(form, PAGE, load);
  load();

  // The clinic's open critical values, on top of everything, until read back.
  var user = R.config.user || {};
  if (user.org_kind === "clinic") {
    R.criticalAlerts(document.getElementById("critical-alerts"), { linkExams: true });
  }
})();

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

  // One dialog for the clinic's answers: mark urgency, or decline a re-scan request.
  var dialog = document.getElementById("answer-dialog");
  var answerForm = document.getElementById("answer-form");
  var answerError = document.getElementById("answer-error");
  var pending = null; // {kind: "priority"|"decline", exam}

  function openAnswer(kind, exam) {
    pending = { kind: kind, exam: exam };
    var priority = kind === "priority";
    document.getElementById("answer-title").textContent = t(priority ? "cl.priority_title" : "cl.decline_title");
    document.getElementById("answer-hint").textContent = t(priority ? "cl.priority_hint" : "cl.decline_hint");
    document.getElementById("answer-priority").hidden = !priority;
    document.getElementById("answer-priority-label").hidden = !priority;
    answerForm.elements.priority.value = exam.priority;
    answerForm.elements.reason.value = "";
    answerError.hidden = true;
    dialog.showModal();
    answerForm.elements[priority ? "priority" : "reason"].focus();
  }

  document.getElementById("answer-cancel").addEventListener("click", function () {
    dialog.close();
  });
  answerForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var reason = answerForm.elements.reason.value.trim();
    if (!reason) {
      answerError.textContent = t("cl.need_reason");
      answerError.hidden = false;
      answerForm.elements.reason.focus();
      return;
    }
    var exam = pending.exam;
    var path = "/api/v1/exams/" + encodeURIComponent(exam.id);
    var call =
      pending.kind === "priority"
        ? R.api("POST", path + "/priority", { priority: answerForm.elements.priority.value, reason: reason })
        : R.api("POST", path + "/rescan/decline", { reason: reason });
    var done = pending.kind === "priority" ? "cl.priority_done" : "cl.decline_done";
    document.getElementById("answer-submit").disabled = true;
    call
      .then(function () {
        dialog.close();
        R.toast(t(done), "ok");
        load();
        if (R.notifications) R.notifications.reload();
      })
      .catch(function (err) {
        answerError.textContent = t("err.failed", { detail: err.message });
        answerError.hidden = false;
      })
      .then(function () {
        document.getElementById("answer-submit").disabled = false;
      });
  });

  var OPEN = { RECEIVING: true, READY: true, RESCAN_REQUESTED: true };

  function priorityCell(exam) {
    var kids = [R.priorityBadge(exam.priority)];
    if (exam.priority_reason) {
      kids[0].title = t("cl.priority_reason", { reason: exam.priority_reason });
    }
    if (R.config.canSetPriority && OPEN[exam.state]) {
      kids.push(
        " ",
        el("button", {
          type: "button",
          class: "btn-link small set-priority",
          text: t("cl.set_priority"),
          onclick: function () {
            openAnswer("priority", exam);
          },
        })
      );
    }
    return el("td", { class: "prio" }, kids);
  }

  function stateCell(exam) {
    var kids = [el("span", { text: R.label("exam_state", exam.state) })];
    if (exam.state === "RESCAN_REQUESTED") {
      kids.push(
        el("div", { class: "rescan-reason", text: t("cl.rescan_reason", { reason: exam.rescan_reason || "" }) }),
        el("div", {
          class: "muted rescan-by",
          text: t("cl.rescan_by", {
            who: exam.rescan_requested_by || t("common.none"),
            time: R.fmt(exam.rescan_requested_at),
          }),
        }),
        el("div", { class: "muted rescan-answer", text: t("cl.rescan_answer") })
      );
    } else if (exam.rescan_declined_at) {
      kids.push(
        el("div", { class: "muted rescan-declined", text: t("cl.declined", { reason: exam.rescan_decline_reason || "" }) })
      );
    }
    return el("td", { class: "state" }, kids);
  }

  function actionCell(exam) {
    var final = exam.report_status === "final";
    var reportUrl = "/ui/report/" + encodeURIComponent(exam.id);
    if (final) return el("td", { class: "actions" }, [el("a", { class: "btn small primary", href: reportUrl, text: t("cl.view_report") })]);
    if (exam.state === "RESCAN_REQUESTED" && R.config.canAnswerRescan) {
      return el("td", { class: "actions" }, [
        el("button", {
          type: "button",
          class: "btn small decline-rescan",
          text: t("cl.decline"),
          onclick: function () {
            openAnswer("decline", exam);
          },
        }),
      ]);
    }
    return el("td", { class: "actions" }, [el("span", { class: "muted", text: t("cl.pending") })]);
  }

  function render(exams) {
    body.textContent = "";
    if (!exams.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 11, text: t("cl.empty") })]));
    }
    exams.forEach(function (exam) {
      var patient = exam.patient || {};
      body.appendChild(
        el(
          "tr",
          {
            class: exam.state === "RESCAN_REQUESTED" ? "rescan-row" : "",
            dataset: { examId: exam.id, clinic: exam.clinic_code, priority: exam.priority, state: exam.state },
          },
          [
            priorityCell(exam),
            el("td", { class: "num", text: R.fmt(exam.first_received_at) }),
            el("td", { class: "patient" }, [
              el("strong", { text: R.personName(patient.name) || patient.patient_id }),
              el("span", { class: "muted pid", text: patient.patient_id, title: patient.patient_id }),
            ]),
            el("td", { class: "num", text: exam.accession_number || t("common.none") }),
            el("td", { class: "clinic", text: exam.clinic_code }),
            el("td", {}, [
              el("span", { class: "modality", text: exam.modality }),
              " ",
              el("span", { class: "muted", text: exam.body_part || "" }),
            ]),
            el("td", { class: "desc", text: exam.description || "", title: exam.description || "" }),
            el("td", { class: "num images", text: String(exam.instance_count) }),
            stateCell(exam),
            el("td", {}, [R.reportBadge(exam.report_status)]),
            actionCell(exam),
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

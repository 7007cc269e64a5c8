/* Recognised results: a patient's results still valid today, from any institution of the
   alliance (GET /api/v1/recognized-results), and a clinician's decline of one with a
   standard reason and the patient told (POST .../decline). */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var form = document.getElementById("lookup");
  var body = document.getElementById("results-body");
  var message = document.getElementById("message");
  var dialog = document.getElementById("decline-dialog");
  var declineForm = document.getElementById("decline-form");
  var declineError = document.getElementById("decline-error");
  var canDecline = !!R.config.canDecline;
  var current = null;
  var declined = {}; // decision id -> true, declined on this page

  function itemName(r) {
    return (R.config.lang === "en" ? r.item_name_en : r.item_name) || r.item_name || r.item_code;
  }

  function render(results) {
    body.textContent = "";
    if (!results.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 7, text: t("hr.none") })]));
      return;
    }
    results.forEach(function (r) {
      var action = declined[r.decision_id]
        ? el("span", { class: "muted declined", text: t("hr.declined") })
        : canDecline
          ? el("button", {
              type: "button",
              class: "btn small decline",
              text: t("hr.decline"),
              onclick: function () {
                openDecline(r);
              },
            })
          : el("span", { class: "muted", text: t("common.none") });
      body.appendChild(
        el("tr", { class: "result-row", dataset: { decisionId: r.decision_id } }, [
          el("td", {}, [el("strong", { text: itemName(r) }), el("span", { class: "muted", text: " " + r.item_code })]),
          el("td", {}, [el("span", { class: "badge hr-mark", text: r.mark || "HR", title: r.scope_note || "" })]),
          el("td", { class: "num", text: r.exam_date }),
          el("td", { class: "num until", text: r.recognizable_until || t("common.none") }),
          el("td", { text: (r.institution && r.institution.name) || "" }),
          el("td", {}, [
            el("span", { class: "modality", text: r.modality }),
            " ",
            el("span", { class: "muted", text: r.body_part || "" }),
            " ",
            el("span", { class: "muted", text: t("rp.version", { n: r.report_version }) }),
          ]),
          el("td", { class: "actions" }, [action]),
        ])
      );
    });
  }

  function search() {
    var params = { patient_id: form.elements.patient_id.value.trim() };
    if (!params.patient_id) return;
    if (form.elements.issuer.value.trim()) params.issuer = form.elements.issuer.value.trim();
    R.api("GET", "/api/v1/recognized-results" + R.query(params))
      .then(function (page) {
        message.hidden = true;
        render(page.results || []);
      })
      .catch(function (err) {
        message.textContent = t("err.failed", { detail: err.message });
        message.hidden = false;
      });
  }

  function openDecline(r) {
    current = r;
    document.getElementById("decline-what").textContent =
      itemName(r) + " · " + r.exam_date + " · " + ((r.institution && r.institution.name) || "");
    declineForm.elements.note.value = "";
    declineForm.elements.patient_informed.checked = false;
    declineError.hidden = true;
    dialog.showModal();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    search();
  });
  document.getElementById("decline-cancel").addEventListener("click", function () {
    dialog.close();
  });
  declineForm.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!declineForm.elements.patient_informed.checked) {
      declineError.textContent = t("hr.need_informed");
      declineError.hidden = false;
      return;
    }
    var decisionId = current.decision_id;
    R.api("POST", "/api/v1/recognized-results/" + encodeURIComponent(decisionId) + "/decline", {
      reason: declineForm.elements.reason.value,
      note: declineForm.elements.note.value.trim(),
      patient_informed: true,
    })
      .then(function () {
        declined[decisionId] = true;
        dialog.close();
        R.toast(t("hr.decline_done"), "ok");
        search();
      })
      .catch(function (err) {
        declineError.textContent = t("err.failed", { detail: err.message });
        declineError.hidden = false;
      });
  });

  if (canDecline) {
    R.api("GET", "/api/v1/recognition/decline-reasons").then(function (reasons) {
      var select = declineForm.elements.reason;
      reasons.forEach(function (r) {
        select.appendChild(el("option", { value: r.code, text: R.config.lang === "en" ? r.label_en : r.label_zh }));
      });
    });
  }
  var user = R.config.user || {};
  if (user.org_kind === "clinic") {
    R.criticalAlerts(document.getElementById("critical-alerts"), { linkExams: true });
  }
})();

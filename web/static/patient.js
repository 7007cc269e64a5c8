/* Patient page: one person of the alliance patient index, every linked clinic identifier
   (national ID masked by the API) and the exams the caller may see across clinics. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var personId = R.config.personId;
  var clinicUser = !!R.config.clinicUser;
  var message = document.getElementById("message");

  function cell(text) {
    return el("td", { text: text || t("common.none") });
  }

  function identifierRow(item) {
    return el("tr", { class: "identifier-row", dataset: { clinic: item.clinic_code } }, [
      cell(item.clinic_code + " · " + item.clinic_name),
      el("td", { class: "identifier", text: item.issuer + "|" + item.patient_id }),
      cell(R.personName(item.name)),
      cell([R.dicomDate(item.birth_date || ""), item.sex].filter(Boolean).join(" · ")),
      el("td", { class: "national-id", text: item.national_id || t("common.none") }),
      cell(R.label("pp.source", item.source) + " · " + R.fmt(item.linked_at)),
    ]);
  }

  function examRow(exam) {
    var link = clinicUser ? "/ui/report/" : "/ui/read/";
    return el("tr", { class: "exam-row", dataset: { examId: exam.id } }, [
      cell(R.fmt(exam.performed_at || exam.first_received_at)),
      cell(exam.clinic_code),
      cell(exam.identifier),
      cell(R.label("discipline", exam.discipline)),
      el("td", {}, [
        el("a", {
          href: link + encodeURIComponent(exam.id),
          text: [exam.modalities || exam.modality, exam.body_part, exam.description]
            .filter(Boolean)
            .join(" · "),
        }),
      ]),
      cell(R.label("exam_state", exam.state)),
    ]);
  }

  function fill(id, rows, empty) {
    var body = document.getElementById(id);
    body.textContent = "";
    if (!rows.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: "6", text: empty })]));
      return;
    }
    rows.forEach(function (row) {
      body.appendChild(row);
    });
  }

  var url = personId
    ? "/api/v1/patients/" + encodeURIComponent(personId)
    : "/api/v1/patients" + R.query({ identifier: R.config.identifier });
  R.api("GET", url)
    .then(function (person) {
      document.getElementById("national-id").textContent = person.national_id || t("common.none");
      fill("identifiers-body", person.identifiers.map(identifierRow), t("common.none"));
      fill("exams-body", person.exams.map(examRow), t("pp.no_exams"));
    })
    .catch(function (err) {
      message.textContent = err.status === 404 ? t("pp.not_found") : t("err.failed", { detail: err.message });
      message.hidden = false;
      fill("identifiers-body", [], t("common.none"));
      fill("exams-body", [], t("common.none"));
    });
})();

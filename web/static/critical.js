/* Critical-value register (危急值登记): every alert with who/what/when on both sides. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var PAGE = 100;
  var REFRESH_MS = 30000;
  var form = document.getElementById("filters");
  var body = document.getElementById("alerts-body");
  var message = document.getElementById("message");
  var paging = null; // set by R.pager below, before the first load
  var total = 0;
  var timer = null;
  var latest = 0;

  function params() {
    return { state: form.elements.state.value, clinic: form.elements.clinic.value, limit: PAGE, offset: paging.offset };
  }

  function load() {
    clearTimeout(timer);
    var seq = ++latest;
    R.api("GET", "/api/v1/critical-alerts" + R.query(params()))
      .then(function (page) {
        if (seq !== latest) return;
        total = page.total || 0;
        render(page.items || []);
        message.hidden = true;
        document.getElementById("updated").textContent = t("common.updated", { time: R.fmt(new Date(), "time") });
      })
      .catch(function (err) {
        message.textContent = t("err.failed", { detail: err.message });
        message.hidden = false;
      })
      .then(function () {
        if (seq === latest) timer = setTimeout(load, REFRESH_MS);
      });
  }

  function person(p) {
    return p ? p.name + (p.name !== p.username ? " (" + p.username + ")" : "") : "";
  }

  function lines(parts) {
    return parts
      .filter(function (part) {
        return part !== null && part !== undefined && part !== "";
      })
      .map(function (part) {
        return typeof part === "string" ? el("div", { text: part }) : part;
      });
  }

  function recipient(r) {
    if (r.name) return r.name + (r.phone ? " " + r.phone : "");
    if (r.username) return r.username;
    return R.label("cr.role", r.role) + (r.org ? " " + r.org : "");
  }

  function inTime(value) {
    if (value === true) return el("span", { class: "yes", text: t("common.yes") });
    if (value === false) return el("span", { class: "no", text: t("common.no") });
    return el("span", { class: "muted", text: t("cr.pending") });
  }

  /** Lead staff record an acknowledgement the clinic gave by telephone (who answered, read-back). */
  function phoneForm(a) {
    var readBack = el("textarea", { name: "read_back", rows: 2, maxlength: 4000, placeholder: t("cv.read_back"), "aria-label": t("cv.read_back") });
    var receiver = el("input", { type: "text", name: "receiver_name", maxlength: 200, placeholder: t("cv.receiver"), "aria-label": t("cv.receiver") });
    var error = el("div", { class: "error-text", hidden: true });
    return el("details", { class: "phone-ack" }, [
      el("summary", { text: t("cr.phone") }),
      el(
        "form",
        {
          autocomplete: "off",
          onsubmit: function (event) {
            event.preventDefault();
            if (!readBack.value.trim() || !receiver.value.trim()) {
              error.textContent = t("cr.phone_need");
              error.hidden = false;
              return;
            }
            R.api("POST", "/api/v1/critical-alerts/" + encodeURIComponent(a.id) + "/acknowledge", {
              read_back: readBack.value.trim(),
              receiver_name: receiver.value.trim(),
              via: "phone",
            }).then(function () {
              R.toast(t("cv.acknowledged"), "ok");
              load();
            }, function (err) {
              error.textContent = t("err.failed", { detail: err.message });
              error.hidden = false;
            });
          },
        },
        [readBack, receiver, el("button", { type: "submit", class: "btn small", text: t("cr.phone_save") }), error]
      ),
    ]);
  }

  function render(alerts) {
    body.textContent = "";
    if (!alerts.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 12, text: t("cr.empty") })]));
    }
    alerts.forEach(function (a) {
      var patient = a.patient || {};
      var exam = a.exam || {};
      var acked = a.state === "acknowledged";
      var ackBy = acked
        ? lines([
            a.acknowledged_by ? person(a.acknowledged_by) : null,
            a.receiver_name ? t("cr.receiver", { name: a.receiver_name }) : null,
            a.via ? t("cr.via." + a.via) : null,
            a.recorded_by ? t("cr.recorded_by", { name: person(a.recorded_by) }) : null,
            el("div", { class: "num muted", text: R.fmt(a.acknowledged_at) }),
          ])
        : [
            el("span", { class: "muted", text: t("common.none") }),
            a.state === "open" ? phoneForm(a) : null,
          ];
      body.appendChild(
        el(
          "tr",
          {
            class: (acked ? "acked" : "open") + (a.escalated ? " escalated" : "") + (a.within_deadline === false ? " late" : ""),
            dataset: { alertId: a.id, state: a.state, clinic: a.clinic_code },
          },
          [
            el("td", { class: "num" }, lines([R.fmt(a.raised_at), el("div", { class: "muted", text: person(a.raised_by) })])),
            el("td", { class: "clinic", title: a.clinic_name, text: a.clinic_code }),
            el("td", { class: "patient" }, [
              el("strong", { text: R.personName(patient.name) || patient.patient_id }),
              el("span", { class: "muted pid", text: patient.patient_id }),
              el("div", { class: "muted", text: [exam.modality, exam.description].filter(Boolean).join(" · ") }),
            ]),
            el("td", { class: "finding" }, [
              el("a", { href: "/ui/report/" + encodeURIComponent(a.exam_id), text: a.finding, title: a.finding }),
            ]),
            el("td", { class: "num" }, lines([
              a.notified_at ? R.fmt(a.notified_at, "time") : t("common.none"),
              a.minutes_to_notify !== null && a.minutes_to_notify !== undefined ? t("cr.minutes", { m: a.minutes_to_notify }) : null,
            ])),
            el("td", { class: "num", text: R.fmt(a.deadline_at) }),
            el("td", {}, [
              el("span", { class: "cv-state st-" + a.state, text: t("cr.state." + a.state) }),
              a.escalated ? el("div", { class: "cv-escalated", text: t("cr.level", { n: a.escalation_level }) }) : null,
              a.superseded_by_version
                ? el("div", { class: "muted", text: t("cr.superseded_by", { n: a.superseded_by_version }) })
                : null,
            ]),
            el(
              "td",
              { class: "escalations" },
              a.escalations.length
                ? a.escalations.map(function (e) {
                    return el("div", {
                      text: t("cr.level", { n: e.level }) + " " + R.fmt(e.at, "time") + " → " + (e.to || []).map(recipient).join("、"),
                    });
                  })
                : [el("span", { class: "muted", text: t("common.none") })]
            ),
            el("td", { class: "ack-by" }, ackBy),
            el("td", { class: "read-back", text: a.read_back || t("common.none") }),
            el("td", {
              class: "num",
              text: a.minutes_to_acknowledge !== null && a.minutes_to_acknowledge !== undefined ? String(a.minutes_to_acknowledge) : t("common.none"),
            }),
            el("td", { class: "in-time" }, [inTime(a.within_deadline)]),
          ]
        )
      );
    });
    paging.show(total);
  }

  paging = R.pager(form, PAGE, load);
  load();
})();

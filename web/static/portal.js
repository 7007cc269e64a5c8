/* Report portal: the organisation's signed reports (the API scopes them), their versions,
   HR mark, delivery and receipt, downloads and the acknowledge button. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var PAGE = 50;
  var REFRESH_MS = 60000;
  var clinicUser = !!R.config.clinicUser;
  var COLS = clinicUser ? 9 : 10;
  var form = document.getElementById("filters");
  var body = document.getElementById("reports-body");
  var message = document.getElementById("message");
  var paging = null; // set by R.pager below, before the first load
  var total = 0;
  var timer = null;
  var latest = 0;

  function params() {
    return {
      status: form.elements.status.value,
      current_only: form.elements.all_versions.checked ? "false" : "true",
      limit: PAGE,
      offset: paging.offset,
    };
  }

  function load() {
    clearTimeout(timer);
    var seq = ++latest;
    R.api("GET", "/api/v1/reports" + R.query(params()))
      .then(function (page) {
        if (seq !== latest) return; // a newer request is on its way
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

  function links(item) {
    return el("span", { class: "downloads" }, [
      el("a", { class: "btn small primary pdf-link", href: item.links.pdf, text: t("pt.pdf") }),
      " ",
      el("a", { class: "btn small json-link", href: item.links.document, text: t("pt.json") }),
      " ",
      el("a", { class: "btn small fhir-link", href: item.links.fhir, text: t("pt.fhir") }),
    ]);
  }

  function versionCell(item) {
    var kids = [el("strong", { text: t("pt.version", { n: item.version }) })];
    if (item.report_number) kids.unshift(el("span", { class: "muted report-number", text: item.report_number }), " ");
    if (item.amendment_kind) {
      kids.push(" ", el("span", { class: "muted", text: t("pt.kind." + item.amendment_kind) }));
    }
    kids.push(
      " ",
      el("span", {
        class: "status-badge " + (item.current ? "st-final current" : "st-draft superseded"),
        text: item.current ? t("pt.current") : t("pt.superseded"),
      })
    );
    return el("td", { class: "version" }, kids);
  }

  function hrCell(hr) {
    if (!hr || !hr.granted) return el("td", { class: "hr muted", text: t("pt.no_hr") });
    var until = hr.recognizable_until ? String(hr.recognizable_until).slice(0, 10) : "";
    var text = until ? t("pt.hr_until", { mark: hr.mark || "HR", until: until }) : hr.mark || "HR";
    return el("td", { class: "hr" }, [
      el("span", { class: "badge hr-mark", text: text, title: hr.scope_note || hr.item_name || "" }),
    ]);
  }

  function ackCell(item) {
    if (item.acknowledged_at) {
      return el("td", { class: "ack", text: t("pt.acknowledged", { time: R.fmt(item.acknowledged_at) }) });
    }
    if (!clinicUser || item.status !== "final" || !item.current) {
      return el("td", { class: "ack muted", text: t("common.none") });
    }
    var button = el("button", {
      type: "button",
      class: "btn small ack-button",
      text: t("pt.acknowledge"),
      onclick: function () {
        button.disabled = true;
        R.api("POST", "/api/v1/reports/" + encodeURIComponent(item.report_id) + "/acknowledge")
          .then(function () {
            R.toast(t("pt.ack_done"), "ok");
            load();
            if (R.notifications) R.notifications.reload();
          })
          .catch(function (err) {
            button.disabled = false;
            R.toast(t("err.failed", { detail: err.message }), "error");
          });
      },
    });
    return el("td", { class: "ack" }, [button]);
  }

  function row(item) {
    var cells = [
      el("td", { class: "patient" }, [
        el("strong", { text: R.personName(item.patient_name) || item.patient_id }),
        el("span", { class: "muted pid", text: " " + item.patient_id }),
      ]),
      el("td", { class: "desc" }, [
        el("span", { class: "modality", text: item.modality }),
        " ",
        el("span", { text: item.description || item.body_part || "" }),
        item.critical ? el("span", { class: "badge prio-emergency", text: t("pt.critical") }) : null,
      ]),
    ];
    if (!clinicUser) cells.push(el("td", { class: "clinic", text: item.clinic_code }));
    cells.push(
      versionCell(item),
      el("td", {}, [R.reportBadge(item.status)]),
      el("td", { class: "num", text: R.fmt(item.final_at || item.submitted_at) }),
      hrCell(item.hr),
      el("td", {
        class: "num delivered",
        text: item.delivered_at ? R.fmt(item.delivered_at) : t("pt.not_fetched"),
      }),
      ackCell(item),
      el("td", { class: "actions" }, [links(item)])
    );
    return el(
      "tr",
      {
        class: "report-row" + (item.current ? " current" : ""),
        dataset: { reportId: item.report_id, examId: item.exam_id, version: String(item.version) },
      },
      cells
    );
  }

  function olderRow(item) {
    // Earlier versions of an amended report stay downloadable.
    var cell = el("td", { colspan: COLS, class: "older muted" }, [t("pt.older") + "："]);
    var tr = el("tr", { class: "older-row", dataset: { examId: item.exam_id } }, [cell]);
    R.api("GET", "/api/v1/reports" + R.query({ exam_id: item.exam_id, current_only: "false" }))
      .then(function (page) {
        (page.items || [])
          .filter(function (v) {
            return !v.current;
          })
          .forEach(function (v) {
            cell.appendChild(
              el("span", { class: "older-version", dataset: { reportId: v.report_id } }, [
                " ",
                el("a", { href: v.links.pdf, text: t("pt.version", { n: v.version }) + " PDF" }),
                " · ",
                el("a", { href: v.links.fhir, text: t("pt.fhir") }),
              ])
            );
          });
      })
      .catch(function () {
        tr.hidden = true;
      });
    return tr;
  }

  function render(items) {
    body.textContent = "";
    if (!items.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: COLS, text: t("pt.empty") })]));
    }
    var showOlder = !form.elements.all_versions.checked;
    items.forEach(function (item) {
      body.appendChild(row(item));
      if (showOlder && item.version > 1) body.appendChild(olderRow(item));
    });
    paging.show(total);
  }

  paging = R.pager(form, PAGE, load);
  load();

  // The clinic's open critical values, on every clinic page until read back.
  var user = R.config.user || {};
  if (user.org_kind === "clinic") {
    R.criticalAlerts(document.getElementById("critical-alerts"), { linkExams: true });
  }
})();

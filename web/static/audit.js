/* Audit trail for QC: search by user, patient, exam, action and time; the hash chain's
   status; CSV export of the same search. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var PAGE = 100;
  var form = document.getElementById("filters");
  var body = document.getElementById("events-body");
  var message = document.getElementById("message");
  var exportLink = document.getElementById("export");
  var paging = null;
  var latest = 0;

  function iso(value) {
    if (!value) return "";
    var date = new Date(value); // datetime-local: the browser's local time
    return isNaN(date.getTime()) ? "" : date.toISOString();
  }

  function filters() {
    var f = form.elements;
    return {
      user: f.user.value.trim(),
      patient: f.patient.value.trim(),
      exam: f.exam.value.trim(),
      action: f.action.value.trim(),
      from: iso(f.from.value),
      to: iso(f.to.value),
    };
  }

  function detailText(detail) {
    if (!detail || !Object.keys(detail).length) return "";
    if (Object.prototype.hasOwnProperty.call(detail, "before") || Object.prototype.hasOwnProperty.call(detail, "after")) {
      return JSON.stringify(detail.before) + " → " + JSON.stringify(detail.after);
    }
    return JSON.stringify(detail);
  }

  function load() {
    var seq = ++latest;
    var params = filters();
    exportLink.href = "/api/v1/audit/events.csv" + R.query(params);
    R.api("GET", "/api/v1/audit/events" + R.query(Object.assign({ limit: PAGE, offset: paging.offset }, params)))
      .then(function (page) {
        if (seq !== latest) return;
        message.hidden = true;
        render(page.items || []);
        paging.show(page.total || 0);
      })
      .catch(function (err) {
        message.textContent = t("err.failed", { detail: err.message });
        message.hidden = false;
      });
  }

  function render(items) {
    body.textContent = "";
    if (!items.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 6, text: t("au.empty") })]));
    }
    items.forEach(function (e) {
      var text = detailText(e.detail);
      body.appendChild(
        el("tr", { dataset: { seq: e.seq, action: e.action } }, [
          el("td", { class: "num", text: String(e.seq) }),
          el("td", { class: "num", text: R.fmt(e.at, "date") + " " + R.fmt(e.at, "time") }),
          el("td", { text: e.actor }),
          el("td", { class: "code", text: e.action }),
          el("td", { text: e.object_type + " " + e.object_id }),
          el("td", { class: "detail", title: text, text: text.length > 300 ? text.slice(0, 300) + "…" : text }),
        ])
      );
    });
  }

  function chain() {
    var box = document.getElementById("chain");
    R.api("GET", "/api/v1/audit/chain").then(function (res) {
      box.dataset.state = res.intact ? "ok" : "broken";
      box.textContent = res.intact ? t("au.chain.ok", { n: res.events }) : t("au.chain.broken", { seq: res.first_bad_seq });
    }, function (err) {
      box.dataset.state = "broken";
      box.textContent = t("err.failed", { detail: err.message });
    });
  }

  var typed = R.debounce(function () {
    paging.offset = 0;
    load();
  }, 400);
  form.addEventListener("input", typed);
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    typed.cancel();
    paging.offset = 0;
    load();
  });
  paging = R.pager(form, PAGE, load);
  document.getElementById("refresh").addEventListener("click", chain);
  chain();
  load();
})();

/* Reading worklist: filters, counts, live SLA countdowns, claim, auto-refresh. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;

  var REFRESH_MS = 15000;
  var FILTERS = ["discipline", "modality", "clinic", "priority", "state", "mine"];
  var form = document.getElementById("filters");
  var body = document.getElementById("worklist-body");
  var message = document.getElementById("message");
  var user = R.config.user || {};
  var isReader = user.role === "reader" || user.role === "senior_reader";
  var canVerify =
    user.role === "senior_reader" || user.level === "attending" || user.level === "chief";

  var clockOffset = 0; // server time - local time, so countdowns follow the server's clock
  var items = [];
  var refreshTimer = null;
  var loading = false;
  var again = false;

  function filters() {
    var values = {};
    FILTERS.forEach(function (name) {
      var field = form.elements[name];
      if (!field) return;
      if (field.type === "checkbox") values[name] = field.checked ? "true" : "";
      else values[name] = field.value.trim();
    });
    return values;
  }

  function restoreFilters() {
    var params = new URLSearchParams(location.search);
    FILTERS.forEach(function (name) {
      var field = form.elements[name];
      if (!field || !params.has(name)) return;
      if (field.type === "checkbox") field.checked = params.get(name) === "true";
      else field.value = params.get(name);
    });
  }

  function showMessage(text) {
    message.textContent = text || "";
    message.hidden = !text;
  }

  function load() {
    if (loading) {
      again = true; // filters changed while a request was out: ask once more afterwards
      return;
    }
    loading = true;
    again = false;
    var params = filters();
    history.replaceState(null, "", location.pathname + R.query(params));
    params.limit = 200;
    R.api("GET", "/api/v1/worklist" + R.query(params))
      .then(function (page) {
        if (page.server_time) clockOffset = Date.parse(page.server_time) - Date.now();
        items = page.items || [];
        render(page);
        showMessage("");
        document.getElementById("updated").textContent = t("common.updated", {
          time: R.fmt(new Date(), "time"),
        });
      })
      .catch(function (err) {
        showMessage(t("err.failed", { detail: err.message }));
      })
      .then(function () {
        loading = false;
        if (again) load();
        else schedule();
      });
  }

  function schedule() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(load, REFRESH_MS);
  }

  function render(page) {
    var counts = page.counts || {};
    document.querySelectorAll("[data-count]").forEach(function (node) {
      var n = counts[node.dataset.count];
      node.textContent = n === undefined ? "–" : n;
    });
    var current = filters();
    document.querySelectorAll(".count[data-state]").forEach(function (node) {
      node.classList.toggle("on", current.state === node.dataset.state);
    });
    var mineChip = document.querySelector(".count[data-mine]");
    if (mineChip) mineChip.classList.toggle("on", current.mine === "true");
    document.getElementById("total").textContent = t("wl.total", { n: page.total || 0 });

    var codes = {};
    body.textContent = "";
    if (!items.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 10, text: t("wl.empty") })]));
    }
    items.forEach(function (item) {
      codes[item.clinic_code] = item.clinic_name || item.clinic_code;
      body.appendChild(row(item));
    });
    var list = document.getElementById("clinic-codes");
    list.textContent = "";
    Object.keys(codes).sort().forEach(function (code) {
      list.appendChild(el("option", { value: code, text: codes[code] }));
    });
    tick();
  }

  function row(item) {
    var awaiting = item.state === "AWAITING_VERIFICATION";
    var stateText;
    var stateClass = "";
    if (awaiting) {
      stateText = t("state.awaiting_verification");
      stateClass = "st-awaiting";
    } else if (item.taken && item.claimed_by) {
      stateText = t("wl.taken_by", { user: item.claimed_by });
      stateClass = "st-taken";
    } else if (!isReader) {
      stateText = t("state.open"); // QC and admins see the queue; nobody holds this one
    } else if (item.mine) {
      stateText = t("wl.claimed_by_me");
      stateClass = "st-mine";
    } else {
      stateText = t("state.open");
    }
    var readUrl = pageUrl(item.exam_id, item.discipline);
    var action;
    if (awaiting) {
      action = el("a", {
        class: "btn small" + (canVerify ? " warn" : ""),
        href: readUrl,
        text: canVerify ? t("wl.verify") : t("wl.view"),
      });
    } else if (item.taken || !isReader) {
      action = el("a", { class: "btn-link small", href: readUrl, text: t("wl.view") });
    } else if (item.mine) {
      action = el("a", { class: "btn small", href: readUrl, text: t("wl.open") });
    } else {
      action = el("button", {
        type: "button",
        class: "btn small primary claim",
        text: t("wl.claim"),
        onclick: function () {
          claim(item, this);
        },
      });
    }
    var patient = R.personName(item.patient_name);
    var tr = el(
      "tr",
      {
        class:
          "prio-row-" +
          item.priority +
          (item.taken ? " taken" : "") +
          (item.mine ? " mine" : ""),
        dataset: {
          itemId: item.id,
          examId: item.exam_id,
          discipline: item.discipline,
          priority: item.priority,
          due: item.due_at,
        },
      },
      [
        el("td", {}, [R.priorityBadge(item.priority)].concat(triageBadge(item))),
        el("td", { class: "countdown num" }),
        el("td", { class: "num", text: R.fmt(item.due_at, "short"), title: R.fmt(item.due_at) }),
        el("td", { class: "patient" }, [
          el("a", { href: readUrl, text: patient || item.patient_id }),
          el("span", { class: "muted pid", text: item.patient_id, title: item.patient_id }),
        ]),
        el("td", {
          class: "clinic",
          text: item.clinic_name || item.clinic_code,
          title: item.clinic_code,
        }),
        el("td", {}, [
          el("span", { class: "modality", text: item.modality }),
          " ",
          el("span", { class: "muted", text: item.body_part || "" }),
        ]),
        el("td", { class: "desc", text: item.description || "", title: item.description || "" }),
        el("td", { class: "state " + stateClass, text: stateText }),
        el("td", {}, [R.reportBadge(item.report_status)]),
        el("td", { class: "actions" }, [action]),
      ]
    );
    return tr;
  }

  /** A machine pre-screen's suspicion (an ECG with QTc >= 550 ms ...): the reason on hover. */
  function triageBadge(item) {
    if (!item.triage_reason) return [];
    return [
      " ",
      el("span", {
        class: "badge triage",
        text: t("wl.triage"),
        title: t("wl.triage_title", { reason: item.triage_reason }),
      }),
    ];
  }

  /** Update every countdown and the overdue highlight (called every second). */
  function tick() {
    var now = Date.now() + clockOffset;
    body.querySelectorAll("tr[data-due]").forEach(function (tr) {
      var left = Date.parse(tr.dataset.due) - now;
      var cell = tr.querySelector(".countdown");
      var overdue = left < 0;
      cell.textContent = overdue ? t("dur.overdue", { t: R.duration(left) }) : R.duration(left);
      tr.classList.toggle("overdue", overdue);
      tr.classList.toggle("due-soon", !overdue && left < 15 * 60 * 1000);
    });
  }

  /** The page that reads an exam: the lab review page, the ECG console, else the viewer. */
  function pageUrl(examId, discipline) {
    if (!discipline) {
      var known = items.filter(function (it) {
        return it.exam_id === examId;
      })[0];
      discipline = known && known.discipline;
    }
    var page = { lab: "/ui/lab/", ecg: "/ui/ecg/" }[discipline] || "/ui/read/";
    return page + encodeURIComponent(examId);
  }

  function claim(item, button) {
    button.disabled = true;
    R.api("POST", "/api/v1/worklist/" + encodeURIComponent(item.id) + "/claim")
      .then(function (lease) {
        location.href = pageUrl(lease.exam_id || item.exam_id, item.discipline);
      })
      .catch(function (err) {
        button.disabled = false;
        R.toast(t("wl.claim_failed", { detail: err.message }), "error");
        load();
      });
  }

  function claimNext() {
    if (!isReader) return;
    R.api("POST", "/api/v1/worklist/next")
      .then(function (lease) {
        location.href = pageUrl(lease.exam_id);
      })
      .catch(function (err) {
        if (err.status === 404) R.toast(t("wl.nothing_left"), "info");
        else R.toast(t("wl.claim_failed", { detail: err.message }), "error");
      });
  }

  form.addEventListener("change", load);
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    load();
  });
  form.elements.clinic.addEventListener("input", R.debounce(load, 400));
  form.addEventListener("reset", function () {
    setTimeout(load, 0);
  });
  document.querySelectorAll(".count[data-state]").forEach(function (chip) {
    chip.addEventListener("click", function () {
      var field = form.elements.state;
      field.value = field.value === chip.dataset.state ? "" : chip.dataset.state;
      load();
    });
  });
  var mineChip = document.querySelector(".count[data-mine]");
  mineChip.addEventListener("click", function () {
    form.elements.mine.checked = !form.elements.mine.checked;
    load();
  });
  document.getElementById("refresh").addEventListener("click", load);
  var nextButton = document.getElementById("next-btn");
  if (nextButton) nextButton.addEventListener("click", claimNext);
  document.addEventListener("keydown", function (event) {
    if (R.typingIn(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "n") {
      event.preventDefault();
      claimNext();
    }
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) load();
  });

  restoreFilters();
  load();
  setInterval(tick, 1000);
})();

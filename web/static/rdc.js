/* RDC web UI: shared helpers (messages, API calls, times in the configured zone). */
(function () {
  "use strict";

  function readJson(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : {};
  }

  var config = readJson("rdc-config");
  var messages = readJson("rdc-messages");

  /** The message `key` with {name} placeholders filled from `params`. */
  function t(key, params) {
    var text = Object.prototype.hasOwnProperty.call(messages, key) ? messages[key] : key;
    if (params) {
      Object.keys(params).forEach(function (name) {
        text = text.split("{" + name + "}").join(String(params[name]));
      });
    }
    return text;
  }

  /** An API error carrying the RFC 9457 problem (status, title, detail). */
  function ApiError(status, problem) {
    this.name = "ApiError";
    this.status = status;
    this.problem = problem || {};
    this.message = (problem && (problem.detail || problem.title)) || "HTTP " + status;
  }
  ApiError.prototype = Object.create(Error.prototype);

  /**
   * Call the JSON API with the session cookie. Every non-GET call carries
   * X-Requested-With: rdc (the cookie alone never authorises a change).
   * Resolves to the parsed body (null for 204), rejects with ApiError.
   */
  function api(method, path, body, options) {
    var init = {
      method: method,
      credentials: "same-origin",
      headers: { Accept: (options && options.accept) || "application/json" },
      keepalive: !!(options && options.keepalive),
    };
    if (method !== "GET" && method !== "HEAD") {
      init.headers["X-Requested-With"] = "rdc";
    }
    if (body !== undefined && body !== null) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(
      function (response) {
        if (response.status === 204) return null;
        return response.text().then(function (text) {
          var data = null;
          try {
            data = text ? JSON.parse(text) : null;
          } catch (e) {
            data = { detail: text.slice(0, 200) };
          }
          if (!response.ok) {
            if (response.status === 401 && !(options && options.quiet401)) {
              sessionEnded();
            }
            throw new ApiError(response.status, data);
          }
          return data;
        });
      },
      function () {
        throw new ApiError(0, { detail: t("err.network") });
      }
    );
  }

  var sessionEndShown = false;
  function sessionEnded() {
    if (sessionEndShown) return;
    sessionEndShown = true;
    toast(t("err.session"), "error");
    setTimeout(function () {
      var here = location.pathname + location.search;
      location.href = "/login?next=" + encodeURIComponent(here);
    }, 1500);
  }

  function query(params) {
    var parts = [];
    Object.keys(params).forEach(function (key) {
      var value = params[key];
      if (value !== undefined && value !== null && value !== "" && value !== false) {
        parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(value));
      }
    });
    return parts.length ? "?" + parts.join("&") : "";
  }

  // --- times: stored in UTC, shown in the configured zone -----------------------------------
  var zoneParts = null;
  /** The calendar fields of `date` in the configured zone. */
  function parts(date) {
    if (!zoneParts) {
      zoneParts = new Intl.DateTimeFormat("en-US", {
        timeZone: config.tz || "Asia/Shanghai",
        hourCycle: "h23",
        year: "numeric",
        month: "2-digit",
        day: "2-digit",
        hour: "2-digit",
        minute: "2-digit",
        second: "2-digit",
      });
    }
    var out = {};
    zoneParts.formatToParts(date).forEach(function (part) {
      out[part.type] = part.value;
    });
    return out;
  }
  /** `iso` (UTC) shown in the configured zone; kind: datetime | date | time | short. */
  function fmt(iso, kind) {
    if (!iso) return t("common.none");
    var date = iso instanceof Date ? iso : new Date(iso);
    if (isNaN(date.getTime())) return String(iso);
    var p = parts(date);
    var day = p.year + "-" + p.month + "-" + p.day;
    var hm = p.hour + ":" + p.minute;
    switch (kind) {
      case "date":
        return day;
      case "time":
        return hm + ":" + p.second;
      case "short":
        return p.month + "-" + p.day + " " + hm;
      default:
        return day + " " + hm;
    }
  }

  function pad(n) {
    return n < 10 ? "0" + n : String(n);
  }
  /** A duration as [d] h:mm:ss. */
  function duration(ms) {
    var total = Math.floor(Math.abs(ms) / 1000);
    var days = Math.floor(total / 86400);
    var h = Math.floor((total % 86400) / 3600);
    var m = Math.floor((total % 3600) / 60);
    var s = total % 60;
    return (days ? t("dur.days", { d: days }) : "") + h + ":" + pad(m) + ":" + pad(s);
  }

  /** DICOM person name (Alphabetic=Ideographic) shown as "王芳 Wang Fang". */
  function personName(value) {
    if (!value) return "";
    var groups = String(value).split("=");
    var alpha = (groups[0] || "").split("^").filter(Boolean).join(" ");
    var ideo = (groups[1] || "").split("^").join("");
    if (ideo && alpha) return config.lang === "en" ? alpha + " " + ideo : ideo + " " + alpha;
    return ideo || alpha;
  }

  /** A DICOM DA (YYYYMMDD) as YYYY-MM-DD. */
  function dicomDate(value) {
    if (!value) return t("common.none");
    var v = String(value);
    return v.length === 8 ? v.slice(0, 4) + "-" + v.slice(4, 6) + "-" + v.slice(6) : v;
  }

  // --- small DOM helpers -------------------------------------------------------------------
  /** Create an element: el("td", {class: "x", text: "…"}, [children]). */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === undefined || value === null || value === false) return;
        if (key === "text") node.textContent = value;
        else if (key === "class") node.className = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value === true ? "" : value);
      });
    }
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  var toastTimer = null;
  /** A short message at the bottom of the page; kind: info | ok | error. */
  function toast(text, kind) {
    var box = document.getElementById("toast");
    if (!box) return;
    box.textContent = text;
    box.className = "toast " + (kind || "info");
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () {
      box.hidden = true;
    }, kind === "error" ? 6000 : 3000);
  }

  function debounce(fn, ms) {
    var timer = null;
    function wrapped() {
      var args = arguments;
      var self = this;
      clearTimeout(timer);
      timer = setTimeout(function () {
        timer = null;
        fn.apply(self, args);
      }, ms);
    }
    wrapped.cancel = function () {
      clearTimeout(timer);
      timer = null;
    };
    wrapped.pending = function () {
      return timer !== null;
    };
    return wrapped;
  }

  /** Whether a key event comes from a field the user types into. */
  function typingIn(target) {
    if (!target || !target.tagName || target.readOnly || target.disabled) return false;
    var tag = target.tagName;
    if (target.isContentEditable || tag === "TEXTAREA" || tag === "SELECT") return true;
    if (tag !== "INPUT") return false;
    var type = (target.type || "text").toLowerCase();
    return ["checkbox", "radio", "button", "submit", "reset", "range"].indexOf(type) < 0;
  }

  var PRIORITY_RANK = { emergency: 0, urgent: 1, routine: 2 };

  function priorityBadge(priority) {
    return el("span", {
      class: "badge prio-" + priority,
      text: t("priority." + priority),
      dataset: { priority: priority },
    });
  }

  function reportBadge(status) {
    return el("span", {
      class: "status-badge st-" + (status || "none"),
      text: t("report_status." + (status || "none")),
    });
  }

  /** The message of a state's label, falling back to the raw value. */
  function label(prefix, value) {
    var key = prefix + "." + value;
    return Object.prototype.hasOwnProperty.call(messages, key) ? messages[key] : String(value);
  }

  // --- critical values: the clinic's open alerts, acknowledged with a read-back ---------------
  /**
   * Show the caller's clinic's OPEN critical-value alerts in `box` (a prominent banner, one
   * card per alert: finding, patient, raised time, deadline countdown) with the read-back
   * form; an acknowledged alert leaves the banner. Polls every `refreshMs` (30 s).
   * Returns {reload: fn}.
   */
  function criticalAlerts(box, options) {
    var opts = options || {};
    var alerts = [];
    var drafts = {}; // alert id -> {read_back, receiver_name} typed but not sent yet
    var timer = null;

    function countdown(alert) {
      var left = new Date(alert.deadline_at).getTime() - Date.now();
      return left < 0 ? t("dur.overdue", { t: duration(left) }) : t("cv.left", { t: duration(left) });
    }

    function tick() {
      box.querySelectorAll("[data-deadline]").forEach(function (node) {
        var left = new Date(node.dataset.deadline).getTime() - Date.now();
        node.textContent = left < 0 ? t("dur.overdue", { t: duration(left) }) : t("cv.left", { t: duration(left) });
        node.classList.toggle("overdue", left < 0);
      });
    }

    function card(alert) {
      var patient = alert.patient || {};
      var exam = alert.exam || {};
      var draft = drafts[alert.id] || {};
      var readBack = el("textarea", {
        name: "read_back",
        rows: 2,
        "aria-required": "true",
        maxlength: 4000,
        placeholder: t("cv.read_back_hint"),
        "aria-label": t("cv.read_back"),
        oninput: function () {
          drafts[alert.id] = Object.assign(drafts[alert.id] || {}, { read_back: this.value });
        },
      });
      readBack.value = draft.read_back || "";
      var receiver = el("input", {
        type: "text",
        name: "receiver_name",
        maxlength: 200,
        placeholder: t("cv.receiver"),
        "aria-label": t("cv.receiver"),
        oninput: function () {
          drafts[alert.id] = Object.assign(drafts[alert.id] || {}, { receiver_name: this.value });
        },
      });
      receiver.value = draft.receiver_name || "";
      var error = el("span", { class: "error-text", hidden: true });
      var button = el("button", { type: "submit", class: "btn danger", text: t("cv.acknowledge") });
      var form = el(
        "form",
        {
          class: "cv-ack",
          autocomplete: "off",
          onsubmit: function (event) {
            event.preventDefault();
            var text = readBack.value.trim();
            if (!text) {
              error.textContent = t("cv.need_read_back");
              error.hidden = false;
              readBack.focus();
              return;
            }
            button.disabled = true;
            api("POST", "/api/v1/critical-alerts/" + encodeURIComponent(alert.id) + "/acknowledge", {
              read_back: text,
              receiver_name: receiver.value.trim() || null,
            }).then(
              function () {
                delete drafts[alert.id];
                toast(t("cv.acknowledged"), "ok");
                load();
              },
              function (err) {
                button.disabled = false;
                if (err.status === 409) {
                  delete drafts[alert.id];
                  load();
                  return;
                }
                error.textContent = t("err.failed", { detail: err.message });
                error.hidden = false;
              }
            );
          },
        },
        [
          el("label", { class: "cv-field" }, [t("cv.read_back") + " *", readBack]),
          el("div", { class: "cv-row" }, [receiver, button]),
          error,
        ]
      );
      var examLink = opts.linkExams
        ? el("a", { href: "/ui/report/" + encodeURIComponent(alert.exam_id), text: t("cv.open_report") })
        : null;
      var left = new Date(alert.deadline_at).getTime() - Date.now();
      return el("article", { class: "cv-card", dataset: { alertId: alert.id, examId: alert.exam_id } }, [
        el("div", { class: "cv-top" }, [
          el("strong", { class: "cv-label", text: "⚠ " + t("cv.banner") }),
          el("span", {
            class: "cv-countdown" + (left < 0 ? " overdue" : ""),
            dataset: { deadline: alert.deadline_at },
            text: countdown(alert),
          }),
        ]),
        el("p", { class: "cv-finding", text: alert.finding }),
        el("div", { class: "cv-meta" }, [
          el("span", { text: personName(patient.name) + " · " + (patient.patient_id || "") }),
          el("span", { text: [exam.modality, exam.description].filter(Boolean).join(" · ") }),
          el("span", { text: t("cv.raised", { time: fmt(alert.raised_at), who: (alert.raised_by || {}).name || "" }) }),
          el("span", { text: t("cv.deadline", { time: fmt(alert.deadline_at, "time") }) }),
          examLink,
        ]),
        form,
      ]);
    }

    function render() {
      var shown = alerts.filter(function (alert) {
        return !opts.examId || alert.exam_id === opts.examId || opts.allExams;
      });
      // Keep the card the user is typing in: re-render only when the set of alerts changed.
      var ids = shown.map(function (a) { return a.id; }).join(",");
      if (box.dataset.ids === ids && ids) { tick(); return; }
      box.dataset.ids = ids;
      box.textContent = "";
      box.hidden = !shown.length;
      if (!shown.length) return;
      box.appendChild(el("h2", { class: "cv-title", text: t("cv.banner_title", { n: shown.length }) }));
      shown.forEach(function (alert) {
        box.appendChild(card(alert));
      });
    }

    function load() {
      clearTimeout(timer);
      return api("GET", "/api/v1/critical-alerts" + query({ state: "open", limit: 100 }))
        .then(function (page) {
          alerts = (page && page.items) || [];
          render();
          if (opts.onchange) opts.onchange(alerts);
        }, function () {})
        .then(function () {
          timer = setTimeout(load, opts.refreshMs || 30000);
        });
    }

    setInterval(tick, 1000);
    load();
    return { reload: load };
  }

  /**
   * Paging of a list page: the filter form (a change or reset goes back to the first page),
   * the refresh, previous and next buttons, and the "from–to of total" footer. `load` asks
   * for `pager.offset` and calls `pager.show(total)` once the page is drawn.
   */
  function pager(form, size, load) {
    var prev = document.getElementById("prev-page");
    var next = document.getElementById("next-page");
    var state = {
      offset: 0,
      show: function (total) {
        var from = total ? state.offset + 1 : 0;
        var to = Math.min(state.offset + size, total);
        document.getElementById("total").textContent = t("pg.range", { from: from, to: to, total: total });
        prev.disabled = state.offset === 0;
        next.disabled = state.offset + size >= total;
      },
    };
    form.addEventListener("change", function () {
      state.offset = 0;
      load();
    });
    form.addEventListener("reset", function () {
      state.offset = 0;
      setTimeout(load, 0);
    });
    document.getElementById("refresh").addEventListener("click", load);
    prev.addEventListener("click", function () {
      state.offset = Math.max(0, state.offset - size);
      load();
    });
    next.addEventListener("click", function () {
      state.offset += size;
      load();
    });
    return state;
  }

  // --- notifications: the header's unread count and list (new report versions, critical
  // values, re-scan requests), each marked read when opened ---------------------------------
  var NOTIFY_LINKS = {
    report_version: "/ui/portal",
    critical_value: "/ui/clinic",
    rescan_requested: "/ui/clinic",
    rescan_declined: "/ui/worklist",
  };

  function notifications() {
    var toggle = document.getElementById("notif-toggle");
    var list = document.getElementById("notif-list");
    var count = document.getElementById("notif-count");
    if (!toggle || !list || !count) return;
    var timer = null;

    function text(n) {
      return config.lang === "en" ? n.text_en || n.text : n.text_zh || n.text;
    }

    function render(items, total) {
      count.textContent = String(total);
      count.classList.toggle("zero", !total);
      list.textContent = "";
      if (!items.length) {
        list.appendChild(el("p", { class: "muted notif-empty", text: t("nt.empty") }));
        return;
      }
      items.forEach(function (n) {
        var href = NOTIFY_LINKS[n.kind] || "#";
        list.appendChild(
          el("a", {
            class: "notif-item kind-" + n.kind,
            href: href,
            dataset: { id: n.id, kind: n.kind, subject: n.subject_id },
            onclick: function (event) {
              event.preventDefault();
              api("POST", "/api/v1/notifications/" + encodeURIComponent(n.id) + "/read")
                .catch(function () {})
                .then(function () {
                  if (href === "#" || location.pathname === href) load();
                  else location.href = href;
                });
            },
          }, [
            el("span", { class: "notif-kind", text: t("nt.kind." + n.kind) }),
            el("span", { class: "notif-text", text: text(n) }),
            el("span", { class: "notif-time muted", text: fmt(n.created_at) }),
          ])
        );
      });
    }

    function load() {
      clearTimeout(timer);
      api("GET", "/api/v1/notifications" + query({ unread: "true", limit: 20 }))
        .then(function (page) {
          render(page.items || [], page.total || 0);
        })
        .catch(function () {})
        .then(function () {
          timer = setTimeout(load, 60000);
        });
    }

    toggle.addEventListener("click", function () {
      list.hidden = !list.hidden;
      toggle.setAttribute("aria-expanded", list.hidden ? "false" : "true");
    });
    document.addEventListener("click", function (event) {
      if (!list.hidden && !event.target.closest("#notif")) {
        list.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
      }
    });
    load();
    return { reload: load };
  }


  /** The work-item lease of a reading page (imaging and laboratory alike): ``state`` is the
   *  page's, with ``lease`` and ``closed`` (closed: submitted, released, lost; no more
   *  renewals); ``options.itemId()`` the work item's ID; ``options.onLease(lease)`` runs on
   *  each claim and renewal, ``options.onLost()`` once the lease is lost. The lease is renewed
   *  a third of the way through (10 s to 2 min); a 409 on renewal means another took it. */
  function workItemLease(state, options) {
    var timer = null;

    function setText(text, kind) {
      var node = document.getElementById("lease-status");
      if (!node) return;
      node.textContent = text;
      node.className = "lease-status" + (kind ? " " + kind : "");
    }

    function path(action) {
      return "/api/v1/worklist/" + encodeURIComponent(options.itemId()) + "/" + action;
    }

    function got(lease) {
      state.lease = lease;
      setText(t("ls.mine", { time: fmt(lease.lease_expires_at, "time") }), "mine");
      options.onLease(lease);
      if (!timer) {
        var every = Math.max(10, Math.min(120, (lease.lease_seconds || 300) / 3)) * 1000;
        timer = setInterval(renew, every);
      }
    }

    function stop() {
      clearInterval(timer);
      timer = null;
    }

    function renew() {
      if (state.closed || !state.lease) return;
      api("POST", path("renew")).then(
        function (lease) {
          if (!state.closed) got(lease);
        },
        function (err) {
          if (err.status === 409) lost();
        }
      );
    }

    function lost() {
      state.closed = true;
      state.lease = null;
      stop();
      setText(t("ls.lost"), "lost");
      toast(t("ls.lost"), "error");
      options.onLost();
    }

    /** Claim the item; ``onTaken(err)`` when another holds it (409). */
    function claim(onTaken) {
      return api("POST", path("claim")).then(got, function (err) {
        if (err.status === 409) onTaken(err);
        else setText(t("err.failed", { detail: err.message }), "lost");
      });
    }

    /** Give the item back; resolves once released, with no more renewals. */
    function release() {
      return api("POST", path("release")).then(function () {
        state.closed = true;
        state.lease = null;
        stop();
      });
    }

    return { setText: setText, path: path, claim: claim, release: release, lost: lost, stop: stop };
  }

  window.RDC = {
    notifications: null,
    criticalAlerts: criticalAlerts,
    config: config,
    t: t,
    api: api,
    ApiError: ApiError,
    query: query,
    fmt: fmt,
    duration: duration,
    personName: personName,
    dicomDate: dicomDate,
    el: el,
    toast: toast,
    debounce: debounce,
    typingIn: typingIn,
    PRIORITY_RANK: PRIORITY_RANK,
    priorityBadge: priorityBadge,
    reportBadge: reportBadge,
    label: label,
    pager: pager,
    workItemLease: workItemLease,
  };
  window.RDC.notifications = notifications();
})();

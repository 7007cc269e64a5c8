/* Lab reading page: one lab order's results (units, reference ranges, H/L flags, critical
   marks, the auto-verification rules that held each result, each analyte's prior values with a
   sparkline), approve / reject / comment per result or per order, and signing with the
   signer's password. The work-item lease works as on the imaging reading page. */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var cfg = R.config;
  var user = cfg.user || {};
  var examId = cfg.examId;
  var isReader = user.role === "reader" || user.role === "senior_reader";
  var canVerify = user.role === "senior_reader" || user.level === "attending" || user.level === "chief";
  var base = "/api/v1/lab/exams/" + encodeURIComponent(examId);
  var FLAG_ARROW = { H: "↑", HH: "↑↑", L: "↓", LL: "↓↓", A: "*", AA: "**" };

  var state = { data: null, lease: null, closed: false, busy: false };

  function $(id) {
    return document.getElementById(id);
  }

  function fail(err) {
    R.toast(t("err.failed", { detail: err && err.message ? err.message : String(err) }), "error");
  }

  function inLang(zh, en) {
    return cfg.lang === "en" ? en || zh : zh || en;
  }

  // --- header --------------------------------------------------------------------------------
  function renderHead(data) {
    var exam = data.exam || {};
    var patient = exam.patient || {};
    var order = data.order || {};
    $("lab-patient").textContent = R.personName(patient.name) || patient.patient_id || "—";
    $("lab-patient-meta").textContent = [
      patient.patient_id + (patient.issuer ? " (" + patient.issuer + ")" : ""),
      patient.sex ? t("lab.sex." + patient.sex) : "",
      R.dicomDate(patient.birth_date),
    ]
      .filter(Boolean)
      .join(" · ");
    var prio = $("lab-priority");
    if (exam.priority) {
      prio.textContent = "";
      prio.appendChild(R.priorityBadge(exam.priority));
      prio.hidden = false;
    }
    $("lo-clinic").textContent = exam.clinic_name || exam.clinic_code || "—";
    $("lo-placer").textContent = order.placer_number || "—";
    $("lo-filler").textContent = order.filler_number || "—";
    $("lo-specimen").textContent = order.specimen || "—";
    $("lo-collected").textContent = R.fmt(order.collected_at);
    $("lo-received").textContent = R.fmt(order.received_at);
    $("lo-reported").textContent = R.fmt(order.reported_at);
    var verdict = $("lab-verdict");
    var shown = order.released_at ? (order.auto_released ? "released" : "signed") : order.verdict || "hold";
    if (!order.released_at && order.critical) shown = "critical";
    verdict.textContent = t("lab.verdict." + shown);
    verdict.dataset.verdict = shown;
  }

  // --- the results table ------------------------------------------------------------------------
  function flagCell(result) {
    var flags = (result.flags || []).filter(function (flag) {
      return flag !== "N"; // normal: no mark
    });
    var node = el("td", { class: "lab-flag" });
    flags.forEach(function (flag) {
      var kind = flag === "HH" || flag === "LL" || flag === "AA" ? "crit" : flag === "H" || flag === "L" || flag === "A" ? "abn" : "";
      node.appendChild(
        el("span", {
          class: "flag " + kind,
          text: (FLAG_ARROW[flag] ? FLAG_ARROW[flag] + " " : "") + flag,
          title: t("lab.flag." + flag),
        })
      );
    });
    if (result.critical) node.appendChild(el("span", { class: "crit-mark", text: t("lab.critical") }));
    return node;
  }

  function verdictCell(result) {
    var node = el("td", { class: "lab-av" });
    var verdict = result.verdict || "pass";
    node.appendChild(el("span", { class: "av av-" + verdict, text: t("lab.av." + verdict) }));
    var reasons = (result.reasons || []).filter(function (r) {
      return r.verdict !== "pass";
    });
    if (reasons.length) {
      var list = el("ul", { class: "av-reasons" });
      reasons.forEach(function (r) {
        list.appendChild(el("li", { text: r.reason, title: r.rule_id + " · " + r.version, dataset: { rule: r.rule_id } }));
      });
      node.appendChild(list);
    }
    return node;
  }

  /** A small SVG line of the prior values and this one, the reference band shaded. */
  function sparkline(result) {
    var points = (result.priors || [])
      .filter(function (p) {
        return typeof p.numeric === "number";
      })
      .map(function (p) {
        return { v: p.numeric, at: p.observed_at, text: p.value };
      });
    if (typeof result.numeric === "number") points.push({ v: result.numeric, at: null, text: result.value, now: true });
    var cell = el("td", { class: "lab-trend" });
    if (points.length < 2) {
      cell.appendChild(el("span", { class: "muted", text: points.length ? t("lab.no_priors") : "" }));
      return cell;
    }
    var W = 110,
      H = 28,
      P = 3;
    var values = points.map(function (p) {
      return p.v;
    });
    var low = result.range_low,
      high = result.range_high;
    var lo = Math.min.apply(null, values.concat(typeof low === "number" ? [low] : []));
    var hi = Math.max.apply(null, values.concat(typeof high === "number" ? [high] : []));
    if (hi === lo) {
      hi += 1;
      lo -= 1;
    }
    function x(i) {
      return P + (i * (W - 2 * P)) / (points.length - 1);
    }
    function y(v) {
      return H - P - ((v - lo) * (H - 2 * P)) / (hi - lo);
    }
    var NS = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("class", "spark");
    svg.setAttribute("role", "img");
    if (typeof low === "number" && typeof high === "number") {
      var band = document.createElementNS(NS, "rect");
      band.setAttribute("x", 0);
      band.setAttribute("width", W);
      band.setAttribute("y", y(high));
      band.setAttribute("height", Math.max(1, y(low) - y(high)));
      band.setAttribute("class", "spark-band");
      svg.appendChild(band);
    }
    var line = document.createElementNS(NS, "polyline");
    line.setAttribute(
      "points",
      points
        .map(function (p, i) {
          return x(i).toFixed(1) + "," + y(p.v).toFixed(1);
        })
        .join(" ")
    );
    line.setAttribute("class", "spark-line");
    svg.appendChild(line);
    points.forEach(function (p, i) {
      var dot = document.createElementNS(NS, "circle");
      dot.setAttribute("cx", x(i).toFixed(1));
      dot.setAttribute("cy", y(p.v).toFixed(1));
      dot.setAttribute("r", p.now ? 2.6 : 1.8);
      dot.setAttribute("class", p.now ? "spark-now" : "spark-dot");
      svg.appendChild(dot);
    });
    var summary = points
      .map(function (p) {
        return (p.now ? t("lab.now") : R.fmt(p.at, "date")) + " " + p.text;
      })
      .join("\n");
    var title = document.createElementNS(NS, "title");
    title.textContent = summary;
    svg.appendChild(title);
    svg.setAttribute("aria-label", summary);
    cell.appendChild(svg);
    cell.appendChild(el("span", { class: "spark-n muted", text: t("lab.priors_n", { n: points.length - 1 }) }));
    return cell;
  }

  function reviewCell(result) {
    var node = el("td", { class: "lab-review" });
    var decision = result.decision || "pending";
    node.appendChild(el("span", { class: "rv rv-" + decision, text: t("lab.decision." + decision) }));
    if (result.decision_reason) node.appendChild(el("div", { class: "rv-reason", text: result.decision_reason }));
    if (result.comment) node.appendChild(el("div", { class: "rv-comment", text: t("lab.comment_prefix") + result.comment }));
    return node;
  }

  function actionsCell(result) {
    var node = el("td", { class: "actions" });
    if (!editable()) return node;
    if (result.decision !== "approved") {
      node.appendChild(
        el("button", {
          type: "button",
          class: "btn small primary",
          text: t("lab.approve"),
          dataset: { act: "approve" },
          onclick: function () {
            review(result, { decision: "approved" });
          },
        })
      );
    }
    if (result.decision !== "rejected") {
      node.appendChild(
        el("button", {
          type: "button",
          class: "btn small danger",
          text: t("lab.reject"),
          dataset: { act: "reject" },
          onclick: function () {
            ask(t("lab.reject_title"), result, t("lab.reject_reason"), "", true, function (text) {
              return review(result, { decision: "rejected", reason: text });
            });
          },
        })
      );
    }
    node.appendChild(
      el("button", {
        type: "button",
        class: "btn small",
        text: t("lab.comment"),
        dataset: { act: "comment" },
        onclick: function () {
          ask(t("lab.comment_title"), result, t("lab.comment"), result.comment || "", false, function (text) {
            return review(result, { comment: text });
          });
        },
      })
    );
    return node;
  }

  /** The value as read: a coded result's text, a text result as sent, a number as sent. */
  function shownValue(result) {
    var v = result.display_value !== undefined && result.display_value !== null ? result.display_value : result.value;
    return v === null || v === undefined ? "" : String(v);
  }

  function resultName(result) {
    return inLang(result.name_zh, result.name_en) || result.code;
  }

  function renderResults(data) {
    var body = $("lab-body");
    body.textContent = "";
    var results = data.results || [];
    if (!results.length) {
      body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: "9", text: t("lab.no_results") })]));
      return;
    }
    results.forEach(function (result) {
      var flags = result.flags || [];
      var abnormal = flags.some(function (f) {
        return f && f !== "N";
      });
      body.appendChild(
        el(
          "tr",
          {
            class:
              "lab-row" +
              (result.critical ? " lab-critical" : abnormal ? " abnormal" : "") +
              (result.verdict && result.verdict !== "pass" ? " held" : "") +
              (result.decision === "rejected" ? " rejected" : ""),
            dataset: { resultId: result.id, code: result.code, verdict: result.verdict || "pass", decision: result.decision || "pending" },
          },
          [
            el("td", { class: "lab-test" }, [
              el("div", { class: "lab-name", text: resultName(result) }),
              el("div", {
                class: "muted lab-code",
                text: [result.code !== result.loinc ? result.code : "", result.loinc ? "LOINC " + result.loinc : ""]
                  .filter(Boolean)
                  .join(" · "),
              }),
            ]),
            el("td", {
              class: "lab-value" + (typeof result.numeric === "number" ? " num" : " lab-text"),
              title: result.value_type && typeof result.numeric !== "number" ? result.value_type + ": " + (result.value || "") : null,
              text: shownValue(result) || "—",
            }),
            flagCell(result),
            el("td", { class: "lab-unit", text: result.unit || "" }),
            el("td", { class: "num lab-range", text: result.reference_range || "—" }),
            verdictCell(result),
            sparkline(result),
            reviewCell(result),
            actionsCell(result),
          ]
        )
      );
    });
  }

  function editable() {
    return !!(state.lease && !state.closed && state.data && !(state.data.report && state.data.report.locked));
  }

  function renderFoot(data) {
    var edit = editable();
    var comment = $("lab-comment");
    if (document.activeElement !== comment) comment.value = data.comment || "";
    comment.disabled = !edit;
    var blocking = data.blocking || [];
    $("lab-blocking").textContent = blocking.length ? t("lab.blocking", { names: blocking.join("、") }) : edit ? t("lab.ready") : "";
    $("approve-all-btn").hidden = !edit || !blocking.length;
    $("reject-order-btn").hidden = !edit;
    $("sign-btn").hidden = !edit;
    $("sign-btn").disabled = state.busy || blocking.length > 0;
    $("release-btn").hidden = !(state.lease && !state.closed);
    var report = data.report;
    var signed = data.signature;
    $("sig-panel").hidden = !signed;
    $("amend-btn").hidden = !(signed && report && report.status === "final" && isReader && canVerify);
    if (signed && report) {
      $("rp-status").textContent = t("report_status." + report.status);
      $("rp-status").className = "status-badge st-" + report.status;
      // People by their display names (the login only when a user has none).
      $("sig-author").textContent = report.author_name || report.author || "—";
      $("sig-verifier").textContent = report.verified_by_name || report.verified_by || "—";
      $("sig-signer").textContent = signed.signer_name || signed.signer;
      $("sig-time").textContent = R.fmt(signed.signed_at);
      var amendment = $("lab-amendment");
      amendment.hidden = !report.amendment_kind;
      if (report.amendment_kind)
        amendment.textContent = t("lab.amended", {
          n: report.version,
          kind: t("am.kind." + report.amendment_kind),
          reason: report.amendment_reason || "",
        });
      $("sig-pdf").href = "/api/v1/reports/" + encodeURIComponent(report.id) + "/pdf";
      $("sig-fhir").href = "/api/v1/reports/" + encodeURIComponent(report.id) + "/fhir";
    }
  }

  function render() {
    var data = state.data;
    if (!data) return;
    renderHead(data);
    renderResults(data);
    renderFoot(data);
  }

  function load() {
    return R.api("GET", base + "/reading").then(function (data) {
      state.data = data;
      render();
      return data;
    });
  }

  // --- review actions -----------------------------------------------------------------------------
  function apply(promise) {
    state.busy = true;
    renderFoot(state.data);
    return promise.then(
      function (data) {
        state.busy = false;
        state.data = data;
        render();
        $("save-state").textContent = t("rp.saved", { time: R.fmt(new Date().toISOString(), "time") });
        return data;
      },
      function (err) {
        state.busy = false;
        renderFoot(state.data);
        if (err.status === 409) leaseLost();
        throw err;
      }
    );
  }

  function review(result, body) {
    return apply(R.api("PUT", base + "/results/" + encodeURIComponent(result.id) + "/review", body)).catch(fail);
  }

  var asking = null;
  function ask(title, result, label, value, required, run) {
    asking = { run: run, required: required };
    $("rv-title").textContent = title;
    $("rv-what").textContent = result ? resultName(result) + " · " + shownValue(result) + " " + (result.unit || "") : "";
    $("rv-label").textContent = label;
    $("rv-text").value = value;
    $("rv-error").hidden = true;
    $("review-dialog").showModal();
    $("rv-text").focus();
  }

  $("review-form").addEventListener("submit", function (event) {
    event.preventDefault();
    if (!asking) return;
    var text = $("rv-text").value.trim();
    if (asking.required && !text) {
      $("rv-error").textContent = t("lab.need_reason");
      $("rv-error").hidden = false;
      return;
    }
    var current = asking;
    asking = null;
    $("review-dialog").close();
    current.run(text);
  });
  $("rv-cancel").addEventListener("click", function () {
    asking = null;
    $("review-dialog").close();
  });

  var saveComment = R.debounce(function () {
    if (!editable()) return;
    $("save-state").textContent = t("rp.saving");
    apply(R.api("PUT", base + "/comment", { comment: $("lab-comment").value })).catch(fail);
  }, 800);
  $("lab-comment").addEventListener("input", function () {
    $("save-state").textContent = t("rp.unsaved");
    saveComment();
  });

  $("approve-all-btn").addEventListener("click", function () {
    apply(R.api("POST", base + "/approve-held")).catch(fail);
  });

  $("reject-order-btn").addEventListener("click", function () {
    ask(t("lab.reject_order_title"), null, t("lab.reject_reason"), "", true, function (text) {
      state.busy = true;
      return R.api("POST", "/api/v1/exams/" + encodeURIComponent(examId) + "/rescan", { reason: text }).then(
        function () {
          state.closed = true;
          stopRenewing();
          R.toast(t("lab.order_rejected"), "ok");
          setLeaseText(t("lab.order_rejected"));
          return load();
        },
        function (err) {
          state.busy = false;
          fail(err);
        }
      );
    });
  });

  // --- signing ------------------------------------------------------------------------------------
  var signing = null;
  function openSigning() {
    var data = state.data;
    if (!data || $("sign-dialog").open) return;
    state.busy = true;
    renderFoot(data);
    // The draft first (the comment as typed), then the dialog with what is signed.
    apply(R.api("PUT", base + "/comment", { comment: $("lab-comment").value }))
      .then(function (fresh) {
        state.busy = false;
        renderFoot(fresh);
        var exam = fresh.exam || {};
        var patient = exam.patient || {};
        signing = true;
        $("sd-title").textContent = t("sd.title") + " · " + t("lab.sign");
        $("sd-patient").textContent = [R.personName(patient.name) || "", patient.patient_id || ""].filter(Boolean).join(" · ");
        $("sd-exam").textContent = [exam.description, (fresh.order || {}).filler_number, exam.clinic_name || exam.clinic_code]
          .filter(Boolean)
          .join(" — ");
        $("sd-results").textContent = (fresh.results || [])
          .map(function (r) {
            var flags = (r.flags || []).filter(function (f) {
              return f && f !== "N";
            });
            return (
              resultName(r) +
              " " +
              (r.decision === "rejected" ? t("lab.decision.rejected") : shownValue(r) + " " + (r.unit || "") + (flags.length ? " " + flags.join(",") : ""))
            );
          })
          .join("\n");
        var critical = (fresh.results || []).some(function (r) {
          return r.critical && r.decision !== "rejected";
        });
        $("sd-critical").textContent = critical ? t("sd.critical_yes") : t("sd.critical_no");
        $("sd-critical").className = critical ? "sd-critical-yes" : "";
        $("sd-outcome").textContent = t("sd.loading");
        $("sd-hr").textContent = t("sd.loading");
        $("sd-error").hidden = true;
        $("sd-password").value = "";
        $("sd-sign").disabled = false;
        $("sign-dialog").showModal();
        $("sd-password").focus();
        if (!fresh.report) return;
        R.api("GET", "/api/v1/reports/" + encodeURIComponent(fresh.report.id) + "/signing-preview" + R.query({ action: "submit" })).then(
          function (preview) {
            $("sd-outcome").textContent = t(preview.outcome === "final" ? "sd.final" : "sd.preliminary");
            $("sd-outcome").dataset.outcome = preview.outcome;
            var rec = preview.recognition;
            var hr = $("sd-hr");
            if (!rec) hr.textContent = t("sd.hr_pending");
            else if (rec.granted) hr.textContent = (rec.mark || "HR") + " · " + t("lab.hr_per_row");
            else
              hr.textContent =
                t("hr.not") +
                ": " +
                (rec.reasons || [])
                  .filter(function (r) {
                    return !r.passed;
                  })
                  .map(function (r) {
                    return inLang(r.text_zh, r.text_en) || r.text;
                  })
                  .join("; ");
            hr.dataset.granted = rec ? String(!!rec.granted) : "";
          },
          function (err) {
            $("sd-outcome").textContent = t("err.failed", { detail: err.message });
            $("sd-hr").textContent = "";
          }
        );
      })
      .catch(fail);
  }

  function closeSigning() {
    signing = null;
    $("sd-password").value = "";
    if ($("sign-dialog").open) $("sign-dialog").close();
  }

  $("sign-form").addEventListener("submit", function (event) {
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
    $("sd-sign").disabled = true;
    var amending = signing !== true ? signing : null;
    var request = amending
      ? R.api("POST", base + "/amend", Object.assign({}, amending, { signing_password: password }))
      : R.api("POST", base + "/sign", { signing_password: password });
    request
      .then(
        function (data) {
          closeSigning();
          state.closed = true;
          stopRenewing();
          state.data = data;
          setLeaseText(t("rp.locked"), "locked");
          if (amending) R.toast(t("am.done", { n: (data.report || {}).version }), "ok");
          else R.toast(t("rp.submitted", { status: t("report_status." + ((data.report || {}).status || "final")) }), "ok");
          render();
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
      });
  });
  $("sd-cancel").addEventListener("click", closeSigning);
  $("sign-btn").addEventListener("click", openSigning);

  // --- amend a signed report (a new signed version; the shared amend dialog) --------------------
  var amendPrefill = "";
  function amendKind() {
    var checked = $("amend-form").querySelector("input[name=kind]:checked");
    return checked ? checked.value : "amended";
  }
  function amendKindChanged() {
    var area = $("amend-impression");
    var appended = amendKind() === "appended";
    if (appended && area.value === amendPrefill) area.value = "";
    if (!appended && !area.value) area.value = amendPrefill;
    area.placeholder = appended ? t("am.append_placeholder") : "";
    $("amend-hint").textContent = t("am.hint." + amendKind());
  }
  function openAmend() {
    var data = state.data;
    if (!data || !data.report) return;
    $("amend-form").reset();
    amendPrefill = data.comment || "";
    $("amend-impression").value = amendPrefill;
    $("amend-error").hidden = true;
    amendKindChanged();
    $("amend-dialog").showModal();
    $("amend-reason-input").focus();
  }
  function submitAmend(event) {
    event.preventDefault();
    var data = state.data;
    var error = $("amend-error");
    var kind = amendKind();
    var reason = $("amend-reason-input").value.trim();
    var comment = $("amend-impression").value;
    if (!reason) {
      error.textContent = t("am.need_reason");
      error.hidden = false;
      return;
    }
    var body = { kind: kind, reason: reason };
    if (kind === "appended" ? comment.trim() : comment !== amendPrefill) body.comment = comment;
    $("amend-dialog").close();
    // What is signed, then the password (the signing dialog in amend mode).
    signing = body;
    var exam = data.exam || {};
    var patient = exam.patient || {};
    $("sd-title").textContent = t("sd.title") + " · " + t("am.open");
    $("sd-patient").textContent = [R.personName(patient.name) || "", patient.patient_id || ""].filter(Boolean).join(" · ");
    $("sd-exam").textContent = [exam.description, (data.order || {}).filler_number, exam.clinic_name || exam.clinic_code].filter(Boolean).join(" — ");
    $("sd-results").textContent =
      t("am.kind." + kind) + " · " + reason + (body.comment !== undefined ? "\n" + body.comment : "");
    $("sd-outcome").textContent = t("sd.final");
    $("sd-critical").textContent = (data.report || {}).critical ? t("sd.critical_yes") : t("sd.critical_no");
    $("sd-hr").textContent = t("lab.hr_per_row");
    $("sd-error").hidden = true;
    $("sd-password").value = "";
    $("sd-sign").disabled = false;
    $("sign-dialog").showModal();
    $("sd-password").focus();
  }
  $("amend-btn").addEventListener("click", openAmend);
  $("amend-form").addEventListener("submit", submitAmend);
  $("amend-form").addEventListener("change", function (event) {
    if (event.target && event.target.name === "kind") amendKindChanged();
  });
  $("amend-cancel").addEventListener("click", function () {
    $("amend-dialog").close();
  });

  // --- lease (R.workItemLease, as on the reading page) ----------------------------------------
  var lease = R.workItemLease(state, {
    itemId: function () {
      return state.data.exam.work_item_id;
    },
    onLease: render,
    onLost: render,
  });
  var setLeaseText = lease.setText;
  var stopRenewing = lease.stop;
  var leaseLost = lease.lost;

  function claimOnOpen(data) {
    var report = data.report;
    if (report && (report.locked || report.status === "final")) {
      setLeaseText(t("rp.locked"), "locked");
      return;
    }
    if (!isReader || !data.exam.work_item_id || data.exam.state === "RESCAN_REQUESTED") {
      setLeaseText(t("ls.readonly"));
      return;
    }
    lease.claim(function (err) {
      var holder = err && err.problem && err.problem.claimed_by;
      setLeaseText(holder ? t("ls.taken", { user: holder }) : t("ls.readonly"), "taken");
    });
  }

  $("release-btn").addEventListener("click", function () {
    lease.release().then(function () {
      location.href = cfg.home || "/ui/worklist";
    }, fail);
  });

  load().then(claimOnOpen, fail);
})();

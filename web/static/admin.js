/* Administration console: clinics, users, routing rules, SLA targets, recognition,
   critical-value contacts and duty list, delivery endpoints. Every change goes through the
   same JSON API as the CLI (admins only; audited there with before/after). */
(function () {
  "use strict";
  var R = window.RDC;
  var t = R.t;
  var el = R.el;
  var cfg = R.config;
  var message = document.getElementById("message");
  var clinics = [];
  var users = [];

  function fail(err) {
    message.textContent = t("err.failed", { detail: err.message });
    message.hidden = false;
    R.toast(t("err.failed", { detail: err.message }), "error");
  }
  function ok(text) {
    message.hidden = true;
    R.toast(text || t("ad.saved"), "ok");
  }
  function words(value) {
    return String(value || "").split(/[\s,，]+/).filter(Boolean);
  }
  function tbody(id) {
    var body = document.querySelector("#" + id + " tbody");
    body.textContent = "";
    return body;
  }
  function input(name, value, attrs) {
    return el("input", Object.assign({ type: "text", name: name, value: value || "", "aria-label": name }, attrs || {}));
  }
  function select(name, values, current, labelOf, anyLabel) {
    var options = [];
    if (anyLabel !== undefined) options.push(el("option", { value: "", text: anyLabel }));
    values.forEach(function (v) {
      options.push(el("option", { value: v, text: labelOf ? labelOf(v) : v, selected: v === current }));
    });
    return el("select", { name: name, "aria-label": name }, options);
  }
  function button(text, onclick, cls) {
    return el("button", { type: "button", class: "btn small " + (cls || ""), text: text, onclick: onclick });
  }
  function cell(children, cls) {
    return el("td", { class: cls || "" }, children);
  }

  // --- tabs ------------------------------------------------------------------------------
  var loaders = {};
  function show(tab) {
    document.querySelectorAll(".admin-panel").forEach(function (panel) {
      panel.hidden = panel.dataset.panel !== tab;
    });
    document.querySelectorAll("#admin-tabs .tab").forEach(function (b) {
      b.setAttribute("aria-selected", b.dataset.tab === tab ? "true" : "false");
    });
    if (location.hash !== "#" + tab) history.replaceState(null, "", "#" + tab);
    message.hidden = true;
    // data-state: "loading" until the latest load of the tab has rendered, then "ready".
    var panel = document.getElementById("panel-" + tab);
    var generation = (panel.loads = (panel.loads || 0) + 1);
    panel.dataset.state = "loading";
    Promise.resolve((loaders[tab] || function () {})()).then(function () {
      if (panel.loads === generation) panel.dataset.state = "ready";
    });
  }
  document.getElementById("admin-tabs").addEventListener("click", function (event) {
    var tab = event.target.closest && event.target.closest(".tab");
    if (tab) show(tab.dataset.tab);
  });

  function loadClinics() {
    return R.api("GET", "/api/v1/clinics").then(function (list) {
      clinics = list;
      return list;
    });
  }
  function loadUsers() {
    return R.api("GET", "/api/v1/users").then(function (list) {
      users = list;
      return list;
    });
  }
  function clinicCodes() {
    return clinics.map(function (c) { return c.code; });
  }

  // --- clinics ---------------------------------------------------------------------------
  loaders.clinics = function () {
    return loadClinics().then(function (list) {
      var body = tbody("clinics");
      list.forEach(function (c) {
        var name = input("name", c.name, { maxlength: 200 });
        var aes = input("ae_titles", c.ae_titles.join(" "));
        var hl7 = input("hl7_facilities", (c.hl7_facilities || []).join(" "));
        function save(patch) {
          R.api("PATCH", "/api/v1/clinics/" + encodeURIComponent(c.code), patch).then(function () {
            ok();
            loaders.clinics();
          }, fail);
        }
        body.appendChild(
          el("tr", { dataset: { code: c.code }, class: c.active ? "" : "inactive" }, [
            el("td", { class: "code", text: c.code }),
            cell([name]),
            cell([aes]),
            cell([hl7]),
            el("td", { class: "num", text: String(c.users) }),
            el("td", { text: c.active ? t("common.yes") : t("common.no") }),
            cell([
              button(t("ad.save"), function () { save({ name: name.value, ae_titles: words(aes.value), hl7_facilities: words(hl7.value) }); }, "primary save"),
              c.active
                ? button(t("ad.disable"), function () {
                    if (window.confirm(t("ad.confirm_disable", { name: c.code }))) save({ active: false });
                  }, "danger disable")
                : button(t("ad.enable"), function () { save({ active: true }); }, "enable"),
            ], "actions"),
          ])
        );
      });
    }, fail);
  };
  document.getElementById("clinic-add").addEventListener("submit", function (event) {
    event.preventDefault();
    var f = event.target.elements;
    R.api("POST", "/api/v1/clinics", {
      code: f.code.value.trim(),
      name: f.name.value.trim(),
      ae_titles: words(f.ae_titles.value),
      hl7_facilities: words(f.hl7_facilities.value),
    })
      .then(function () {
        event.target.reset();
        ok();
        loaders.clinics();
      }, fail);
  });

  // --- users -----------------------------------------------------------------------------
  function quals(list) {
    return (list || []).map(function (q) { return q.discipline + (q.modality ? ":" + q.modality : ""); }).join(" ");
  }
  function parseQuals(value) {
    return words(value).map(function (w) {
      var parts = w.split(":");
      return parts[1] ? { discipline: parts[0], modality: parts[1] } : { discipline: parts[0] };
    });
  }
  var READERS = ["reader", "senior_reader"];
  loaders.users = function () {
    return Promise.all([loadUsers(), R.api("GET", "/api/v1/clinics?include_lead=true")]).then(function (res) {
      var orgs = res[1].map(function (c) { return c.code; });
      var addForm = document.getElementById("user-add");
      if (!addForm.elements.org_code.options.length) {
        orgs.forEach(function (code) { addForm.elements.org_code.appendChild(el("option", { value: code, text: code })); });
        cfg.roles.forEach(function (r) { addForm.elements.role.appendChild(el("option", { value: r, text: t("role." + r) })); });
      }
      var body = tbody("users");
      users.forEach(function (u) {
        var reader = READERS.indexOf(u.role) >= 0;
        var name = input("display_name", u.display_name, { maxlength: 200 });
        var role = select("role", cfg.roles, u.role, function (r) { return t("role." + r); });
        var level = select("level", cfg.levels, u.level || "", function (l) { return t("level." + l); }, t("common.none"));
        var pools = input("pools", (u.pools || []).join(" "), { disabled: !reader });
        var q = input("qualifications", quals(u.qualifications), { disabled: !reader });
        var pw = input("password", "", { type: "password", placeholder: t("ad.new_password"), autocomplete: "new-password", minlength: 8 });
        function patch(body) {
          R.api("PATCH", "/api/v1/users/" + encodeURIComponent(u.username), body).then(function () {
            ok();
            loaders.users();
          }, fail);
        }
        body.appendChild(
          el("tr", { dataset: { username: u.username }, class: u.active ? "" : "inactive" }, [
            el("td", { class: "code", text: u.username }),
            cell([name]),
            el("td", { text: u.org_code }),
            cell([role]),
            cell([level]),
            cell([pools]),
            cell([q]),
            el("td", { text: u.active ? t("common.yes") : t("common.no") }),
            cell([
              button(t("ad.save"), function () {
                var r = role.value;
                var isReader = READERS.indexOf(r) >= 0;
                var data = { display_name: name.value, role: r, level: isReader && level.value ? level.value : null };
                if (isReader) {
                  data.pools = words(pools.value);
                  data.qualifications = parseQuals(q.value);
                }
                patch(data);
              }, "primary save"),
              u.username === cfg.me
                ? null
                : u.active
                ? button(t("ad.disable"), function () {
                    if (!window.confirm(t("ad.confirm_disable", { name: u.username }))) return;
                    R.api("POST", "/api/v1/users/" + encodeURIComponent(u.username) + "/disable").then(function () {
                      ok();
                      loaders.users();
                    }, fail);
                  }, "danger disable")
                : button(t("ad.enable"), function () { patch({ active: true }); }, "enable"),
              el("span", { class: "pw" }, [
                pw,
                button(t("ad.reset_password"), function () {
                  R.api("POST", "/api/v1/users/" + encodeURIComponent(u.username) + "/password", { password: pw.value }).then(function () {
                    pw.value = "";
                    ok(t("ad.password_reset"));
                  }, fail);
                }, "reset"),
              ]),
            ], "actions"),
          ])
        );
      });
    }, fail);
  };
  document.getElementById("user-add").addEventListener("submit", function (event) {
    event.preventDefault();
    var f = event.target.elements;
    R.api("POST", "/api/v1/users", {
      username: f.username.value.trim(),
      display_name: f.display_name.value.trim(),
      org_code: f.org_code.value,
      role: f.role.value,
      password: f.password.value,
    }).then(function () {
      event.target.reset();
      ok();
      loaders.users();
    }, fail);
  });

  // --- routing rules ---------------------------------------------------------------------
  var rulesBody = document.querySelector("#rules tbody");
  function ruleRow(rule) {
    var row = el("tr", { class: "rule" }, [
      el("td", { class: "num pos" }),
      cell([select("discipline", cfg.disciplines, rule.discipline || "", null, t("ad.any"))]),
      cell([input("modality", rule.modality, { maxlength: 16, list: "modalities", placeholder: t("ad.any") })]),
      cell([input("body_part", rule.body_part, { maxlength: 64, placeholder: t("ad.any") })]),
      cell([select("clinic", clinicCodes(), rule.clinic || "", null, t("ad.any"))]),
      cell([select("priority", cfg.priorities, rule.priority || "", function (p) { return t("priority." + p); }, t("ad.any"))]),
      cell([input("pool", rule.pool, { maxlength: 64, required: true })]),
      cell([
        button(t("ad.up"), function () {
          if (row.previousElementSibling) rulesBody.insertBefore(row, row.previousElementSibling);
          number();
        }, "up"),
        button(t("ad.remove"), function () {
          row.remove();
          number();
        }, "danger remove"),
      ], "actions"),
    ]);
    return row;
  }
  function number() {
    Array.prototype.forEach.call(rulesBody.rows, function (row, i) {
      row.querySelector(".pos").textContent = String(i + 1);
    });
  }
  loaders.routing = function () {
    return Promise.all([loadClinics(), R.api("GET", "/api/v1/routing-rules")]).then(function (res) {
      rulesBody.textContent = "";
      res[1].rules.forEach(function (rule) { rulesBody.appendChild(ruleRow(rule)); });
      number();
    }, fail);
  };
  document.getElementById("rule-add").addEventListener("click", function () {
    rulesBody.appendChild(ruleRow({}));
    number();
  });
  document.getElementById("rules-save").addEventListener("click", function () {
    var rules = Array.prototype.map.call(rulesBody.rows, function (row) {
      function v(name) {
        var value = row.querySelector("[name=" + name + "]").value.trim();
        return value || null;
      }
      return { discipline: v("discipline"), modality: v("modality"), body_part: v("body_part"), clinic: v("clinic"), priority: v("priority"), pool: v("pool") || "" };
    });
    R.api("PUT", "/api/v1/routing-rules", rules).then(function () {
      ok();
      loaders.routing();
    }, fail);
  });

  // --- SLA targets -----------------------------------------------------------------------
  loaders.sla = function () {
    return R.api("GET", "/api/v1/sla-targets").then(function (res) {
      var body = tbody("sla");
      res.targets.forEach(function (target) {
        body.appendChild(
          el("tr", { dataset: { discipline: target.discipline, priority: target.priority } }, [
            el("td", { text: t("discipline." + target.discipline) }),
            el("td", { text: t("priority." + target.priority) }),
            cell([el("input", { type: "number", name: "minutes", min: 1, value: target.minutes, "aria-label": t("ad.col.minutes"), dataset: { was: target.minutes } })]),
            el("td", { class: "num muted", text: String(target.default_minutes) }),
          ])
        );
      });
    }, fail);
  };
  document.getElementById("sla-save").addEventListener("click", function () {
    var changed = [];
    document.querySelectorAll("#sla tbody tr").forEach(function (row) {
      var field = row.querySelector("input");
      if (field.value !== field.dataset.was) {
        changed.push({ discipline: row.dataset.discipline, priority: row.dataset.priority, minutes: parseInt(field.value, 10) });
      }
    });
    var apply = document.getElementById("sla-apply").checked;
    R.api("PUT", "/api/v1/sla-targets" + R.query({ apply_to_ready: apply ? "true" : "" }), changed).then(function (res) {
      ok(t("ad.sla.rescheduled", { n: res.rescheduled }));
      loaders.sla();
    }, fail);
  });

  // --- recognition -----------------------------------------------------------------------
  loaders.recognition = function () {
    return R.api("GET", "/api/v1/recognition/catalog").then(function (cat) {
      document.getElementById("catalog-version").textContent = cat.version ? t("ad.rec.version", { n: cat.version }) : "";
      var body = tbody("catalog");
      cat.items.forEach(function (i) {
        body.appendChild(el("tr", {}, [
          el("td", { class: "code", text: i.code }),
          el("td", { text: t("discipline." + i.discipline) }),
          el("td", { text: cfg.lang === "en" ? i.name_en || i.name_zh : i.name_zh }),
          el("td", { text: i.scope_mark }),
          el("td", { class: "num", text: String(i.valid_days) }),
          el("td", { text: [i.modality, i.body_part].filter(Boolean).join(" ") }),
        ]));
      });
    }, fail);
    R.api("GET", "/api/v1/recognition/accreditations").then(function (list) {
      var body = tbody("accreditations");
      list.forEach(function (a) {
        body.appendChild(el("tr", {}, [
          el("td", { text: a.org }),
          el("td", { text: a.item_code || t("discipline." + a.discipline) }),
          el("td", { class: "num", text: a.valid_from }),
          el("td", { class: "num", text: a.valid_to }),
          el("td", { text: a.note || "" }),
        ]));
      });
    }, fail);
  };
  document.getElementById("rec-upload").addEventListener("submit", function (event) {
    event.preventDefault();
    var f = event.target.elements;
    fetch("/api/v1/recognition/" + f.target.value + "?format=" + f.format.value, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Requested-With": "rdc", "Content-Type": "text/plain; charset=utf-8", Accept: "application/json" },
      body: f.text.value,
    }).then(function (response) {
      return response.json().then(function (data) {
        if (!response.ok) throw new Error(data.detail || data.title || "HTTP " + response.status);
        f.text.value = "";
        ok();
        loaders.recognition();
      });
    }).catch(fail);
  });

  // --- critical-value contacts and duty list ----------------------------------------------
  // A contact's account: one of the clinic's active users (notified in RDC as well).
  function accounts(name, code) {
    var names = users.filter(function (u) { return u.active && u.org_code === code; })
      .map(function (u) { return u.username; });
    return select(name, names, null, null, "—");
  }
  // datetime-local <-> ISO with the browser's offset (the API wants a time zone).
  function localValue(iso) {
    if (!iso) return "";
    var d = new Date(iso);
    var pad = function (n) { return String(n).padStart(2, "0"); };
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function isoValue(local) {
    return local ? new Date(local).toISOString() : null;
  }
  loaders.critical = function () {
    return Promise.all([loadClinics(), loadUsers()]).then(function () {
      var body = tbody("contacts");
      clinics.forEach(function (c) {
        var fields = {
          primary_name: input("primary_name", "", { maxlength: 200 }),
          primary_phone: input("primary_phone", "", { maxlength: 64 }),
          primary_username: accounts("primary_username", c.code),
          secondary_name: input("secondary_name", "", { maxlength: 200 }),
          secondary_phone: input("secondary_phone", "", { maxlength: 64 }),
          secondary_username: accounts("secondary_username", c.code),
        };
        R.api("GET", "/api/v1/critical-contacts/" + encodeURIComponent(c.code), null, { quiet401: true }).then(function (contact) {
          Object.keys(fields).forEach(function (k) { fields[k].value = contact[k] || ""; });
        }, function () {});
        body.appendChild(el("tr", { dataset: { code: c.code } }, [
          el("td", { class: "code", text: c.code }),
          cell([fields.primary_name]),
          cell([fields.primary_phone]),
          cell([fields.primary_username]),
          cell([fields.secondary_name]),
          cell([fields.secondary_phone]),
          cell([fields.secondary_username]),
          cell([button(t("ad.save"), function () {
            var data = {};
            Object.keys(fields).forEach(function (k) { data[k] = fields[k].value.trim() || null; });
            R.api("PUT", "/api/v1/critical-contacts/" + encodeURIComponent(c.code), data).then(function () { ok(); }, fail);
          }, "primary save")], "actions"),
        ]));
      });
      var duty = document.getElementById("duty-add").elements.username;
      duty.textContent = "";
      users.filter(function (u) { return u.active && ["reader", "senior_reader", "qc", "admin"].indexOf(u.role) >= 0; }).forEach(function (u) {
        duty.appendChild(el("option", { value: u.username, text: u.display_name + " (" + u.username + ")" }));
      });
      return R.api("GET", "/api/v1/critical-duty");
    }).then(function (list) {
      var body = tbody("duty");
      (list || []).forEach(function (d) {
        var from = input("on_from", localValue(d.on_from), { type: "datetime-local" });
        var until = input("on_until", localValue(d.on_until), { type: "datetime-local" });
        body.appendChild(el("tr", { dataset: { username: d.username } }, [
          el("td", { class: "code", text: d.username }),
          el("td", { text: d.name }),
          cell([from]),
          cell([until]),
          el("td", { text: d.on_duty_now ? t("common.yes") : t("common.no") }),
          cell([button(t("ad.save"), function () {
            R.api("POST", "/api/v1/critical-duty", {
              username: d.username, on_from: isoValue(from.value), on_until: isoValue(until.value),
            }).then(function () {
              ok();
              loaders.critical();
            }, fail);
          }, "primary save"), button(t("ad.remove"), function () {
            R.api("DELETE", "/api/v1/critical-duty/" + encodeURIComponent(d.username)).then(function () {
              ok();
              loaders.critical();
            }, fail);
          }, "danger remove")], "actions"),
        ]));
      });
    }, fail);
  };
  document.getElementById("duty-add").addEventListener("submit", function (event) {
    event.preventDefault();
    R.api("POST", "/api/v1/critical-duty", { username: event.target.elements.username.value }).then(function () {
      ok();
      loaders.critical();
    }, fail);
  });

  // --- delivery endpoints ----------------------------------------------------------------
  loaders.delivery = function () {
    return Promise.all([loadClinics(), R.api("GET", "/api/v1/delivery-endpoints")]).then(function (res) {
      var clinicSelect = document.getElementById("endpoint-add").elements.clinic;
      clinicSelect.textContent = "";
      clinicCodes().forEach(function (code) { clinicSelect.appendChild(el("option", { value: code, text: code })); });
      var body = tbody("endpoints");
      res[1].forEach(function (e) {
        body.appendChild(el("tr", { dataset: { id: e.id } }, [
          el("td", { text: e.clinic_code }),
          el("td", { text: e.name }),
          el("td", { text: e.channel.toUpperCase() }),
          el("td", { class: "num", text: (e.ae_title ? e.ae_title + "@" : "") + e.host + ":" + e.port }),
          el("td", { text: e.enabled ? t("common.yes") : t("common.no") }),
          cell([button(e.enabled ? t("ad.disable") : t("ad.enable"), function () {
            R.api("POST", "/api/v1/delivery-endpoints/" + encodeURIComponent(e.id) + (e.enabled ? "/disable" : "/enable")).then(function () {
              ok();
              loaders.delivery();
            }, fail);
          }, e.enabled ? "danger" : "")], "actions"),
        ]));
      });
    }, fail);
  };
  document.getElementById("endpoint-add").addEventListener("submit", function (event) {
    event.preventDefault();
    var f = event.target.elements;
    R.api("POST", "/api/v1/delivery-endpoints", {
      clinic: f.clinic.value,
      channel: f.channel.value,
      host: f.host.value.trim(),
      port: parseInt(f.port.value, 10),
      ae_title: f.ae_title.value.trim() || null,
    }).then(function () {
      event.target.reset();
      ok();
      loaders.delivery();
    }, fail);
  });

  // --- lab code mapping (the mapping queue) ------------------------------------------------
  var catalogue = null;
  function loadCatalogue() {
    if (catalogue) return Promise.resolve(catalogue);
    return R.api("GET", "/api/v1/lab/catalogue").then(function (list) {
      catalogue = list;
      return list;
    });
  }
  loaders.labmap = function () {
    var resolved = document.getElementById("labmap-resolved").checked;
    return Promise.all([
      loadCatalogue(),
      R.api("GET", "/api/v1/lab/mapping-queue" + R.query({ include_resolved: resolved ? "true" : "" })),
    ]).then(function (res) {
      var body = tbody("labmap");
      if (!res[1].length) body.appendChild(el("tr", { class: "placeholder" }, [el("td", { colspan: 9, text: t("ad.lm.empty") })]));
      res[1].forEach(function (e) {
        var actions;
        var target;
        if (e.resolved_loinc) {
          target = el("td", { text: t("ad.lm.mapped", { loinc: e.resolved_loinc }) });
          actions = cell([], "actions");
        } else {
          var pick = el(
            "select",
            { name: "loinc", "aria-label": t("ad.lm.loinc") },
            [el("option", { value: "", text: "—" })].concat(
              res[0].map(function (c) {
                return el("option", { value: c.loinc, text: c.loinc + " " + c.name_zh + " " + (c.unit || "") });
              })
            )
          );
          var all = el("input", { type: "checkbox", name: "all_senders", "aria-label": t("ad.lm.all") });
          target = cell([pick, el("label", { class: "muted" }, [all, " " + t("ad.lm.all")])]);
          actions = cell([button(t("ad.lm.map"), function () {
            if (!pick.value) return;
            R.api("POST", "/api/v1/lab/mapping-queue/" + encodeURIComponent(e.id) + "/resolve", {
              loinc: pick.value,
              all_senders: all.checked,
            }).then(function (out) {
              ok(t("ad.lm.done", { loinc: out.loinc, n: out.reverified.length, r: out.released.length }));
              loaders.labmap();
            }, fail);
          }, "primary")], "actions");
        }
        body.appendChild(el("tr", { dataset: { id: e.id, code: e.code } }, [
          el("td", { text: e.clinic || "" }),
          el("td", { text: e.facility }),
          el("td", { text: (e.code_system ? e.code_system + " " : "") + e.code }),
          el("td", { text: e.text }),
          el("td", { text: e.unit }),
          el("td", { class: "num", text: String(e.occurrences) }),
          el("td", { class: "muted", text: cfg.lang === "en" ? e.reason : e.reason_zh || e.reason }),
          target,
          actions,
        ]));
      });
    }, fail);
  };
  document.getElementById("labmap-resolved").addEventListener("change", function () {
    loaders.labmap();
  });

  // The modality suggestions of the routing rules' inputs.
  document.body.appendChild(
    el("datalist", { id: "modalities" }, cfg.modalities.map(function (m) { return el("option", { value: m }); }))
  );
  var first = (location.hash || "").slice(1);
  loadClinics().then(function () {
    show(loaders[first] ? first : "clinics");
  }, fail);
})();

// Kiln UI behaviour. The page's Content-Security-Policy forbids inline scripts and handlers,
// so everything interactive is wired here, by event delegation.
(function () {
  "use strict";

  // ---- errors shown in place ------------------------------------------------------------
  // A failed htmx request answers with application/problem+json; its `detail` goes into the
  // `.form-error` slot of the nearest form or [data-error-scope] that has one (as text, never
  // as HTML), or into a toast when there is no such slot.

  function problemDetail(xhr) {
    if (!xhr || xhr.status === 0) {
      return "Kiln could not be reached. Check your connection and try again.";
    }
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && typeof body.detail === "string" && body.detail) return body.detail;
    } catch (e) { /* not JSON */ }
    return "The request failed (" + xhr.status + (xhr.statusText ? " " + xhr.statusText : "") + ").";
  }

  function errorSlot(elt) {
    for (let node = elt; node && node.nodeType === 1; node = node.parentElement) {
      if (node.matches("form, [data-error-scope]")) {
        const slot = node.querySelector(":scope > .form-error");
        if (slot) return slot;
      }
    }
    return null;
  }

  let toastTimer = null;
  function toast(message) {
    const box = document.getElementById("toast");
    if (!box) return;
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { box.hidden = true; }, 8000);
  }

  function showError(elt, message) {
    const slot = elt ? errorSlot(elt) : null;
    if (!slot) { toast(message); return; }
    slot.textContent = message;
    slot.hidden = false;
    slot.focus({ preventScroll: true });
    if (slot.scrollIntoView) slot.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  // ---- errors at their fields --------------------------------------------------------------
  // A problem's `errors` ({field, message}) name the inputs it is about: each message is shown
  // under its field, which is marked invalid (aria-invalid, aria-describedby) and the first
  // one focused. The banner at the top of the form is only for what no field can hold. The
  // browser's own checks (required, pattern...) are shown the same way, with the field's
  // data-invalid text for a pattern instead of "Please match the requested format."

  let fieldErrorCount = 0;

  function formOf(elt) {
    if (!elt || !elt.closest) return null;
    return elt.matches("form") ? elt : elt.closest("form");
  }

  function controlFor(form, field) {
    if (!form || !field) return null;
    const found = form.elements.namedItem(String(field).split(".")[0]);
    if (!found) return null;
    const control = typeof found.length === "number" && !found.tagName ? found[0] : found;
    return control && control.type !== "hidden" ? control : null;
  }

  function errorHome(control) {
    // After a group of checkboxes as a whole; otherwise at the end of the field's label.
    if (control.type === "checkbox" || control.type === "radio") {
      const group = control.closest(".checks, fieldset");
      if (group) return { parent: group.parentNode, before: group.nextSibling };
    }
    const label = control.closest("label");
    if (label) return { parent: label, before: null };
    return { parent: control.parentNode, before: control.nextSibling };
  }

  function markInvalid(control, message) {
    clearFieldError(control);
    const box = document.createElement("span");
    box.className = "field-error";
    box.id = "field-error-" + (++fieldErrorCount);
    box.textContent = message;
    const home = errorHome(control);
    home.parent.insertBefore(box, home.before);
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("data-error-id", box.id);
    const described = (control.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
    described.push(box.id);
    control.setAttribute("aria-describedby", described.join(" "));
  }

  function clearFieldError(control) {
    const id = control.getAttribute("data-error-id");
    if (!id) return;
    const box = document.getElementById(id);
    if (box) box.remove();
    const described = (control.getAttribute("aria-describedby") || "").split(" ").filter(function (d) { return d && d !== id; });
    if (described.length) control.setAttribute("aria-describedby", described.join(" "));
    else control.removeAttribute("aria-describedby");
    control.removeAttribute("aria-invalid");
    control.removeAttribute("data-error-id");
  }

  function clearFieldErrors(form) {
    if (!form) return;
    form.querySelectorAll("[data-error-id]").forEach(clearFieldError);
  }

  // Shows each error at its field; returns the messages no field of the form could hold.
  function showFieldErrors(form, errors) {
    const left = [];
    let first = null;
    (errors || []).forEach(function (error) {
      const control = controlFor(form, error && error.field);
      if (!control || typeof error.message !== "string") {
        if (error && typeof error.message === "string") left.push(error.message);
        return;
      }
      markInvalid(control, error.message);
      if (!first) first = control;
    });
    if (first) {
      first.focus({ preventScroll: true });
      if (first.scrollIntoView) first.scrollIntoView({ block: "center", behavior: "smooth" });
    }
    return { placed: !!first, left: left };
  }

  function problemErrors(xhr) {
    try {
      const body = JSON.parse(xhr.responseText);
      return body && Array.isArray(body.errors) ? body.errors : [];
    } catch (e) {
      return [];
    }
  }

  document.addEventListener("input", function (evt) {
    if (evt.target.getAttribute && evt.target.getAttribute("data-error-id")) clearFieldError(evt.target);
  });
  document.addEventListener("change", function (evt) {
    if (evt.target.getAttribute && evt.target.getAttribute("data-error-id")) clearFieldError(evt.target);
  });

  // The browser's own checks, shown like the server's; the first invalid field is focused.
  let focusedThisRound = false;
  document.addEventListener("invalid", function (evt) {
    const control = evt.target;
    evt.preventDefault();  // no browser bubble: the message goes under the field
    const custom = control.getAttribute("data-invalid");
    const validity = control.validity || {};
    const useCustom = custom && (validity.patternMismatch || validity.typeMismatch);
    markInvalid(control, useCustom ? custom : control.validationMessage);
    if (!focusedThisRound) {
      focusedThisRound = true;
      control.focus({ preventScroll: true });
      if (control.scrollIntoView) control.scrollIntoView({ block: "center", behavior: "smooth" });
      setTimeout(function () { focusedThisRound = false; }, 0);
    }
  }, true);

  document.addEventListener("htmx:beforeRequest", function (evt) {
    const slot = errorSlot(evt.detail.elt);
    if (slot) { slot.hidden = true; slot.textContent = ""; }
    clearFieldErrors(formOf(evt.detail.elt));
  });
  document.addEventListener("htmx:responseError", function (evt) {
    const form = formOf(evt.detail.elt);
    const shown = form ? showFieldErrors(form, problemErrors(evt.detail.xhr)) : { placed: false, left: [] };
    if (shown.placed && !shown.left.length) return;  // every message is at its field
    showError(evt.detail.elt, shown.placed ? shown.left.join("; ") : problemDetail(evt.detail.xhr));
  });
  document.addEventListener("htmx:sendError", function (evt) {
    showError(evt.detail.elt, problemDetail(null));
  });

  // Forms marked data-reset are cleared after a successful request (passwords, new rows).
  document.addEventListener("htmx:afterRequest", function (evt) {
    const elt = evt.detail.elt;
    if (evt.detail.successful && elt.matches && elt.matches("form[data-reset]")) elt.reset();
  });

  // ---- times ----------------------------------------------------------------------------
  // One format with its zone, as the server writes it (kiln.web.times): 24-hour UTC. Relative
  // times (<time data-relative>) are re-written as the page stays open, with the server's
  // rules, so "in 40 seconds" never lingers once that moment has passed.

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function utcClock(date) {
    return pad(date.getUTCHours()) + ":" + pad(date.getUTCMinutes()) + " UTC";
  }

  const UNITS = [["day", 86400], ["hour", 3600], ["minute", 60], ["second", 1]];
  function relativeText(date, now) {
    let seconds = (now - date) / 1000;
    const future = seconds < 0;
    seconds = Math.abs(seconds);
    if (!future && seconds < 10) return "just now";
    if (future && seconds < 1) return "now";
    for (const [unit, size] of UNITS) {
      if (seconds >= size) {
        const n = Math.floor(seconds / size);
        const text = n + " " + unit + (n === 1 ? "" : "s");
        return future ? "in " + text : text + " ago";
      }
    }
    return "now";
  }

  function refreshTimes() {
    const now = Date.now();
    document.querySelectorAll("time[data-relative][datetime]").forEach(function (el) {
      const date = new Date(el.getAttribute("datetime"));
      if (!isNaN(date)) el.textContent = relativeText(date, now);
    });
  }
  setInterval(refreshTimes, 5000);

  // ---- secret values: <input type=checkbox data-masks="FIELD"> -----------------------------
  // While ticked, FIELD of the same form is a password field: a secret is not shown as it is
  // typed (nor kept by the browser's autofill).
  function applyMask(box) {
    const field = box.form && box.form.elements.namedItem(box.getAttribute("data-masks"));
    if (field && field.tagName === "INPUT") field.type = box.checked ? "password" : "text";
  }
  document.addEventListener("change", function (evt) {
    if (evt.target.matches && evt.target.matches("input[data-masks]")) applyMask(evt.target);
  });
  document.addEventListener("htmx:load", function (evt) {
    const root = evt.detail.elt;
    if (root && root.querySelectorAll) root.querySelectorAll("input[data-masks]").forEach(applyMask);
  });

  // ---- copy buttons: <button data-copy="element-id"> -------------------------------------
  document.addEventListener("click", function (evt) {
    const button = evt.target.closest ? evt.target.closest("[data-copy]") : null;
    if (!button) return;
    const source = document.getElementById(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });

  // ---- text editor ---------------------------------------------------------------------
  // The editor form PUTs the textarea's text as the raw request body to the file API,
  // which streams it to disk with its size and quota limits.
  htmx.defineExtension("raw-body", {
    onEvent: function (name, evt) {
      if (name === "htmx:configRequest") {
        evt.detail.headers["Content-Type"] = "text/plain; charset=utf-8";
      }
    },
    encodeParameters: function (xhr, parameters, elt) {
      const area = elt.querySelector("textarea[data-editor]");
      return area ? area.value : "";
    },
  });

  function saveState(form, text, kind) {
    const state = form.querySelector(".save-state");
    if (!state) return;
    state.textContent = text;
    state.className = "save-state" + (kind ? " " + kind : "");
  }

  document.addEventListener("keydown", function (evt) {
    const editor = evt.target.closest ? evt.target.closest("textarea[data-editor]") : null;
    if (!editor) return;
    if ((evt.ctrlKey || evt.metaKey) && evt.key.toLowerCase() === "s") {
      evt.preventDefault();
      if (editor.form) editor.form.requestSubmit();
    } else if (evt.key === "Tab" && !evt.shiftKey && !evt.ctrlKey && !evt.altKey && !evt.metaKey) {
      evt.preventDefault();
      editor.setRangeText("    ", editor.selectionStart, editor.selectionEnd, "end");
      editor.dispatchEvent(new Event("input", { bubbles: true }));
    }
  });
  document.addEventListener("input", function (evt) {
    const area = evt.target;
    if (area.matches && area.matches("textarea[data-editor]") && area.form) {
      area.form.setAttribute("data-dirty", "");
      saveState(area.form, "Unsaved changes", "dirty");
    }
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    const form = evt.detail.elt;
    if (!evt.detail.successful || !form.matches || !form.matches("form[hx-ext~=raw-body]")) return;
    form.removeAttribute("data-dirty");
    let saved = new Date();
    try {
      saved = new Date(JSON.parse(evt.detail.xhr.responseText).modified || saved);
    } catch (e) { /* not JSON: the time of the answer */ }
    saveState(form, "Saved at " + utcClock(saved), "saved");
  });
  window.addEventListener("beforeunload", function (evt) {
    if (document.querySelector("form[data-dirty]")) { evt.preventDefault(); evt.returnValue = ""; }
  });

  // ---- uploads --------------------------------------------------------------------------
  // Each chosen file is PUT to the file API (streamed, with its limits), with the same CSRF
  // header htmx sends; then the folder listing reloads in place.
  function csrfHeaders() {
    try {
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}");
    } catch (e) {
      return {};
    }
  }

  document.addEventListener("submit", function (evt) {
    const form = evt.target;
    if (!form.matches("form[data-upload]")) return;
    evt.preventDefault();
    const input = form.querySelector("input[type=file]");
    const chosen = Array.from((input && input.files) || []);
    if (!chosen.length) return;
    const slot = errorSlot(form);
    if (slot) { slot.hidden = true; slot.textContent = ""; }
    const status = form.querySelector(".upload-status");
    const button = form.querySelector("button[type=submit]");
    const base = form.getAttribute("data-upload-url");
    button.disabled = true;
    (async function () {
      try {
        for (let i = 0; i < chosen.length; i++) {
          const file = chosen[i];
          status.textContent = "Uploading " + file.name + " (" + (i + 1) + " of " + chosen.length + ")…";
          const response = await fetch(base + encodeURIComponent(file.name), {
            method: "PUT",
            body: file,
            headers: csrfHeaders(),
            credentials: "same-origin",
          });
          if (!response.ok) {
            const fake = { status: response.status, statusText: response.statusText, responseText: await response.text() };
            throw new Error(file.name + ": " + problemDetail(fake));
          }
        }
        status.textContent = chosen.length === 1 ? "Uploaded." : "Uploaded " + chosen.length + " files.";
        form.reset();
      } catch (err) {
        status.textContent = "";
        showError(form, err instanceof Error ? err.message : String(err));
      } finally {
        button.disabled = false;
        htmx.ajax("GET", form.getAttribute("data-listing"), { target: "#file-list", swap: "outerHTML" });
      }
    })();
  });

  // ---- new project: "upload an archive" posts the same form to the upload endpoint ------
  document.addEventListener("htmx:configRequest", function (evt) {
    const form = evt.detail.elt;
    if (!form.matches || !form.matches("form[data-upload-path]")) return;
    const source = form.querySelector("input[name=source]:checked");
    if (source && source.value === "upload") evt.detail.path = form.getAttribute("data-upload-path");
  });
})();

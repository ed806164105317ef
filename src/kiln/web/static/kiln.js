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

  document.addEventListener("htmx:beforeRequest", function (evt) {
    const slot = errorSlot(evt.detail.elt);
    if (slot) { slot.hidden = true; slot.textContent = ""; }
  });
  document.addEventListener("htmx:responseError", function (evt) {
    showError(evt.detail.elt, problemDetail(evt.detail.xhr));
  });
  document.addEventListener("htmx:sendError", function (evt) {
    showError(evt.detail.elt, problemDetail(null));
  });

  // Forms marked data-reset are cleared after a successful request (passwords, new rows).
  document.addEventListener("htmx:afterRequest", function (evt) {
    const elt = evt.detail.elt;
    if (evt.detail.successful && elt.matches && elt.matches("form[data-reset]")) elt.reset();
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

  // ---- text editor: Ctrl/Cmd+S saves, Tab indents, leaving with unsaved changes warns ----
  document.addEventListener("keydown", function (evt) {
    const editor = evt.target.closest ? evt.target.closest("textarea[data-editor]") : null;
    if (!editor) return;
    if ((evt.ctrlKey || evt.metaKey) && evt.key === "s") {
      evt.preventDefault();
      if (editor.form) editor.form.requestSubmit();
    } else if (evt.key === "Tab" && !evt.shiftKey && !evt.ctrlKey && !evt.altKey) {
      evt.preventDefault();
      editor.setRangeText("    ", editor.selectionStart, editor.selectionEnd, "end");
      editor.dispatchEvent(new Event("input", { bubbles: true }));
    }
  });
  document.addEventListener("input", function (evt) {
    if (evt.target.matches && evt.target.matches("textarea[data-editor]")) {
      evt.target.form.setAttribute("data-dirty", "");
    }
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    const elt = evt.detail.elt;
    if (evt.detail.successful && elt.matches && elt.matches("form[data-dirty]")) {
      elt.removeAttribute("data-dirty");
    }
  });
  window.addEventListener("beforeunload", function (evt) {
    if (document.querySelector("form[data-dirty]")) { evt.preventDefault(); evt.returnValue = ""; }
  });
})();

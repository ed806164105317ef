// Kiln's code editor: CodeMirror 6 on the file editor page, bundled by esbuild into
// static/vendor/editor.js at set-up time (`make assets`, scripts/copy_assets.py).
//
// Progressive enhancement: the page's <textarea data-editor> stays the form's source of
// truth (kiln.js sends its text as the file's new content, tracks unsaved changes and saves
// on Ctrl+S); this editor replaces it on screen and writes every change back into it.
//
// The page's CSP admits <style> elements only with this response's nonce, which the page
// gives to this script's own <script> tag: CodeMirror's style elements get the same nonce.

import { basicSetup } from "codemirror";
import { EditorView, keymap } from "@codemirror/view";
import { EditorState, Compartment } from "@codemirror/state";
import { indentWithTab } from "@codemirror/commands";
import { StreamLanguage } from "@codemirror/language";
import { python } from "@codemirror/lang-python";
import { markdown } from "@codemirror/lang-markdown";
import { json } from "@codemirror/lang-json";
import { yaml } from "@codemirror/lang-yaml";
import { javascript } from "@codemirror/lang-javascript";
import { css } from "@codemirror/lang-css";
import { html } from "@codemirror/lang-html";
import { sql } from "@codemirror/lang-sql";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { toml } from "@codemirror/legacy-modes/mode/toml";
import { r } from "@codemirror/legacy-modes/mode/r";
import { dockerFile } from "@codemirror/legacy-modes/mode/dockerfile";
import { oneDark } from "@codemirror/theme-one-dark";

const nonce = document.currentScript ? document.currentScript.nonce : "";

// The language of a file, by its name (as the viewer's highlighter picks it).
const BY_EXTENSION = {
  py: python, pyw: python, ipy: python,
  md: markdown, markdown: markdown,
  json: json, ipynb: json,
  yml: yaml, yaml: yaml,
  js: javascript, mjs: javascript, cjs: javascript,
  ts: () => javascript({ typescript: true }),
  css: css,
  html: html, htm: html,
  sql: sql,
  sh: () => StreamLanguage.define(shell), bash: () => StreamLanguage.define(shell),
  toml: () => StreamLanguage.define(toml),
  r: () => StreamLanguage.define(r),
};

function languageFor(name) {
  const lower = (name || "").toLowerCase();
  if (lower === "dockerfile" || lower.endsWith(".dockerfile")) return StreamLanguage.define(dockerFile);
  if (lower === "cdsw-build.sh" || lower === ".bashrc") return StreamLanguage.define(shell);
  const dot = lower.lastIndexOf(".");
  const make = dot >= 0 ? BY_EXTENSION[lower.slice(dot + 1)] : undefined;
  return make ? make() : [];
}

// Typing over a selection that spans lines, Chrome's own editing keeps the removed text's
// look by writing style *attributes* into the editor, which the page's CSP refuses (and
// reports). The editor makes that change itself instead: same text, no inline style.
const replaceSelectionsItself = EditorView.domEventHandlers({
  beforeinput(event, view) {
    const typed = event.inputType === "insertText" && typeof event.data === "string";
    if (!typed || event.isComposing || view.state.selection.main.empty) return false;
    event.preventDefault();
    view.dispatch(view.state.replaceSelection(event.data), {
      scrollIntoView: true,
      userEvent: "input.type",
    });
    return true;
  },
});

function enhance(area) {
  const form = area.form;
  const dark = window.matchMedia("(prefers-color-scheme: dark)");
  const theme = new Compartment();
  const view = new EditorView({
    parent: area.parentNode,
    state: EditorState.create({
      doc: area.value,
      extensions: [
        basicSetup,
        keymap.of([
          {
            key: "Mod-s",
            preventDefault: true,
            run: () => { if (form) form.requestSubmit(); return true; },
          },
          indentWithTab,
        ]),
        languageFor(area.getAttribute("data-filename")),
        theme.of(dark.matches ? oneDark : []),
        EditorView.cspNonce.of(nonce),
        replaceSelectionsItself,
        EditorView.contentAttributes.of({ "aria-label": area.getAttribute("aria-label") || "Editor" }),
        EditorView.updateListener.of((update) => {
          if (!update.docChanged) return;
          area.value = update.state.doc.toString();
          // kiln.js listens for input on the textarea: "Unsaved changes".
          area.dispatchEvent(new Event("input", { bubbles: true }));
        }),
      ],
    }),
  });
  area.parentNode.insertBefore(view.dom, area);
  area.hidden = true;
  area.setAttribute("data-enhanced", "");
  dark.addEventListener("change", (evt) => {
    view.dispatch({ effects: theme.reconfigure(evt.matches ? oneDark : []) });
  });
  view.focus();
}

document.querySelectorAll("textarea[data-editor]").forEach(enhance);

// The session page's terminal: xterm.js (with its fit addon) bridged to the session's
// terminal WebSocket (kiln.api.sessions). Input goes out as binary frames (so typed text can
// never be mistaken for a control message); a window or layout resize is sent as the text
// frame {"type":"resize","cols":C,"rows":R}; output arrives as binary frames, and
// {"type":"exit","exit_code":N,"session_state":S} precedes a normal close when the shell
// exits (S is "stopping" when the shell ended because the session is being stopped).
//
// The terminal connects when the session is running: the page's #session-status fragment
// (polled by htmx while the session starts) carries the state in data-session-state.
(function () {
  "use strict";

  // ---- the page's Content-Security-Policy --------------------------------------------
  // This page's CSP admits <style> elements only with this response's nonce, which the
  // server put on this <script> tag (a script can read it; CSS and markup cannot). xterm.js
  // creates style elements for its theme and cell sizes: each style element that this page's
  // own scripts create gets the nonce. Markup injected into the page still gets no styles.
  const styleNonce = document.currentScript ? document.currentScript.nonce : "";
  if (styleNonce) {
    const createElement = document.createElement.bind(document);
    document.createElement = function (name, options) {
      const element = createElement(name, options);
      if (String(name).toLowerCase() === "style") element.nonce = styleNonce;
      return element;
    };
  }

  // xterm's DOM renderer writes 24-bit colours as style *attributes*, which the CSP refuses
  // (a nonce cannot cover attributes). The same declarations set through CSSOM are allowed.
  // This reaches into xterm 5.5's renderer (the version package-lock.json pins); if its shape
  // ever changes it does nothing, and only 24-bit colours are lost (the browser test shows it).
  function styleCellsThroughCssom(term) {
    try {
      const renderer = term._core._renderService._renderer.value;
      const rows = renderer && renderer._rowFactory;
      if (!rows || typeof rows._addStyle !== "function") return;
      rows._addStyle = function (element, declaration) {
        const colon = declaration.indexOf(":");
        if (colon > 0) {
          element.style.setProperty(
            declaration.slice(0, colon).trim(), declaration.slice(colon + 1).trim());
        }
      };
    } catch (e) { /* another xterm version: keep its own behaviour */ }
  }

  const box = document.getElementById("terminal");
  if (!box || typeof window.Terminal !== "function" || !window.FitAddon) return;
  const stateLine = document.getElementById("terminal-state");
  const reconnect = document.getElementById("terminal-reconnect");
  const encoder = new TextEncoder();

  const CLOSE_MESSAGES = {
    4401: "You are signed out: reload the page and sign in again.",
    4403: "You may not open this terminal",
    4404: "This session no longer exists.",
    4409: "The session is not running",
    1011: "The runner failed",
  };

  let term = null;
  let fit = null;
  let socket = null;
  let exitCode = null;
  let sessionEnding = false; // the shell ended because the session is ending
  let autoConnected = false; // one automatic connection per stretch of "running"

  function sessionState() {
    const status = document.getElementById("session-status");
    return status ? status.getAttribute("data-session-state") : "";
  }

  function say(message, isError) {
    stateLine.textContent = message;
    stateLine.classList.toggle("error", Boolean(isError));
  }

  function ensureTerminal() {
    if (term) return;
    term = new window.Terminal({
      cursorBlink: true,
      scrollback: 5000,
      fontFamily: 'ui-monospace, "SFMono-Regular", "JetBrains Mono", Menlo, Consolas, "Liberation Mono", monospace',
      fontSize: 14,
      theme: { background: "#101216", foreground: "#e6e9ed" },
    });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    styleCellsThroughCssom(term);
    fitNow();
    term.onData(function (data) { send(encoder.encode(data)); });
    term.onBinary(function (data) {
      send(Uint8Array.from(data, function (c) { return c.charCodeAt(0) & 0xff; }));
    });
    term.onResize(function (size) {
      send(JSON.stringify({ type: "resize", cols: size.cols, rows: size.rows }));
    });
    let pending = null;
    function refit() {
      clearTimeout(pending);
      pending = setTimeout(fitNow, 80);
    }
    window.addEventListener("resize", refit);
    if (window.ResizeObserver) new ResizeObserver(refit).observe(box);
  }

  function fitNow() {
    if (!fit || box.clientWidth === 0) return;
    try { fit.fit(); } catch (e) { /* not laid out yet */ }
  }

  function send(data) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(data);
  }

  function connect() {
    ensureTerminal();
    if (socket) return;
    autoConnected = true;
    exitCode = null;
    sessionEnding = false;
    reconnect.hidden = true;
    box.classList.remove("closed");
    say("Connecting…");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = "?rows=" + term.rows + "&cols=" + term.cols;
    const ws = new WebSocket(scheme + "//" + location.host + box.getAttribute("data-terminal-path") + query);
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.addEventListener("open", function () {
      say("Connected");
      fitNow();
      term.focus();
    });
    ws.addEventListener("message", function (evt) {
      if (typeof evt.data !== "string") {
        term.write(new Uint8Array(evt.data));
        return;
      }
      try {
        const message = JSON.parse(evt.data);
        if (message && message.type === "exit") {
          exitCode = message.exit_code;
          sessionEnding = Boolean(message.session_state) && message.session_state !== "running";
        }
      } catch (e) { /* not a control message: nothing else comes as text */ }
    });
    ws.addEventListener("close", function (evt) {
      socket = null;
      box.classList.add("closed");
      let message;
      let isError = false;
      if (exitCode !== null && sessionEnding) {
        message = "The session is ending: its terminal closed.";
      } else if (exitCode !== null) {
        // Whether the session itself is still running, the status fragment says (asked below).
        message = exitCode === 0 ? "The shell exited." : "The shell exited (code " + exitCode + ").";
      } else if (CLOSE_MESSAGES[evt.code]) {
        message = CLOSE_MESSAGES[evt.code] + (evt.reason && evt.code !== 4401 ? ": " + evt.reason : "");
        isError = evt.code !== 4409;
      } else if (evt.code === 1000) {
        message = "The terminal closed.";
      } else {
        message = "The connection to the terminal was lost.";
        isError = true;
      }
      say(message, isError);
      term.write("\r\n\x1b[2m[" + message + "]\x1b[0m\r\n");
      // Has the session itself ended? The status fragment asks the server again.
      document.body.dispatchEvent(new CustomEvent("session-changed"));
      offerReconnect();
    });
  }

  function offerReconnect() {
    reconnect.hidden = socket !== null || sessionState() !== "running";
  }

  function follow() {
    const state = sessionState();
    if (state === "running") {
      if (!socket && !autoConnected) connect();
      offerReconnect();
      return;
    }
    autoConnected = false;
    offerReconnect();
    if (socket) return; // the server closes it when the session ends; its message says why
    if (state === "queued" || state === "waiting" || state === "starting") {
      say("The terminal opens when the session is running…");
    } else if (state === "stopping") {
      say("The session is stopping.");
    } else if (state) {
      // How it ended, in the words of the page (never an exit status of Kiln's own stop).
      const status = document.getElementById("session-status");
      const outcome = status ? status.getAttribute("data-session-outcome") : "";
      say((outcome || "The session has ended.") + " Its terminal is closed.");
    }
  }

  reconnect.addEventListener("click", connect);
  // After each swap of the status fragment (htmx fires this on the new element).
  document.body.addEventListener("htmx:afterSettle", follow);
  follow();
})();

// Optional auto-refresh for /analytics: every 30 s, fetch this same URL and swap the #live part of the page.
// The page works without this file; it never builds HTML itself and never runs code it fetched.
(function () {
  "use strict";
  var PERIOD_MS = 30000;
  var KEY = "ollama-proxy-dashboard-refresh";
  var toggle = document.getElementById("refresh");
  var label = document.getElementById("refresh-toggle");
  if (!toggle || !label || !window.fetch || !window.DOMParser) {
    return;
  }
  var timer = null;

  function refresh() {
    fetch(window.location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then(function (answer) {
        if (!answer.ok) { throw new Error("HTTP " + answer.status); }
        return answer.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) { live.replaceWith(document.adoptNode(fresh)); }
      })
      .catch(function () { /* keep the current figures; the next tick tries again */ });
  }

  function apply() {
    if (timer) { window.clearInterval(timer); timer = null; }
    if (toggle.checked) { timer = window.setInterval(refresh, PERIOD_MS); }
    try { window.localStorage.setItem(KEY, toggle.checked ? "1" : ""); } catch (e) { /* private mode */ }
  }

  try { toggle.checked = window.localStorage.getItem(KEY) === "1"; } catch (e) { toggle.checked = false; }
  label.hidden = false;
  toggle.addEventListener("change", apply);
  apply();
}());

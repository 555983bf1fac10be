// meshlet appview: live updates. The page works without this file; with it, the main part
// of the page is replaced when the server says the view changed (server-sent events).
(function () {
  "use strict";
  if (!window.EventSource || !window.fetch || !window.DOMParser) return;
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main"), main = document.getElementById("main");
        if (!fresh || !main) return;
        // Keep an open <select> of the filters alone while someone uses it.
        var active = document.activeElement;
        if (active && active.tagName === "SELECT" && main.contains(active)) { again = true; return; }
        main.replaceWith(fresh);
        document.body.dataset.version = doc.body.dataset.version || "";
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; setTimeout(refresh, 100); } });
  }
  var live = document.getElementById("live");
  var source = new EventSource("/events");
  source.addEventListener("hello", function () { if (live) live.hidden = false; });
  source.addEventListener("change", refresh);
  source.onerror = function () { if (live) live.hidden = true; };
  // Filter selects submit themselves when scripts run (the button stays for no-JS).
  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t && t.tagName === "SELECT" && t.form && t.form.classList.contains("filters")) t.form.submit();
  });
})();

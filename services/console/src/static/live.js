// Flywheel console: reloads the page once the view it was drawn from has
// changed. The page says what it depends on (data-live: "records", plus
// "probes" for offset-derived numbers, "trainer" for the trainer's scraped
// progress) and which version it shows.
(function () {
  "use strict";
  var body = document.body;
  var drawn = body.getAttribute("data-version");
  var wants = (body.getAttribute("data-live") || "records").split(" ");
  var every = Number(body.getAttribute("data-refresh-ms")) || 5000;
  function version(v) {
    var n = 0;
    if (wants.indexOf("records") >= 0) { n += v.changes; }
    if (wants.indexOf("probes") >= 0) { n += v.probes; }
    if (wants.indexOf("trainer") >= 0) { n += v.trainer; }
    return String(n);
  }
  function tick() {
    fetch("/api/version", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) {
        if (v && version(v) !== drawn) { location.reload(); } else { setTimeout(tick, every); }
      })
      .catch(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();

// drscreen web interface: the only script. No framework, nothing loaded from elsewhere.
// 1. Result pages poll their progress route and reload once the result is complete.
// 2. Pages with data-refresh-seconds (the jobs list while a job runs) reload themselves.
// 3. Upload forms show that they are busy and cannot be sent twice.
"use strict";

(function () {
  const POLL_MS = 2000;
  const GIVE_UP_MS = 15 * 60 * 1000;

  function pollProgress(el) {
    const url = el.getAttribute("data-progress-url");
    const text = el.querySelector("[data-progress-text]");
    const started = Date.now();
    const pageScored = el.getAttribute("data-scored") === "true";

    async function tick() {
      if (Date.now() - started > GIVE_UP_MS) {
        if (text) text.textContent = "Still not complete: reload the page later.";
        return;
      }
      try {
        const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" });
        if (resp.status === 401) { window.location.assign("/login"); return; }
        if (resp.ok) {
          const p = await resp.json();
          if (p.complete) { window.location.reload(); return; }
          // Grades in, heatmaps still being drawn: show the grades now.
          if (p.scored && !pageScored) { window.location.reload(); return; }
          if (text) {
            text.textContent = p.scored
              ? "Results ready; drawing heatmaps (" + p.heatmaps_missing + " left)…"
              : p.finished + " of " + p.total + " photograph(s) scored…";
          }
        }
      } catch (err) {
        // Network hiccup: try again on the next tick.
      }
      window.setTimeout(tick, POLL_MS);
    }
    window.setTimeout(tick, POLL_MS);
  }

  function busyForms() {
    document.querySelectorAll("form[data-busy-text]").forEach(function (form) {
      form.addEventListener("submit", function () {
        const button = form.querySelector("button[type=submit]");
        if (button) {
          button.disabled = true;
          button.textContent = form.getAttribute("data-busy-text");
        }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const progress = document.querySelector("[data-progress-url]");
    if (progress) pollProgress(progress);
    const refresh = document.querySelector("[data-refresh-seconds]");
    if (refresh) {
      const seconds = Number(refresh.getAttribute("data-refresh-seconds")) || 5;
      window.setTimeout(function () { window.location.reload(); }, seconds * 1000);
    }
    busyForms();
  });
})();

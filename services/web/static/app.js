// drscreen web interface: the only script. No framework, nothing loaded from elsewhere.
// 1. Result pages poll their progress route and reload once the result is complete.
// 2. Pages with data-refresh-seconds (the jobs list while a job runs) reload themselves; no page
//    reloads while a form on it holds what the user typed (it says so instead).
// 3. Upload forms show that they are busy and cannot be sent twice.
// 4. "ask again" for a missing heatmap asks in place and shows it when drawn (the link alone
//    opened the heatmap route's bare "not ready yet").
// 5. "Print" buttons print the page (its print stylesheet keeps the result, not the navigation).
"use strict";

(function () {
  const POLL_MS = 2000;
  const GIVE_UP_MS = 15 * 60 * 1000;

  // The session ended while the page waited: sign in and come back to this page (a bare
  // "/login" ended on the home page, and the clinician had to find the patient again).
  function signIn() {
    const here = window.location.pathname + window.location.search;
    window.location.assign(here === "/" ? "/login" : "/login?next=" + encodeURIComponent(here));
  }

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
        if (resp.status === 401) {
          // signed out while filling in a form: leaving now would lose what was typed
          if (userBusy()) {
            if (text) text.textContent = "Signed out. Copy what you typed, then reload the page to sign in again.";
            return;
          }
          signIn();
          return;
        }
        if (resp.ok) {
          const p = await resp.json();
          if (p.complete) { reloadWhenIdle(text, "Result complete."); return; }
          // Grades in, heatmaps still being drawn: show the grades now.
          if (p.scored && !pageScored) { reloadWhenIdle(text, "Grades ready."); return; }
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

  // Something typed or chosen in a form, or a form field in use: a reload would throw it away
  // (a grader's half-entered grade, a folder path being typed on the jobs page).
  function userBusy() {
    const active = document.activeElement;
    if (active && active.closest && active.closest("form") && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) {
      return true;
    }
    return Array.from(document.querySelectorAll("form input, form select, form textarea")).some(function (el) {
      if (el.type === "hidden" || el.type === "submit") return false;
      if (el.type === "checkbox" || el.type === "radio") return el.checked !== el.defaultChecked;
      if (el.type === "file") return Boolean(el.files && el.files.length);
      if (el.tagName === "SELECT") {
        return Array.from(el.options).some(function (o) { return o.selected !== o.defaultSelected; });
      }
      return el.value !== el.defaultValue;
    });
  }

  // Reload to show what changed, unless the user is busy with a form: then say so (in a live
  // region, so a screen reader hears it) and reload once they have left the form alone.
  function reloadWhenIdle(live, what) {
    if (!userBusy()) { window.location.reload(); return; }
    // said once: a live region rewritten every few seconds is read out again each time
    const message = what + " Not refreshed while you fill in the form: reload the page when you are done.";
    if (live && live.textContent !== message) live.textContent = message;
    window.setTimeout(function () { reloadWhenIdle(live, what); }, POLL_MS * 5);
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

  function askAgain(link) {
    link.addEventListener("click", async function (event) {
      event.preventDefault();
      const box = link.closest("[data-heatmap-missing]");
      const url = link.getAttribute("href");
      const started = Date.now();
      box.textContent = "Heatmap asked for; being drawn…";
      while (Date.now() - started < 120000) {
        try {
          const resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
          if (resp.ok) {
            // the page's URL, not a blob: one (the pages' CSP allows img-src 'self' only)
            const img = document.createElement("img");
            img.onerror = function () {
              img.replaceWith(box);
              box.textContent = "The heatmap could not be shown now: reload the page later.";
            };
            img.src = url;
            img.alt = box.getAttribute("data-heatmap-alt");
            img.setAttribute("data-testid", "heatmap");
            box.replaceWith(img);
            return;
          }
          if (resp.status !== 409) break;  // 404: no heatmap for this photograph
        } catch (err) {
          // Network hiccup: try again.
        }
        await new Promise(function (done) { window.setTimeout(done, POLL_MS); });
      }
      box.textContent = "The heatmap could not be drawn now: reload the page later.";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-heatmap-missing] a").forEach(askAgain);
    document.querySelectorAll("[data-print]").forEach(function (button) {
      button.addEventListener("click", function () { window.print(); });
    });
    // the time of printing, not of loading (a tab left open prints later); the server's is the fallback
    window.addEventListener("beforeprint", function () {
      const now = new Date().toISOString();  // UTC
      document.querySelectorAll("[data-printed-at]").forEach(function (el) {
        el.textContent = now.slice(0, 10) + " " + now.slice(11, 16);
      });
    });
    const progress = document.querySelector("[data-progress-url]");
    if (progress) pollProgress(progress);
    const refresh = document.querySelector("[data-refresh-seconds]");
    if (refresh) {
      const seconds = Number(refresh.getAttribute("data-refresh-seconds")) || 5;
      const live = refresh.querySelector("[data-refresh-text]");
      window.setTimeout(function () { reloadWhenIdle(live, "Jobs may have moved on."); }, seconds * 1000);
    }
    busyForms();
  });
})();

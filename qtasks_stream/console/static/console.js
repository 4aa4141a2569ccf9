// The console's only script: confirmations, and live updates of the task list.
// It never builds HTML from data: updated rows come from the server, already escaped.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

function liveList() {
  const live = document.getElementById("live");
  if (!live || !window.EventSource) {
    return;
  }
  const state = document.getElementById("live-state");
  const source = new EventSource(live.dataset.src);
  let pending = false;
  source.addEventListener("open", () => { state.textContent = "on"; });
  source.addEventListener("error", () => { state.textContent = "reconnecting"; });
  source.addEventListener("changed", async () => {
    if (pending) {
      return;
    }
    pending = true;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const id of ["counts", "task-rows", "paging"]) {
        const now = document.getElementById(id);
        const next = fresh.getElementById(id);
        if (now && next) {
          now.replaceWith(document.importNode(next, true));
        }
      }
      state.textContent = "on, updated " + new Date().toLocaleTimeString();
    } finally {
      pending = false;
    }
  });
}

liveList();

// Added to Locust's index page by locustfiles/webui.py: shows the LLM console (./llm/) inside Locust's "LLM" tab.
// Locust renders an extended tab as a plain table; when that table (found by its column title) is on the page,
// the console goes in an iframe next to it and the table is hidden. If Locust's page changes so that the
// table is not found, nothing happens and the plain table stays.
"use strict";
(function () {
  const TITLE = "LLM service envelope (live)";
  const FRAME_ID = "envelope-llm-console";

  function ourTable() {
    for (const th of document.querySelectorAll("th")) {
      if (th.textContent.trim() === TITLE) return th.closest(".MuiTableContainer-root") || th.closest("table");
    }
    return null;
  }

  function place() {
    const table = ourTable();
    let frame = document.getElementById(FRAME_ID);
    if (!table) {
      if (frame) frame.remove();  // another tab is shown
      return;
    }
    if (!frame || frame.previousElementSibling !== table) {
      if (frame) frame.remove();
      frame = document.createElement("iframe");
      frame.id = FRAME_ID;
      frame.title = "LLM service envelope";
      frame.src = "./llm/";
      frame.style.cssText = "width:100%;border:0;display:block;min-height:600px;background:#fff;border-radius:4px";
      table.insertAdjacentElement("afterend", frame);
    }
    table.style.display = "none";
    try {  // same origin: size the frame to its page so the tab scrolls as one page
      const body = frame.contentDocument && frame.contentDocument.body;
      const h = body && body.offsetHeight;
      if (h && Math.abs(frame.offsetHeight - h) > 4) frame.style.height = h + "px";
    } catch (e) { /* not loaded yet */ }
  }

  setInterval(place, 300);
})();

// Search without a page load: the form still works without this script (the server
// renders results for ?q=), this only fetches /search.json and says what it is doing.
"use strict";
(function () {
  const form = document.getElementById("search-form");
  const input = document.getElementById("q");
  const status = document.getElementById("search-status");
  const list = document.getElementById("search-results");
  if (!form || !input || !status || !list) return;
  let current = null;

  function show(data) {
    list.replaceChildren();
    for (const hit of data.results) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = hit.url;
      link.textContent = hit.title;
      const source = document.createElement("span");
      source.className = "source";
      source.textContent = hit.source;
      const snippet = document.createElement("p");
      snippet.textContent = hit.snippet;
      item.append(link, source, snippet);
      list.append(item);
    }
    if (data.count === 0) {
      status.textContent = "No results for “" + data.query + "”.";
    } else {
      const shown = data.results.length < data.count ? ", showing the first " + data.results.length : "";
      status.textContent = data.count + (data.count === 1 ? " result" : " results") +
        " for “" + data.query + "”" + shown + ".";
    }
  }

  form.addEventListener("submit", async function (event) {
    const query = input.value.trim();
    event.preventDefault();
    if (!query) {
      list.replaceChildren();
      status.textContent = "Type a word to search for.";
      return;
    }
    if (current) current.abort();
    current = new AbortController();
    status.textContent = "Searching…";
    list.setAttribute("aria-busy", "true");
    history.replaceState(null, "", "/search?q=" + encodeURIComponent(query));
    try {
      const answer = await fetch("/search.json?q=" + encodeURIComponent(query), {
        headers: { Accept: "application/json" }, credentials: "same-origin",
        signal: current.signal,
      });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      show(await answer.json());
    } catch (error) {
      if (error.name === "AbortError") return;
      list.replaceChildren();
      status.textContent = "Search failed. Please try again.";
    } finally {
      list.removeAttribute("aria-busy");
    }
  });
})();

// Live filter for the sign-in page's list of organisations. Without JavaScript the
// search form filters on the server (?q=); this only hides non-matching entries as you type.
(function () {
  "use strict";
  var input = document.getElementById("idp-filter");
  var list = document.getElementById("idp-list");
  var none = document.getElementById("idp-none");
  if (!input || !list) { return; }
  function filter() {
    // Folded as the server folds names: lower case, accents removed.
    var folded = input.value.toLowerCase().normalize("NFKD").replace(/[\u0300-\u036f]/g, "");
    var words = folded.split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(list.children, function (item) {
      var name = item.getAttribute("data-name") || "";
      var match = words.every(function (w) { return name.indexOf(w) !== -1; });
      item.hidden = !match;
      if (match) { shown += 1; }
    });
    if (none) { none.hidden = shown !== 0; }
  }
  input.addEventListener("input", filter);
})();

// Hide the delivery address while "Deliver to the billing address" is ticked. Without
// this script both address blocks stay visible and the server ignores the second one.
"use strict";
(function () {
  const box = document.getElementById("same-as-billing");
  const delivery = document.getElementById("delivery");
  if (!box || !delivery) return;
  const sync = function () { delivery.hidden = box.checked; };
  box.addEventListener("change", sync);
  sync();
})();

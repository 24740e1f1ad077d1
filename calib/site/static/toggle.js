(function () {
  var key = "calib-site-code", root = document.documentElement;
  try { if (localStorage.getItem(key) === "shown") root.classList.remove("code-hidden"); }
  catch (e) { /* storage disabled: keep the default */ }
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("code-toggle");
    if (!button) return;
    function label() {
      var hidden = root.classList.contains("code-hidden");
      button.textContent = hidden ? "Show code" : "Hide code";
      button.setAttribute("aria-pressed", hidden ? "false" : "true");
    }
    button.addEventListener("click", function () {
      root.classList.toggle("code-hidden");
      try {
        localStorage.setItem(key, root.classList.contains("code-hidden") ? "hidden" : "shown");
      } catch (e) { /* storage disabled: the choice lasts for this page */ }
      label();
    });
    label();
  });
})();

// Render the math that pymdownx.arithmatex (generic mode) wrapped in
// <span class="arithmatex">\(...\)</span> and <div class="arithmatex">\[...\]</div>,
// with the KaTeX copy shipped under assets/katex (no network access). Runs on every
// page load, including mkdocs-material's instant navigation (document$).
(function () {
  var options = {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  };
  function render(root) {
    root.querySelectorAll(".arithmatex").forEach(function (el) {
      renderMathInElement(el, options);
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (doc) {
      render(doc.body);
    });
  } else {
    document.addEventListener("DOMContentLoaded", function () {
      render(document.body);
    });
  }
})();

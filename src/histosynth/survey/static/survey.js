// Keyboard shortcuts for the answer buttons: each button names its key in data-key.
(function () {
  "use strict";
  let sent = false;
  document.addEventListener("keydown", function (event) {
    if (sent || event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
    const tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    if (!/^[a-z0-9]$/i.test(event.key)) return;
    const button = document.querySelector('button[data-key="' + event.key.toLowerCase() + '"]');
    if (!button) return;
    event.preventDefault();
    sent = true;  // one answer per page, however fast the keys come
    button.form.requestSubmit(button);
  });
})();

// Keyboard shortcuts: each answer button or choice names its key in data-key. A button sends its
// answer at once; a choice (a radio of answer or confidence) is picked and focused, so Enter then
// sends the form, as it does for any focused form field.
(function () {
  "use strict";
  let sent = false;
  function typing(target) {
    const tag = target && target.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT") return true;
    return tag === "INPUT" && target.type !== "radio" && target.type !== "checkbox";
  }
  document.addEventListener("keydown", function (event) {
    if (sent || event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    if (!/^[a-z0-9]$/i.test(event.key)) return;
    const target = document.querySelector('[data-key="' + event.key.toLowerCase() + '"]');
    if (!target) return;
    event.preventDefault();
    if (target.tagName === "BUTTON") {
      sent = true;  // one answer per page, however fast the keys come
      target.form.requestSubmit(target);
    } else {
      target.checked = true;
      target.focus();
    }
  });
})();

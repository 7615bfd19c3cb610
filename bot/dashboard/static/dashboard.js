// Keyboard shortcuts of the review queue: j/k move, a approve, r reject, e edit.
// Every action is a plain form, so the page works without this script too.
(function () {
  "use strict";
  var queue = document.getElementById("queue");
  if (!queue) return;
  var items = Array.prototype.slice.call(queue.querySelectorAll(".item"));
  var selected = Math.min(parseInt(queue.dataset.selected || "0", 10) || 0, items.length - 1);

  function select(index) {
    if (!items.length) return;
    selected = Math.max(0, Math.min(items.length - 1, index));
    items.forEach(function (item, i) { item.classList.toggle("selected", i === selected); });
    items[selected].scrollIntoView({ block: "nearest" });
  }

  function typing(target) {
    return target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" ||
                      target.isContentEditable);
  }

  document.addEventListener("keydown", function (event) {
    var item = items[selected];
    if (typing(event.target)) {
      var details = event.target.closest("details.edit");
      if (details && event.key === "Escape") {
        details.open = false;
        event.target.blur();
      } else if (details && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        event.target.form.requestSubmit();
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || !item) return;
    if (event.key === "j") select(selected + 1);
    else if (event.key === "k") select(selected - 1);
    else if (event.key === "a" || event.key === "r") {
      item.querySelector('button[data-key="' + event.key + '"]').form.requestSubmit();
    } else if (event.key === "e") {
      var edit = item.querySelector("details.edit");
      edit.open = true;
      var area = edit.querySelector("textarea");
      area.focus();
      area.setSelectionRange(area.value.length, area.value.length);
    } else return;
    event.preventDefault();
  });

  items.forEach(function (item, i) {
    item.addEventListener("click", function () { select(i); });
  });
  select(selected);
})();

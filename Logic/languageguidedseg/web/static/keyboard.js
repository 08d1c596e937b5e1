// Keyboard: Enter in the report box segments (Shift+Enter starts a new line); Escape cancels a running segmentation
// or a pending update. Both go through what the mouse uses: the visible Segment button, the server's cancel.
window.addEventListener("keydown", (event) => {
  if (event.isComposing) {
    return;
  }
  if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.altKey && !event.metaKey &&
      event.target.closest && event.target.closest("#lg-report")) {
    event.preventDefault();
    const button = window.document.getElementById("lg-segment");
    if (button && !button.disabled) {
      button.click();
    }
  } else if (event.key === "Escape" && window.trame) {
    window.trame.trigger("lg_cancel");
  }
}, true);

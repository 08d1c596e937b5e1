// Uploads go over plain HTTP (streamed to disk by the server, with its size limit), not over the websocket.
// The server opens what it received and shows the result or the one error message in the page.
window.lgsegUpload = async function lgsegUpload(files) {
  if (!files || files.length === 0) {
    return;
  }
  const form = new FormData();
  for (const file of files) {
    form.append("file", file, file.webkitRelativePath || file.name);
  }
  window.trame.state.set("lg_uploading", true);
  try {
    // Relative to the page, so that the page also works under a reverse proxy's path prefix.
    const response = await fetch("upload", { method: "POST", body: form, credentials: "same-origin" });
    if (!response.ok && response.status !== 400 && response.status !== 413) {
      window.trame.state.set("lg_error", `the upload failed (HTTP ${response.status}); try again`);
    }
  } catch (error) {
    window.trame.state.set("lg_error", `the upload failed (${error}); check the connection and try again`);
  } finally {
    window.trame.state.set("lg_uploading", false);
  }
};

// The page's Upload image and DICOM folder buttons open the browser's file chooser of their hidden input (Vue
// templates see `window`, not `document`).
window.lgsegChoose = function lgsegChoose(inputId) {
  window.document.getElementById(inputId).click();
};

// Upload with a progress bar: XMLHttpRequest (fetch reports no upload progress) to the JSON API's /v1/files,
// with the session cookie and its CSRF token.
"use strict";
(function () {
  const form = document.getElementById("upload");
  const bar = document.getElementById("upload-progress");
  const state = document.getElementById("upload-state");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = form.elements.file.files[0];
    if (!file) return;
    if (file.size > Number(state.dataset.limit)) {
      state.textContent = "This file is larger than the server accepts (" + state.dataset.limit + " bytes).";
      return;
    }
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", file);
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/files");
    request.setRequestHeader("X-CSRF-Token", tq.csrf());
    request.upload.onprogress = (progress) => {
      if (progress.lengthComputable) bar.value = Math.round(100 * progress.loaded / progress.total);
    };
    request.onload = () => {
      let answer = {};
      try { answer = JSON.parse(request.responseText); } catch (error) { answer = {}; }
      if (request.status === 200) {
        state.textContent = "Uploaded " + answer.id;
        window.location.reload();
      } else {
        state.textContent = (answer.error && answer.error.message) || ("Upload failed: HTTP " + request.status);
        bar.hidden = true;
      }
    };
    request.onerror = () => { state.textContent = "Upload failed: the server could not be reached"; bar.hidden = true; };
    bar.hidden = false;
    bar.value = 0;
    state.textContent = "Uploading " + file.name + "…";
    request.send(data);
  });
})();

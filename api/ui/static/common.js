// Shared by the dashboard's scripts: the session's CSRF token (in <main data-csrf>) and JSON API calls with it.
"use strict";
const tq = {
  csrf: () => document.querySelector("main").dataset.csrf || "",
  async api(method, url, body) {
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": tq.csrf() },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new Error((error.param ? error.param + ": " : "") + (error.message || response.statusText));
    }
    return data;
  },
  el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);  // text only: never markup
    if (cls) node.className = cls;
    return node;
  },
  time(epoch) { return epoch ? new Date(epoch * 1000).toLocaleString() : "—"; },
};

// The console's own script: the access token (sessionStorage), the Authorization header on every
// htmx request, the login page, and live progress read with fetch (EventSource cannot send a
// header). No build step; htmx.min.js is vendored next to this file.
"use strict";
(function () {
  const TOKEN = "ticketflow.console.token";
  const token = () => sessionStorage.getItem(TOKEN);

  function claims(value) {
    try {
      const part = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part));
    } catch (error) {
      return null;
    }
  }

  function showError(message) {
    const box = document.getElementById("errors");
    if (box) box.textContent = message;
  }

  function toLogin() {
    sessionStorage.removeItem(TOKEN);
    window.location.assign("/console/login");
  }

  // Without a token, no page but the login page asks for data: straight to the login page.
  if (!token() && window.location.pathname !== "/console/login") toLogin();

  document.addEventListener("htmx:configRequest", function (event) {
    const value = token();
    if (!value) return event.preventDefault();
    event.detail.headers["Authorization"] = "Bearer " + value;
  });

  document.addEventListener("htmx:responseError", function (event) {
    const xhr = event.detail.xhr;
    if (xhr.status === 401) return toLogin();
    let message = xhr.status + " " + xhr.statusText;
    try {
      const body = JSON.parse(xhr.responseText);
      message = body.error.message + " (" + body.error.code + ")";
    } catch (error) { /* not the error envelope */ }
    showError(message);
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.successful) showError("");
    if (event.detail.successful && event.detail.requestConfig.verb === "post") {
      htmx.trigger(document.body, "refresh");
    }
  });

  function setUpLogin() {
    const error = document.getElementById("login-error");
    document.getElementById("login-form").addEventListener("submit", async function (event) {
      event.preventDefault();
      const answer = await fetch("/console/login", { method: "POST", body: new FormData(event.target) });
      const body = await answer.json().catch(() => ({}));
      if (!answer.ok || !body.access_token) {
        error.textContent = (body.error && body.error.message) || "Login failed (" + answer.status + ").";
        return;
      }
      sessionStorage.setItem(TOKEN, body.access_token);
      window.location.assign("/console");
    });
    document.getElementById("token-form").addEventListener("submit", function (event) {
      event.preventDefault();
      const value = new FormData(event.target).get("token").toString().trim();
      if (!claims(value)) {
        error.textContent = "That is not a JWT access token.";
        return;
      }
      sessionStorage.setItem(TOKEN, value);
      window.location.assign("/console");
    });
  }

  // Server-Sent Events over fetch: the Authorization header travels, and Last-Event-ID resumes.
  async function follow(list) {
    const state = document.getElementById("stream-state");
    const ticket = list.dataset.ticket;
    let lastId = null;
    for (let tries = 0; tries < 30; tries++) {
      const headers = { Authorization: "Bearer " + token(), Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      let answer;
      try {
        answer = await fetch("/tickets/" + ticket + "/stream", { headers: headers });
      } catch (error) {
        state.textContent = "reconnecting…";
        await new Promise((resolve) => setTimeout(resolve, 2000));
        continue;
      }
      if (answer.status === 401) return toLogin();
      if (!answer.ok) {
        state.textContent = "unavailable (" + answer.status + ")";
        return;
      }
      state.textContent = "live";
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let finished = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const message = {};
          for (const line of block.split("\n")) {
            const at = line.indexOf(":");
            if (at <= 0) continue;
            message[line.slice(0, at)] = line.slice(at + 1).trim();
          }
          if (!message.event) continue;
          lastId = message.id || lastId;
          const item = document.createElement("li");
          item.className = "live-event";
          item.dataset.name = message.event;
          item.textContent = "#" + message.id + " " + message.event;
          list.appendChild(item);
          htmx.trigger(document.body, "refresh");
          if (["completed", "failed", "cancelled"].includes(message.event)) finished = true;
        }
      }
      if (finished) {
        state.textContent = "ended";
        return;
      }
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    const page = document.body.dataset.page;
    if (page === "login") return setUpLogin();
    const value = token();
    if (!value) return toLogin();
    const who = claims(value);
    if (who) {
      document.getElementById("who").textContent =
        (who.tenant || "") + " · " + (who.roles || []).join(", ");
    }
    const logout = document.getElementById("logout");
    logout.hidden = false;
    logout.addEventListener("click", toLogin);
    const live = document.getElementById("live");
    if (live) follow(live);
  });
})();

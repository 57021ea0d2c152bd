// The admin page's few behaviours: filter the list as you type, and refresh the live numbers
// from /api/status every 2 s without reloading. Plain DOM, no library; text only, never HTML.
(function () {
  "use strict";

  var POLL_MS = 2000;

  function formatBytes(count) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var value = Number(count) || 0;
    for (var i = 0; i < units.length; i++) {
      if (value < 1024 || i === units.length - 1) {
        return i === 0 ? Math.floor(value) + " B" : Number(value.toPrecision(3)) + " " + units[i];
      }
      value /= 1024;
    }
    return String(count);
  }

  function formatAgo(timestamp, now) {
    if (!timestamp) return "never";
    var seconds = Math.max(0, Math.floor(now - timestamp));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return new Date(timestamp * 1000).toLocaleString();
  }

  function setText(element, text) {
    if (element && element.textContent !== text) element.textContent = text;
  }

  // Search ---------------------------------------------------------------------------------
  var search = document.getElementById("search");
  var table = document.getElementById("entries");
  if (search && table) {
    search.addEventListener("input", function () {
      var words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      table.querySelectorAll("tbody tr").forEach(function (row) {
        var haystack = row.getAttribute("data-search") || "";
        var match = words.every(function (word) { return haystack.indexOf(word) !== -1; });
        row.hidden = !match;
        if (match) shown++;
      });
      var none = document.getElementById("no-match");
      if (none) none.hidden = shown !== 0;
    });
  }

  // Live numbers ---------------------------------------------------------------------------
  if (document.body.getAttribute("data-live") !== "1") return;
  var liveState = document.getElementById("live-state");

  function updateRelay(relay, now) {
    document.querySelectorAll("[data-stat]").forEach(function (element) {
      var key = element.getAttribute("data-stat");
      if (!(key in relay)) return;
      var value = relay[key];
      setText(element, element.getAttribute("data-format") === "rate"
        ? formatBytes(value) + "/s" : String(value));
    });
    var body = document.getElementById("rejections");
    if (!body) return;
    var rows = relay.rejections.map(function (r) {
      var tr = document.createElement("tr");
      [["When", formatAgo(r.time, now)], ["Reason", r.reason],
       ["Status", r.status ? String(r.status) : "\u2014"], ["ID", r.id || "\u2014"],
       ["Peer", r.peer]].forEach(function (cell) {
        var td = document.createElement("td");
        td.setAttribute("data-label", cell[0]);
        if (cell[0] === "ID") {
          var code = document.createElement("code");
          code.textContent = cell[1];
          td.appendChild(code);
        } else {
          td.textContent = cell[1];
        }
        tr.appendChild(td);
      });
      return tr;
    });
    body.replaceChildren.apply(body, rows);
    var none = document.getElementById("no-rejections");
    if (none) none.hidden = rows.length !== 0;
  }

  function updateRows(ids, now) {
    document.querySelectorAll("tr[data-id]").forEach(function (row) {
      var numbers = ids[row.getAttribute("data-id")] ||
        {parked: 0, active: 0, bytes: null, last_seen: null};
      var parked = row.querySelector('[data-field="parked"]');
      if (parked) {
        setText(parked, String(numbers.parked));
        parked.classList.toggle("on", numbers.parked > 0);
      }
      setText(row.querySelector('[data-field="active"]'), String(numbers.active));
      if (numbers.bytes !== null) {
        setText(row.querySelector('[data-field="bytes"]'), formatBytes(numbers.bytes));
      }
      var seen = row.querySelector('[data-field="last_seen"]');
      if (seen) {
        var timestamp = numbers.last_seen !== null ? numbers.last_seen
          : Number(seen.getAttribute("data-ts")) || 0;
        seen.setAttribute("data-ts", String(timestamp));
        setText(seen, formatAgo(timestamp, now));
      }
    });
  }

  function markState(ok, text) {
    if (!liveState) return;
    liveState.classList.toggle("stale", !ok);
    setText(liveState, text);
  }

  function poll() {
    fetch("/api/status", {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (response) {
        if (response.status === 401) throw new Error("logged out: reload the page");
        if (!response.ok) throw new Error("status " + response.status);
        return response.json();
      })
      .then(function (status) {
        if (status.relay) updateRelay(status.relay, status.now);
        updateRows(status.ids || {}, status.now);
        markState(true, "live");
      })
      .catch(function (error) { markState(false, "not updating (" + error.message + ")"); })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }

  window.setTimeout(poll, POLL_MS);
})();

// The watch page: one job, live, from a link that carries a watch token.
//
// The link is <job>/watch#token=<token>. The fragment never reaches a server; this
// script trades the token for an HttpOnly cookie scoped to the job's routes
// (POST watch/session), takes it out of the address bar, and from then on the cookie
// opens the job's events and its plain-text logs. A reload finds the cookie
// (GET watch/session).
//
// The stream: a browser's EventSource reconnects by itself after a network error, but
// closes for good on an answer that is not a stream (a proxy's 502 while the service
// restarts, a 503). Then this script reconnects itself, with backoff, asking for what
// it missed by the last event id (last_event_id=; a new EventSource cannot send the
// Last-Event-ID header). A hidden tab closes its stream and resumes the same way when
// shown again. Log lines are worker output: shown as text, never as HTML.
"use strict";

(() => {
  const TAIL = 1000; // log lines a fresh page starts with; the download has them all
  const PAGE = 100; // earlier lines read at a time, as GET logs gives them
  const MAX_DELAY_MS = 30000; // the longest wait between reconnects
  const FINAL = ["completed", "failed", "removed"];
  // A line's level, as loggers spell it at its start: "info:", "[WARN]", "ERROR ", ...
  const LEVEL = /^\s*\[?(info|warn|warning|error)\b\]?/i;
  // ANSI escape sequences: SGR (colours, bold) is drawn, every other one dropped.
  // eslint-disable-next-line no-control-regex
  const ESCAPE = /\x1b(?:\[([0-?]*)[ -/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])/g;
  const CUBE = [0, 95, 135, 175, 215, 255]; // the 256-colour palette's 6x6x6 cube
  // The 16 basic ANSI colours (and bright ones): mid-tones legible in light and dark.
  const BASIC = [
    "#5c5c5c", "#cd3131", "#14a05e", "#b58900", "#2472c8", "#bc3fbc", "#11a8cd", "#8a8a8a",
    "#767676", "#f14c4c", "#23d18b", "#d5a500", "#3b8eea", "#d670d6", "#29b8db", "#a0a0a0",
  ];
  // Where a section of the log begins or ends, as CI logs write it: Buildkite's
  // "--- title" (open), "+++ title" (open) and "~~~ title" (folded), GitHub Actions'
  // "::group::title" ... "::endgroup::".
  const SECTION = /^(?:(---|\+\+\+|~~~) (.*)|::group::(.*)|(::endgroup::))/;
  // When a line came, where the service stamps it (LOG_LINE_TIMESTAMPS): ISO 8601 in
  // UTC to the millisecond, then a space.
  const STAMP = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) /;

  // The job's routes as this browser addressed them: a proxy's prefix included.
  const base = location.pathname.replace(/watch$/, "");
  const $ = (id) => document.getElementById(id);
  const ui = {
    name: $("name"),
    times: $("times"),
    status: $("status"),
    attempt: $("attempt"),
    connection: $("connection"),
    problem: $("problem"),
    bar: $("bar"),
    fill: $("bar").firstElementChild,
    progressText: $("progress-text"),
    raw: $("raw"),
    rawJson: $("raw-json"),
    announce: $("announce"),
    outcome: $("outcome"),
    outcomeTitle: $("outcome-title"),
    outcomeBody: $("outcome-body"),
    filter: $("filter"),
    severe: $("severe"),
    follow: $("follow"),
    lines: $("lines"),
    empty: $("empty"),
  };
  const title = document.title;

  let source = null; // the open EventSource
  let lastEventId = ""; // where the stream resumes
  let ended = false; // the job finished, or the link no longer opens it
  let failures = 0; // reconnects since the stream was last live
  let retryTimer = 0;
  let sessionTimer = 0; // renews the session cookie
  let following = true; // keep the newest line in view
  let pending = []; // lines that arrived since the last frame drew
  let frame = 0;
  let seenFirstLine = false;
  let target = /^#L(\d+)$/.exec(location.hash)?.[1] ?? null; // a line to show on arrival
  let filterText = "";
  let severeOnly = false; // show only warnings and errors
  let times = {}; // the job's timestamp, processedOn and finishedOn (ms), as BullMQ's
  let ticker = 0; // redraws the time the job has run, while it runs
  let attemptsStarted = null; // as the page last heard, to mark where a new one starts
  let mark = null; // the mark of an attempt that began, until the service says which
  const sections = []; // {head, toggle, open, chosen, id}: the log's sections
  // Where lines go, section-wise: the live ones, and each page of earlier lines read.
  const live = { section: null, live: true };

  // ----------------------------------------------------------------- status

  function setConnection(state) {
    ui.connection.dataset.state = state;
    ui.connection.textContent = state;
  }

  function setStatus(state) {
    if (ui.status.dataset.state === state) return;
    ui.status.dataset.state = state;
    ui.status.textContent = state;
    ui.announce.textContent = `Job ${state}`;
  }

  function showProblem(message) {
    ui.problem.textContent = message;
    ui.problem.hidden = !message;
  }

  // ------------------------------------------------------------------ times

  // A moment in the reader's own time zone: the time of day, with the date unless it
  // is today.
  function clock(ms) {
    const at = new Date(ms);
    const today = at.toDateString() === new Date().toDateString();
    return today ? at.toLocaleTimeString() : at.toLocaleString();
  }

  function duration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const [h, m, sec] = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
    if (h) return `${h}h ${m}m ${sec}s`;
    return m ? `${m}m ${sec}s` : `${sec}s`;
  }

  // When the job was queued, started and finished, and how long it has run.
  function showTimes() {
    const parts = [];
    if (times.timestamp) parts.push(`queued ${clock(times.timestamp)}`);
    if (times.processedOn) parts.push(`started ${clock(times.processedOn)}`);
    if (times.finishedOn) parts.push(`finished ${clock(times.finishedOn)}`);
    if (times.processedOn) {
      const running = !times.finishedOn;
      const ran = (running ? Date.now() : times.finishedOn) - times.processedOn;
      parts.push(`${running ? "running for" : "ran"} ${duration(ran)}`);
    }
    ui.times.textContent = parts.join(" · ");
    ui.times.hidden = parts.length === 0;
  }

  function keepTimes(job) {
    times = { timestamp: job.timestamp, processedOn: job.processedOn, finishedOn: job.finishedOn };
    clearInterval(ticker);
    showTimes();
    if (times.processedOn && !times.finishedOn && !ended) ticker = setInterval(showTimes, 1000);
  }

  // ---------------------------------------------------------------- attempts

  // The badge says which attempt this is of how many; where a new one starts while the
  // page is open, a mark among the lines says so, and why the one before failed.
  function keepAttempts(job) {
    const { attemptsStarted: started, attempts } = job;
    ui.attempt.hidden = !(attempts > 1 || started > 1);
    ui.attempt.textContent = `attempt ${Math.max(1, started)} of ${Math.max(attempts, started)}`;
    if (mark && attemptsStarted !== null && started > attemptsStarted) {
      const failed = job.failedReason ? ` · attempt ${started - 1} failed: ${job.failedReason}` : "";
      mark.textContent = `Attempt ${started} of ${Math.max(attempts, started)} began${failed}`;
      ui.announce.textContent = mark.textContent;
      mark = null;
    }
    attemptsStarted = started;
  }

  // A worker took the job: mark the place among the lines now, in order with them, and
  // say which attempt it is once the service has said.
  function attemptBegan() {
    mark = document.createElement("li");
    mark.className = "attempt";
    mark.setAttribute("role", "separator");
    mark.textContent = "A new attempt began";
    pending.push({ element: mark });
    if (!frame) frame = requestAnimationFrame(draw);
  }

  // Ask what the job holds again, by the page's session, which the answer renews: as the
  // session nears its end, and when the job starts, starts again or finishes.
  async function askAgain() {
    try {
      const url = `${base}watch/session`;
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401 || response.status === 404) return; // over
      if (response.ok) {
        const job = await response.json();
        keepTimes(job);
        keepAttempts(job);
        return keepSession(job.session_seconds);
      }
    } catch {
      // out of reach: try again shortly
    }
    keepSession(10);
  }

  // --------------------------------------------------------------- progress

  // A percentage from the shapes workers report: 42, "42", {progress: 42},
  // {percent: 42}, {current: 21, total: 50}, {step: 3, of: 10}; null for anything else.
  function percentOf(value) {
    const number = (v) =>
      typeof v === "number" ? v : typeof v === "string" && v.trim() !== "" ? Number(v) : NaN;
    let percent = number(value);
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      percent = number(value.progress);
      if (!Number.isFinite(percent)) percent = number(value.percent);
      for (const [part, whole] of [["current", "total"], ["step", "of"]]) {
        if (!Number.isFinite(percent) && number(value[whole]) > 0) {
          percent = (number(value[part]) / number(value[whole])) * 100;
        }
      }
    }
    return Number.isFinite(percent) ? Math.min(100, Math.max(0, percent)) : null;
  }

  function messageOf(value) {
    if (value === null || typeof value !== "object") return "";
    const text = [value.message, value.status].find((v) => typeof v === "string");
    return text ?? "";
  }

  function showProgress(value) {
    const percent = percentOf(value);
    const message = messageOf(value);
    ui.bar.classList.toggle("indeterminate", percent === null);
    if (percent === null) {
      ui.bar.removeAttribute("aria-valuenow");
      ui.fill.style.width = "";
      ui.progressText.textContent = message || "Progress reported, not as a number:";
    } else {
      const shown = Math.floor(percent);
      ui.bar.setAttribute("aria-valuenow", String(shown));
      ui.fill.style.width = `${percent}%`;
      ui.progressText.textContent = message ? `${shown}% · ${message}` : `${shown}%`;
      document.title = `${shown}% · ${title}`;
    }
    ui.rawJson.textContent = JSON.stringify(value, null, 2);
    ui.raw.hidden = false;
    ui.raw.open = percent === null && !message;
  }

  // -------------------------------------------------------------- log lines

  // A colour of an SGR sequence's 256-colour or true-colour form, as CSS, from its
  // parameters after the 38 or 48; and how many of them it took.
  function extendedColour(params) {
    if (params[0] === 5) {
      const n = params[1] ?? 0;
      if (n < 16) return [BASIC[n], 2];
      if (n < 232) {
        const c = n - 16;
        return [`rgb(${CUBE[Math.floor(c / 36)]}, ${CUBE[Math.floor(c / 6) % 6]}, ${CUBE[c % 6]})`, 2];
      }
      const grey = 8 + 10 * (n - 232);
      return [`rgb(${grey}, ${grey}, ${grey})`, 2];
    }
    if (params[0] === 2) {
      const [r, g, b] = params.slice(1, 4).map((v) => Math.min(255, v ?? 0));
      return [`rgb(${r}, ${g}, ${b})`, 4];
    }
    return [null, 1];
  }

  // A line's text as runs, each with the colours and weight ANSI SGR gave it; every
  // other escape sequence is dropped. Nothing in a line ever becomes markup.
  function ansiRuns(line) {
    const runs = [];
    let style = {};
    let at = 0;
    for (const match of line.matchAll(ESCAPE)) {
      if (match.index > at) runs.push({ text: line.slice(at, match.index), style });
      at = match.index + match[0].length;
      if (match[2] !== "m") continue; // not SGR: dropped
      const params = (match[1] || "0").split(/[;:]/).map((v) => (v === "" ? 0 : Number(v)));
      style = { ...style };
      for (let i = 0; i < params.length; i += 1) {
        const p = params[i];
        if (p === 0) style = {};
        else if (p === 1) style.bold = true;
        else if (p === 22) delete style.bold;
        else if (p >= 30 && p <= 37) style.fg = BASIC[p - 30];
        else if (p >= 90 && p <= 97) style.fg = BASIC[p - 90 + 8];
        else if (p === 39) delete style.fg;
        else if (p >= 40 && p <= 47) style.bg = BASIC[p - 40];
        else if (p >= 100 && p <= 107) style.bg = BASIC[p - 100 + 8];
        else if (p === 49) delete style.bg;
        else if (p === 38 || p === 48) {
          const [colour, took] = extendedColour(params.slice(i + 1));
          if (colour !== null) style[p === 38 ? "fg" : "bg"] = colour;
          i += took;
        }
      }
    }
    if (at < line.length) runs.push({ text: line.slice(at), style });
    return runs;
  }

  function styledText(runs) {
    const text = document.createElement("span");
    text.className = "text";
    for (const { text: part, style } of runs) {
      if (!style.fg && !style.bg && !style.bold) {
        text.append(part);
        continue;
      }
      const span = document.createElement("span");
      span.textContent = part;
      if (style.bold) span.classList.add("ansi-bold");
      // Through the CSSOM, which the page's CSP allows (a style attribute it refuses).
      if (style.fg) span.style.color = style.fg;
      if (style.bg) span.style.backgroundColor = style.bg;
      text.append(span);
    }
    return text;
  }

  // The time a stamped line came, in the reader's time zone; empty for a line with none.
  function stampElement(stamp) {
    const at = document.createElement("time");
    at.className = "at";
    if (!stamp) return at;
    const when = new Date(stamp);
    at.dateTime = stamp;
    at.title = when.toLocaleString();
    at.textContent = when.toLocaleTimeString([], {
      hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hour12: false,
    });
    ui.lines.classList.add("stamped"); // the column shows once a line has a time
    return at;
  }

  // ---------------------------------------------------------------- sections

  // A section folds when the job moves on to the next one (or ends it), unless the
  // reader opened or folded it by hand.
  // A page of earlier lines is history: its sections are folded; the live lines' are
  // open while the job is on them.
  function enterSection(place, item, title, open) {
    leaveSection(place);
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "fold";
    toggle.textContent = title || "(untitled section)";
    const entered = { head: item, toggle, open, chosen: false, id: String(sections.length) };
    sections.push(entered);
    place.section = entered;
    item.dataset.head = entered.id;
    showSection(entered, open && place.live);
    return toggle;
  }

  function leaveSection(place) {
    if (place.section && !place.section.chosen) showSection(place.section, false);
    place.section = null;
  }

  function showSection(which, open) {
    which.open = open;
    which.toggle.setAttribute("aria-expanded", String(open));
    for (const row of ui.lines.querySelectorAll(`li[data-section="${which.id}"]`)) {
      row.hidden = !shown(row);
    }
  }

  function shown(row) {
    const inside = row.dataset.section;
    if (inside !== undefined && !sections[Number(inside)].open) return false;
    return matches(row.querySelector(".text").textContent, row.className);
  }

  function lineElement(index, line, place = live) {
    const item = document.createElement("li");
    item.id = `L${index}`;
    const stamp = STAMP.exec(line);
    const runs = ansiRuns(stamp ? line.slice(stamp[0].length) : line);
    const plain = runs.map((run) => run.text).join("");
    const level = LEVEL.exec(plain)?.[1].toLowerCase();
    if (level) item.className = level === "warning" ? "warn" : level;
    const number = document.createElement("a");
    number.className = "number";
    number.href = `#L${index}`;
    number.textContent = String(index);
    const text = styledText(runs);
    const marker = SECTION.exec(plain);
    const inside = place.section;
    if (marker?.[4]) {
      if (inside) item.dataset.section = inside.id; // the group's own end, folded with it
      leaveSection(place);
    } else if (marker) {
      const title = (marker[2] ?? marker[3]).trim();
      text.replaceChildren(enterSection(place, item, title, marker[1] !== "~~~"));
    } else if (inside) {
      item.dataset.section = inside.id;
    }
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", `Copy line ${index}`);
    item.append(number, stampElement(stamp?.[1]), text, copy);
    item.hidden = !shown(item);
    return item;
  }

  function addLine(index, line) {
    if (!seenFirstLine) {
      seenFirstLine = true;
      if (index > 0) {
        const gap = gapElement(0, index);
        pending.push({ element: gap });
        // A line asked for (#L<n>) before the ones shown: read the page around it.
        if (target !== null && Number(target) < index) {
          const start = Math.max(0, Number(target) - PAGE / 2);
          readInto(gap, start, Math.min(index, start + PAGE)).then(showTarget);
        }
      }
    }
    pending.push({ index, line });
    if (!frame) frame = requestAnimationFrame(draw);
  }

  // ------------------------------------------------------------ earlier lines

  // Lines [from, to) not read yet: a row that reads them, a page at a time from its
  // end, when the reader scrolls to it (or presses it), in place above the lines after
  // it.
  function gapElement(from, to) {
    const gap = document.createElement("li");
    gap.className = "gap";
    const button = document.createElement("button");
    button.type = "button";
    gap.append(button);
    setGap(gap, from, to);
    button.addEventListener("click", () => readPage(gap));
    return gap;
  }

  function setGap(gap, from, to) {
    gap.dataset.from = String(from);
    gap.dataset.to = String(to);
    const count = to - from;
    gap.firstElementChild.textContent =
      `${count.toLocaleString()} earlier ${count === 1 ? "line" : "lines"}: scroll up, or ` +
      "press, to read them";
  }

  // The reader scrolled up to a gap: read it (not while following the newest line).
  function readGapsInView() {
    const view = ui.lines.getBoundingClientRect();
    for (const gap of ui.lines.querySelectorAll("li.gap")) {
      const { top, bottom } = gap.getBoundingClientRect();
      if (bottom > view.top && top < view.bottom) readPage(gap);
    }
  }

  // The page of lines just above what follows the gap, keeping that where it is.
  function readPage(gap) {
    if (gap.dataset.reading || !gap.isConnected) return;
    const [from, to] = [Number(gap.dataset.from), Number(gap.dataset.to)];
    return readInto(gap, Math.max(from, to - PAGE), to);
  }

  // Read lines [start, end) of the gap's range into place after it; what is left of
  // the gap stays (above them, and below them where a read stopped short of its end).
  async function readInto(gap, start, end) {
    gap.dataset.reading = "1";
    while (!gap.isConnected) await new Promise((drawn) => requestAnimationFrame(drawn));
    try {
      const place = { section: null, live: false };
      const rows = [];
      let at = start;
      while (at < end) {
        const query = `start=${at}&length=${Math.min(PAGE, end - at)}`;
        const response = await fetch(`${base}logs?${query}`, { credentials: "same-origin" });
        if (!response.ok) return;
        const { logs } = await response.json();
        if (!logs.length) break;
        for (const line of logs) rows.push(lineElement(at++, line, place));
      }
      const after = gap.nextElementSibling;
      const before = after ? after.getBoundingClientRect().top : 0;
      const [from, to] = [Number(gap.dataset.from), Number(gap.dataset.to)];
      if (at < to) gap.after(gapElement(at, to));
      gap.after(...rows);
      if (start > from) setGap(gap, from, start);
      else gap.remove();
      // The lines the reader was on stay where they were on the screen.
      if (after) ui.lines.scrollTop += after.getBoundingClientRect().top - before;
    } finally {
      delete gap.dataset.reading;
    }
  }

  function showTarget() {
    const wanted = target === null ? null : document.getElementById(`L${target}`);
    if (!wanted) return;
    target = null;
    wanted.classList.add("target");
    follow(false);
    wanted.scrollIntoView({ block: "center" });
  }

  // Lines are drawn once a frame, however fast they come.
  function draw() {
    frame = 0;
    if (!pending.length) return;
    // Appended one by one (the page lays out once, at the frame's end): a section that
    // folds finds its lines already in the list.
    for (const { index, line, element } of pending) {
      ui.lines.append(element ?? lineElement(index, line));
    }
    pending = [];
    ui.empty.hidden = true;
    if (target !== null && document.getElementById(`L${target}`)) showTarget();
    else if (following && target === null) ui.lines.scrollTop = ui.lines.scrollHeight;
  }

  function follow(on) {
    following = on;
    ui.follow.setAttribute("aria-pressed", String(on));
    ui.follow.textContent = on ? "Following" : "Follow";
  }

  function matches(text, level) {
    if (severeOnly && level !== "warn" && level !== "error") return false;
    return !filterText || text.toLowerCase().includes(filterText);
  }

  function applyFilter() {
    filterText = ui.filter.value.trim().toLowerCase();
    for (const row of ui.lines.querySelectorAll("li[id]")) row.hidden = !shown(row);
  }

  async function copyLine(button) {
    const text = button.parentElement.querySelector(".text").textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      // No clipboard here (an insecure origin): select the line for the reader to copy.
      const range = document.createRange();
      range.selectNodeContents(button.previousElementSibling);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  }

  // ------------------------------------------------------------------ the end

  // Nothing moves once the job has ended: a bar still waiting for a number stops, full
  // for a completed job, empty otherwise.
  function settleBar(kind) {
    if (!ui.bar.classList.contains("indeterminate")) return;
    ui.bar.classList.remove("indeterminate");
    ui.fill.style.width = kind === "completed" ? "100%" : "0";
  }

  function finish(kind, data) {
    ended = true;
    closeStream();
    clearInterval(ticker);
    if (kind !== "removed") askAgain(); // when it finished
    setStatus(kind);
    setConnection("ended");
    settleBar(kind);
    ui.outcome.hidden = false;
    ui.outcome.dataset.kind = kind;
    if (kind === "completed") {
      ui.outcomeTitle.textContent = "Completed. Return value:";
      ui.outcomeBody.textContent = JSON.stringify(data.returnvalue, null, 2) ?? "undefined";
    } else if (kind === "failed") {
      ui.outcomeTitle.textContent = "Failed. Reason:";
      ui.outcomeBody.textContent = data.failedReason || "(none given)";
    } else {
      ui.outcomeTitle.textContent = "The job was removed.";
      ui.outcomeBody.hidden = true;
    }
  }

  // The link no longer opens the job: its message, and none of the job's controls.
  function giveUp(message, state) {
    ended = true;
    closeStream();
    clearTimeout(retryTimer);
    setConnection("ended");
    settleBar(state);
    if (state) setStatus(state);
    showProblem(message);
    document.body.dataset.refused = "";
  }

  // ----------------------------------------------------------------- the link

  // Ask what the job is; with the link's token the first time, by cookie after.
  async function session() {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    const url = `${base}watch/session`;
    let response;
    try {
      response = token
        ? await fetch(url, {
            method: "POST",
            body: token,
            credentials: "same-origin",
            // The path as this browser writes it, which a proxy may have re-encoded: the
            // cookie is scoped to it, so that the browser sends it back.
            headers: { "X-Watch-Path": base },
          })
        : await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch {
      return later(session); // the service is out of reach: try again
    }
    if (token && response.status !== 502 && response.status !== 503) {
      // The token is now the cookie's (or no good): out of the address bar and history.
      history.replaceState(null, "", location.pathname + location.search);
    }
    if (response.status === 401) {
      return giveUp(
        token || !lastEventId
          ? "This link is not valid, or has expired: ask for a new one."
          : "The link has expired: ask for a new one to go on watching.",
      );
    }
    if (response.status === 404) return giveUp("There is no such job.", "removed");
    if (!response.ok) return later(session);
    const job = await response.json();
    keepSession(job.session_seconds);
    keepTimes(job);
    keepAttempts(job);
    ui.name.textContent = job.name;
    setStatus(job.state);
    showProblem("");
    connect();
  }

  // The cookie is a session that ends on its own, not the link's token: renew it
  // while the page is open (for the stream's reconnects and "Download all"), halfway
  // through what it has left; the service never renews it past the link's end.
  function keepSession(seconds) {
    clearTimeout(sessionTimer);
    if (seconds) sessionTimer = setTimeout(askAgain, seconds * 500);
  }

  // ---------------------------------------------------------------- the stream

  function connect() {
    clearTimeout(retryTimer);
    if (ended || source || document.hidden) return;
    const query = lastEventId
      ? `last_event_id=${encodeURIComponent(lastEventId)}`
      : `tail=${TAIL}`;
    source = new EventSource(`${base}events?${query}`);
    setConnection(failures ? "reconnecting" : "connecting");
    source.onopen = () => {
      failures = 0;
      setConnection("live");
    };
    source.addEventListener("progress", (event) => {
      lastEventId = event.lastEventId || lastEventId;
      if (ui.status.dataset.state === "waiting") {
        setStatus("active");
        askAgain(); // when it started
      }
      showProgress(JSON.parse(event.data));
    });
    source.addEventListener("log", (event) => {
      lastEventId = event.lastEventId || lastEventId;
      const { index, line } = JSON.parse(event.data);
      addLine(index, line);
    });
    source.addEventListener("active", (event) => {
      lastEventId = event.lastEventId || lastEventId;
      setStatus("active");
      attemptBegan();
      askAgain(); // which attempt, and why the one before failed
    });
    for (const kind of FINAL) {
      source.addEventListener(kind, (event) => {
        lastEventId = event.lastEventId || lastEventId;
        finish(kind, JSON.parse(event.data));
      });
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Not a stream (a 401, a proxy's 502, a 503): the browser gave up; we don't.
        closeStream();
        later(session);
      } else {
        setConnection("reconnecting"); // the browser retries, sending Last-Event-ID
      }
    };
  }

  function closeStream() {
    if (source) {
      source.close();
      source = null;
    }
  }

  // Try again after a delay that doubles, from 1 s up to MAX_DELAY_MS, with jitter.
  function later(step) {
    if (ended) return;
    failures += 1;
    setConnection("reconnecting");
    const delay = Math.min(MAX_DELAY_MS, 1000 * 2 ** (failures - 1));
    clearTimeout(retryTimer);
    retryTimer = setTimeout(step, delay / 2 + Math.random() * (delay / 2));
  }

  document.addEventListener("visibilitychange", () => {
    if (ended) return;
    if (document.hidden) {
      closeStream();
      clearTimeout(retryTimer);
      setConnection("paused");
    } else if (!source) {
      session(); // the link may have expired meanwhile
    }
  });

  // ---------------------------------------------------------------- controls

  ui.lines.addEventListener("scroll", () => {
    const { scrollTop, scrollHeight, clientHeight } = ui.lines;
    const atBottom = scrollHeight - scrollTop - clientHeight < 8;
    if (atBottom !== following) follow(atBottom);
    if (!following) readGapsInView();
  });
  ui.follow.addEventListener("click", () => {
    follow(true);
    ui.lines.scrollTop = ui.lines.scrollHeight;
  });
  ui.filter.addEventListener("input", applyFilter);
  ui.severe.addEventListener("click", () => {
    severeOnly = !severeOnly;
    ui.severe.setAttribute("aria-pressed", String(severeOnly));
    applyFilter();
  });
  ui.lines.addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (button) copyLine(button);
    const fold = event.target.closest("button.fold");
    if (fold) {
      const which = sections[Number(fold.closest("li").dataset.head)];
      which.chosen = true;
      showSection(which, !which.open);
    }
  });

  if (document.hidden) setConnection("paused");
  session();
})();

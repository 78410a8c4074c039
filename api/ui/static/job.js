// The job page, live: one EventSource on the job's event stream (the JSON API, with the session cookie)
// feeds the charts, the events log, the status, progress, ETA and which buttons show. Nothing is polled.
"use strict";
(function () {
  const root = document.getElementById("job");
  const jobId = root.dataset.job;
  const SERIES = ["train_loss", "valid_loss", "learning_rate", "grad_norm", "tokens_per_second"];
  const COLORS = { train_loss: "#3558d6", valid_loss: "#c2352b", learning_rate: "#1e8a4c", grad_norm: "#a8660b", tokens_per_second: "#5b3fc4" };
  const steps = [];            // x: the training step of each point
  const values = {};           // y: one array per metric, null where a step did not report it
  SERIES.forEach((name) => { values[name] = []; });
  const charts = [];

  // Tick labels that stay readable from 1e-6 (a learning rate) to 1e4 (tokens/s).
  function short(value) {
    if (value === null || value === undefined) return "";
    if (value !== 0 && Math.abs(value) < 0.01) return value.toExponential(1);
    return String(Number(value.toPrecision(3)));
  }

  function width(node) { return Math.max(240, node.clientWidth || node.parentNode.clientWidth - 16); }

  document.querySelectorAll(".chart").forEach((node) => {
    const names = node.dataset.series.split(",");
    const chart = new uPlot({
      width: width(node), height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { size: 64, values: (chart, ticks) => ticks.map(short) }],
      series: [{ label: "step" }].concat(names.map((name) => ({ label: name, stroke: COLORS[name], width: 2, spanGaps: true, points: { show: steps.length < 60 } }))),
    }, [steps].concat(names.map((name) => values[name])), node);
    charts.push({ node, chart, names });
  });
  window.addEventListener("resize", () => charts.forEach(({ node, chart }) => chart.setSize({ width: width(node), height: 220 })));

  let redraw = null;
  function scheduleRedraw() {
    if (redraw) return;
    redraw = requestAnimationFrame(() => {
      redraw = null;
      charts.forEach(({ chart, names }) => chart.setData([steps].concat(names.map((name) => values[name]))));
      document.getElementById("point-count").textContent = String(steps.length);
    });
  }

  function addMetrics(data) {
    if (typeof data.step !== "number") return;
    let i = steps.indexOf(data.step);
    if (i < 0) {
      steps.push(data.step);
      SERIES.forEach((name) => values[name].push(null));
      i = steps.length - 1;
    }
    SERIES.forEach((name) => { if (typeof data[name] === "number") values[name][i] = data[name]; });
    scheduleRedraw();
  }

  const log = document.getElementById("events");
  const level = document.getElementById("level");
  function addEvent(event) {
    const item = tq.el("li", null, "lvl-" + event.level);
    item.dataset.level = event.level;
    item.appendChild(tq.el("span", tq.time(event.created_at) + " ", "muted"));
    item.appendChild(tq.el("span", event.message));
    item.hidden = Boolean(level.value) && level.value !== event.level;
    log.insertBefore(item, log.firstChild);
    while (log.children.length > 1000) log.removeChild(log.lastChild);
  }
  level.addEventListener("change", () => {
    Array.from(log.children).forEach((item) => { item.hidden = Boolean(level.value) && item.dataset.level !== level.value; });
  });

  const TERMINAL = ["succeeded", "failed", "cancelled"];
  function showJob(job) {
    const badge = document.querySelector("#status .badge");
    badge.textContent = job.status;
    badge.className = "badge s-" + job.status;
    root.dataset.status = job.status;
    const progress = job.progress || {};
    if (progress.total_steps) {
      document.getElementById("progress").value = Math.round(100 * (progress.step || 0) / progress.total_steps);
      document.getElementById("steps").textContent = (progress.step || 0) + "/" + progress.total_steps;
    }
    if (job.status === "succeeded") document.getElementById("progress").value = 100;
    document.getElementById("eta").textContent = job.estimated_finish ? tq.time(job.estimated_finish) : "—";
    document.getElementById("tuned").textContent = job.fine_tuned_model || "—";
    const error = document.getElementById("error");
    if (job.error && job.error.message) { error.textContent = (job.error.code || "error") + ": " + job.error.message; error.hidden = false; }
    const allowed = { pause: ["queued", "running"].includes(job.status), resume: job.status === "paused", cancel: !TERMINAL.includes(job.status) };
    document.querySelectorAll("form[data-action]").forEach((form) => { form.hidden = !allowed[form.dataset.action]; });
  }

  const state = document.getElementById("stream-state");
  const source = new EventSource("/v1/fine_tuning/jobs/" + encodeURIComponent(jobId) + "/events?stream=true");
  source.onopen = () => { state.textContent = "Live"; };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    addEvent(event);
    if (event.type === "metrics" && event.data) addMetrics(event.data);
  };
  source.addEventListener("job", (message) => showJob(JSON.parse(message.data)));
  source.addEventListener("end", (message) => {
    source.close();
    showJob(JSON.parse(message.data));
    state.textContent = "Finished";
    if (root.dataset.terminal !== "true") setTimeout(() => window.location.reload(), 1500);  // checkpoints, adapter link
  });
  source.onerror = () => { if (source.readyState !== EventSource.CLOSED) state.textContent = "Reconnecting…"; };
})();

// The create-job form: "Check" runs the API's dry run (validation report and time estimate) before the job is
// created; "Create" posts the same body and opens the job's page.
"use strict";
(function () {
  const form = document.getElementById("new-job");
  const create = document.getElementById("create");
  const failure = document.getElementById("form-error");

  function body(dryRun) {
    const fields = new FormData(form);
    const value = (name) => (fields.get(name) || "").toString().trim();
    const hyperparameters = {};
    ["n_epochs", "batch_size"].forEach((name) => { if (value(name)) hyperparameters[name] = parseInt(value(name), 10); });
    if (value("learning_rate_multiplier")) hyperparameters.learning_rate_multiplier = parseFloat(value("learning_rate_multiplier"));
    const request = { model: value("model"), training_file: value("training_file"), dry_run: dryRun };
    if (value("validation_file")) request.validation_file = value("validation_file");
    if (value("suffix")) request.suffix = value("suffix");
    if (Object.keys(hyperparameters).length) request.method = { type: "supervised", supervised: { hyperparameters } };
    return request;
  }

  function fact(list, name, text) {
    const row = document.createElement("div");
    row.appendChild(tq.el("dt", name));
    row.appendChild(tq.el("dd", text));
    list.appendChild(row);
  }

  function showReport(report) {
    const facts = document.getElementById("report-facts");
    const issues = document.getElementById("report-issues");
    facts.replaceChildren();
    issues.replaceChildren();
    const data = report.validation_report || report.report || {};
    const estimate = { "estimated trained tokens": report.estimated_trained_tokens, "estimated time (s)": Math.round(report.estimated_seconds), "estimate basis": report.estimate_basis };
    fact(facts, "Examples", data.examples);
    fact(facts, "Tokens", data.total_tokens);
    fact(facts, "Trained tokens", data.loss_tokens);
    if (data.length) fact(facts, "Length p50 / p95 / max", data.length.p50 + " / " + data.length.p95 + " / " + data.length.max);
    Object.entries(estimate).forEach(([name, value]) => { if (value !== undefined) fact(facts, name, value); });
    (data.errors || []).forEach((e) => issues.appendChild(tq.el("p", "line " + e.line + ": " + e.message, "error")));
    (data.warnings || []).forEach((w) => issues.appendChild(tq.el("p", "line " + w.line + ": " + w.message, "warn")));
    document.getElementById("report").hidden = false;
    create.disabled = report.valid === false || (data.errors || []).length > 0;
  }

  async function run(dryRun) {
    failure.hidden = true;
    try {
      const answer = await tq.api("POST", "/v1/fine_tuning/jobs", body(dryRun));
      if (dryRun) showReport(answer);
      else window.location.assign("/ui/jobs/" + encodeURIComponent(answer.id));
    } catch (error) {
      failure.textContent = error.message;
      failure.hidden = false;
    }
  }
  document.getElementById("check").addEventListener("click", () => run(true));
  form.addEventListener("submit", (event) => { event.preventDefault(); run(false); });
})();

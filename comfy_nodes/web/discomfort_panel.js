// The Discomfort panel: a sidebar tab of the ComfyUI editor that runs saved workflows in sequence
// and in loops on this server (routes /discomfort/panel/..., see discomfort.panel.runner).
// Plain JS, no build step: the frontend imports this file from /extensions/<pack>/.
// A run belongs to its token (returned when it starts, kept in this tab's sessionStorage): the
// panel reads, follows (long poll of /runs/{id}/events) and cancels a run with it. Each progress
// event is also dispatched on window as a "discomfort.progress" CustomEvent. Each iteration's
// outputs show as they arrive ("iteration" events; the run's "history" when events were missed).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "discomfort-panel";
const EVENT = "discomfort.progress";
const TOKEN_HEADER = "X-Discomfort-Panel-Token";
const TOKENS_KEY = "discomfort.panel.tokens"; // sessionStorage: [[run_id, token], ...], newest last

// What the panel shows; it outlives the tab's DOM (the sidebar unmounts closed tabs).
const state = {
  workflows: [], // saved workflows [{name, size, modified}]
  files: [], // input folder files [{name}]
  sequence: [], // chosen workflow names, in order
  ports: {}, // name -> [{unique_id, type, mode, reads, writes}] or {error}
  bindings: {}, // key -> {mode: "file"|"value", file, value}
  iterations: 1,
  until: "",
  pick: "", // the saved workflow chosen in the select, not yet added
  run: null, // the current or last run's summary
  progress: null, // the last progress event
  busy: false,
  loadError: null,
};
let root = null;

// ---------------------------------------------------------------------------------- helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "className") el.className = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function call(method, path, body, token) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  if (token) options.headers[TOKEN_HEADER] = token;
  const resp = await api.fetchApi(path, options);
  let data;
  try {
    data = await resp.json();
  } catch {
    data = { error: `HTTP ${resp.status}`, type: "HTTPError" };
  }
  if (!resp.ok) {
    const err = new Error(data.error || `HTTP ${resp.status}`);
    err.type = data.type;
    err.status = resp.status;
    throw err;
  }
  return data;
}

function toast(severity, summary, detail, life = 4000) {
  app.extensionManager?.toast?.add({ severity, summary, detail, life });
}

function tokens() {
  try {
    const t = JSON.parse(sessionStorage.getItem(TOKENS_KEY) || "[]");
    return Array.isArray(t) ? t : [];
  } catch {
    return [];
  }
}

function keepToken(runId, token) {
  const t = tokens().filter(([id]) => id !== runId);
  t.push([runId, token]);
  sessionStorage.setItem(TOKENS_KEY, JSON.stringify(t.slice(-16)));
}

function tokenOf(runId) {
  return (tokens().find(([id]) => id === runId) || [])[1];
}

// Follow a run's events until it has finished (one loop per run; a lost connection is retried).
const following = new Set();
async function follow(runId) {
  const token = tokenOf(runId);
  if (!token || following.has(runId)) return;
  following.add(runId);
  let after = 0;
  let failures = 0;
  try {
    while (true) {
      let r;
      try {
        r = await call("GET", `/discomfort/panel/runs/${runId}/events?after=${after}`, undefined, token);
        failures = 0;
      } catch (e) {
        if (e.status === 404 || e.status === 403 || ++failures > 20) return;
        await new Promise((ok) => setTimeout(ok, Math.min(5000, 250 * 2 ** failures)));
        continue;
      }
      if (r.dropped) await catchUp(runId, token); // events were missed: the run's history has them
      for (const d of r.events) {
        onEvent(d);
        window.dispatchEvent(new CustomEvent(EVENT, { detail: d }));
      }
      after = r.next;
      if (r.done) return;
    }
  } finally {
    following.delete(runId);
  }
}

async function catchUp(runId, token) {
  const s = await call("GET", `/discomfort/panel/runs/${runId}`, undefined, token).catch(() => null);
  if (!s || state.run?.run_id !== runId) return;
  state.run.history = s.history;
  state.run.history_note = s.history_note;
  renderHistory();
}

function viewURL(o) {
  const q = new URLSearchParams({ filename: o.filename, subfolder: o.subfolder, type: o.type });
  return api.apiURL(`/view?${q}`);
}

// Keys a run must be given: read by a workflow before any earlier one writes them.
function neededKeys() {
  const written = new Set();
  const needed = new Map();
  for (const name of state.sequence) {
    const ports = state.ports[name];
    if (!Array.isArray(ports)) continue;
    for (const p of ports) if (p.reads && !written.has(p.unique_id) && !needed.has(p.unique_id)) needed.set(p.unique_id, p.type);
    for (const p of ports) if (p.writes) written.add(p.unique_id);
  }
  return { needed, written };
}

const running = () => state.run && state.run.state === "running";

// ---------------------------------------------------------------------------------- actions

async function refresh() {
  try {
    const [w, f] = await Promise.all([call("GET", "/discomfort/panel/workflows"), call("GET", "/discomfort/panel/inputs")]);
    state.workflows = w.workflows;
    state.files = f.files;
    state.loadError = null;
    const mine = tokens().map(([, t]) => t).join(",");
    const runs = mine ? await call("GET", "/discomfort/panel/runs", undefined, mine).catch(() => null) : null;
    if (runs && runs.runs.length && !state.run) {
      state.run = runs.runs[runs.runs.length - 1];
      if (running()) follow(state.run.run_id);
    }
  } catch (e) {
    state.loadError = e.message;
  }
  render();
}

async function loadPorts(name) {
  try {
    const r = await call("GET", `/discomfort/panel/ports?workflow=${encodeURIComponent(name)}`);
    state.ports[name] = r.ports;
  } catch (e) {
    state.ports[name] = { error: e.message };
  }
  render();
}

function addWorkflow(name) {
  if (!name) return;
  state.sequence.push(name);
  if (!(name in state.ports)) loadPorts(name);
  render();
}

function move(i, d) {
  const j = i + d;
  if (j < 0 || j >= state.sequence.length) return;
  [state.sequence[i], state.sequence[j]] = [state.sequence[j], state.sequence[i]];
  render();
}

async function start() {
  const { needed } = neededKeys();
  const inputs = {};
  for (const key of needed.keys()) {
    const b = state.bindings[key] || {};
    if (b.mode === "value") inputs[key] = { value: b.value ?? "" };
    else if (b.file) inputs[key] = { file: b.file };
  }
  state.busy = true;
  state.progress = null;
  render();
  try {
    const r = await call("POST", "/discomfort/panel/runs", {
      workflows: state.sequence, iterations: Number(state.iterations), until: state.until || null, inputs,
    });
    keepToken(r.run_id, r.token);
    delete r.token;
    state.run = r;
    follow(r.run_id);
    toast("info", "Discomfort", `Run ${r.run_id.slice(0, 8)} started`, 2500);
  } catch (e) {
    toast("error", "Discomfort: cannot start", e.message, 8000);
  } finally {
    state.busy = false;
    render();
  }
}

async function cancel() {
  if (!running()) return;
  const ok = await app.extensionManager.dialog.confirm({
    title: "Cancel the Discomfort run?",
    message: `Run ${state.run.run_id.slice(0, 8)} stops inside its current workflow; its values are released.`,
    type: "default",
  });
  if (!ok || !running()) return;
  try {
    await call("POST", `/discomfort/panel/runs/${state.run.run_id}/cancel`, {}, tokenOf(state.run.run_id));
  } catch (e) {
    toast("error", "Discomfort: cannot cancel", e.message, 8000);
  }
}

function showError() {
  app.extensionManager.dialog.confirm({ title: "Discomfort run failed", message: state.run?.error || "", type: "info" });
}

function onEvent(d) {
  if (d.kind === "start") {
    state.run = { ...(state.run || {}), ...d, state: "running", outputs: [], history: [], history_note: null };
    render();
    return;
  }
  if (d.kind === "finished") {
    state.run = d;
    if (d.state === "finished") toast("success", "Discomfort", `Run finished: ${d.outputs.length} output(s)`, 3000);
    else if (d.state === "cancelled") toast("warn", "Discomfort", "Run cancelled", 3000);
    else toast("error", "Discomfort: run failed", d.error, 8000);
    render();
    return;
  }
  if (d.kind === "iteration") {
    if (state.run?.run_id !== d.run_id) return;
    const item = { iteration: d.iteration, outputs: d.outputs, files: d.files, note: d.note };
    const history = (state.run.history ||= []);
    if (!history.some((x) => x.iteration === item.iteration)) history.push(item);
    if (d.note) state.run.history_note = d.note;
    renderHistory();
    return;
  }
  state.progress = d;
  if (state.run && state.run.run_id === d.run_id) state.run.progress = d;
  renderProgress();
}

// ---------------------------------------------------------------------------------- views

function section(title, ...children) {
  return h("section", { className: "dcf-section" }, h("h3", {}, title), ...children);
}

function portChips(name) {
  const ports = state.ports[name];
  if (ports === undefined) return h("div", { className: "dcf-muted" }, "reading ports…");
  if (!Array.isArray(ports)) return h("div", { className: "dcf-error" }, ports.error);
  if (!ports.length) return h("div", { className: "dcf-muted" }, "no ports");
  return h("ul", { className: "dcf-ports" }, ports.map((p) =>
    h("li", { "data-key": p.unique_id, title: p.mode },
      h("span", { className: "dcf-key" }, p.unique_id), " ",
      h("span", { className: "dcf-type" }, p.type), " ",
      h("span", { className: "dcf-dir" }, p.reads && p.writes ? "in/out" : p.writes ? "output" : "input"))));
}

function bindingRow(key, type) {
  const b = (state.bindings[key] ||= { mode: ["IMAGE", "MASK", "LATENT"].includes(type) ? "file" : "value", file: "", value: "" });
  const control = b.mode === "file"
    ? h("select", { "data-dcf": `input-file-${key}`, onchange: (e) => (b.file = e.target.value) },
      h("option", { value: "" }, "— file in input/ —"),
      state.files.map((f) => h("option", { value: f.name, selected: f.name === b.file }, f.name)))
    : h("input", { type: "text", "data-dcf": `input-value-${key}`, value: b.value, placeholder: type,
      oninput: (e) => (b.value = e.target.value) });
  return h("div", { className: "dcf-row", "data-binding": key },
    h("label", {}, h("span", { className: "dcf-key" }, key), " ", h("span", { className: "dcf-type" }, type)),
    h("select", { "data-dcf": `input-mode-${key}`, onchange: (e) => { b.mode = e.target.value; render(); } },
      h("option", { value: "file", selected: b.mode === "file" }, "file"),
      h("option", { value: "value", selected: b.mode === "value" }, "value")),
    control);
}

function progressView() {
  const run = state.run;
  if (!run) return h("div", { className: "dcf-muted", "data-dcf": "status", "data-state": "idle" }, "No run yet");
  const p = (run.state === "running" ? state.progress : run.progress) || {};
  const total = p.total || (run.iterations || 1) * (run.workflows?.length || 1);
  const done = run.state === "finished" ? total : p.done || 0;
  const lines = [h("div", { className: "dcf-state" }, `Run ${run.run_id.slice(0, 8)}: ${run.state}`)];
  if (p.iteration !== undefined && p.iteration !== null) {
    lines.push(h("div", { "data-dcf": "iteration" }, `Iteration ${p.iteration + 1}/${p.iterations ?? "∞"}`));
    lines.push(h("div", { "data-dcf": "workflow" }, `Workflow ${p.workflow + 1}/${p.workflows}: ${p.name}`));
  }
  if (p.node) lines.push(h("div", { "data-dcf": "node" }, `Node ${p.node}${p.node_title ? ` (${p.node_title})` : ""}`));
  if (p.kind === "step" && p.max) lines.push(h("div", { "data-dcf": "step" }, `Step ${p.value}/${p.max}`));
  if (run.error && run.state !== "running") {
    lines.push(h("div", { className: "dcf-error" }, run.error.split("\n")[0].slice(0, 300)));
    if (run.state === "failed") lines.push(h("button", { className: "dcf-link", onclick: showError }, "Details…"));
  }
  return h("div", { "data-dcf": "status", "data-state": run.state, "data-run": run.run_id },
    h("div", { className: "dcf-bar" }, h("div", { style: `width:${Math.round((100 * done) / Math.max(1, total))}%` })),
    lines);
}

function renderProgress() {
  const slot = root?.querySelector("[data-dcf-slot=progress]");
  if (!slot) return;
  slot.replaceChildren(progressView());
  const cancelBtn = root.querySelector("[data-dcf=cancel]");
  if (cancelBtn) cancelBtn.disabled = !running();
}

// One output of an iteration: a value the run wrote (o.key) or a file a ComfyUI output node wrote (o.node).
function thumb(o, iteration) {
  const name = o.key ?? `node ${o.node}`;
  const label = `${name}, iteration ${iteration + 1}`;
  const isImage = o.kind ? o.kind === "image" || o.kind === "mask" : /\.(png|jpe?g|webp|gif)$/i.test(o.filename || "");
  return h("figure", { "data-key": o.key, "data-node": o.node, "data-kind": o.kind || "file" },
    !o.filename ? h("span", { className: "dcf-muted", title: o.note || "" }, "not saved")
      : isImage ? h("a", { href: viewURL(o), target: "_blank" }, h("img", { src: viewURL(o), alt: label, title: label, loading: "lazy" }))
        : h("a", { href: viewURL(o), target: "_blank", className: "dcf-file", title: label }, o.filename),
    h("figcaption", {}, name));
}

function historyView() {
  const run = state.run;
  const history = run?.history || [];
  if (!history.length) {
    return h("div", { className: "dcf-muted", "data-dcf": "history" },
      run?.state === "running" ? "Each iteration's outputs show here as it ends" : "No iteration outputs yet");
  }
  // Newest first: the iteration that just ended is at the top.
  return h("div", { "data-dcf": "history" },
    run.history_note ? h("div", { className: "dcf-muted", "data-dcf": "history-note" }, run.history_note) : null,
    [...history].reverse().map((it) =>
      h("div", { className: "dcf-iteration", "data-dcf": "iteration-outputs", "data-iteration": it.iteration + 1 },
        h("div", { className: "dcf-iteration-title" }, `Iteration ${it.iteration + 1}`),
        h("div", { className: "dcf-outputs" }, [...(it.outputs || []), ...(it.files || [])].map((o) => thumb(o, it.iteration))))));
}

function renderHistory() {
  const slot = root?.querySelector("[data-dcf-slot=history]");
  if (slot) slot.replaceChildren(historyView());
}

function outputsView() {
  const outs = state.run?.state !== "running" ? state.run?.outputs || [] : [];
  if (!outs.length) return h("div", { className: "dcf-muted" }, "Outputs of a finished run show here");
  return h("div", { className: "dcf-outputs", "data-dcf": "outputs" }, outs.map((o) =>
    h("figure", { "data-key": o.key, "data-kind": o.kind },
      o.kind === "image" || o.kind === "mask"
        ? h("a", { href: viewURL(o), target: "_blank" }, h("img", { src: viewURL(o), alt: o.key, loading: "lazy" }))
        : o.filename ? h("a", { href: viewURL(o), target: "_blank", className: "dcf-file" }, o.filename)
          : h("span", { className: "dcf-muted" }, o.note || "not saved"),
      h("figcaption", {}, o.key))));
}

function render() {
  if (!root || !root.isConnected) return;
  const { needed, written } = neededKeys();
  const locked = running() || state.busy;
  const chosen = new Set(state.workflows.map((w) => w.name));
  const body = h("div", { className: "dcf-panel" },
    h("header", {}, h("h2", {}, "Discomfort"),
      h("button", { className: "dcf-icon", title: "Reload workflows and input files", "data-dcf": "refresh", onclick: refresh },
        h("i", { className: "pi pi-refresh" }))),
    state.loadError ? h("div", { className: "dcf-error" }, state.loadError) : null,
    section("Workflows",
      h("div", { className: "dcf-row" },
        h("select", { "data-dcf": "workflow-select", disabled: locked, onchange: (e) => (state.pick = e.target.value) },
          h("option", { value: "" }, state.workflows.length ? "— saved workflow —" : "no saved workflows"),
          state.workflows.map((w) => h("option", { value: w.name, selected: w.name === state.pick }, w.name.replace(/\.json$/, "")))),
        h("button", { "data-dcf": "add-workflow", disabled: locked, onclick: () => addWorkflow(state.pick) }, "Add")),
      h("ol", { className: "dcf-sequence", "data-dcf": "sequence" }, state.sequence.map((name, i) =>
        h("li", { "data-workflow": name },
          h("div", { className: "dcf-row" },
            h("span", { className: "dcf-name", title: name }, name.replace(/\.json$/, ""), chosen.has(name) ? null : " (missing)"),
            h("button", { className: "dcf-icon", title: "Up", disabled: locked || i === 0, onclick: () => move(i, -1) }, h("i", { className: "pi pi-arrow-up" })),
            h("button", { className: "dcf-icon", title: "Down", disabled: locked || i === state.sequence.length - 1, onclick: () => move(i, 1) }, h("i", { className: "pi pi-arrow-down" })),
            h("button", { className: "dcf-icon", title: "Remove", "data-dcf": "remove", disabled: locked, onclick: () => { state.sequence.splice(i, 1); render(); } }, h("i", { className: "pi pi-times" }))),
          portChips(name))))),
    section("Inputs", needed.size
      ? [...needed].map(([k, t]) => bindingRow(k, t))
      : h("div", { className: "dcf-muted" }, "Nothing to bind")),
    section("Loop",
      h("div", { className: "dcf-row" }, h("label", {}, "Iterations"),
        h("input", { type: "number", min: 1, step: 1, "data-dcf": "iterations", value: state.iterations, disabled: locked,
          oninput: (e) => (state.iterations = e.target.value) })),
      h("div", { className: "dcf-row" }, h("label", {}, "Until"),
        h("select", { "data-dcf": "until", disabled: locked, onchange: (e) => (state.until = e.target.value) },
          h("option", { value: "" }, "— all iterations —"),
          [...written].map((k) => h("option", { value: k, selected: k === state.until }, k))))),
    h("div", { className: "dcf-row dcf-actions" },
      h("button", { className: "dcf-primary", "data-dcf": "run", disabled: locked || !state.sequence.length, onclick: start },
        h("i", { className: "pi pi-play" }), " Run"),
      h("button", { "data-dcf": "cancel", disabled: !running(), onclick: cancel }, h("i", { className: "pi pi-stop" }), " Cancel")),
    section("Progress", h("div", { "data-dcf-slot": "progress" }, progressView())),
    section("Outputs", outputsView()),
    section("Iterations", h("div", { "data-dcf-slot": "history" }, historyView())));
  root.replaceChildren(body);
}

const CSS = `
.dcf-panel { padding: 0.75rem; display: flex; flex-direction: column; gap: 0.75rem; color: var(--fg-color);
  font-size: 0.85rem; overflow-y: auto; height: 100%; box-sizing: border-box; }
.dcf-panel header { display: flex; align-items: center; justify-content: space-between; }
.dcf-panel h2 { margin: 0; font-size: 1rem; }
.dcf-panel h3 { margin: 0 0 0.35rem; font-size: 0.75rem; text-transform: uppercase; color: var(--descrip-text); }
.dcf-row { display: flex; gap: 0.4rem; align-items: center; margin: 0.2rem 0; }
.dcf-row > label { min-width: 5.5rem; }
.dcf-panel select, .dcf-panel input { flex: 1; min-width: 0; background: var(--comfy-input-bg); color: var(--input-text);
  border: 1px solid var(--border-color); border-radius: 4px; padding: 0.25rem 0.35rem; }
.dcf-panel button { background: var(--comfy-input-bg); color: var(--input-text); border: 1px solid var(--border-color);
  border-radius: 4px; padding: 0.25rem 0.6rem; cursor: pointer; }
.dcf-panel button:disabled { opacity: 0.45; cursor: default; }
.dcf-panel button.dcf-primary { background: var(--p-primary-color, #3b82f6); color: var(--p-primary-contrast-color, #fff); border: none; }
.dcf-panel button.dcf-icon { padding: 0.2rem 0.35rem; }
.dcf-panel button.dcf-link { background: none; border: none; color: var(--p-primary-color); padding: 0; }
.dcf-sequence { margin: 0.3rem 0 0; padding-left: 1.2rem; }
.dcf-sequence li { margin-bottom: 0.4rem; }
.dcf-name { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.dcf-ports { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 0.25rem; }
.dcf-ports li { border: 1px solid var(--border-color); border-radius: 999px; padding: 0 0.45rem; font-size: 0.75rem; }
.dcf-key { font-weight: 600; }
.dcf-type, .dcf-dir, .dcf-muted { color: var(--descrip-text); }
.dcf-error { color: var(--error-text, #f55); white-space: pre-wrap; word-break: break-word; }
.dcf-bar { height: 6px; background: var(--comfy-input-bg); border-radius: 3px; overflow: hidden; margin-bottom: 0.35rem; }
.dcf-bar > div { height: 100%; background: var(--p-primary-color, #3b82f6); transition: width 0.2s; }
.dcf-outputs { display: grid; grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)); gap: 0.4rem; }
.dcf-outputs figure { margin: 0; text-align: center; }
.dcf-outputs img { width: 100%; aspect-ratio: 1; object-fit: contain; background: var(--comfy-input-bg);
  border: 1px solid var(--border-color); border-radius: 4px; image-rendering: pixelated; }
.dcf-outputs figcaption { font-size: 0.75rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.dcf-file { word-break: break-all; color: var(--p-primary-color); }
.dcf-iteration { display: flex; gap: 0.5rem; align-items: center; margin-bottom: 0.35rem; }
.dcf-iteration-title { min-width: 4.5rem; font-size: 0.75rem; color: var(--descrip-text); }
.dcf-iteration .dcf-outputs { display: flex; flex-wrap: wrap; gap: 0.3rem; }
.dcf-iteration .dcf-outputs figure { width: 56px; }
`;

app.registerExtension({
  name: "discomfort.panel",
  setup() {
    document.head.append(h("style", { id: "discomfort-panel-css" }, CSS));
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-sync",
      title: "Discomfort",
      tooltip: "Discomfort: run saved workflows in sequence and in loops",
      type: "custom",
      render(el) {
        root = el;
        root.style.height = "100%";
        render();
        refresh();
      },
      destroy() {
        root = null;
      },
    });
  },
});

// airun playground: a chat page over this server's Workers AI REST API. Plain ES module, no build, no CDN.
//
// Invariants:
// - Every API call goes to API_ROOT on this page's origin and carries `Authorization: Bearer <token>` whenever the
//   token field is non-empty; the token lives in localStorage under TOKEN_KEY.
// - `state.history` holds only finished chat turns, alternating user/assistant, without the system message;
//   raw-prompt exchanges and failed turns are never part of it.
// - At most one generation runs at a time: `state.controller` is its AbortController, null when idle.
// - No failure is silent: run errors show the envelope's `errors[0].message` (else the HTTP status) in the answer,
//   page-level failures show it in the alert banner.
// - Model output is inserted as text (textContent / Text nodes), never as HTML.

export const API_ROOT = "/client/v4/accounts/local/ai";
const TOKEN_KEY = "airun.apiToken";
const MODEL_KEY = "airun.model";
const INT_PARAMS = new Set(["max_tokens", "top_k", "seed"]);
const PARAM_NAMES = ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
  "frequency_penalty", "presence_penalty"];

const $ = (id) => /** @type {any} */ (document.getElementById(id));

const state = {
  /** @type {{role: string, content: string}[]} */ history: [],
  /** @type {{model: string, body: Record<string, unknown>} | null} */ lastRequest: null,
  /** @type {AbortController | null} */ controller: null,
};

/** An API failure: `message` comes from the envelope's errors[0].message when the server sent one. */
export class ApiError extends Error {
  /** @param {string} message @param {number} status */
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// ---------------------------------------------------------------- HTTP

function token() {
  return $("api-token").value.trim();
}

/** @returns {Record<string, string>} */
function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

/** The path of a model: each segment percent-encoded, `@` and `/` kept literal (Workers AI's curl spelling). */
export function modelPath(model) {
  return model.split("/").map((s) => encodeURIComponent(s).replaceAll("%40", "@")).join("/");
}

/** @param {Response} res @returns {Promise<string>} the envelope's errors[0].message, else the HTTP status line. */
export async function errorMessage(res) {
  const text = await res.text().catch(() => "");
  try {
    const message = JSON.parse(text)?.errors?.[0]?.message;
    if (typeof message === "string" && message) return message;
  } catch { /* not JSON: fall through */ }
  const plain = (res.headers.get("content-type") ?? "").startsWith("text/plain");
  const detail = plain ? text.trim().slice(0, 200) : "";  // an HTML error page says nothing useful here
  return `HTTP ${res.status} ${res.statusText}`.trim() + (detail ? `: ${detail}` : "");
}

/** GET an enveloped route under API_ROOT and return its `result`. @throws {ApiError} */
async function apiGet(path) {
  let res;
  try {
    res = await fetch(API_ROOT + path, { headers: { Accept: "application/json", ...authHeaders() } });
  } catch (err) {
    throw new ApiError(`Cannot reach the server: ${err.message}`, 0);
  }
  if (!res.ok) throw new ApiError(await errorMessage(res), res.status);
  const envelope = await res.json();
  if (!envelope.success) throw new ApiError(envelope.errors?.[0]?.message ?? "Request failed", res.status);
  return envelope.result;
}

/**
 * The `data:` payloads of a text/event-stream body, one string per event, in order.
 * Events end at a blank line (LF, CRLF or CR); multi-line data is joined with "\n"; comments and other fields are
 * skipped. A trailing event without its blank line is still delivered when the body ends.
 * @param {ReadableStream<Uint8Array>} body
 */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const boundary = /\r\n\r\n|\n\n|\r\r/;
  let buffer = "";
  const parse = (block) => {
    const lines = block.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"));
    return lines.length ? lines.map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n") : null;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = boundary.exec(buffer))) {
        const data = parse(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
        if (data !== null) yield data;
      }
    }
    const tail = parse(buffer);
    if (tail !== null) yield tail;
  } finally {
    reader.cancel().catch(() => {});  // frees the connection when the consumer stops early
  }
}

// ---------------------------------------------------------------- request building

/**
 * The parameter values set in the form, as numbers; an empty field is omitted (the server's default applies).
 * @returns {{values: Record<string, number>, invalid: HTMLInputElement | null}}
 */
function readParams() {
  /** @type {Record<string, number>} */
  const values = {};
  let invalid = null;
  for (const name of PARAM_NAMES) {
    const input = $(`param-${name}`);
    if (!input.checkValidity() || (input.value !== "" && !Number.isFinite(input.valueAsNumber))) {
      invalid ??= input;
      continue;
    }
    if (input.value === "") continue;
    values[name] = INT_PARAMS.has(name) ? Math.trunc(input.valueAsNumber) : input.valueAsNumber;
  }
  return { values, invalid };
}

/** The model inputs for sending `text` now (without `stream`), from the mode, history and controls. */
function buildRequest(text) {
  /** @type {Record<string, unknown>} */
  const body = {};
  if ($("raw-mode").checked) {
    body.prompt = text;
    body.raw = true;
  } else {
    const system = $("system-message").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
      { role: "user", content: text }];
  }
  Object.assign(body, readParams().values);
  if ($("lora-select").value) body.lora = $("lora-select").value;
  return { model: $("model-select").value, body };
}

// ---------------------------------------------------------------- code generation

/** `s` as one POSIX shell word. */
export function shellQuote(s) {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** A Python literal equal to the JSON value `v`; lists of objects get one item per line. */
export function pyLiteral(v, indent = "") {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    const inner = indent + "    ";
    return `[\n${v.map((x) => inner + pyLiteral(x, inner) + ",\n").join("")}${indent}]`;
  }
  const entries = Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyLiteral(x, indent)}`);
  return `{${entries.join(", ")}}`;
}

/** @typedef {{model: string, body: Record<string, unknown>}} RunRequest */
/** @typedef {{origin: string, token: string, stream: boolean}} SnippetOptions */

function runUrl(origin, model) {
  return `${origin}${API_ROOT}/run/${modelPath(model)}`;
}

/** @param {RunRequest} request @param {SnippetOptions} o */
function curlSnippet(request, { origin, token, stream }) {
  const lines = [`curl -sS${stream ? " -N" : ""} ${shellQuote(runUrl(origin, request.model))}`];
  if (token) lines.push(`  -H ${shellQuote(`Authorization: Bearer ${token}`)}`);
  lines.push(`  -H 'Content-Type: application/json'`);
  lines.push(`  -d ${shellQuote(JSON.stringify({ ...request.body, stream }, null, 2))}`);
  return lines.join(" \\\n");
}

/** The official `cloudflare` SDK pointed at this server. @param {RunRequest} request @param {SnippetOptions} o */
function cloudflareSnippet(request, { origin, token, stream }) {
  const apiToken = token ? `${JSON.stringify(token)},` : `"unused",  # the SDK needs one; this server asks for none`;
  const kwargs = Object.entries(request.body).map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},\n`).join("");
  const head = `from cloudflare import Cloudflare

client = Cloudflare(
    api_token=${apiToken}
    base_url=${JSON.stringify(`${origin}/client/v4`)},
)
`;
  if (!stream) {
    return `${head}
result = client.ai.run(
    ${JSON.stringify(request.model)},
    account_id="local",
${kwargs})
print(result["response"])
`;
  }
  return `import json

${head}
with client.ai.with_streaming_response.run(
    ${JSON.stringify(request.model)},
    account_id="local",
${kwargs}    stream=True,
) as response:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            print(json.loads(line[6:]).get("response", ""), end="", flush=True)
print()
`;
}

/** airun's own client (`airun.client.AI`). @param {RunRequest} request @param {SnippetOptions} o */
function airunSnippet(request, { origin, token, stream }) {
  const inputs = Object.entries(request.body).map(([k, v]) => `    ${JSON.stringify(k)}: ${pyLiteral(v, "    ")},\n`);
  const call = `ai.run(${JSON.stringify(request.model)}, {\n${inputs.join("")}}${stream ? ", stream=True" : ""})`;
  const head = `from airun.client import AI

ai = AI(${JSON.stringify(origin)}, ${token ? JSON.stringify(token) : "None"})
`;
  return stream
    ? `${head}for piece in ${call}:\n    print(piece, end="", flush=True)\nprint()\n`
    : `${head}result = ${call}\nprint(result["response"])\n`;
}

/** Browser or Node `fetch`; with `stream`, the SSE frames parsed by hand. @param {RunRequest} request @param {SnippetOptions} o */
function fetchSnippet(request, { origin, token, stream }) {
  const auth = token ? `    Authorization: ${JSON.stringify(`Bearer ${token}`)},\n` : "";
  const body = JSON.stringify({ ...request.body, stream }, null, 2).replaceAll("\n", "\n  ");
  const call = `const res = await fetch(${JSON.stringify(runUrl(origin, request.model))}, {
  method: "POST",
  headers: {
${auth}    "Content-Type": "application/json",
  },
  body: JSON.stringify(${body}),
});
`;
  if (!stream) {
    return `${call}const envelope = await res.json();
if (!envelope.success) throw new Error(envelope.errors[0].message);
console.log(envelope.result.response);
console.log(envelope.result.usage);
`;
  }
  return `${call}if (!res.ok) throw new Error((await res.json()).errors[0].message);

// Server-sent events: "data: {json}" frames separated by blank lines, ending with "data: [DONE]".
const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
let buffer = "", text = "", usage = null;
for (let done = false; !done;) {
  const chunk = await reader.read();
  done = chunk.done;
  buffer += chunk.value ?? "";
  const events = buffer.split("\\n\\n");
  buffer = done ? "" : events.pop();
  for (const event of events) {
    const data = event.split("\\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\\n");
    if (!data || data === "[DONE]") continue;
    const frame = JSON.parse(data);
    text += frame.response ?? "";  // the next piece of the answer
    usage = frame.usage ?? usage;  // sent in the last frame
  }
}
console.log(text);
console.log(usage);
`;
}

/**
 * Runnable snippets for one request; `stream` decides the request's `stream` field and how each reads the answer.
 * @param {RunRequest} request @param {SnippetOptions} opts
 * @returns {{curl: string, python: string, airun: string, js: string}}
 */
export function codeSnippets(request, opts) {
  return {
    curl: curlSnippet(request, opts),
    python: cloudflareSnippet(request, opts),
    airun: airunSnippet(request, opts),
    js: fetchSnippet(request, opts),
  };
}

function renderCode() {
  if ($("code-panel").hidden) return;
  const draft = $("prompt-input").value;
  let request;
  let caption;
  if (draft.trim()) {
    request = buildRequest(draft);
    caption = "The request Send will make now.";
  } else if (state.lastRequest) {
    request = state.lastRequest;
    caption = "The last request sent. Type a message to see the next one.";
  } else {
    request = buildRequest("Hello!");
    caption = "An example request. Type a message to see yours.";
  }
  $("code-caption").textContent = caption;
  const snippets = codeSnippets(request, { origin: location.origin, token: token(), stream: $("code-stream").checked });
  for (const [lang, code] of Object.entries(snippets)) $(`code-${lang}`).textContent = code;
}

// ---------------------------------------------------------------- transcript

function appendMessage(role, text, { raw = false } = {}) {
  $("empty-hint").hidden = true;
  const article = document.createElement("article");
  article.className = `message ${role}`;
  article.dataset.testid = role === "user" ? "user-message" : "answer";
  const head = document.createElement("h3");
  head.className = "role";
  head.textContent = (role === "user" ? "You" : "Assistant") + (raw ? " (raw prompt)" : "");
  const content = document.createElement("div");
  content.className = "content";
  content.dataset.testid = `${role === "user" ? "user" : "answer"}-text`;
  const textNode = document.createTextNode(text);
  content.append(textNode);
  article.append(head, content);
  $("transcript").append(article);
  return { article, content, textNode };
}

function scrollToEnd() {
  const t = $("transcript");
  if (t.scrollHeight - t.scrollTop - t.clientHeight < 120) t.scrollTop = t.scrollHeight;
}

/** The stats line under an answer: usage, time to first token and decode rate. */
function showStats(article, { usage, ttftMs, tokensPerSecond, chunks, outcome }) {
  const stats = document.createElement("p");
  stats.className = "stats";
  stats.dataset.testid = "answer-stats";
  const item = (testid, label, value) => {
    const span = document.createElement("span");
    span.dataset.testid = testid;
    span.textContent = label ? `${label} ${value}` : String(value);
    stats.append(span);
  };
  if (outcome !== "done") item("outcome", "", outcome === "stopped" ? "stopped" : "incomplete: the stream ended early");
  if (usage) {
    item("usage-prompt", "prompt", usage.prompt_tokens);
    item("usage-completion", "completion", usage.completion_tokens);
    item("usage-total", "total", `${usage.total_tokens} tokens`);
  } else {
    item("usage-completion", "completion ≈", `${chunks} chunks`);
  }
  item("ttft", "first token", ttftMs === null ? "—" : `${Math.round(ttftMs)} ms`);
  item("tps", "", tokensPerSecond === null ? "— tok/s" : `${tokensPerSecond.toFixed(1)} tok/s`);
  stats.lastChild.title = "Decode rate: tokens after the first, over the time from the first to the last token.";
  article.append(stats);
}

function showRunError(article, message) {
  const p = document.createElement("p");
  p.className = "error";
  p.dataset.testid = "answer-error";
  p.setAttribute("role", "alert");
  p.textContent = message;
  article.append(p);
}

// ---------------------------------------------------------------- running

function setBusy(busy) {
  $("send-button").setAttribute("aria-disabled", String(busy));
  $("stop-button").disabled = !busy;
  $("status").textContent = busy ? "Generating…" : "";
}

function showBanner(message) {
  $("error-text").textContent = message;
  $("error-banner").hidden = false;
}

async function send() {
  if (state.controller) return;
  const text = $("prompt-input").value;
  if (!text.trim()) return $("prompt-input").focus();
  const { invalid } = readParams();
  if (invalid) {
    showBanner(`${invalid.name}: ${invalid.validationMessage || "not a number"}`);
    return invalid.focus();
  }
  if (!$("model-select").value) return showBanner("No model is selected: the model list could not be loaded.");
  $("error-banner").hidden = true;
  const raw = $("raw-mode").checked;
  const request = buildRequest(text);
  state.lastRequest = request;
  $("prompt-input").value = "";
  appendMessage("user", text, { raw });
  const answer = appendMessage("assistant", "", { raw });
  answer.article.setAttribute("aria-busy", "true");
  scrollToEnd();
  const result = await stream(request, answer);
  answer.article.removeAttribute("aria-busy");
  if (!raw && result.outcome !== "error" && result.text) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: result.text });
  }
  renderCode();
}

/** Streams one request into `answer`; resolves with what happened, never rejects. */
async function stream(request, answer) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tLast = null, chunks = 0, text = "", usage = null, outcome = "incomplete";
  const add = (delta) => {
    if (!delta) return;
    tLast = performance.now();
    tFirst ??= tLast;
    chunks += 1;
    text += delta;
    answer.textNode.appendData(delta);
    scrollToEnd();
  };
  try {
    const res = await fetch(runUrl("", request.model), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify({ ...request.body, stream: true }),
      signal: controller.signal,
    });
    if (!res.ok) throw new ApiError(await errorMessage(res), res.status);
    if (!(res.headers.get("content-type") ?? "").includes("text/event-stream")) {
      const envelope = await res.json();
      if (!envelope.success) throw new ApiError(envelope.errors?.[0]?.message ?? "Request failed", res.status);
      const response = envelope.result?.response;
      add(typeof response === "string" ? response : JSON.stringify(response));
      usage = envelope.result.usage ?? null;
      outcome = "done";
    } else {
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") { outcome = "done"; break; }
        const frame = JSON.parse(data);
        if (frame.errors?.length) throw new ApiError(frame.errors[0].message, res.status);
        if (typeof frame.response === "string") add(frame.response);
        if (frame.usage) usage = frame.usage;
        if (frame.tool_calls) add(`\n[tool_calls] ${JSON.stringify(frame.tool_calls)}`);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) outcome = "stopped";
    else {
      outcome = "error";
      showRunError(answer.article, err instanceof ApiError ? err.message : `Request failed: ${err.message}`);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (outcome !== "error") {
    const seconds = tFirst === null ? 0 : (tLast - tFirst) / 1000;
    const n = usage ? usage.completion_tokens : chunks;
    const rate = seconds > 0 && n > 1 ? (n - 1) / seconds : null;
    showStats(answer.article, { usage, ttftMs: tFirst === null ? null : tFirst - t0, tokensPerSecond: rate, chunks,
      outcome });
  }
  $("status").textContent = { done: "Done.", stopped: "Stopped.", error: "Failed.", incomplete: "Stream ended early." }[outcome];
  scrollToEnd();
  return { outcome, text };
}

// ---------------------------------------------------------------- loading models, fine-tunes, schema

function fillSelect(select, options, keep) {
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  if (options.some(([value]) => value === keep)) select.value = keep;
}

async function loadModels() {
  const result = await apiGet("/models/search");
  const names = result.filter((m) => !m.task?.name || m.task.name === "Text Generation").map((m) => m.name);
  if (!names.length) throw new ApiError("The server lists no text-generation model.", 200);
  fillSelect($("model-select"), names.map((n) => [n, n]), localStorage.getItem(MODEL_KEY) ?? names[0]);
}

async function loadFinetunes() {
  const keep = $("lora-select").value;
  let options = [["", "none"]];
  try {
    const result = await apiGet("/finetunes");
    options = options.concat(result.map((f) => [f.name ?? f.id, f.model ? `${f.name ?? f.id} (${f.model})` : f.name ?? f.id]));
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) showBanner(`Fine-tunes: ${err.message}`);
  }
  fillSelect($("lora-select"), options, keep);
}

/** Applies the schema's minimum/maximum/default of each parameter to its control; keeps the built-in ranges on failure. */
async function loadSchema() {
  const model = $("model-select").value;
  if (!model) return;
  let result;
  try {
    result = await apiGet(`/models/schema?model=${encodeURIComponent(model)}`);
  } catch (err) {
    console.warn("schema unavailable, keeping the catalog ranges:", err.message);
    return;
  }
  const variants = result?.input?.oneOf ?? [result?.input ?? {}];
  const props = Object.assign({}, ...variants.map((v) => v.properties ?? {}));
  for (const name of PARAM_NAMES) {
    const spec = props[name];
    const input = $(`param-${name}`);
    if (!spec) continue;
    for (const key of ["minimum", "maximum"]) {
      const attr = key === "minimum" ? "min" : "max";
      if (typeof spec[key] === "number") input[attr] = String(spec[key]);
    }
    const range = input.labels[0]?.querySelector(".range");
    if (range && input.min !== "") range.textContent = input.max !== "" ? `${input.min} – ${input.max}` : `≥ ${input.min}`;
  }
}

async function loadAll() {
  try {
    await loadModels();
    $("error-banner").hidden = true;
  } catch (err) {
    fillSelect($("model-select"), [["", "no model available"]], "");
    showBanner(`Models: ${err.message}`);
  }
  await Promise.all([loadFinetunes(), loadSchema()]);
  renderCode();
}

// ---------------------------------------------------------------- wiring

function selectTab(tab, focus = false) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
}

async function copy(lang, button) {
  const text = $(`code-${lang}`).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (plain http on a LAN address): select the text for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($(`code-${lang}`));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand?.("copy");
  }
  const label = button.textContent;
  button.textContent = "Copied";
  $("copy-status").textContent = `${lang} code copied`;
  setTimeout(() => { button.textContent = label; }, 1500);
}

function toggleCode(open) {
  $("code-panel").hidden = !open;
  $("layout").classList.toggle("with-code", open);
  $("view-code-button").setAttribute("aria-expanded", String(open));
  if (open) {
    renderCode();
    $("code-title").scrollIntoView?.({ block: "nearest" });
  }
}

function init() {
  $("api-token").value = localStorage.getItem(TOKEN_KEY) ?? "";
  if (matchMedia("(max-width: 760px)").matches) $("settings").open = false;

  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop-button").addEventListener("click", () => {
    state.controller?.abort();
    $("prompt-input").focus();
  });
  $("clear-button").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    state.lastRequest = null;
    $("transcript").replaceChildren($("empty-hint"));
    $("empty-hint").hidden = false;
    $("status").textContent = "";
    renderCode();
  });
  $("api-token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, token());
    loadAll();
  });
  $("model-select").addEventListener("change", () => {
    localStorage.setItem(MODEL_KEY, $("model-select").value);
    loadSchema();
  });
  $("raw-mode").addEventListener("change", () => { $("system-message").disabled = $("raw-mode").checked; });
  $("params-form").addEventListener("reset", () => setTimeout(renderCode));
  $("error-dismiss").addEventListener("click", () => { $("error-banner").hidden = true; });
  for (const ev of ["input", "change"]) document.addEventListener(ev, renderCode);

  $("view-code-button").addEventListener("click", () => toggleCode($("code-panel").hidden));
  $("code-close").addEventListener("click", () => { toggleCode(false); $("view-code-button").focus(); });
  $("code-panel").addEventListener("keydown", (e) => {
    if (e.key === "Escape") { toggleCode(false); $("view-code-button").focus(); }
  });
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button.dataset.copy, button));
  }
  loadAll();
}

init();

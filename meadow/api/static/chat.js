// Meadow chat: streams /v1/chat/completions (server-sent events) into the conversation. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const thread = $("thread"), conversation = $("conversation"), prompt = $("prompt");
const sendButton = $("send"), stopButton = $("stop");
const temperature = $("temperature"), temperatureValue = $("temperature-value"), maxTokens = $("max-tokens");

let model = null;      // the id /v1/models gives (or the one chosen, when it gives several)
let several = false;   // the API serves several models: each answer's meta line names its own
let messages = [];     // the conversation on the page, as OpenAI messages (an answer's also with `info`: its meta line)
let current = newConversationId();  // its id in the conversations kept (conversations.js)
let conversations = loadConversations();
let running = null;    // {controller, stopped} while an answer streams

// settings survive a reload
temperature.value = localStorage.getItem("meadow.temperature") ?? temperature.value;
maxTokens.value = localStorage.getItem("meadow.maxTokens") ?? maxTokens.value;
const showTemperature = () => (temperatureValue.textContent = Number(temperature.value).toFixed(2));
showTemperature();
temperature.addEventListener("input", () => { showTemperature(); remember("meadow.temperature", temperature.value); });
maxTokens.addEventListener("change", () => remember("meadow.maxTokens", maxTokens.value));
// the system prompt, sent before the conversation with every question; open while it says something
const system = $("system"), systemDetails = $("system-details");
system.value = localStorage.getItem("meadow.system") ?? "";
systemDetails.open = system.value.trim() !== "";
system.addEventListener("input", () => remember("meadow.system", system.value));

// so do the conversations, each saved once an answer is in; the list beside them opens or deletes one
function save(id, history) {
  // not kept: a conversation deleted meanwhile, or one left before its first answer
  if (history !== messages && !conversations.some((c) => c.id === id)) return;
  conversations = keepConversation(conversations, id, history);
  if (id === current) remember("meadow.current", id);  // a reload shows it again
  showConversations();
}

// a setting kept in this browser (not kept, when its storage is full)
function remember(item, value) {
  try {
    localStorage.setItem(item, value);
  } catch (full) { /* not remembered */ }
}

function showConversations() {
  $("conversations").replaceChildren(...conversations.map((conversation) => {
    const item = element("li", conversation.id === current ? "active" : "");
    const open = element("button", "open", titleOf(conversation));
    open.type = "button";
    open.title = titleOf(conversation);
    open.addEventListener("click", () => openConversation(conversation));
    const remove = element("button", "delete", "×");
    remove.type = "button";
    remove.title = "Delete this conversation";
    remove.setAttribute("aria-label", "Delete this conversation");
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    item.append(open, remove);
    return item;
  }));
}

function openConversation(conversation) {
  if (conversation.id === current && thread.querySelector(".turn")) return;  // on the page already
  stop();
  current = conversation.id;
  remember("meadow.current", current);
  messages = conversation.messages;
  thread.replaceChildren();
  for (const message of messages) {
    const {turn} = addTurn(message.role, message.content, message.reasoning);
    if (message.info) {
      showMeta(turn, message.info, message.content);
      turn.dataset.done = "true";
    }
  }
  const used = messages.findLast((message) => message.info?.model)?.info.model;
  if (used) modelReady.then(() => chooseModel(used));  // it goes on with the model that answered it
  showConversations();
  prompt.focus();
}

// Choose model `id` among those this API serves (nothing, if it serves one, or no longer that one)
function chooseModel(id) {
  const choice = $("model-choice");
  if (!several || ![...choice.options].some((option) => option.value === id)) return;
  model = choice.value = id;
  remember("meadow.model", id);
}

function deleteConversation(id) {
  if (id === current) newChat();
  conversations = keepConversation(conversations, id, []);
  showConversations();
}

// the model that answers: the API's, or the one chosen among several (kept over a reload)
const modelReady = apiFetch("/v1/models").then((r) => (r.ok ? r.json() : Promise.reject(r.status))).then((body) => {
  const ids = body.data.map((entry) => entry.id), chosen = localStorage.getItem("meadow.model");
  model = ids.includes(chosen) ? chosen : ids[0];
  $("model").textContent = model;
  several = ids.length > 1;
  if (several) {
    const choice = $("model-choice");
    for (const id of ids) choice.append(new Option(id, id, false, id === model));
    choice.addEventListener("change", () => chooseModel(choice.value));
    $("model").hidden = true;
    choice.hidden = false;
  }
}).catch((status) => {
  $("model").textContent = status === 401 ? "API key needed: reload to enter it" : "API unreachable";
});

// the user's own points, when this API has a points identity (meadow api --points-identity)
async function showMyPoints() {
  try {
    const body = await (await apiFetch("/api/points?mine=true", {cache: "no-store"})).json();
    if (body.me) {
      $("my-points").textContent = `Your points: ${Number(body.me.points).toPrecision(3)}`;
      $("my-points").title = `verified points of ${body.me.peer} (${body.unit})`;
      $("my-points").hidden = false;
    }
  } catch (error) { /* no points shown */ }
}
showMyPoints();
setInterval(showMyPoints, 30000);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Text onto the clipboard; the old way where the page is not a secure context (an API reached over plain http by
// another address than 127.0.0.1 has no navigator.clipboard). The button shows a tick for a moment.
async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.classList.add("copied");
  setTimeout(() => button.classList.remove("copied"), 1500);
}

function codeBlock(language, lines) {
  const pre = element("pre", "code-block");
  if (language) pre.dataset.language = language;  // shown by the style sheet, so not part of the answer's text
  const copy = element("button", "copy-code");  // its label too comes from the style sheet
  copy.type = "button";
  copy.setAttribute("aria-label", "Copy the code");
  copy.addEventListener("click", () => copyText(lines.join("\n"), copy));
  pre.append(copy, element("code", "", lines.join("\n")));
  return pre;
}

// Prose with its headings (# ...), bullets (- ...), `code`, **bold** and links ([text](https://...)) shown so. The
// marks stay in the text, hidden, so that the answer's text is still the model's (what the page's tests read). Links
// go only to http(s) addresses, in a new tab that cannot reach back into this page.
const MARKDOWN = new RegExp([
  /^(#{1,4} )(.+)$/, /^( {0,6})([-*]) (?=\S)/, /`([^`\n]+)`/, /\*\*([^*\n]+)\*\*/,
  /\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/,
].map((part) => part.source).join("|"), "gm");

function marked(tag, className, before, inner, after) {
  const styled = element(tag, className);
  styled.append(element("span", "mark", before), ...inner, element("span", "mark", after));
  return styled;
}

function inline(text) {
  const nodes = [];
  let end = 0;
  for (const match of text.matchAll(MARKDOWN)) {
    if (match.index > end) nodes.push(document.createTextNode(text.slice(end, match.index)));
    const [, hashes, heading, indent, bullet, code, bold, label, url] = match;
    if (hashes) {
      nodes.push(marked("strong", `heading h${hashes.length - 1}`, hashes, inline(heading), ""));
    } else if (bullet) {
      const dot = marked("span", "bullet", bullet, [], "");  // the style sheet shows a dot
      nodes.push(document.createTextNode(indent), dot, document.createTextNode(" "));
    } else if (code !== undefined) {
      nodes.push(marked("code", "inline", "`", [code], "`"));
    } else if (bold !== undefined) {
      nodes.push(marked("strong", "inline", "**", [bold], "**"));
    } else {
      const link = marked("a", "", "[", [label], `](${url})`);
      Object.assign(link, {href: url, target: "_blank", rel: "noopener noreferrer", title: url});
      nodes.push(link);
    }
    end = match.index + match[0].length;
  }
  if (end < text.length) nodes.push(document.createTextNode(text.slice(end)));
  return nodes;
}

// An answer as nodes: its fenced code blocks (``` lines) as code with a copy button, the rest as plain text. Only text
// nodes carry what the model wrote, so nothing in it becomes HTML. A block not closed yet (still streaming) runs to the
// end.
function rendered(text) {
  const nodes = [];
  let prose = [], code = null;  // the lines since the last fence; inside a block, {language, lines}
  const endProse = (beforeBlock) => {
    let text = prose.join("\n");
    if (nodes.length) text = text.replace(/^\n/, "");  // a code block is a block of its own: no blank line after it
    if (beforeBlock) text = text.replace(/\n$/, "");  // nor before it
    if (text) nodes.push(...inline(text));
  };
  for (const line of text.split("\n")) {
    const fence = line.match(/^ {0,3}```\s*([\w#+.-]*)\s*$/);
    if (fence && !code) {
      endProse(true);
      prose = [];
      code = {language: fence[1], lines: []};
    } else if (fence && !fence[1]) {
      nodes.push(codeBlock(code.language, code.lines));
      code = null;
    } else {
      (code ? code.lines : prose).push(line);
    }
  }
  if (code) nodes.push(codeBlock(code.language, code.lines));
  endProse(false);
  return nodes;
}

function nearBottom() {
  return conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) conversation.scrollTop = conversation.scrollHeight;
}

function addTurn(role, text, reasoning) {
  $("welcome")?.remove();
  const turn = element("div", `turn ${role}`);
  if (role === "assistant") turn.append(element("div", "who", "Meadow"));
  const bubble = element("div", "bubble", role === "assistant" ? undefined : text);
  if (role === "assistant") bubble.append(...rendered(text));
  const thought = showReasoning(turn, reasoning);
  turn.append(bubble);
  thread.append(turn);
  scrollDown(true);
  return {turn, bubble, thought};
}

// A reasoning model's thinking, folded away above its answer (open while it thinks); none shown without any
function showReasoning(turn, reasoning) {
  const thought = element("details", "reasoning");
  thought.append(element("summary", "", "Thought"), element("div", "thinking", reasoning ?? ""));
  thought.hidden = !reasoning;
  turn.append(thought);
  return thought;
}

const shortPeer = (peer) => "…" + peer.slice(-6);

// An answer's meta line: its time, speed and servers, and what can be done with it: copy it; for the last, ask again
// or edit its question
function showMeta(turn, info, answer) {
  const meta = element("div", "meta");
  const parts = [`${info.seconds.toFixed(2)} s`];
  if (info.tokens !== undefined) {
    parts.push(`${info.tokens} tokens`);
    if (info.seconds > 0) parts.push(`${(info.tokens / info.seconds).toFixed(1)} tokens/s`);
  }
  if (info.model) parts.unshift(info.model);
  for (const part of parts) meta.append(element("span", "", part));
  if (info.servers?.length) {
    const chain = element("span", "chain");
    chain.append(element("span", "", "via"));
    info.servers.forEach((server, i) => {
      if (i) chain.append(element("span", "arrow", "→"));
      const hop = element("span", "hop", `${shortPeer(server.peer)} ${server.blocks}`);
      hop.title = `server ${server.peer}, blocks ${server.blocks}`;
      chain.append(hop);
    });
    meta.append(chain);
  }
  if (info.stopped) meta.append(element("span", "stopped", "stopped"));
  const copy = element("button", "action copy", "Copy");
  copy.type = "button";
  copy.title = "Copy the answer";
  copy.addEventListener("click", () => copyText(answer, copy));
  const again = element("button", "action regenerate", "↻ Ask again");
  again.type = "button";
  again.title = "Drop this answer and ask the swarm again";
  again.addEventListener("click", () => regenerate(turn));
  const edit = element("button", "action edit", "✎ Edit");
  edit.type = "button";
  edit.title = "Drop this answer and put its question back in the message box, to change it";
  edit.addEventListener("click", () => editQuestion(turn));
  meta.append(copy, again, edit);
  turn.append(meta);
}

// Server-sent events from a fetch body: yields each `data:` payload, parsed ([DONE] ends).
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setRunning(value) {
  running = value;
  sendButton.hidden = !!value;
  stopButton.hidden = !value;
}

function send() {
  const text = prompt.value.trim();
  if (!text || running) return;
  prompt.value = "";
  autosize();
  messages.push({role: "user", content: text});
  answer(messages, addTurn("user", text).turn);
}

// Ask again: the last answer is dropped and its question answered anew (another answer, unless greedy).
function regenerate(turn) {
  if (running || turn !== thread.lastElementChild || messages.at(-1)?.role !== "assistant") return;
  const question = turn.previousElementSibling;
  turn.remove();
  messages.pop();
  answer(messages, question);
}

// Edit the question: the last answer and its question leave the conversation, the question goes back to the message
// box (the conversation kept in the browser changes once the new question is answered).
function editQuestion(turn) {
  if (running || turn !== thread.lastElementChild || messages.at(-1)?.role !== "assistant") return;
  turn.previousElementSibling.remove();
  turn.remove();
  messages.pop();
  prompt.value = messages.pop().content;
  autosize();
  prompt.focus();
}

// Stream the answer to `history` (which ends with the user's question, shown in `questionTurn`) into the page.
async function answer(history, questionTurn) {
  // `history` is this conversation, even if another one replaces it on the page while the answer streams
  const id = current;
  const {turn, bubble, thought} = addTurn("assistant", "");
  const cursor = element("span", "cursor");
  bubble.append(cursor);
  const controller = new AbortController();
  const state = {controller, stopped: false};
  setRunning(state);
  const began = performance.now();
  await modelReady;
  const asked = model;  // the model that answers, whatever is chosen meanwhile
  const instructions = system.value.trim() ? [{role: "system", content: system.value.trim()}] : [];
  let text = "", reasoning = "", info = null, tokens;
  // shown while every server that could answer is full (at first, or after a failover mid-answer), until words come
  const waiting = element("div", "waiting", "The servers are full: waiting for room…");
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({
        model: asked, messages: [...instructions, ...history.map(({role, content}) => ({role, content}))], stream: true,
        stream_options: {include_usage: true},
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message ?? `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.meadow?.waiting) {
        waiting.title = chunk.meadow.waiting;  // the server's words: how full it is, how many wait ahead
        turn.append(waiting);
        scrollDown();
      }
      const thinking = chunk.choices?.[0]?.delta?.reasoning_content;
      if (thinking) {
        waiting.remove();
        if (!reasoning) {  // its first words: shown, and open while it thinks (folded once it answers)
          thought.hidden = false;
          thought.open = true;
        }
        reasoning += thinking;
        thought.lastChild.textContent = reasoning;
        scrollDown();
      }
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        waiting.remove();
        if (!text) thought.open = false;
        text += delta;
        bubble.replaceChildren(...rendered(text), cursor);
        scrollDown();
      }
      if (chunk.meadow) info = chunk.meadow;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
  } catch (error) {
    waiting.remove();
    if (!state.stopped) {
      // the question got no answer: it goes back to the composer (unless something new is typed there) to ask again
      turn.remove();
      questionTurn.remove();
      const question = history.pop();
      save(id, history);
      if (!prompt.value.trim()) {
        prompt.value = question.content;
        autosize();
      }
      addTurn("error", `Error: ${error.message}`);
      setRunning(null);
      prompt.focus();
      return;
    }
  }
  cursor.remove();
  waiting.remove();
  const meta = {
    seconds: info?.seconds ?? (performance.now() - began) / 1000,
    servers: info?.servers, tokens, stopped: state.stopped, ...(several && {model: asked}),
  };
  history.push({role: "assistant", content: text, ...(reasoning && {reasoning}), info: meta});
  save(id, history);
  showMeta(turn, meta, text);
  turn.dataset.done = "true";
  scrollDown();
  setRunning(null);
  prompt.focus();
}

function stop() {
  if (!running) return;
  running.stopped = true;
  running.controller.abort();  // the API sees the disconnect and ends the session on the servers
}

function newChat() {
  stop();
  messages = [];
  current = newConversationId();
  remember("meadow.current", current);
  showConversations();
  thread.replaceChildren();
  const welcome = element("div", "welcome");
  welcome.id = "welcome";
  welcome.append(element("h1", "", "New conversation"), element("p", "", "Ask anything."));
  thread.append(welcome);
  prompt.focus();
}

function autosize() {
  prompt.style.height = "auto";
  prompt.style.height = prompt.scrollHeight + "px";
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
prompt.addEventListener("input", autosize);
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
stopButton.addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
// the page as it was left: the conversation it showed, or a new one
const left = conversations.find((conversation) => conversation.id === localStorage.getItem("meadow.current"));
if (left) openConversation(left);
else showConversations();

// Meadow swarm monitor: reads /api/swarm every few seconds and draws coverage bars and server tables.
"use strict";

const REFRESH_MS = 3000;
const POINTS_REFRESH_MS = 15000;  // the API verifies every ledger for /api/points: not at every poll
const $ = (id) => document.getElementById(id);
let lastUpdate = null;
let points = {};  // peer -> verified ledger totals and points, from /api/points
let pointsUnit = "";
let lastSwarm = null;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const shortPeer = (peer) => "…" + peer.slice(-6);
const plural = (count, noun) => `${count} ${noun}${count === 1 ? "" : "s"}`;
const number = (value, digits = 0) => Number(value).toLocaleString("en-US", {maximumFractionDigits: digits});

function withUnit(value, unit) {
  const cell = element("td", "num", number(value) + " ");
  cell.append(element("span", "unit", unit));
  return cell;
}

function coverageCard(model) {
  const card = element("article", "model-card");
  const title = element("h2", "", model.name);
  if (model.dht_prefix !== model.name) title.append(element("span", "prefix", `swarm name ${model.dht_prefix}`));
  const online = model.coverage.filter((state) => state === "online").length;
  const complete = online === model.num_blocks;
  title.append(element("span", `summary ${complete ? "ok" : "gap"}`,
    complete ? `all ${model.num_blocks} blocks online` : `${online} of ${model.num_blocks} blocks online`));
  card.append(title);

  const bar = element("div", "coverage");
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", `${online} of ${model.num_blocks} blocks online`);
  model.coverage.forEach((state, block) => {
    const cell = element("span", `block ${state}`);
    const count = model.block_servers?.[block] ?? 0;
    cell.title = `block ${block}: ${state === "missing" ? "no server" : `${state}, ${count} server${count === 1 ? "" : "s"}`}`;
    bar.append(cell);
  });
  const scale = element("div", "coverage-scale");
  scale.append(element("span", "", "0"), element("span", "", `${model.num_blocks} blocks`));
  card.append(bar, scale);
  return card;
}

function serverTable(model) {
  const section = element("div");
  const name = model.dht_prefix === model.name ? model.name : `${model.name} (${model.dht_prefix})`;
  section.append(element("h3", "", `${name}: ${plural(model.servers.length, "server")}`));
  if (!model.servers.length) {
    section.append(element("div", "empty", "No server holds any block of this model right now."));
    return section;
  }
  const table = element("table");
  const head = element("tr");
  for (const [label, numeric] of [["Peer"], ["Blocks"], ["State"], ["Throughput", true], ["Cache left", true], ["Version", true], ["Points", true], ["Name"]]) {
    head.append(element("th", numeric ? "num" : "", label));
  }
  table.createTHead().append(head);
  const body = table.createTBody();
  for (const server of model.servers) {
    const row = element("tr");
    const peer = element("td", "peer", shortPeer(server.peer));
    peer.title = server.peer;

    const [start, end] = server.blocks.split(":").map(Number);
    const blocks = element("td");
    const span = element("div", "span-cell");
    span.append(element("code", "", server.blocks));
    const track = element("div", "span-bar");
    const fill = element("span");
    fill.style.left = `${(100 * start) / model.num_blocks}%`;
    fill.style.width = `${(100 * (end - start)) / model.num_blocks}%`;
    track.append(fill);
    span.append(track);
    blocks.append(span);

    const state = element("td");
    const badge = element("span", "state");
    badge.append(element("span", `dot ${server.state}`), server.state);
    state.append(badge);

    row.append(peer, blocks, state, withUnit(server.throughput, "tokens/s"), withUnit(server.cache_tokens_left, "tokens"),
      element("td", "num", String(server.version)), pointsCell(server.peer), element("td", "", server.public_name || "—"));
    body.append(row);
  }
  section.append(table);
  return section;
}

function pointsCell(peer) {
  const ledger = points[peer];
  if (!ledger) return element("td", "num muted", "—");
  if (!ledger.valid) {
    const cell = element("td", "num invalid", "invalid ledger");
    cell.title = ledger.error;
    return cell;
  }
  const cell = element("td", "num", (ledger.points ? Number(ledger.points).toPrecision(3) : "0") + " ");
  cell.append(element("span", "unit", "points"));
  cell.title = `verified ledger: ${plural(ledger.entries, "receipt")}, ${number(ledger.tokens)} tokens served (${pointsUnit})`;
  return cell;
}

async function refreshPoints() {
  try {
    const response = await apiFetch("/api/points", {cache: "no-store"});
    if (response.ok) {
      const body = await response.json();
      points = body.servers;
      pointsUnit = body.unit;
      if (lastSwarm) render(lastSwarm);
    }
  } catch (error) { /* the table shows "—" until the next try */ }
  setTimeout(refreshPoints, POINTS_REFRESH_MS);
}

function render(swarm) {
  lastSwarm = swarm;
  const overview = $("overview"), servers = $("servers");
  overview.replaceChildren();
  servers.replaceChildren();
  if (!swarm.models.length) {
    $("totals").textContent = "no models";
    overview.append(element("div", "empty", "No model is announced in this swarm yet. Servers appear here a moment after they start."));
    return;
  }
  for (const model of swarm.models) {
    overview.append(coverageCard(model));
    servers.append(serverTable(model));
  }
  const peers = new Set(swarm.models.flatMap((model) => model.servers.map((server) => server.peer)));
  $("totals").textContent = `${plural(swarm.models.length, "model")} · ${plural(peers.size, "server")}`;
}

function showAge() {
  if (!lastUpdate) return;
  const seconds = Math.round((Date.now() - lastUpdate) / 1000);
  $("updated").textContent = seconds < 1 ? "updated just now" : `updated ${seconds} s ago`;
  $("pulse").classList.toggle("stale", seconds > (3 * REFRESH_MS) / 1000);
}

async function refresh() {
  try {
    const response = await apiFetch("/api/swarm", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    lastUpdate = Date.now();
    $("error").hidden = true;
    document.body.dataset.loaded = "true";
  } catch (error) {
    $("error").textContent = `Could not read the swarm: ${error.message}. Retrying…`;
    $("error").hidden = false;
  }
  showAge();
  setTimeout(refresh, REFRESH_MS);
}

refresh();
refreshPoints();
setInterval(showAge, 1000);

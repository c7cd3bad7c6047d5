// imgsim's web page: search by an image (drop, pick or paste), click a result to search by it.
// Plain DOM, no build step; every text from the server goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, queryUrl: null };

async function api(url, options) {
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = (data && data.error) || `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return data;
}

function status(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

function count() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? Math.min(k, 200) : 20;
}

function query() {
  const params = new URLSearchParams({ limit: String(count()) });
  const supported = (state.info && state.info.features.filters) || [];
  for (const input of document.querySelectorAll(".filter-grid input")) {
    if (input.value !== "" && supported.includes(input.name)) params.append(input.name, input.value);
  }
  return params.toString();
}

function showQuery(src) {
  const img = $("query-preview");
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = src.startsWith("blob:") ? src : null;
  img.src = src;
  img.hidden = false;
}

async function searchFile(file) {
  if (!file) return;
  showQuery(URL.createObjectURL(file));
  const form = new FormData();
  form.append("file", file, file.name || "pasted-image");
  status("searching…");
  try {
    const answer = await api(`/search?${query()}`, { method: "POST", body: form });
    render(answer, file.name || "the pasted image");
  } catch (e) {
    $("results").replaceChildren();
    status(e.message, true);
  }
}

async function searchSimilar(id, name) {
  showQuery(`/thumbs/${id}`);
  status("searching…");
  window.scrollTo({ top: 0, behavior: "smooth" });
  try {
    render(await api(`/similar/${id}?${query()}`), name);
  } catch (e) {
    $("results").replaceChildren();
    status(e.message, true);
  }
}

function baseName(path) {
  return path.split("/").pop();
}

function card(result, keeper) {
  const li = document.createElement("li");
  li.className = "card" + (keeper ? " keeper" : "");
  const button = document.createElement("button");
  button.type = "button";
  button.title = `Search by ${result.path}`;
  const img = document.createElement("img");
  img.src = result.thumb_url;
  img.alt = result.path;
  img.loading = "lazy";
  img.decoding = "async";
  button.append(img);
  button.addEventListener("click", () => searchSimilar(result.id, baseName(result.path)));
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = baseName(result.path);
  name.title = `${result.path} · ${result.width}×${result.height} ${result.format}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = keeper ? "keep" : Number(result.score).toFixed(3);
  meta.append(name, score);
  const open = document.createElement("a");
  open.href = result.image_url;
  open.target = "_blank";
  open.rel = "noopener";
  open.textContent = "open";
  li.append(button, meta, open);
  return li;
}

function render(answer, name) {
  const results = answer.results || [];
  $("results").replaceChildren(...results.map((r) => card(r)));
  const what = results.length === 1 ? "1 result" : `${results.length} results`;
  const why = !results.length && answer.note ? `: ${answer.note}` : "";  // why nothing was found, where known
  status(`${what} for ${name} in ${answer.took_ms} ms${why}`);
}

// -- duplicates ------------------------------------------------------------------------------------
// GET /dupes answers 501 until imgsim groups duplicates. The page expects
// {"groups": [{"keeper": ID, "members": [RESULT, ...]}]}, each RESULT shaped like a /search result
// (id, path, score against the keeper, width, height, format, thumb_url, image_url).
async function showDupes() {
  const box = $("groups");
  box.replaceChildren();
  $("dupes-status").classList.remove("error");
  $("dupes-status").textContent = "looking for duplicates…";
  try {
    const answer = await api("/dupes");
    const groups = answer.groups || [];
    $("dupes-status").textContent = `${groups.length} groups of duplicates`;
    for (const group of groups) {
      const ol = document.createElement("ol");
      ol.className = "grid group";
      for (const member of group.members || []) ol.append(card(member, member.id === group.keeper));
      box.append(ol);
    }
  } catch (e) {
    $("dupes-status").textContent = e.message;
    $("dupes-status").classList.add("error");
  }
}

function selectTab(name) {
  const search = name === "search";
  $("search-view").hidden = !search;
  $("dupes-view").hidden = search;
  $("tab-search").classList.toggle("active", search);
  $("tab-dupes").classList.toggle("active", !search);
  $("tab-search").setAttribute("aria-pressed", String(search));
  $("tab-dupes").setAttribute("aria-pressed", String(!search));
  if (!search) showDupes();
}

// -- wiring ----------------------------------------------------------------------------------------
async function loadInfo() {
  try {
    const info = await api("/info");
    state.info = info;
    $("about").textContent = `${info.count.toLocaleString()} images · ${info.model}`;
    const supported = info.features.filters;
    for (const label of document.querySelectorAll(".filter-grid label")) {
      const on = supported.includes(label.dataset.filter);
      label.classList.toggle("off", !on);
      label.querySelector("input").disabled = !on;
    }
    $("filters-note").textContent = supported.length ? "" : "This imgsim cannot filter searches yet.";
  } catch (e) {
    $("about").textContent = e.message;
    $("about").classList.add("error");
  }
}

function firstImage(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file) return file;
  }
  return null;
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    searchFile(firstImage(e.dataTransfer.files));
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) { e.preventDefault(); searchFile(file); }
  });
  // Keep drops outside the zone from navigating away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("tab-search").addEventListener("click", () => selectTab("search"));
  $("tab-dupes").addEventListener("click", () => selectTab("dupes"));
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);

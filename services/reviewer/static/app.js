// Sieve labelling page: plain JavaScript, no build step. Server data is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "sieve.reviewer.token";
const REASONS = {
  uncertain_flag: "A classifier score is inside the uncertainty band.",
  near_threshold_duplicate: "The closest match is near the duplicate threshold.",
  duplicate_classifier_disagreement: "The duplicate match and the classifier disagree.",
  bank_match: "It matches an image in a watch-list bank.",
};

function bankDistance(m) {
  if (m.signal_type === "embedding") {
    const score = m.score == null ? (1 - m.distance).toFixed(3) : m.score.toFixed(3);
    return "score " + score + (m.inliers == null ? "" : " · " + m.inliers + " inliers");
  }
  if (m.signal_type === "pdq") return m.distance + " bits apart";
  return "identical " + m.signal_type;
}

function renderBanks(banks) {
  const box = $("bank-evidence");
  box.replaceChildren();
  box.hidden = !banks.length;
  const loads = [];
  banks.forEach((m) => {
    const row = document.createElement("div");
    row.className = "bank";
    row.dataset.bank = m.bank;
    const head = document.createElement("div");
    head.className = "bank-head";
    const name = document.createElement("strong");
    name.textContent = m.bank;
    const action = document.createElement("span");
    action.className = "badge bank-action";
    action.textContent = m.action;
    head.append(name, action);
    const how = document.createElement("div");
    how.className = "bank-how";
    how.textContent = m.signal_type + " · " + bankDistance(m) + " · item " + m.item_id;
    row.append(head, how);
    if (m.image_url) {
      const img = document.createElement("img");
      img.className = "bank-image";
      img.alt = "banked image " + m.item_id;
      row.appendChild(img);
      loads.push(showImage(img, m.image_url));
    }
    box.appendChild(row);
  });
  return loads;
}

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  me: null,
  item: null,
  busy: false,
  deadline: 0,
  blobs: [],
  timers: [],
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await res.json();
  } catch (_) {
    data = null;
  }
  if (res.status === 401 && path !== "/api/me") {
    signOut("Your token is no longer accepted; sign in again.");
  }
  if (!res.ok) {
    const detail = data && data.detail ? data.detail : res.statusText;
    throw new ApiError(res.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
}

// Images need the bearer token, so they are fetched and shown through blob: URLs.
async function showImage(img, url) {
  img.classList.remove("missing");
  img.removeAttribute("src");
  if (!url) {
    img.classList.add("missing");
    return false;
  }
  try {
    const res = await fetch(url, { headers: { Authorization: "Bearer " + state.token } });
    // 204: the view does not exist for this item (e.g. a model version without a spatial transformer).
    if (!res.ok || res.status === 204) throw new Error(String(res.status));
    const blobUrl = URL.createObjectURL(await res.blob());
    state.blobs.push(blobUrl);
    await new Promise((resolve) => {
      img.onload = resolve;
      img.onerror = resolve;
      img.src = blobUrl;
    });
    return true;
  } catch (_) {
    img.classList.add("missing");
    return false;
  }
}

// A bar for a score in [0, 1]; high is alarming except for "safe".
function meter(value, benign) {
  const m = document.createElement("div");
  m.className = "meter" + (benign ? " good" : value >= 0.8 ? " hot" : value >= 0.4 ? " mid" : "");
  const fill = document.createElement("span");
  fill.style.width = Math.round(Math.max(0, Math.min(1, value)) * 100) + "%";
  m.appendChild(fill);
  return m;
}

function renderScores(scores) {
  const list = $("scores");
  list.replaceChildren();
  const entries = Object.entries(scores);
  if (!entries.length) {
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = "no classifier scores";
    list.appendChild(li);
  }
  for (const [name, value] of entries) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = name;
    const v = document.createElement("span");
    v.className = "v";
    v.textContent = value.toFixed(2);
    li.append(label, meter(value, name === "safe"), v);
    list.appendChild(li);
  }
}

function renderExplainButtons(neighbours) {
  const box = $("explain-buttons");
  box.replaceChildren();
  $("explain-fig").hidden = true;
  const explainable = neighbours.filter((n) => n.explain_url);
  $("explain-box").hidden = !explainable.length;
  explainable.forEach((n, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "ghost";
    b.dataset.explain = n.upload_id;
    if (i === 0) {
      const k = document.createElement("kbd");
      k.textContent = "w";
      b.appendChild(k);
    }
    b.appendChild(document.createTextNode(n.upload_id + " (" + n.score.toFixed(3) + ")"));
    b.addEventListener("click", () => showExplanation(n));
    box.appendChild(b);
  });
}

// Drawn on demand (a Grad-CAM pass costs about a second on a CPU), for one neighbour at a time.
async function showExplanation(n) {
  const fig = $("explain-fig");
  $("explain-which").textContent = "upload vs " + n.upload_id + " · loading…";
  fig.hidden = false;
  const ok = await showImage($("img-explain"), n.explain_url);
  $("explain-which").textContent = "upload vs " + n.upload_id + (ok ? "" : " · not available");
  fig.dataset.loaded = ok ? "true" : "false";
}

function renderNeighbours(neighbours) {
  renderExplainButtons(neighbours);
  const box = $("neighbours");
  box.replaceChildren();
  if (!neighbours.length) {
    const p = document.createElement("p");
    p.className = "none";
    p.textContent = "No near neighbours in the recent-images index.";
    box.appendChild(p);
    return [];
  }
  const loads = [];
  neighbours.forEach((n, i) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "nb" + (i === 0 ? " top" : "");
    card.dataset.neighbour = n.upload_id;
    card.title = "Duplicate of " + n.upload_id;
    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.alt = "neighbour " + n.upload_id;
    frame.appendChild(img);
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = n.upload_id;
    const sim = document.createElement("div");
    sim.className = "sim";
    const num = document.createElement("span");
    num.textContent = n.score.toFixed(3);
    sim.append(num, meter(n.score));
    card.append(frame, id, sim);
    if (n.inliers != null) {
      const inliers = document.createElement("div");
      inliers.className = "inliers";
      inliers.title = "keypoints matched in one consistent geometry (cosine " + n.cosine.toFixed(3) + ")";
      inliers.textContent = n.inliers + " inliers";
      card.appendChild(inliers);
    }
    if (i === 0) {
      const tag = document.createElement("div");
      tag.className = "tag";
      tag.textContent = "top match · press d";
      card.appendChild(tag);
    }
    card.addEventListener("click", () => submit({ duplicate_of: n.upload_id }, "duplicate of " + n.upload_id));
    box.appendChild(card);
    loads.push(showImage(img, n.image_url));
  });
  return loads;
}

function renderCategories() {
  const box = $("cat-buttons");
  box.replaceChildren();
  state.me.categories.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "act cat";
    b.dataset.category = name;
    const k = document.createElement("kbd");
    k.textContent = String(i + 1);
    b.append(k, document.createTextNode(name));
    b.addEventListener("click", () => labelCategory(i));
    box.appendChild(b);
  });
}

function releaseBlobs() {
  for (const u of state.blobs) URL.revokeObjectURL(u);
  state.blobs = [];
}

async function renderItem(item) {
  state.item = item;
  releaseBlobs();
  $("empty").hidden = !!item;
  $("item").hidden = !item;
  document.body.dataset.itemLoaded = "false";
  if (!item) {
    state.deadline = 0;
    return;
  }
  $("item-id").textContent = item.upload_id;
  $("item-reason").textContent = item.reason.replaceAll("_", " ");
  $("reason-text").textContent = REASONS[item.reason] || item.reason;
  $("item-priority").textContent = item.priority.toFixed(2);
  $("item-model").textContent = item.model_version || "–";
  state.deadline = item.claim_expires_in_s == null ? 0 : Date.now() + item.claim_expires_in_s * 1000;
  tick();
  renderScores(item.scores);
  const dupButton = document.querySelector('[data-action="duplicate"]');
  dupButton.disabled = !item.neighbours.length;
  document.querySelector('[data-action="not_duplicate"]').disabled = !item.neighbours.length;
  const loads = renderNeighbours(item.neighbours).concat(renderBanks(item.banks || []));
  const upload = $("img-upload");
  $("upload-dims").textContent = "";
  loads.push(
    showImage(upload, item.image_url).then((ok) => {
      if (ok) $("upload-dims").textContent = upload.naturalWidth + " × " + upload.naturalHeight;
    }),
  );
  const alignedFig = $("aligned-fig");
  alignedFig.hidden = true;
  if (item.aligned_url) {
    // The aligned view exists only where the model provides it: hide the figure on 404.
    loads.push(showImage($("img-aligned"), item.aligned_url).then((ok) => (alignedFig.hidden = !ok)));
  }
  await Promise.all(loads);
  document.body.dataset.itemLoaded = "true";
}

function tick() {
  const box = $("item-timer-box");
  if (!state.deadline) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const left = Math.max(0, Math.round((state.deadline - Date.now()) / 1000));
  $("item-timer").textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0");
  box.classList.toggle("low", left < 30);
  if (left === 0 && state.item) {
    setStatus("Your claim expired and the item went back to the queue. Press c to claim again.", "err");
  }
}

async function refreshStats() {
  try {
    const s = await api("GET", "/api/queue/stats");
    $("st-pending").textContent = s.pending;
    $("st-claimed").textContent = s.claimed;
    $("st-labelled").textContent = s.labelled;
  } catch (_) {
    // stats are decoration; the next refresh tries again
  }
}

// note: what the previous action did, kept on screen while the next item loads.
async function claimNext(note) {
  if (state.busy) return;
  state.busy = true;
  try {
    const res = await api("POST", "/api/claim");
    await renderItem(res.item);
    if (note) setStatus(note + (res.item ? "" : " The queue is now empty."), "ok");
    else if (!res.item) setStatus("The queue is empty.", "");
  } catch (e) {
    setStatus("Could not claim: " + e.message, "err");
  } finally {
    state.busy = false;
    refreshStats();
  }
}

async function submit(body, description) {
  const item = state.item;
  if (!item || state.busy) return;
  state.busy = true;
  setStatus("Labelling " + item.upload_id + " …", "");
  try {
    const res = await api("POST", "/api/items/" + encodeURIComponent(item.upload_id) + "/label", body);
    const how = res.repeated ? "already labelled" : "labelled";
    setStatus("✓ " + item.upload_id + " " + how + ": " + description + ". Sent to the feedback topic.", "ok");
    document.body.dataset.lastLabel = item.upload_id;
  } catch (e) {
    setStatus("Label not saved (" + e.status + "): " + e.message, "err");
    state.busy = false;
    return;
  }
  state.busy = false;
  await claimNext($("status").textContent);
}

function labelCategory(index) {
  const cats = state.me.categories;
  if (index >= cats.length) return;
  // One click names the item's category: the chosen one true, the other configured ones false.
  const categories = Object.fromEntries(cats.map((c, i) => [c, i === index]));
  submit({ categories }, cats[index]);
}

async function skip() {
  const item = state.item;
  if (!item || state.busy) return;
  try {
    await api("POST", "/api/items/" + encodeURIComponent(item.upload_id) + "/release");
  } catch (e) {
    setStatus("Could not skip: " + e.message, "err");
    return;
  }
  await claimNext("Skipped " + item.upload_id + "; it went back to the queue for someone else.");
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !state.me) return;
  const tag = (ev.target && ev.target.tagName) || "";
  if (tag === "INPUT" || tag === "TEXTAREA") return;
  const item = state.item;
  if (ev.key === "c" || (ev.key === " " && !item)) {
    ev.preventDefault();
    claimNext();
  } else if (!item) {
    return;
  } else if (ev.key === "d") {
    if (item.neighbours.length) submit({ duplicate_of: item.neighbours[0].upload_id }, "duplicate of " + item.neighbours[0].upload_id);
  } else if (ev.key === "n") {
    if (item.neighbours.length) submit({ not_duplicate: true }, "not a duplicate");
  } else if (ev.key === "s") {
    skip();
  } else if (ev.key === "w") {
    const first = item.neighbours.find((n) => n.explain_url);
    if (first) showExplanation(first);
  } else if (/^[1-9]$/.test(ev.key)) {
    labelCategory(Number(ev.key) - 1);
  } else {
    return;
  }
  ev.preventDefault();
}

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("GET", "/api/me");
  } catch (e) {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-error").textContent = e.status === 401 ? "That token was not accepted." : "Sign-in failed: " + e.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login-error").textContent = "";
  $("token").value = "";
  $("login").hidden = true;
  $("workspace").hidden = false;
  $("stats").hidden = false;
  $("who").hidden = false;
  $("who-id").textContent = state.me.reviewer_id;
  $("who-role").textContent = state.me.role;
  renderCategories();
  state.timers.push(setInterval(refreshStats, 5000), setInterval(tick, 1000));
  await claimNext();
}

function signOut(message) {
  state.token = "";
  state.me = null;
  state.item = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  releaseBlobs();
  $("workspace").hidden = true;
  $("stats").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value.trim());
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("claim-button").addEventListener("click", () => claimNext());
  document.querySelector('[data-action="duplicate"]').addEventListener("click", () => {
    const top = state.item && state.item.neighbours[0];
    if (top) submit({ duplicate_of: top.upload_id }, "duplicate of " + top.upload_id);
  });
  document.querySelector('[data-action="not_duplicate"]').addEventListener("click", () => submit({ not_duplicate: true }, "not a duplicate"));
  document.querySelector('[data-action="skip"]').addEventListener("click", skip);
  document.addEventListener("keydown", onKey);
  if (state.token) signIn(state.token);
});

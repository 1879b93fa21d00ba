// The draw-a-digit page: pointer events draw on the canvas; a short pause after a stroke sends the
// drawing to POST /api/predict and shows the answer. Everything the page needs is served by nn-numba.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 150;
let drawing = false, inked = false, timer = null, last = null, pending = 0;

function blank() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

function at(e) {  // pointer position in canvas pixels, whatever the canvas's size on screen
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(to) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 24;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last[0], last[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
  last = to;
  inked = true;
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  drawing = true;
  last = at(e);
  stroke(last);
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  for (const c of (e.getCoalescedEvents ? e.getCoalescedEvents() : [e])) stroke(at(c));
  soon();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => { if (drawing) { drawing = false; soon(); } });
}

function soon() {
  clearTimeout(timer);
  timer = setTimeout(() => { if (inked) pad.toBlob((b) => send(b, "drawing.png"), "image/png"); }, DEBOUNCE_MS);
}

async function send(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  if ($("model").value) form.append("model", $("model").value);
  const ticket = ++pending;  // answers can overtake each other: show only the newest
  try {
    const r = await fetch("/api/predict", { method: "POST", body: form });
    const body = await r.json();
    if (ticket !== pending) return;
    if (!r.ok) return show(null, body.error || `error ${r.status}`);
    show(body, "");
  } catch (err) {
    if (ticket === pending) show(null, "the server does not answer: is nn-numba serve still running?");
  }
}

function show(res, error) {
  $("error").textContent = error;
  $("warnings").replaceChildren(...(res ? res.warnings : []).map((w) => {
    const li = document.createElement("li");
    li.textContent = w;
    return li;
  }));
  if (!res) {
    $("digit").textContent = "–";
    $("confidence").textContent = "";
    $("seen").removeAttribute("src");
    bars(null);
    return;
  }
  $("digit").textContent = String(res.digit);
  $("confidence").textContent = `${(100 * res.probabilities[res.digit]).toFixed(1)}% sure`;
  $("seen").src = res.image28;
  bars(res);
}

function bars(res) {
  const list = $("bars");
  if (!list.children.length) {
    for (let d = 0; d < 10; d++) {
      const li = document.createElement("li");
      li.innerHTML = `<span>${d}</span><span class="bar"><span class="fill"></span></span><span class="pct"></span>`;
      list.append(li);
    }
  }
  [...list.children].forEach((li, d) => {
    const p = res ? res.probabilities[d] : 0;
    li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".pct").textContent = res ? `${(100 * p).toFixed(1)}%` : "";
    li.classList.toggle("best", !!res && d === res.digit);
    li.setAttribute("aria-label", res ? `${d}: ${(100 * p).toFixed(1)} percent` : `${d}`);
  });
}

function clear() {
  clearTimeout(timer);
  pending++;
  blank();
  $("file").value = "";
  show(null, "");
}

$("clear").addEventListener("click", clear);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") clear();
});
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) { blank(); send(f, f.name); }
});

function describe(m) {
  const parts = [m.architecture];
  if (m.epoch != null) parts.push(`epoch ${m.epoch}`);
  if (m.val_acc != null) parts.push(`validation ${(100 * m.val_acc).toFixed(2)}%`);
  if (m.test_acc != null) parts.push(`test ${(100 * m.test_acc).toFixed(2)}%`);
  return parts.join(", ");
}

async function models() {
  const r = await fetch("/api/models");
  const { models } = await r.json();
  const sel = $("model");
  sel.replaceChildren(...models.map((m) => {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = `${m.id} (${describe(m)})`;
    o.selected = m.default;
    return o;
  }));
  const info = () => {
    const m = models.find((x) => x.id === sel.value);
    $("model-info").textContent = m ? `${m.path}: ${describe(m)}` : "";
  };
  sel.addEventListener("change", () => { info(); if (inked) soon(); });
  info();
}

blank();
bars(null);
models();

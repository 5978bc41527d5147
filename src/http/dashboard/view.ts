/**
 * The dashboard's HTML, with Hono's `html` template: every value is escaped unless wrapped in raw(). No build step,
 * nothing from the internet: the stylesheet and the few lines of script are served by the app (see assets/).
 *
 * The live part (`#live`) is rendered once per snapshot and sent as is to every open page, so it holds nothing of
 * one session: the CSRF token of each page lives in its <meta> and the script puts it into a form when it is sent.
 * It shows counts, room ids and agent names; never message content or a customer's name or e-mail (the snapshot
 * does not even read them).
 */
import { html, raw } from 'hono/html';
import type { HtmlEscapedString } from 'hono/utils/html';
import type { AgentRow, Frame, QueueRow } from './feed.ts';

export const BASE = '/dashboard';

/** `html` with our values, which are never promises: always a plain string. */
const h = (strings: TemplateStringsArray, ...values: unknown[]) => html(strings, ...values) as HtmlEscapedString;

/** 5s, 1m 03s, 2h 05m. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const pad = (n: number) => String(n).padStart(2, '0');
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
}

const clock = (iso: string) => `${iso.slice(11, 19)} UTC`;

/** Waited before the rest: on a phone the first columns are what shows without scrolling sideways. */
function queueRow(r: QueueRow) {
  return h`<tr data-room="${r.room_id}">
    <td>${r.position}</td><td class="room">${r.room_id}</td><td>${duration(r.waited_seconds)}</td>
    <td>${r.source ?? '—'}</td><td>${r.divisions ? r.divisions.join(', ') : 'any'}</td>
    <td>${r.attempts}</td><td class="error">${r.last_error ?? ''}</td></tr>`;
}

function agentRow(a: AgentRow) {
  const full = a.load >= a.capacity;
  // The button beside the status, so that on a phone it is on screen without scrolling the table sideways.
  const pause = h`<form method="post" action="${BASE}/agents/${a.id}/pause"><input type="hidden" name="csrf" value="">
      <input type="hidden" name="paused" value="${a.paused ? 'false' : 'true'}">
      <button type="submit">${a.paused ? 'Unpause' : 'Pause'}</button></form>`;
  // A native <meter>: a bar against capacity without inline styles (the page's CSP allows none).
  const max = Math.max(a.capacity, 1);
  return h`<tr data-agent="${a.id}" class="${a.status === 'online' ? 'on' : 'off'}">
    <td class="name">${a.name || `#${a.id}`}</td>
    <td><span class="status">${a.status}</span> ${pause}</td>
    <td class="load"><meter min="0" max="${max}" value="${a.load}" low="${max}" high="${max}" optimum="0"></meter>
      <span class="${full ? 'full' : ''}">${a.load}/${a.capacity}</span></td>
    <td>${a.by_hand}</td>
    <td>${a.divisions.length ? a.divisions.join(', ') : '—'}</td></tr>`;
}

/** The part of the page that the server sends again with every snapshot. */
export function renderLive(frame: Omit<Frame, 'html'>): string {
  const s = frame.snapshot;
  if (!s) return String(h`<p class="problem">${frame.error ?? 'no data yet'}</p>`);
  const online = s.agents.filter((a) => a.status === 'online').length;
  const more = s.waiting - s.queue.length;
  return String(h`
<section class="top">
  <p class="qiscus ${s.qiscus.status}">Qiscus ${s.qiscus.status === 'up' ? 'is up' : h`is down since ${clock(s.qiscus.down_since ?? s.at)}`}</p>
  <p class="asof">as of <time datetime="${s.at}">${clock(s.at)}</time></p>
</section>
<section class="tiles">
  <div><b id="waiting">${s.waiting}</b> waiting</div>
  <div><b id="longest">${duration(s.longest_wait_seconds)}</b> longest wait</div>
  <div><b id="per-minute">${s.assigned_last_minute}</b> assigned in the last minute</div>
  <div><b id="failures">${s.failures_last_hour}</b> failed calls in the last hour</div>
  <div><b id="online">${online}/${s.agents.length}</b> agents online</div>
</section>
<section>
  <h2>Queue</h2>
  <div class="scroll"><table id="queue">
    <thead><tr><th>#</th><th>Room</th><th>Waited</th><th>Source</th><th>Division</th><th>Tries</th><th>Last error</th></tr></thead>
    <tbody>${s.queue.length ? s.queue.map(queueRow) : raw('<tr><td colspan="7" class="empty">No room is waiting.</td></tr>')}</tbody>
  </table></div>
  ${more > 0 ? h`<p class="more">and ${more} more waiting</p>` : ''}
</section>
<section>
  <h2>Agents</h2>
  <div class="scroll"><table id="agents">
    <thead><tr><th>Agent</th><th>Status</th><th>Load</th><th>By hand</th><th>Divisions</th></tr></thead>
    <tbody>${s.agents.length ? s.agents.map(agentRow) : raw('<tr><td colspan="5" class="empty">No agents yet (the roster comes from Qiscus).</td></tr>')}</tbody>
  </table></div>
</section>`);
}

function layout(title: string, body: HtmlEscapedString, head: HtmlEscapedString | string = '') {
  return String(h`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title}</title>
<link rel="stylesheet" href="${BASE}/assets/dashboard.css">
<link rel="icon" href="${BASE}/assets/favicon.svg" type="image/svg+xml">
${head}
</head>
<body>
${body}
</body>
</html>
`);
}

/** The whole page: the live part as of `frame`, then the script keeps it current. */
export function renderPage(frame: Frame, csrf: string | undefined): string {
  const head = h`<meta name="csrf-token" content="${csrf ?? ''}">
<script src="${BASE}/assets/dashboard.js" defer></script>`;
  const logout = csrf
    ? h`<form method="post" action="${BASE}/logout"><input type="hidden" name="csrf" value="${csrf}"><button type="submit">Log out</button></form>`
    : '';
  return layout(
    'Allocator — live',
    h`<header><h1>Agent allocator</h1><span id="connection" class="connection"></span>${logout}</header>
<main id="live" aria-live="polite">${raw(frame.html)}</main>`,
    head,
  );
}

export function renderLogin(problem?: string): string {
  return layout(
    'Allocator — log in',
    h`<header><h1>Agent allocator</h1></header>
<main class="login">
  <form method="post" action="${BASE}/login">
    <label for="token">Dashboard token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
    <button type="submit">Log in</button>
    ${problem ? h`<p class="problem" role="alert">${problem}</p>` : ''}
  </form>
</main>`,
  );
}

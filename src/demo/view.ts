/**
 * The demo's screens: the live view (ANSI escape codes, redrawn in place; no dependencies) and the plain lines of
 * headless mode. Pure functions of a Snapshot, so they are easy to look at in a test.
 */

export interface AgentRow {
  id: number;
  name: string;
  /** Online in Qiscus and not paused (allocator.agent_load.available). */
  available: boolean;
  paused: boolean;
  /** Rooms counted on the agent: ours plus those Qiscus shows that we did not assign. */
  load: number;
  ourLoad: number;
  externalLoad: number;
  capacity: number;
}

export interface DemoEvent {
  /** Seconds since the start. */
  at: number;
  text: string;
}

export interface Snapshot {
  elapsed: number;
  seconds: number;
  agentsTotal: number;
  rate: number;
  waiting: number;
  /** Seconds the oldest waiting room has waited. */
  longestWait: number;
  /** Rooms reserved for an agent, their Qiscus call in flight. */
  assigning: number;
  /** Assignments per second over the last few seconds. */
  perSecond: number;
  p50: number | null;
  p90: number | null;
  agents: AgentRow[];
  arrived: number;
  returning: number;
  assigned: number;
  resolved: number;
  webhooksAccepted: number;
  webhooksSent: number;
  /** Queue length, oldest first, one sample per redraw. */
  history: number[];
  events: DemoEvent[];
  warnings: string[];
  /** Set once customers stopped arriving: "finishing". */
  ending: boolean;
  /** The database, for a `psql` line under the view. */
  databaseUrl?: string;
  /** The supervisor's page of this run, and the token generated for it. */
  dashboard?: { url: string; token: string };
}

const ESC = '\x1b[';
export const ansi = {
  home: `${ESC}H`,
  clear: `${ESC}2J`,
  clearLine: `${ESC}K`,
  clearBelow: `${ESC}J`,
  hideCursor: `${ESC}?25l`,
  showCursor: `${ESC}?25h`,
};

type Paint = (s: string) => string;
interface Palette {
  bold: Paint;
  dim: Paint;
  green: Paint;
  cyan: Paint;
  yellow: Paint;
  red: Paint;
}
const sgr = (code: string): Paint => (s) => `${ESC}${code}m${s}${ESC}0m`;
const colors: Palette = {
  bold: sgr('1'),
  dim: sgr('2'),
  green: sgr('32'),
  cyan: sgr('36'),
  yellow: sgr('33'),
  red: sgr('31'),
};
const plain: Palette = { bold: String, dim: String, green: String, cyan: String, yellow: String, red: String };

// eslint-disable-next-line no-control-regex
const ANSI_RE = /\x1b\[[0-9;?]*[A-Za-z]/g;
export const visible = (s: string) => s.replace(ANSI_RE, '');

function clock(s: number): string {
  const t = Math.max(0, Math.floor(s));
  return `${Math.floor(t / 60)}:${String(t % 60).padStart(2, '0')}`;
}

export function duration(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return '–';
  if (s < 0.1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

const SPARK = ' ▁▂▃▄▅▆▇█';
function sparkline(values: number[], width: number): string {
  const v = values.slice(-width);
  const max = Math.max(1, ...v);
  return v.map((x) => SPARK[Math.round((x / max) * (SPARK.length - 1))]).join('');
}

const SLOT = 4; // characters per slot of capacity

/** `████▓▓▓▓░░░░`: rooms we assigned, rooms assigned by hand, free slots (and red beyond capacity, never seen). */
function loadBar(a: AgentRow, p: Palette = plain): string {
  const ours = Math.max(0, Math.min(a.ourLoad, a.load));
  const shownOurs = Math.min(ours, a.capacity);
  const shownExt = Math.min(a.load - ours, a.capacity - shownOurs);
  const free = Math.max(0, a.capacity - a.load);
  const over = Math.max(0, a.load - a.capacity);
  const busy = a.available ? p.green : p.dim;
  return (
    busy('█'.repeat(shownOurs * SLOT)) +
    p.yellow('▓'.repeat(shownExt * SLOT)) +
    p.dim('░'.repeat(free * SLOT)) +
    p.red('█'.repeat(over * SLOT))
  );
}

const HAND_MARK = (n: number) => `+${n} hand`;

function agentCell(a: AgentRow, nameWidth: number, p: Palette): string {
  const mark = a.paused ? p.yellow('paused') : !a.available ? p.red('offline') : '';
  const hand = a.externalLoad > 0 ? p.yellow(HAND_MARK(a.externalLoad)) : '';
  const name = a.available ? a.name.padEnd(nameWidth) : p.dim(a.name.padEnd(nameWidth));
  return `${name} ${loadBar(a, p)} ${a.load}/${a.capacity} ${[mark, hand].filter(Boolean).join(' ')}`.trimEnd();
}

/** The widest a cell can get, so that the columns stay put whatever the marks. */
function cellWidth(agents: AgentRow[], nameWidth: number): number {
  const cap = Math.max(1, ...agents.map((a) => Math.max(a.capacity, a.load)));
  const counts = `${cap}/${cap}`.length;
  return nameWidth + 1 + cap * SLOT + 1 + counts + 1 + `offline ${HAND_MARK(cap)}`.length;
}

function padVisible(s: string, width: number): string {
  return s + ' '.repeat(Math.max(0, width - visible(s).length));
}

function fit(s: string, width: number): string {
  if (visible(s).length <= width) return s;
  return visible(s).slice(0, Math.max(0, width - 1)) + '…';
}

/** One frame of the live view, as lines (without the cursor movements). */
export function renderLines(s: Snapshot, width = 100, useColor = true): string[] {
  const p = useColor ? colors : plain;
  const out: string[] = [];
  const title = `${p.bold('Qiscus agent allocator')} · live demo`;
  const right = s.ending ? p.yellow('finishing…') : `${clock(s.elapsed)} / ${clock(s.seconds)}`;
  out.push(` ${padVisible(title, Math.min(width, 78) - visible(right).length - 2)}${right}`);
  out.push(
    p.dim(
      ` ${s.agentsTotal} agents in a fake Qiscus · ~${s.rate} customers/s · q or Ctrl-C to stop`,
    ),
  );
  out.push('');

  const wait = s.longestWait >= 30 ? p.red : s.longestWait >= 10 ? p.yellow : String;
  out.push(
    ` ${p.bold('Queue')}     ${String(s.waiting).padStart(4)} waiting    longest wait ${wait(duration(s.waiting ? s.longestWait : 0).padEnd(8))} ` +
      p.cyan(sparkline(s.history, 24)),
  );
  out.push(
    ` ${p.bold('Assigned')}  ${s.perSecond.toFixed(1).padStart(4)} /s         time to assign p50 ${duration(s.p50)} · p90 ${duration(s.p90)}` +
      (s.assigning ? p.dim(` · ${s.assigning} in flight`) : ''),
  );
  out.push('');

  const nameWidth = Math.max(6, ...s.agents.map((a) => a.name.length));
  const cells = s.agents.map((a) => agentCell(a, nameWidth, p));
  const column = cellWidth(s.agents, nameWidth) + 2;
  const columns = width >= 1 + column * 2 && cells.length > 6 ? 2 : 1;
  const rows = Math.ceil(cells.length / columns);
  for (let r = 0; r < rows; r++) {
    const left = cells[r] ?? '';
    const rightCell = columns === 2 ? (cells[r + rows] ?? '') : '';
    out.push(` ${columns === 2 ? padVisible(left, column) + rightCell : left}`);
  }
  out.push(p.dim(` ██ assigned by the allocator   ▓▓ assigned by hand in Qiscus   ░░ free`));
  out.push('');

  const held = s.agents.reduce((n, a) => n + a.load, 0);
  const online = s.agents.filter((a) => a.available);
  const slots = online.reduce((n, a) => n + a.capacity, 0);
  const total = s.agents.reduce((n, a) => n + a.capacity, 0);
  const away = s.agents.length - online.length;
  out.push(
    ` ${p.bold('Customers')} ${s.arrived} arrived (${s.returning} returning) · ${s.assigned} assigned · ${s.resolved} resolved`,
  );
  out.push(` ${p.bold('Webhooks')}  ${s.webhooksAccepted} of ${s.webhooksSent} accepted`);
  out.push(
    ` ${p.bold('Agents')}    ${held} rooms held · ${slots} of ${total} slots online` +
      (away ? ` · ${away} agent${away > 1 ? 's' : ''} away` : ''),
  );
  out.push('');
  out.push(` ${p.bold('Events')}`);
  const events = s.events.slice(-4);
  for (const e of events) out.push(`  ${p.dim(clock(e.at))}  ${e.text}`);
  for (let i = events.length; i < 4; i++) out.push('');
  for (const w of s.warnings.slice(-3)) out.push(` ${p.yellow('warn')} ${w}`);
  if (s.databaseUrl) {
    out.push('');
    out.push(p.dim(` psql ${s.databaseUrl}   (try: table allocator.queue;)`));
  }
  if (s.dashboard) out.push(p.dim(` dashboard ${s.dashboard.url}   token ${s.dashboard.token}`));
  return out.map((l) => fit(l, width));
}

/** The whole frame, drawn over the previous one. */
export function renderFrame(s: Snapshot, width: number, useColor: boolean): string {
  return (
    ansi.home + renderLines(s, width, useColor).map((l) => l + ansi.clearLine).join('\n') + '\n' + ansi.clearBelow
  );
}

/** Headless mode: one plain line per period. */
export function renderPlainLine(s: Snapshot): string {
  const busy = s.agents.reduce((n, a) => n + a.load, 0);
  const slots = s.agents.reduce((n, a) => n + a.capacity, 0);
  const away = s.agents.filter((a) => !a.available).map((a) => `${a.name}${a.paused ? ' (paused)' : ''}`);
  const hand = s.agents.filter((a) => a.externalLoad > 0).map((a) => `${a.name} ${a.externalLoad}`);
  return (
    `[${clock(s.elapsed)}] queue ${s.waiting} (longest ${duration(s.waiting ? s.longestWait : 0)}) · ` +
    `${s.perSecond.toFixed(1)} assignments/s · arrived ${s.arrived} · assigned ${s.assigned} · resolved ${s.resolved} · ` +
    `load ${busy}/${slots}${away.length ? ` · away: ${away.join(', ')}` : ''}` +
    (hand.length ? ` · by hand: ${hand.join(', ')}` : '')
  );
}

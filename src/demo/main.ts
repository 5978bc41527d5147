/**
 * `npm run demo`: a contact centre in one command, on a fresh machine. A throwaway embedded PostgreSQL (run by
 * postgres-holder.ts, out of reach of Ctrl-C until the summary is read), the
 * migrations, the webhook app and the listener (exactly what `npm start` runs), the Qiscus simulator with a dozen
 * agents, and simulated customers writing in and agents resolving their rooms. A live view shows the queue, each
 * agent's load and the assignment rate; at the end a summary and its checks (exit 0 when they all hold).
 *
 *   npm run demo -- --seconds 30 --rate 4
 *   npm run demo -- --headless          # plain lines (automatic when stdout is not a terminal)
 *
 * The last line of the output is `DEMO SUMMARY {json}` (see summary.ts) for scripts and tests.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { pino, type Logger } from 'pino';
import type pg from 'pg';
import { loadConfig } from '../config/index.ts';
import { runMigrations } from '../db/migrate.ts';
import { createPool } from '../db/pool.ts';
import { startHttpServer, type HttpServer } from '../http/server.ts';
import { startListenerFromConfig, type Listener } from '../listener/listener.ts';
import { mulberry32, startSimulator, type SimAgentInit, type Simulator } from '../simulator/qiscus-simulator.ts';
import { parseOptions, UsageError, USAGE, type DemoOptions } from './options.ts';
import { summarize, renderSummary, type DemoSummary } from './summary.ts';
import { Traffic } from './traffic.ts';
import { ansi, renderFrame, renderPlainLine, type AgentRow, type DemoEvent, type Snapshot } from './view.ts';
import { onShutdown } from '../shutdown.ts';

const APP_ID = 'demo-app';
const SECRET_KEY = 'demo-secret-key';
const SYNC_SECONDS = 2;
const SUPPORT = 439;
const SALES = 438;
const TEAMS: Record<number, string> = { [SUPPORT]: 'Customer support', [SALES]: 'Sales' };
const NAMES = ['Ayu', 'Budi', 'Citra', 'Dewi', 'Eka', 'Fajar', 'Gita', 'Hadi', 'Indah', 'Joko', 'Kartika', 'Lestari'];

let opts: DemoOptions;
try {
  opts = parseOptions(process.argv.slice(2), Boolean(process.stdout.isTTY));
} catch (e) {
  if (!(e instanceof UsageError)) throw e;
  if (e.message) process.stderr.write(`${e.message}\n\n`);
  process.stderr.write(USAGE);
  process.exit(e.message ? 2 : 0);
}
const live = !opts.headless;
const useColor = live && !process.env.NO_COLOR;
const rand = mulberry32(opts.seed);
/** The clock of the run: set again when the first customers arrive (PostgreSQL takes a few seconds to start). */
let started = Date.now();
const elapsed = () => (Date.now() - started) / 1000;

// ---------- what the screen shows besides the database ----------

const events: DemoEvent[] = [];
const warnings: string[] = [];
const say = (text: string) => {
  events.push({ at: elapsed(), text });
  if (!live) process.stdout.write(`[event ${Math.round(elapsed())}s] ${text}\n`);
};

/** The service's own log, at warn: kept for the screen (live) or printed as plain lines (headless). */
const logger: Logger = pino(
  { level: process.env.LOG_LEVEL === 'silent' ? 'silent' : 'warn', base: null, timestamp: false },
  {
    write(line: string) {
      let text = line.trim();
      try {
        const { level: _l, msg, ...rest } = JSON.parse(line) as Record<string, unknown>;
        const extra = Object.keys(rest).length ? ` ${JSON.stringify(rest)}` : '';
        text = `${String(msg)}${extra}`;
      } catch {
        // not JSON: keep the raw line
      }
      warnings.push(text.slice(0, 300));
      if (!live) process.stderr.write(`warn: ${text}\n`);
    },
  },
);

const assignedAt: number[] = [];
const perSecond = () => {
  const since = Date.now() - 5000;
  while (assignedAt.length && assignedAt[0]! < since) assignedAt.shift();
  return assignedAt.length / Math.min(5, Math.max(elapsed(), 0.5));
};

// ---------- the parts, started in order and stopped in reverse ----------

let postgres: PostgresHolder | undefined;
let pool: pg.Pool | undefined;
let sim: Simulator | undefined;
let web: HttpServer | undefined;
let listener: Listener | undefined;
let dashboard: { url: string; token: string } | undefined;
let traffic: Traffic | undefined;
const timers: NodeJS.Timeout[] = [];

function restoreTerminal() {
  if (process.stdin.isTTY && process.stdin.isRaw) process.stdin.setRawMode(false);
  if (live) process.stdout.write(ansi.showCursor);
}
process.on('exit', restoreTerminal);

async function releaseAll() {
  for (const t of timers) clearTimeout(t);
  traffic?.stop();
  await sim?.close().catch(() => {});
  await pool?.end().catch(() => {});
  await postgres?.stop();
}

interface PostgresHolder {
  url: string;
  /** The temporary folder of its data directory (deleted on stop). */
  root: string;
  stop(): Promise<void>;
}

/**
 * The throwaway PostgreSQL, run by postgres-holder.ts in a session of its own: out of reach of the SIGINT that Ctrl-C
 * sends to the terminal's foreground process group, so that the summary can still be read after Ctrl-C. It stops
 * PostgreSQL and deletes the folder when its stdin closes: on stop(), or when this process dies in any way.
 */
async function startPostgresHolder(): Promise<PostgresHolder> {
  const file = fileURLToPath(new URL('./postgres-holder.ts', import.meta.url));
  const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), file], {
    detached: true,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(out.slice(0, nl));
    });
    void exited.then((code) => reject(new Error(`the embedded PostgreSQL did not start (exit ${code}): ${stderr.trim()}`)));
  });
  const { url, root } = JSON.parse(line) as { url: string; root: string };
  let stopped: Promise<void> | undefined;
  return {
    url,
    root,
    stop: () =>
      (stopped ??= (async () => {
        child.stdin.end();
        const kill = setTimeout(() => {
          try {
            process.kill(-child.pid!, 'SIGKILL');
          } catch {
            // gone already
          }
        }, 15_000);
        await exited;
        clearTimeout(kill);
      })()),
  };
}

async function start(): Promise<void> {
  if (live) process.stdout.write(ansi.clear + ansi.home + ansi.hideCursor + 'Starting an embedded PostgreSQL…\n');
  else process.stdout.write(`demo: ${opts.agents} agents, ~${opts.rate} customers/s for ${opts.seconds} s, seed ${opts.seed}\n`);

  postgres = await startPostgresHolder();
  const databaseUrl = postgres.url;
  await runMigrations(databaseUrl);
  pool = createPool(databaseUrl, logger, { max: 30, applicationName: 'allocator-demo' });

  // Two teams, as Qiscus divisions: the first half of the agents in Customer support, the rest in Sales; and one
  // route, typed as a DBA would: WhatsApp rooms go to Customer support, the others to anyone.
  const agents: SimAgentInit[] = Array.from({ length: opts.agents }, (_, i) => {
    const base = NAMES[i % NAMES.length]!;
    const name = i < NAMES.length ? base : `${base} ${Math.floor(i / NAMES.length) + 1}`;
    const team = i < Math.ceil(opts.agents / 2) ? SUPPORT : SALES;
    return { id: 1001 + i, name, email: `${name.toLowerCase().replace(/\s+/g, '.')}@example.com`, divisions: [team] };
  });
  sim = await startSimulator({
    agents,
    divisions: { [SUPPORT]: TEAMS[SUPPORT]!, [SALES]: TEAMS[SALES]! },
    appId: APP_ID,
    secretKey: SECRET_KEY,
    seed: opts.seed,
  });
  await pool.query(`insert into allocator.routes (source, division_ids) values ('wa', array[$1::bigint])`, [SUPPORT]);

  // The supervisor's page too, with a token made for this run (shown under the live view).
  const token = randomBytes(16).toString('hex');
  web = await startHttpServer({ pool, logger, port: 0, hostname: '127.0.0.1', graceMs: 3000, dashboard: { token } });
  sim.webhookBaseUrl = `http://127.0.0.1:${web.port}`;
  dashboard = { url: `${sim.webhookBaseUrl}/dashboard`, token };

  const config = loadConfig('start', {
    QISCUS_BASE_URL: sim.url,
    QISCUS_APP_ID: APP_ID,
    QISCUS_SECRET_KEY: SECRET_KEY,
    AGENT_SYNC_SECONDS: String(SYNC_SECONDS),
    SWEEP_SECONDS: '1',
    LOG_LEVEL: 'warn',
  });
  listener = await startListenerFromConfig(config, {
    pool,
    databaseUrl,
    logger,
    onOutcome: (_r, outcome) => {
      if (outcome === 'assigned') assignedAt.push(Date.now());
    },
  });
  if (!live) {
    process.stdout.write(
      `demo: PostgreSQL ${databaseUrl} (data in ${postgres.root}), web ${sim.webhookBaseUrl}, Qiscus simulator ${sim.url}\n`,
    );
    process.stdout.write(`demo: dashboard ${dashboard.url} (token ${dashboard.token})\n`);
  }
}

/** The story around the steady traffic: agents going away and coming back, a pause, a room assigned by hand. */
function scenario(s: Simulator, p: pg.Pool, t: Traffic) {
  const at = (seconds: number, f: () => void | Promise<void>) =>
    timers.push(
      setTimeout(() => {
        if (!ending) void Promise.resolve(f()).catch((e: unknown) => warnings.push(`scenario: ${String(e)}`));
      }, seconds * 1000),
    );
  const all = s.agents();
  const pick = (i: number) => all[Math.min(i, all.length - 1)]!;
  const away = all.length >= 4 ? [pick(2), pick(9 % all.length)] : [pick(0)];
  const paused = all.length >= 6 ? pick(5) : undefined;
  const S = opts.seconds;
  const offAt = 0.25 * S;
  const onAt = 0.75 * S;

  at(offAt, () => {
    for (const a of away) s.setAgent(a.id, { is_available: false });
    say(`${away.map((a) => a.name).join(' and ')} went offline in Qiscus (roster sync every ${SYNC_SECONDS} s)`);
  });
  // Once the sync has seen them offline, a supervisor gives one of them a room by hand in the Qiscus dashboard.
  // The allocator counts it toward that agent's load from the next sync on.
  const handAt = offAt + SYNC_SECONDS + 1;
  if (handAt < onAt - 0.5) {
    at(handAt, () => {
      const a = away
        .map((x) => ({ ...x, held: s.roomsOf(x.id).length }))
        .sort((x, y) => x.held - y.held)[0];
      if (!a || a.held >= 2) return;
      const room = 'vip-1';
      s.assignByHand(room, a.id);
      t.handled(room);
      say(`a supervisor assigned room ${room} to ${a.name} by hand in Qiscus`);
    });
  }
  if (paused) {
    at(0.4 * S, async () => {
      await p.query(`update allocator.agents set paused = true where id = $1`, [paused.id]);
      say(`DBA: update allocator.agents set paused = true where id = ${paused.id} (${paused.name})`);
    });
    at(0.85 * S, async () => {
      await p.query(`update allocator.agents set paused = false where id = $1`, [paused.id]);
      say(`${paused.name} is back from the pause`);
    });
  }
  at(onAt, () => {
    for (const a of away) s.setAgent(a.id, { is_available: true });
    say(`${away.map((a) => a.name).join(' and ')} are back online`);
  });
}

// ---------- sampling and drawing ----------

const history: number[] = [];
let ending = false;

async function snapshot(): Promise<Snapshot> {
  const q = (
    await pool!.query(
      `select count(*)::int as waiting, coalesce(extract(epoch from max(waited)), 0)::float8 as longest from allocator.queue`,
    )
  ).rows[0];
  const s = (
    await pool!.query(`
      select count(*) filter (where assigned_at is not null)::int as assigned,
             count(*) filter (where state = 'resolved')::int as resolved,
             count(*) filter (where state = 'reserved')::int as reserved,
             percentile_cont(0.5) within group (order by extract(epoch from assigned_at - queued_at))::float8 as p50,
             percentile_cont(0.9) within group (order by extract(epoch from assigned_at - queued_at))::float8 as p90
      from allocator.sessions`)
  ).rows[0];
  const agents: AgentRow[] = (
    await pool!.query(
      `select id, name, available, load, our_load, external_load, capacity, paused, division_ids
       from allocator.agent_load order by id`,
    )
  ).rows.map((a) => ({
    id: Number(a.id),
    // the team once the first roster pull has brought the divisions
    name: a.division_ids?.length ? `${a.name} · ${TEAMS[Number(a.division_ids[0])] ?? a.division_ids[0]}` : a.name,
    available: a.available,
    paused: a.paused,
    load: a.load,
    ourLoad: a.our_load,
    externalLoad: a.external_load,
    capacity: a.capacity,
  }));
  history.push(q.waiting);
  if (history.length > 200) history.shift();
  const c = traffic!.counts;
  return {
    elapsed: Math.min(elapsed(), opts.seconds),
    seconds: opts.seconds,
    agentsTotal: opts.agents,
    rate: opts.rate,
    waiting: q.waiting,
    longestWait: q.longest,
    assigning: s.reserved,
    perSecond: perSecond(),
    p50: s.p50,
    p90: s.p90,
    agents,
    arrived: c.arrived,
    returning: c.returning,
    assigned: s.assigned,
    resolved: s.resolved,
    webhooksAccepted: c.webhooksAccepted,
    webhooksSent: c.webhooksSent,
    history,
    events,
    warnings,
    ending,
    databaseUrl: postgres?.url,
    dashboard,
  };
}

let drawing = false;
let lastPlain = 0;
async function draw(force = false): Promise<void> {
  if (drawing && !force) return;
  drawing = true;
  try {
    const snap = await snapshot();
    if (live) {
      process.stdout.write(renderFrame(snap, process.stdout.columns || 100, useColor));
    } else {
      const every = opts.seconds > 120 ? 10 : opts.seconds > 30 ? 5 : 1;
      if (force || elapsed() - lastPlain >= every - 0.05) {
        lastPlain = elapsed();
        process.stdout.write(renderPlainLine(snap) + '\n');
      }
    }
  } catch (e) {
    if (!ending) warnings.push(`view: ${String(e)}`);
  } finally {
    drawing = false;
  }
}

// ---------- ending: on time, or q / Ctrl-C ----------

let finish: () => void = () => {};
const finished = new Promise<void>((r) => (finish = r));
process.on('unhandledRejection', (e) => warnings.push(`unhandled: ${String(e)}`));

async function run(): Promise<number> {
  await start();
  traffic = new Traffic(sim!, {
    rate: opts.rate,
    burst: Math.round(opts.agents * 2 * 1.5),
    handleMs: [2000, 10_000],
    returningShare: 0.15,
    repeatShare: 0.1,
    whatsappShare: 0.4,
    rand,
  });
  started = Date.now();
  say(`${Math.round(opts.agents * 3)} customers are already writing; then ~${opts.rate} new customers per second`);
  say(`route: WhatsApp rooms (4 in 10) go to ${TEAMS[SUPPORT]}, the others to anyone`);
  traffic.start();
  scenario(sim!, pool!, traffic);

  const redraw = setInterval(() => void draw(), live ? 250 : 200);
  timers.push(setTimeout(finish, opts.seconds * 1000));
  await finished;

  // Customers stop arriving; agents stop resolving; what was posted is answered; assignments in flight finish.
  ending = true;
  traffic.stop();
  await traffic.settle();
  await listener!.stop();
  await web!.stop();
  clearInterval(redraw);
  while (drawing) await new Promise((r) => setTimeout(r, 20));
  await draw(true);

  const summary: DemoSummary = await summarize({
    pool: pool!,
    sim: sim!,
    counts: traffic.counts,
    seconds: elapsed(),
    seed: opts.seed,
  });
  await releaseAll();
  restoreTerminal();
  process.stdout.write(renderSummary(summary, useColor));
  process.stdout.write(`DEMO SUMMARY ${JSON.stringify(summary)}\n`);
  return summary.ok ? 0 : 1;
}

/** The run's exit code, once its summary is out (or it failed and everything is stopped). */
const outcome: Promise<number> = run().catch(async (e: unknown) => {
  restoreTerminal();
  process.stderr.write(`\ndemo failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  for (const w of warnings.slice(-5)) process.stderr.write(`warn: ${w}\n`);
  await releaseAll();
  return 1;
});

// Stopping early goes through src/shutdown.ts like every entry point: the first Ctrl-C/SIGTERM (or `q`) ends the
// run now, with its summary; the second hands in-flight assignments back and leaves without it (exit 130); a
// third exits at once. The demo says so on its screen; the shutdown helper's own lines are left out.
const requestStop = onShutdown(logger.child({}, { level: 'error' }), {
  graceful: () => {
    say('stopping early (press again to skip the summary)');
    finish();
    return outcome;
  },
  hurry: async () => {
    process.stderr.write('\nhurrying: no summary\n');
    await listener?.abandon().catch(() => {});
    await releaseAll();
    return 130;
  },
});

// On the live screen, keys instead of the terminal's line discipline: q or Ctrl-C (raw mode turns it into a key).
if (process.stdin.isTTY) {
  process.stdin.setRawMode(true);
  process.stdin.on('data', (buf: Buffer) => {
    const k = buf.toString();
    if (k === '\x03' || k === 'q' || k === 'Q' || k === '\x04') requestStop('key');
  });
} else {
  process.stdin.on('error', () => {});
}

void outcome.then((code) => process.exit(code));

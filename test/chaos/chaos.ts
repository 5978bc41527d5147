/**
 * The chaos run (issue 7; liveness added by issue 11): the whole service as real processes — two `web`, three
 * `listener` — against an embedded PostgreSQL of its own, with the Qiscus simulator as Qiscus, all on loopback and
 * bounded in time, at the SHIPPED DEFAULTS: the settings table as migrated (lease 30 s, backoff from 2 s up to
 * 300 s, 8 attempts, outage after 5 failures, probe every 1 s; only default_max_load is written, to the same 2),
 * AGENT_SYNC_SECONDS 30, SWEEP_SECONDS 5 (passed explicitly: spawnProc passes the shell's environment on), and the
 * listener's own defaults (Qiscus timeout 10 s, 16 calls in flight). Nothing is shortened to make the checks pass.
 *
 * While it runs:
 *   - customers: new rooms arrive steadily and in bursts; the allocation webhook is repeated (duplicate customer
 *     messages); a webhook that did not get a 200 is sent again later, as the customer's next message would; some
 *     resolved rooms come back (same room id, new session), some of them within a second; some webhooks are
 *     delivered again, late, as an at-least-once sender may do;
 *   - agents resolve their rooms after 3-12 s, and 30% of them within 0.1-0.5 s of getting them; a resolution that
 *     did not get a 200 is sent again until it does;
 *   - Qiscus (the simulator) answers slowly (5-300 ms), with 10% 5xx, 3% 429 + Retry-After, 2% never (hangs), or
 *     3% assigns and then says 500; now and then its latency jumps for a few seconds (1.5-3.5 s, or beyond the
 *     listeners' 10 s timeout);
 *   - a listener is killed with kill -9 every 3-6 s, a web process every 10-20 s, each restarted after a moment;
 *   - PostgreSQL is stopped for 1-5 s every 20-30 s;
 *   - routing by division (issue 13; routing.ts): Qiscus has three divisions (Sales, Customer support, Second line;
 *     two agents in two of them, five in none); rooms come by WhatsApp (two numbers), the web widget, LINE (no
 *     channel.id) and Telegram; routes send WhatsApp to Customer support (overflow 5 s), the VIP WhatsApp number by
 *     its channel.id to Sales (a lower position, before the source's route; no overflow) and LINE to Second line
 *     (overflow 8 s), and change every 8-14 s while rooms wait (a route added, overflows shortened, every route
 *     deleted, a catch-all); membership changes in Qiscus every 10-16 s (an agent joins, Second line empties), which
 *     the listeners' roster pulls bring at the shipped AGENT_SYNC_SECONDS (30; a listener also pulls when it starts).
 * Then it stops injecting, heals everything, drains (agents resolve until nothing waits), and checks — counting,
 * never assuming — what the service's invariants promise: safety (nothing lost, nobody over capacity, no room with
 * two agents, every reservation allowed by the room's route, every membership change pulled: routing.ts) and
 * liveness, watched DURING the run by liveness.ts (a waiting room with a free agent who may serve it gets its assign
 * call within the bound; the excuses allowed are listed there), the time from each allocation webhook's 2xx to its
 * assign call, and the time to settle once the traffic stops. `runChaos` returns the report; `formatReport` prints
 * it.
 */
import { rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { freePort, startEmbeddedPostgres, tempDataDir, type EmbeddedServer } from '../../src/db/embedded.ts';
import { runMigrations } from '../../src/db/migrate.ts';
import {
  mulberry32,
  startSimulator,
  type Simulator,
  type WebhookResult,
} from '../../src/simulator/qiscus-simulator.ts';
import { APP_ID, SECRET_KEY, sleep, spawnProc, type Proc } from '../support/processes.ts';
import { BOUND_MS, LivenessWatch, percentile, type LivenessFigures } from './liveness.ts';
import { startQiscusTap, type QiscusTap } from './qiscus-tap.ts';
import {
  CHANNELS,
  DIVISIONS,
  INITIAL_ROUTES_SQL,
  MEMBERSHIP_STEPS,
  ROUTE_STEPS,
  changeRoutes,
  initialDivisions,
  installAudit,
  judgeMembership,
  judgeReservations,
  readRoutes,
  type RouteRow,
  type RouteVersion,
  type RoutingFigures,
} from './routing.ts';

/** Share of rooms an agent resolves within 0.1-0.5 s of getting it. */
const FAST_RESOLVE_SHARE = 0.3;
/** Bounds checked on every run (see the header of liveness.ts for the liveness bound and its excuses). */
export const WEBHOOK_TO_ASSIGN_P95_MS = 2000;
export const SETTLE_MS = 5000;
/** A membership change in Qiscus must reach the database within this (AGENT_SYNC_SECONDS 30, plus a pull's retry). */
export const MEMBERSHIP_PICKUP_MS = 45_000;

// ------------------------------------------------------------------------------------------------------------------
// Options and report
// ------------------------------------------------------------------------------------------------------------------

export interface ChaosOptions {
  /** Length of the chaos phase (faults on). `seconds` wins over `minutes`; default one minute. */
  minutes?: number;
  seconds?: number;
  /** Seed of the driver's PRNG and of the simulator's faults. Random when absent (printed in the report). */
  seed?: number;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
  /** Agents in the simulator (default 20) and their capacity, default_max_load (default: the shipped one). */
  agents?: number;
  capacity?: number;
  /** New rooms per second, on average (default 4). */
  arrivalsPerSecond?: number;
  /** Deliver copies of accepted webhooks again, late (default true). */
  lateCopies?: boolean;
  /** Bound on heal + drain + final checks (default 60 s). */
  drainSeconds?: number;
  /** Stops the chaos phase early (Ctrl-C); the run still heals, drains and reports. */
  signal?: AbortSignal;
}

export interface Check {
  name: string;
  ok: boolean;
  /** The figure checked, as printed. */
  value: string;
  /** What went wrong, when it did (a few examples). */
  detail?: string;
}

export interface ChaosReport {
  seed: number;
  /** Date.now() at the start (the times in the timelines count from it). */
  startedAt: number;
  /** The machine's 1-minute load average at the start and at the end, and its cores (timing figures need it). */
  load: { start: number; end: number; cores: number };
  chaosSeconds: number;
  drainSeconds: number;
  drained: boolean;
  agents: number;
  capacity: number;
  customers: {
    rooms: number;
    returning: number;
    duplicateMessages: number;
    resentNewRequests: number;
    resentResolutions: number;
    lateRedeliveries: number;
    fastResolutions: number;
    fastReturns: number;
  };
  webhooks: {
    sent: number;
    accepted: number;
    acceptedByKind: Record<string, number>;
    /** Answers other than 200 (or no answer), by kind and status / error code. */
    notAccepted: Record<string, number>;
    /** Outcomes of the accepted ones, as the web app answered them. */
    outcomes: Record<string, number>;
    /** Rows in allocator.webhooks. */
    rows: number;
    acceptedNotApplied: number;
    /** Rows whose 200 never reached the sender (the web process was killed after the commit). */
    appliedWithout200: number;
  };
  sessions: {
    opened: number;
    assigned: number;
    resolved: number;
    failed: number;
    cancelled: number;
    open: number;
    failedReasons: Record<string, number>;
  };
  qiscus: {
    assignCalls: Record<string, number>;
    maxLoadSeen: number;
    roomsAssignedTwice: number;
    secondAgentCalls: number;
    /** Rooms the simulator shows held although the driver had already resolved them (an assignment that landed after the resolution). */
    reopenedAfterResolution: number;
    /** Of those still held at the end: counted by the database on their agent (external_load). */
    countedExternal: number;
  };
  faults: Record<string, number>;
  routing: RoutingFigures & { divisions: string[] };
  processes: Array<{ name: string; kills: number; starts: number; alive: boolean; errorLines: number }>;
  liveness: LivenessFigures & {
    /** From the traffic stopping (faults off, every process serving) until no room waits with a free agent. */
    settleMs: number | null;
    /** Allocation webhook's 2xx → the room's first assign call (ms), for sessions that found a free slot. */
    webhookToAssign: Latencies;
    /** The same, to the moment Qiscus decided the call (`sim.assignments[].at`: includes Qiscus's latency). */
    webhookToAssignDecided: Latencies;
    /** The same for every session, including those that had to queue for a slot (informational). */
    webhookToAssignAll: Latencies;
    /** Sessions whose webhook got a 2xx and that never had an assign call. */
    sessionsWithoutCall: number;
    /** Sessions with a free slot whose call came later than WEBHOOK_TO_ASSIGN_P95_MS, by the excuses of their wait. */
    slowSessionsByExcuse: Record<string, number>;
  };
  checks: Check[];
  ok: boolean;
  /** Timelines of the rooms a failed check is about (driver, simulator and database, merged by time). */
  forensics: string[];
}

// ------------------------------------------------------------------------------------------------------------------
// Processes
// ------------------------------------------------------------------------------------------------------------------

/** One web or listener slot: a process that may be killed and started again (same port for web). */
/** A web or listener process must serve within this long of its start (PostgreSQL may be down up to 5 s of it). */
const START_TIMEOUT_MS = 30_000;
/** The first start of all five at once, before any traffic (tsx compiles each; a loaded machine is slow at it). */
const FIRST_START_TIMEOUT_MS = 120_000;

class Slot {
  proc: Proc | undefined;
  kills = 0;
  starts = 0;
  /** The current process finished starting (and was not killed since). */
  ready = false;
  /** Starts that did not finish in time: what the process printed last. */
  readonly startFailures: string[] = [];
  /** Error-level lines (and anything not JSON, e.g. a stack trace) of every incarnation. */
  readonly errors: string[] = [];
  private starting: Promise<void> | undefined;

  constructor(
    readonly name: string,
    readonly kind: 'web' | 'listener',
    private readonly env: Record<string, string | undefined>,
    readonly url?: string,
  ) {}

  get running(): boolean {
    const c = this.proc?.child;
    return !!c && c.exitCode === null && c.signalCode === null;
  }

  /** Starts the process and waits until it serves (web: /healthz; listener: its "listener started" line). */
  start(timeoutMs = START_TIMEOUT_MS): Promise<void> {
    this.starting ??= this.doStart(timeoutMs).finally(() => (this.starting = undefined));
    return this.starting;
  }

  private async doStart(timeoutMs: number): Promise<void> {
    if (this.running && this.ready) return;
    if (this.proc && this.running) {
      // started but never ready (see startFailures): replace it
      this.proc.kill('SIGKILL');
      await this.proc.exited;
    }
    if (this.proc) this.harvest(this.proc);
    this.ready = false;
    try {
      await this.spawnAndWait(timeoutMs);
      this.ready = true;
    } catch (e) {
      const p = this.proc;
      this.startFailures.push(
        `${this.name}: ${(e instanceof Error ? e.message : String(e)).split('\n')[0]}; last lines: ${p ? p.lines.slice(-3).join(' | ').slice(0, 600) : '-'}`,
      );
      throw e;
    }
  }

  private async spawnAndWait(timeoutMs: number): Promise<void> {
    const script = this.kind === 'web' ? 'src/http/main.ts' : 'src/listener/main.ts';
    const p = spawnProc(this.name, script, this.env);
    this.proc = p;
    this.starts++;
    if (this.kind === 'web') {
      const end = Date.now() + timeoutMs;
      for (;;) {
        if (p.child.exitCode !== null || p.child.signalCode !== null) throw new Error(`${this.name} exited at start`);
        try {
          const r = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(1000) });
          if (r.ok) return;
        } catch {
          // not listening yet
        }
        if (Date.now() > end) throw new Error(`${this.name} did not answer /healthz within ${timeoutMs / 1000} s`);
        await sleep(100);
      }
    } else {
      // Waits while PostgreSQL is down (at most 5 s here): the listener must keep trying and then start.
      await p.waitFor(/listener started/, timeoutMs);
    }
  }

  async kill(): Promise<void> {
    const p = this.proc;
    if (!p || !this.running) return;
    this.kills++;
    this.ready = false;
    p.kill('SIGKILL');
    await p.exited;
  }

  async stop(): Promise<void> {
    if (this.proc) {
      await this.proc.stop(5000);
      this.harvest(this.proc);
      this.proc = undefined;
    }
  }

  /** Keeps the error lines of a process that has ended (or is about to be replaced). */
  harvest(p: Proc): void {
    if ((p as Proc & { harvested?: boolean }).harvested) return;
    (p as Proc & { harvested?: boolean }).harvested = true;
    for (const line of p.lines) if (isErrorLine(line)) this.errors.push(line);
  }

  errorLines(): string[] {
    return this.proc ? [...this.errors, ...this.proc.lines.filter(isErrorLine)] : this.errors;
  }
}

/** What a listener logs at error level about a fault the run injects on purpose: not a failure of the service. */
const INJECTED = [/^Qiscus is down: every assign call fails/];

function isErrorLine(line: string): boolean {
  try {
    const o = JSON.parse(line) as { level?: number; msg?: unknown };
    if (typeof o.msg === 'string' && INJECTED.some((re) => re.test(o.msg as string))) return false;
    return typeof o.level === 'number' && o.level >= 50;
  } catch {
    return line.trim().length > 0; // not pino JSON: a crash or a stack trace
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------------------------------

interface Room {
  id: string;
  /** Sessions started by the driver (1 + returns). */
  sessions: number;
  /** 'open': the customer's session is open in Qiscus; 'closing': resolved in Qiscus, the webhook not yet accepted;
   *  'closed': resolution accepted. */
  state: 'open' | 'closing' | 'closed';
  /** The allocation webhook of the current session still needs a 200 (sent again while the room has no agent). */
  needNew: boolean;
  nextNewAt: number;
  newInFlight: boolean;
  closeInFlight: boolean;
  nextCloseAt: number;
  /** When the agent holding the room resolves it. */
  resolveAt: number | null;
  returnAt: number | null;
  /** When the current session's allocation webhook first got its 2xx (null until then): the allocator knows it. */
  acceptedAt: number | null;
  /** The agent Qiscus took the room off at its resolution, while that webhook has no 2xx yet (state 'closing'). */
  closingFrom: number | null;
  /** The webhook's source and channel.id (null: none), the same for every session of the room. */
  source: string;
  channel: number | null;
}

/** One customer session, for the webhook → assign figures. */
interface SessionLog {
  room: string;
  session: number;
  acceptedAt: number;
  /** A free slot (as the liveness watch counts them) was there for it when its webhook was sent. */
  hadFreeSlot: boolean;
}

interface Accepted {
  kind: 'new_request' | 'close_request';
  room: string;
  outcome: string;
  webhookId: string;
  /** A late copy of a webhook already accepted: must change nothing. */
  redelivery: boolean;
}

type Kind = 'new_request' | 'close_request';

export async function runChaos(opts: ChaosOptions = {}): Promise<ChaosReport> {
  const chaosMs = Math.round((opts.seconds ?? (opts.minutes ?? 1) * 60) * 1000);
  // A long run ends with a longer backlog (customers keep arriving faster than 20 agents serve them), so the time
  // allowed to drain it grows with the run.
  const drainMs = (opts.drainSeconds ?? Math.max(60, chaosMs / 1000 / 4)) * 1000;
  const seed = (opts.seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
  const nAgents = opts.agents ?? 20;
  const arrivalsPerSecond = opts.arrivalsPerSecond ?? 4;
  const lateCopies = opts.lateCopies ?? true;
  const log = opts.log ?? (() => {});
  const rand = mulberry32(seed ^ 0x5eed);
  const between = (lo: number, hi: number) => lo + rand() * (hi - lo);
  const chance = (p: number) => rand() < p;
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;

  const t0 = Date.now();
  const loadAtStart = os.loadavg()[0]!;
  const elapsed = () => ((Date.now() - t0) / 1000).toFixed(1).padStart(6);
  const say = (msg: string) => log(`[chaos ${elapsed()}s] ${msg}`);

  const faults: Record<string, number> = {};
  const fault = (kind: string, n = 1) => (faults[kind] = (faults[kind] ?? 0) + n);

  // ---------- PostgreSQL, simulator, processes ----------
  const dataDir = await tempDataDir('allocator-chaos-');
  let srv: EmbeddedServer | undefined;
  let sim: Simulator | undefined;
  let pool: pg.Pool | undefined;
  let tap: QiscusTap | undefined;
  let watch: LivenessWatch | undefined;
  const slots: Slot[] = [];
  const realFetch = globalThis.fetch;

  try {
    srv = await startEmbeddedPostgres({ dataDir, persistent: true });
    await runMigrations(srv.url);
    pool = new pg.Pool({ connectionString: srv.url, max: 4, connectionTimeoutMillis: 2000 });
    pool.on('error', () => {}); // PostgreSQL restarts under it
    // The shipped settings, except the capacity when a caller asks for another.
    if (opts.capacity !== undefined) {
      await pool.query(`update allocator.settings set value = $1 where key = 'default_max_load'`, [String(opts.capacity)]);
    }
    const capacity = (await pool.query<{ c: number }>(`select allocator.default_max_load() as c`)).rows[0]!.c;
    // Routing: the audit of every reservation and membership change (routing.ts), and the routes of the start.
    await installAudit(pool);
    const routeVersions: RouteVersion[] = [
      { ...(await changeRoutes(pool, INITIAL_ROUTES_SQL, 'the routes of the start')), pre: -Infinity },
    ];
    let currentRoutes: RouteRow[] = routeVersions[0]!.routes;
    const shipped = (
      await pool.query<{ base: string; max: string; failures: number; lease: string }>(
        `select allocator.retry_base_seconds()::text as base, allocator.retry_max_seconds()::text as max,
                allocator.outage_failures() as failures, extract(epoch from allocator.lease())::text as lease`,
      )
    ).rows[0]!;

    sim = await startSimulator({
      appId: APP_ID,
      secretKey: SECRET_KEY,
      seed,
      divisions: DIVISIONS,
      agents: Array.from({ length: nAgents }, (_, i) => ({ id: i + 1, name: `Agent ${i + 1}`, divisions: initialDivisions(i + 1) })),
    });
    const baseFaults = {
      latencyMs: [5, 300] as [number, number],
      errorRate: 0.1,
      rate429: 0.03,
      retryAfterSeconds: 1,
      hangRate: 0.02,
      acceptThenFailRate: 0.03,
    };
    sim.setFaults(baseFaults);
    // The listeners reach the simulator through the tap, which sees each assign call start and end.
    tap = await startQiscusTap(sim.url);

    // The product's defaults, written out: spawnProc passes our environment on. QISCUS_TIMEOUT_MS (10 s) and
    // LISTENER_CONCURRENCY (32) stay unset.
    const env = {
      DATABASE_URL: srv.url,
      QISCUS_BASE_URL: tap.url,
      QISCUS_APP_ID: APP_ID,
      QISCUS_SECRET_KEY: SECRET_KEY,
      SWEEP_SECONDS: '5',
      AGENT_SYNC_SECONDS: '30',
      QISCUS_TIMEOUT_MS: undefined,
      LISTENER_CONCURRENCY: undefined,
      METRICS_PORT: '0',
      LOG_LEVEL: 'info',
    };
    for (let i = 1; i <= 2; i++) {
      const port = await freePort();
      slots.push(new Slot(`web-${i}`, 'web', { ...env, PORT: String(port) }, `http://127.0.0.1:${port}`));
    }
    for (let i = 1; i <= 3; i++) slots.push(new Slot(`listener-${i}`, 'listener', env));
    await Promise.all(slots.map((s) => s.start(FIRST_START_TIMEOUT_MS)));
    const webs = slots.filter((s) => s.kind === 'web');
    say(
      `seed ${seed}; PostgreSQL on ${srv.port}; simulator ${sim.url} (tap ${tap.url}); ${webs.map((w) => w.url).join(', ')}; 3 listeners; ` +
        `lease ${shipped.lease} s, backoff ${shipped.base}-${shipped.max} s, roster every 30 s, sweep every 5 s`,
    );

    // ---------- webhooks out ----------
    // Every webhook body posted, captured from the simulator's fetch, so that a late copy can be delivered again.
    // The simulator's allocation webhook has no `channel`: the room's channel.id is added here, as Qiscus sends it
    // (test/fixtures/caa-current-shape.json).
    let captured: string | undefined;
    const channelOf = new Map<string, number>();
    globalThis.fetch = ((input: Parameters<typeof fetch>[0], init?: Parameters<typeof fetch>[1]) => {
      const u = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
      if (/\/api\/v1\/new_request/.test(u) && typeof init?.body === 'string') {
        const o = JSON.parse(init.body) as { room_id?: unknown; source?: unknown; channel?: unknown };
        const channel = channelOf.get(String(o.room_id));
        if (channel !== undefined) {
          o.channel = { id: channel, name: `Channel ${channel}`, source: o.source };
          init = { ...init, body: JSON.stringify(o) };
        }
      }
      if (/\/api\/v1\/(new|close)_request/.test(u) && typeof init?.body === 'string') captured = init.body;
      return realFetch(input, init);
    }) as typeof fetch;

    const accepted = new Map<string, Accepted>();
    const acceptedBodies: Array<{ kind: Kind; room: string; body: string }> = [];
    const notAccepted: Record<string, number> = {};
    const outcomes: Record<string, number> = {};
    const problems: string[] = []; // 200 answers we could not make sense of
    // What the driver did and heard, per room, for the timelines of a failing check.
    const events = new Map<string, Array<{ at: number; text: string }>>();
    const ev = (room: string, text: string) => {
      let xs = events.get(room);
      if (!xs) events.set(room, (xs = []));
      xs.push({ at: Date.now(), text });
    };
    let sent = 0;
    const inflight = new Set<Promise<unknown>>();
    const track = <T>(p: Promise<T>): Promise<T> => {
      inflight.add(p);
      void p.finally(() => inflight.delete(p)).catch(() => {});
      return p;
    };
    const customers = {
      rooms: 0,
      returning: 0,
      duplicateMessages: 0,
      resentNewRequests: 0,
      resentResolutions: 0,
      lateRedeliveries: 0,
      fastResolutions: 0,
      fastReturns: 0,
    };

    const record = (kind: Kind, room: string, r: WebhookResult, redelivery: boolean, body?: string): boolean => {
      const b0 = (r.body ?? {}) as { outcome?: unknown; session_id?: unknown; webhook_id?: unknown };
      ev(room, `driver: ${kind}${redelivery ? ' (late copy)' : ''} answered ${r.status}${r.status === 200 ? ` ${String(b0.outcome)} session ${String(b0.session_id)} webhook #${String(b0.webhook_id)}` : ''}`);
      if (r.status !== 200) {
        notAccepted[`${kind} ${r.status}`] = (notAccepted[`${kind} ${r.status}`] ?? 0) + 1;
        return false;
      }
      const b = (r.body ?? {}) as { request_id?: unknown; outcome?: unknown; webhook_id?: unknown };
      if (typeof b.request_id !== 'string' || typeof b.outcome !== 'string') {
        problems.push(`${kind} ${room}: 200 without request_id/outcome: ${JSON.stringify(r.body).slice(0, 200)}`);
        return true;
      }
      accepted.set(b.request_id, { kind, room, outcome: b.outcome, webhookId: String(b.webhook_id), redelivery });
      const key = `${kind}${redelivery ? ' (late copy)' : ''} → ${b.outcome}`;
      outcomes[key] = (outcomes[key] ?? 0) + 1;
      if (body && !redelivery) acceptedBodies.push({ kind, room, body });
      return true;
    };
    const failed = (kind: Kind, e: unknown, room: string) => {
      const c = e as { cause?: { code?: string }; name?: string; code?: string };
      const code = c?.cause?.code ?? c?.code ?? c?.name ?? 'error';
      ev(room, `driver: ${kind} got no answer (${code})`);
      notAccepted[`${kind} ${code}`] = (notAccepted[`${kind} ${code}`] ?? 0) + 1;
    };

    /** Posts through the simulator (it builds the payload) to one of the two web processes, at random. */
    const viaSim = async (kind: Kind, room: string, send: () => Promise<WebhookResult>): Promise<boolean> => {
      const web = pick(webs);
      sim!.webhookBaseUrl = web.url; // read synchronously by the simulator before its first await
      ev(room, `driver: ${kind} → ${web.name}`);
      captured = undefined;
      sent++;
      let p: Promise<WebhookResult>;
      try {
        p = send();
      } catch (e) {
        failed(kind, e, room);
        return false;
      }
      const body = captured;
      try {
        return record(kind, room, await p, false, body);
      } catch (e) {
        failed(kind, e, room);
        return false;
      }
    };

    /** Posts a body again, as is (a late or duplicate delivery by Qiscus). */
    const redeliver = async (kind: Kind, room: string, body: string): Promise<void> => {
      sent++;
      const web = pick(webs);
      ev(room, `driver: late copy of an accepted ${kind} → ${web.name}`);
      try {
        const res = await realFetch(`${web.url}/api/v1/${kind}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body,
          signal: AbortSignal.timeout(10_000),
        });
        const text = await res.text();
        let parsed: unknown = text;
        try {
          parsed = JSON.parse(text);
        } catch {
          /* keep text */
        }
        record(kind, room, { status: res.status, body: parsed }, true);
      } catch (e) {
        failed(kind, e, room);
      }
    };

    // ---------- customers and agents ----------
    const rooms = new Map<string, Room>();
    let nextRoom = 1;
    let phase: 'chaos' | 'drain' | 'hold' | 'final' = 'chaos';
    let reopened = 0;
    let pgUp = true;
    let lastPgUp = 0;
    let lastListenerKill = 0;
    const sessionLog: SessionLog[] = [];
    const liveness = new LivenessWatch({
      sim,
      tap,
      rooms: () => rooms.values(),
      room: (id) => rooms.get(id),
      settings: {
        capacity,
        retryBaseSeconds: Number(shipped.base),
        retryMaxSeconds: Number(shipped.max),
        outageFailures: shipped.failures,
        leaseSeconds: Number(shipped.lease),
      },
      pool,
      databaseUrl: srv.url,
      pgUp: () => pgUp,
      listenersServing: () => slots.filter((x) => x.kind === 'listener' && x.running && x.ready).length,
      context: () => {
        const ago = (t: number) => (t ? `${((Date.now() - t) / 1000).toFixed(1)} s ago` : 'never');
        const serving = slots.filter((x) => x.kind === 'listener' && x.running && x.ready).map((x) => x.name);
        return `at ${elapsed().trim()} s; listeners serving: ${serving.join(', ') || 'none'}; PostgreSQL ${pgUp ? `up since ${ago(lastPgUp)}` : 'down'}; last listener kill ${ago(lastListenerKill)}; latency ${JSON.stringify(sim!.faults.latencyMs)}; routes: ${routeVersions.at(-1)!.what}`;
      },
      routes: () => currentRoutes,
    });
    watch = liveness;

    /** The allocation webhook of room `r`'s current session (first, again, or a second copy at once). */
    const postNew = (r: Room): Promise<boolean> => {
      const session = r.sessions;
      return viaSim('new_request', r.id, () => sim!.sendNewRequest(r.id, { source: r.source })).then((ok) => {
        if (ok && r.sessions === session && r.state === 'open' && r.acceptedAt === null) {
          // Free slots against the rooms already waiting, when the allocator learns of this one (its 2xx): asked
          // before the webhook was sent, two rooms arriving together each counted the one free slot as theirs.
          const at = liveness.freeSlotsAndWaiting(r.id);
          r.acceptedAt = Date.now();
          sessionLog.push({ room: r.id, session, acceptedAt: r.acceptedAt, hadFreeSlot: at.free > at.waiting });
        }
        return ok;
      });
    };

    const arrive = () => {
      const id = `c${String(nextRoom++).padStart(5, '0')}`;
      let x = rand();
      const via = CHANNELS.find((c) => (x -= c.share) < 0) ?? CHANNELS.at(-1)!;
      if (via.channel !== null) channelOf.set(id, via.channel);
      const r: Room = {
        source: via.source,
        channel: via.channel,
        id,
        sessions: 1,
        state: 'open',
        needNew: true,
        nextNewAt: Date.now(),
        newInFlight: false,
        closeInFlight: false,
        nextCloseAt: 0,
        resolveAt: null,
        returnAt: null,
        acceptedAt: null,
        closingFrom: null,
      };
      rooms.set(id, r);
      customers.rooms++;
      sendNew(r, false);
      if (chance(0.1)) {
        // the customer sent two messages at once: two copies of the webhook race
        customers.duplicateMessages++;
        void track(postNew(r));
      }
    };

    const sendNew = (r: Room, resend: boolean) => {
      if (resend) customers.resentNewRequests++;
      r.newInFlight = true;
      void track(
        postNew(r).then((ok) => {
          r.newInFlight = false;
          if (ok) r.needNew = false;
          else r.nextNewAt = Date.now() + between(300, 1500);
        }),
      );
    };

    /** The agent resolves the room in Qiscus; the webhook is sent until it gets a 200. */
    const sendClose = (r: Room, resend: boolean) => {
      if (resend) customers.resentResolutions++;
      else {
        ev(r.id, `agent ${sim!.agentOf(r.id) ?? 'none'} resolves the room in Qiscus`);
        r.closingFrom = sim!.agentOf(r.id);
      }
      r.state = 'closing';
      r.needNew = false; // resolved: the customer's earlier message needs no agent any more
      r.resolveAt = null;
      r.closeInFlight = true;
      void track(
        viaSim('close_request', r.id, () => sim!.resolve(r.id)).then((ok) => {
          r.closeInFlight = false;
          if (!ok) {
            r.nextCloseAt = Date.now() + between(300, 1500);
            return;
          }
          r.state = 'closed';
          r.closingFrom = null;
          if (phase === 'chaos' && chance(0.2)) {
            // a returning customer; one in ten writes again within a second of the resolution
            const fast = chance(0.1);
            if (fast) customers.fastReturns++;
            r.returnAt = Date.now() + (fast ? between(200, 1000) : between(1000, 8000));
          }
          // Qiscus delivering the same resolution twice, at once
          const last = acceptedBodies.at(-1);
          if (lateCopies && phase === 'chaos' && chance(0.05) && last?.room === r.id && last.kind === 'close_request') {
            customers.lateRedeliveries++;
            void track(redeliver('close_request', r.id, last.body));
          }
        }),
      );
    };

    const overCapacity: string[] = [];
    const overSeen = new Set<number>();
    const tick = () => {
      const now = Date.now();
      for (const a of sim!.agents()) {
        if (a.rooms.length > capacity && !overSeen.has(a.id)) {
          overSeen.add(a.id);
          overCapacity.push(...a.rooms);
          for (const id of a.rooms) ev(id, `driver: agent ${a.id} holds ${a.rooms.length} rooms in Qiscus: ${a.rooms.join(', ')}`);
          // what the database says about that agent right now
          void pool!
            .query(
              `select (select row_to_json(x) from (select our_load, external_load, external_seen, qiscus_load,
                              round(extract(epoch from now() - synced_at)::numeric, 2) as synced_ago_s,
                              round(extract(epoch from now() - external_hold_until)::numeric, 2) as hold_until_ago_s
                            from allocator.agents where id = $1) x)::text as agent,
                      (select json_agg(y)::text from (select room_id, state, holds_slot, uncertain, attempt_id
                            from allocator.sessions where agent_id = $1 and state in ('waiting', 'reserved', 'assigned')) y) as sessions`,
              [a.id],
            )
            .then((r) => {
              for (const id of a.rooms) ev(id, `db: agent ${a.id} ${String(r.rows[0]?.agent)}; its open sessions ${String(r.rows[0]?.sessions)}`);
            })
            .catch(() => {});
        }
      }
      // Agents: each room an agent holds is resolved a while after the agent got it.
      if (phase !== 'hold') {
        for (const a of sim!.agents()) {
          for (const id of a.rooms) {
            const r = rooms.get(id);
            if (!r) continue;
            if (r.state !== 'open') {
              if (r.state === 'closed' || (r.state === 'closing' && !r.closeInFlight)) {
                // The room is held again after we resolved it: an assignment that landed after the resolution.
                reopened++;
                ev(id, `driver: Qiscus shows agent ${a.id} holding the room again after its resolution`);
                r.state = 'open';
                r.closingFrom = null;
                r.returnAt = null;
                r.needNew = false;
              } else continue;
            }
            r.needNew = false; // it has an agent: Qiscus sends no allocation webhook
            if (r.resolveAt === null) {
              const fast = chance(FAST_RESOLVE_SHARE);
              if (fast) customers.fastResolutions++;
              r.resolveAt = now + (fast ? between(100, 500) : phase === 'chaos' ? between(3000, 12_000) : between(500, 4000));
            } else if (r.resolveAt <= now && !r.closeInFlight) {
              // Not while an assign call for the room is still undecided at Qiscus (slow, or its listener gone):
              // landing after the resolution, it would open the room again (as the simulator does), which nobody
              // can know until a roster pull. The agent resolves the moment Qiscus has decided it.
              if (liveness.undecided(r.id) > 0) continue;
              sendClose(r, false);
            }
          }
        }
      }
      for (const r of rooms.values()) {
        if (r.state === 'closing' && !r.closeInFlight && r.nextCloseAt <= now) sendClose(r, true);
        if (r.state === 'open' && r.needNew && !r.newInFlight && r.nextNewAt <= now) {
          if (sim!.agentOf(r.id) !== null) r.needNew = false;
          else sendNew(r, true);
        }
        if (phase !== 'chaos') continue;
        // the customer writes again while waiting: the allocation webhook repeated
        if (r.state === 'open' && !r.needNew && sim!.agentOf(r.id) === null && chance(0.001)) {
          customers.duplicateMessages++;
          void track(viaSim('new_request', r.id, () => sim!.sendNewRequest(r.id, { source: r.source })));
        }
        // a returning customer: same room, new session (only once Qiscus shows the room free)
        if (r.state === 'closed' && r.returnAt !== null && r.returnAt <= now && sim!.agentOf(r.id) === null) {
          r.returnAt = null;
          r.sessions++;
          r.state = 'open';
          r.needNew = true;
          r.resolveAt = null;
          r.acceptedAt = null;
          customers.returning++;
          sendNew(r, false);
        }
      }
    };

    // ---------- faults ----------
    // The chaos phase is timed from here, after the setup (which a loaded machine can make long).
    const chaosStart = Date.now();
    const chaosEnd = chaosStart + chaosMs;
    const chaosOn = () => Date.now() < chaosEnd && !opts.signal?.aborted;
    const waitUntil = async (ms: number) => {
      const end = Date.now() + ms;
      while (Date.now() < end && chaosOn()) await sleep(Math.min(100, end - Date.now()));
    };
    let pgDownMs = 0;

    const restartLater = (s: Slot, down: number) =>
      void (async () => {
        await sleep(down);
        try {
          await s.start();
          say(`${s.name} back`);
        } catch (e) {
          say(`${s.name} did not start: ${(e instanceof Error ? e.message : String(e)).split('\n')[0]}`);
        }
      })();

    /** The listener's presence id (src/listener/presence.ts): its reservations carry it as their owner. */
    const presenceId = (s: Slot): number | null => {
      for (const line of [...(s.proc?.lines ?? [])].reverse()) {
        if (!line.includes('listener registered')) continue;
        try {
          const id = (JSON.parse(line) as { listener?: unknown }).listener;
          if (typeof id === 'number') return id;
        } catch {
          /* not JSON */
        }
      }
      return null;
    };

    // A listener killed every 3-6 s (one at a time, never the last one serving), back after 0.5-2 s.
    const listenerKiller = (async () => {
      await waitUntil(between(3000, 6000));
      while (chaosOn()) {
        const serving = slots.filter((x) => x.kind === 'listener' && x.running && x.ready);
        if (serving.length >= 2) {
          const s = pick(serving);
          const owner = presenceId(s);
          const addReserved = liveness.listenerKilled();
          lastListenerKill = Date.now();
          await s.kill();
          fault('kill -9 listener');
          say(`kill -9 ${s.name}`);
          if (owner !== null && pgUp) {
            pool!
              .query<{ room_id: string; agent_id: string }>(
                `select room_id, agent_id::text from allocator.sessions where state = 'reserved' and owner = $1`,
                [owner],
              )
              .then((r) => addReserved(r.rows.map((x) => ({ room: x.room_id, agent: Number(x.agent_id) }))))
              .catch(() => {});
          }
          restartLater(s, between(500, 2000));
        }
        await waitUntil(between(3000, 6000));
      }
    })();

    // A web process killed every 10-20 s, back after 0.5-3 s.
    const webKiller = (async () => {
      await waitUntil(between(5000, 10_000));
      while (chaosOn()) {
        const s = pick(slots.filter((x) => x.kind === 'web' && x.running && x.ready));
        if (s) {
          await s.kill();
          fault('kill -9 web');
          say(`kill -9 ${s.name}`);
          restartLater(s, between(500, 3000));
        }
        await waitUntil(between(10_000, 20_000));
      }
    })();

    const pgRestarts = (async () => {
      await waitUntil(between(10_000, 20_000));
      while (chaosOn()) {
        const down = between(1000, 5000);
        say(`PostgreSQL stop for ${(down / 1000).toFixed(1)} s`);
        const t = Date.now();
        pgUp = false;
        liveness.pgStopping();
        await srv!.stop();
        fault('PostgreSQL restart');
        await sleep(down);
        for (let i = 1; ; i++) {
          try {
            await srv!.start();
            break;
          } catch (e) {
            if (i >= 5) throw e;
            await sleep(1000);
          }
        }
        pgUp = true;
        lastPgUp = Date.now();
        liveness.pgStarted();
        pgDownMs += Date.now() - t;
        say('PostgreSQL up');
        await waitUntil(between(20_000, 30_000));
      }
    })();

    const spikes = (async () => {
      await waitUntil(between(8000, 15_000));
      while (chaosOn()) {
        if (chance(0.7)) {
          // Qiscus slow for a few seconds: calls pile up in flight, the rooms behind them must not wait
          fault('Qiscus latency spike (1.5-3.5 s)');
          sim!.setFaults({ latencyMs: [1500, 3500] });
          await waitUntil(between(2000, 5000));
        } else {
          // slower than the listeners' timeout (10 s): calls time out, and some land after it
          fault('Qiscus latency spike over the timeout (9-12 s)');
          sim!.setFaults({ latencyMs: [9000, 12_000] });
          await waitUntil(between(1000, 2000));
        }
        sim!.setFaults({ latencyMs: baseFaults.latencyMs });
        await waitUntil(between(20_000, 35_000));
      }
    })();

    // Routes changed while rooms wait, every 8-14 s (routing.ts, ROUTE_STEPS). The watch and the checks take each
    // version as committed; a commit PostgreSQL stopped under is read back once it is up (applied or not).
    const routeChanger = (async () => {
      await waitUntil(between(4000, 8000));
      for (let step = 0; chaosOn(); step++) {
        while (!pgUp && chaosOn()) await sleep(100);
        if (!chaosOn()) break;
        const { what, sql } = ROUTE_STEPS[step % ROUTE_STEPS.length]!;
        const since = Date.now();
        let v: RouteVersion | undefined;
        try {
          v = await changeRoutes(pool!, sql, what);
        } catch {
          for (let i = 0; i < 150 && !v; i++) {
            await sleep(200);
            if (pgUp) v = await readRoutes(pool!, since, `${what} (PostgreSQL stopped under it: applied or not)`).catch(() => undefined);
          }
        }
        if (v) {
          routeVersions.push(v);
          currentRoutes = v.routes;
          fault('routes changed while rooms wait');
          say(`routes: ${v.what}`);
        }
        await waitUntil(between(8000, 14_000));
      }
    })();

    // Division membership changed in Qiscus every 10-16 s (routing.ts, MEMBERSHIP_STEPS), until 15 s before the end
    // of the chaos phase (each change is checked to reach the database).
    const membershipChanges: Array<{ at: number; agent: number; divisions: number[] }> = [];
    const membershipChanger = (async () => {
      await waitUntil(between(6000, 10_000));
      for (let step = 0; chaosOn() && Date.now() < chaosEnd - 15_000; step++) {
        const { what, set } = MEMBERSHIP_STEPS[step % MEMBERSHIP_STEPS.length]!;
        const at = Date.now();
        for (const [agent, divisions] of Object.entries(set)) {
          if (Number(agent) > nAgents) continue;
          sim!.setAgentDivisions(Number(agent), divisions);
          membershipChanges.push({ at, agent: Number(agent), divisions });
        }
        fault('division membership changed in Qiscus');
        say(`Qiscus: ${what}`);
        await waitUntil(between(10_000, 16_000));
      }
    })();

    // ---------- the chaos phase ----------
    liveness.start();
    let nextProgress = Date.now() + 10_000;
    let nextBurst = Date.now() + between(15_000, 25_000);
    let arrivalCredit = 0;
    let last = Date.now();
    while (chaosOn()) {
      const now = Date.now();
      arrivalCredit += ((now - last) / 1000) * arrivalsPerSecond * between(0.5, 1.5);
      last = now;
      while (arrivalCredit >= 1) {
        arrivalCredit -= 1;
        arrive();
      }
      if (now >= nextBurst) {
        const n = Math.round(between(15, 35));
        say(`burst of ${n} new rooms`);
        for (let i = 0; i < n; i++) arrive();
        nextBurst = now + between(20_000, 40_000);
      }
      // Qiscus re-delivering an old webhook late (at-least-once delivery)
      if (lateCopies && acceptedBodies.length > 0 && chance(0.5 * 0.05)) {
        const w = pick(acceptedBodies);
        customers.lateRedeliveries++;
        void track(redeliver(w.kind, w.room, w.body));
      }
      tick();
      if (now >= nextProgress) {
        nextProgress = now + 10_000;
        say(await progress());
      }
      await sleep(50);
    }

    async function progress(): Promise<string> {
      let db = 'database down';
      if (pgUp) {
        try {
          const r = await pool!.query<{ state: string; n: number }>(
            `select state::text, count(*)::int as n from allocator.sessions group by 1 order by 1`,
          );
          db = r.rows.map((x) => `${x.state} ${x.n}`).join(', ');
        } catch {
          /* restarting */
        }
      }
      return `rooms ${customers.rooms} (+${customers.returning} returning); webhooks accepted ${accepted.size}/${sent}; ${db}; max load ${sim!.maxLoadSeenAll()}`;
    }

    // ---------- heal ----------
    const chaosSeconds = (Date.now() - chaosStart) / 1000;
    say('chaos over: healing (faults off, everything restarted)');
    const drainStart = Date.now();
    phase = 'drain';
    // Healing runs while the driver keeps going (agents resolve, webhooks are sent again), as it would for real.
    let healed = false;
    const healing = (async () => {
      await Promise.all([listenerKiller, webKiller, pgRestarts, spikes, routeChanger, membershipChanger]);
      sim!.clearFaults();
      await Promise.all(
        slots.map(async (s) => {
          for (let i = 1; i <= 3; i++) {
            try {
              return await s.start();
            } catch (e) {
              say(`${s.name} did not start: ${(e instanceof Error ? e.message : String(e)).split('\n')[0]}`);
            }
          }
        }),
      );
      healed = slots.every((s) => s.ready);
      say(healed ? 'healed: every process serving' : 'NOT healed: a process would not start');
      // The traffic and the faults have stopped: from now on, nothing that could be assigned may wait long.
      liveness.trafficStopped();
    })();

    // ---------- drain: agents resolve until nothing waits ----------
    const drainDeadline = drainStart + drainMs;
    const driverIdle = () =>
      inflight.size === 0 &&
      [...rooms.values()].every((r) => !(r.state === 'closing') && !(r.state === 'open' && r.needNew));
    const openCounts = async () => {
      const r = await pool!.query<{ waiting: number; reserved: number; assigned: number }>(
        `select count(*) filter (where state = 'waiting')::int as waiting,
                count(*) filter (where state = 'reserved')::int as reserved,
                count(*) filter (where state = 'assigned')::int as assigned
         from allocator.sessions`,
      );
      return r.rows[0]!;
    };
    let drained = false;
    while (Date.now() < drainDeadline - 10_000) {
      tick();
      try {
        const c = await openCounts();
        if (healed && driverIdle() && c.waiting === 0 && c.reserved === 0) {
          drained = true;
          break;
        }
      } catch {
        /* keep trying */
      }
      if (Date.now() >= nextProgress) {
        nextProgress = Date.now() + 5000;
        say(`draining: ${await progress()}`);
      }
      await sleep(50);
    }
    // A process that will not start (see startFailures) must not hold the run past its deadline.
    await Promise.race([healing, sleep(Math.max(0, drainDeadline - 10_000 - Date.now()))]);
    if (!healed) say('not healed in time: going on to the checks');

    // ---------- hold: nobody resolves; Qiscus and the database must agree on every open room ----------
    phase = 'hold';
    const mismatches: string[] = [];
    let countedExternal = 0;
    {
      const end = Date.now() + 5000;
      while (!driverIdle() && Date.now() < end) {
        tick();
        await sleep(50);
      }
      await sleep(300); // assignments and roster syncs in flight settle
      const db = await pool.query<{ room_id: string; agent_id: string }>(
        `select room_id, agent_id::text from allocator.sessions where state = 'assigned'`,
      );
      const dbAgent = new Map(db.rows.map((x) => [x.room_id, Number(x.agent_id)]));
      for (const [room, agent] of dbAgent) {
        const simAgent = sim.agentOf(room);
        if (simAgent !== agent) mismatches.push(`room ${room}: database says agent ${agent}, Qiscus ${simAgent ?? 'none'}`);
      }
      for (const a of sim.agents()) {
        // Rooms Qiscus shows on the agent that the database has resolved: an assign call that landed after the
        // resolution (settle_resolved_in_flight). Right when the database counts them on that agent as rooms it
        // holds without us (external_load) until a roster pull says otherwise; wrong when it counts them nowhere.
        const landedAfter: string[] = [];
        for (const room of a.rooms) {
          if (dbAgent.get(room) !== a.id) {
            const s = await pool.query<{ state: string; agent_id: string | null }>(
              `select state::text, agent_id::text from allocator.sessions where room_id = $1 order by id desc limit 1`,
              [room],
            );
            const x = s.rows[0];
            if (x?.state === 'resolved' && x.agent_id === String(a.id)) {
              landedAfter.push(room);
              continue;
            }
            mismatches.push(
              `room ${room}: Qiscus shows agent ${a.id}, database ${x ? `${x.state} (agent ${x.agent_id ?? 'none'})` : 'has no session'}`,
            );
          }
        }
        if (landedAfter.length) {
          const ext = (await pool.query<{ n: number }>(`select external_load as n from allocator.agents where id = $1`, [a.id])).rows[0]?.n ?? 0;
          if (ext >= landedAfter.length) countedExternal += landedAfter.length;
          else {
            for (const room of landedAfter) {
              mismatches.push(
                `room ${room}: Qiscus shows agent ${a.id} holding it after its resolution, database counts ${ext} such room(s) on the agent`,
              );
            }
          }
        }
      }
      say(`hold: ${db.rows.length} rooms assigned, ${mismatches.length} disagreements between Qiscus and the database`);
    }

    // ---------- final: every room resolved ----------
    phase = 'final';
    liveness.stop();
    const settleMs = liveness.settleMs;
    {
      const dbOpen = await pool.query<{ room_id: string }>(
        `select room_id from allocator.sessions where state = 'assigned'`,
      );
      for (const { room_id } of dbOpen.rows) {
        const r = rooms.get(room_id);
        // assigned in the database but held by nobody in Qiscus (a disagreement reported above): resolve it, so the
        // run can end clean
        if (r && !r.closeInFlight && sim.agentOf(room_id) === null) sendClose(r, false);
      }
      const end = Math.max(drainDeadline, Date.now() + 15_000);
      for (;;) {
        tick();
        const c = await openCounts().catch(() => undefined);
        const simHeld = sim.agents().reduce((n, a) => n + a.rooms.length, 0);
        if (c && driverIdle() && c.waiting + c.reserved + c.assigned === 0 && simHeld === 0) break;
        if (Date.now() > end) {
          drained = false;
          break;
        }
        await sleep(50);
      }
    }
    const drainSeconds = (Date.now() - drainStart) / 1000;
    await Promise.allSettled([...inflight]);

    // ---------- the figures ----------
    const rows = await pool.query<{ request_id: string | null; id: string; kind: string; room_id: string; outcome: string }>(
      `select request_id, id::text, kind, room_id, outcome from allocator.webhooks`,
    );
    const byRequest = new Map(rows.rows.filter((x) => x.request_id).map((x) => [x.request_id!, x]));
    const notApplied: string[] = [];
    const changedByCopy: string[] = [];
    const implicated = new Map<string, string>(); // room → the check it failed
    const implicate = (room: string, why: string) => {
      if (!implicated.has(room)) implicated.set(room, why);
    };
    for (const [rid, a] of accepted) {
      const row = byRequest.get(rid);
      if (!row || row.id !== a.webhookId || row.outcome !== a.outcome) implicate(a.room, 'accepted webhook not applied');
      if (!row) notApplied.push(`${a.kind} ${a.room} request ${rid}: answered ${a.outcome}, no row`);
      else if (row.id !== a.webhookId || row.outcome !== a.outcome || row.kind !== a.kind || row.room_id !== a.room) {
        notApplied.push(`${a.kind} ${a.room} request ${rid}: answered ${a.outcome} #${a.webhookId}, row says ${row.kind} ${row.room_id} ${row.outcome} #${row.id}`);
      }
      if (a.redelivery && (a.outcome === 'queued' || a.outcome === 'resolved')) {
        changedByCopy.push(`${a.kind} ${a.room}: a late copy of an accepted webhook → ${a.outcome} (webhook #${a.webhookId})`);
        implicate(a.room, 'a late copy changed something');
      }
    }
    const acceptedRequestIds = new Set(accepted.keys());
    const appliedWithout200 = rows.rows.filter((x) => !x.request_id || !acceptedRequestIds.has(x.request_id)).length;

    const st = await pool.query<{ state: string; n: number }>(
      `select state::text, count(*)::int as n from allocator.sessions group by 1`,
    );
    const states = Object.fromEntries(st.rows.map((x) => [x.state, x.n])) as Record<string, number>;
    const opened = Object.values(states).reduce((a, b) => a + b, 0);
    const everAssigned = (
      await pool.query<{ n: number }>(`select count(*)::int as n from allocator.sessions where assigned_at is not null`)
    ).rows[0]!.n;
    const reasons = await pool.query<{ reason: string; n: number }>(
      `select coalesce(regexp_replace(last_error, '\\d+', 'N', 'g'), '?') as reason, count(*)::int as n
       from allocator.sessions where state = 'failed' group by 1 order by 2 desc`,
    );
    const invariants = await pool.query<{ problem: string; detail: string }>(`select * from allocator.check_invariants()`);
    const loads = await pool.query<{ load: number; external: number }>(
      `select coalesce(sum(our_load), 0)::int as load, coalesce(sum(external_load), 0)::int as external from allocator.agents`,
    );
    // Agents still counting rooms of ours once every session has ended: their last rooms' timelines.
    const leftLoad = await pool.query<{ id: string; our_load: number; rooms: string[] }>(
      `select a.id::text, a.our_load,
              array(select s.room_id from allocator.sessions s where s.agent_id = a.id order by s.id desc limit 3) as rooms
       from allocator.agents a where a.our_load <> 0`,
    );
    for (const a of leftLoad.rows) for (const room of a.rooms) implicate(room, `its agent ${a.id} still counts ${a.our_load} room(s) of ours at the end`);

    // Qiscus's side: every assign call, by answer
    const assignCalls: Record<string, number> = {};
    const perSession = new Map<string, { fresh: number; agents: Set<number> }>();
    let secondAgentCalls = 0;
    const secondAgentExamples: string[] = [];
    for (const a of sim.assignments) {
      const label = a.status === 0 ? 'hung' : a.fault ? `${a.status} (${a.fault})` : a.repeat ? `${a.status} repeat` : String(a.status);
      assignCalls[label] = (assignCalls[label] ?? 0) + 1;
      const key = `${a.room_id}#${a.session}`;
      const e = perSession.get(key) ?? { fresh: 0, agents: new Set<number>() };
      perSession.set(key, e);
      const performed = (a.status === 200 && !a.fault) || a.fault === 'acceptThenFail';
      if (performed) e.agents.add(a.agent_id);
      if (a.status === 200 && !a.fault && !a.repeat) e.fresh++;
      if (a.status === 400 && !a.fault) {
        // "room already has the maximum number of agents": we asked a second agent for a room someone holds
        secondAgentCalls++;
        if (secondAgentExamples.length < 5) secondAgentExamples.push(`room ${a.room_id} session ${a.session} → agent ${a.agent_id}`);
        implicate(a.room_id, 'assign call for a room another agent held');
      }
    }
    const twice = [...perSession].filter(([, e]) => e.fresh > 1 || e.agents.size > 1);
    // Every session the database recorded as assigned must have had a call for its room and agent that Qiscus
    // performed (a 200, or assigned-then-500), or at least answered 200 as a repeat.
    const performedPairs = new Set(
      sim.assignments.filter((a) => (a.status === 200 && !a.fault) || a.fault === 'acceptThenFail').map((a) => `${a.room_id}|${a.agent_id}`),
    );
    const assignedRows = await pool.query<{ room_id: string; agent_id: string; id: string }>(
      `select room_id, agent_id::text, id::text from allocator.sessions where assigned_at is not null`,
    );
    const assignedWithoutCall = assignedRows.rows.filter((x) => !performedPairs.has(`${x.room_id}|${x.agent_id}`));
    for (const x of assignedWithoutCall) implicate(x.room_id, 'assigned in the database without a call Qiscus performed');
    const violations = liveness.realViolations();
    // Routing: every reservation against the routes of its moment; every membership change in Qiscus against the
    // database's history (a change not there yet is waited for until its bound has passed).
    const routed = await judgeReservations(pool, routeVersions);
    for (const room of routed.violationRooms) implicate(room, "reserved for an agent its route did not allow");
    let membership = await judgeMembership(pool, initialDivisions, membershipChanges);
    while (
      membershipChanges.some((c, i) => membership.membershipLagMs[i] === null && Date.now() < c.at + MEMBERSHIP_PICKUP_MS)
    ) {
      await sleep(500);
      membership = await judgeMembership(pool, initialDivisions, membershipChanges);
    }
    const lags = membership.membershipLagMs;
    const lateChanges = membershipChanges
      .map((c, i) => ({ ...c, lag: lags[i] }))
      .filter((c) => c.lag === null || c.lag === undefined || c.lag > MEMBERSHIP_PICKUP_MS);
    // ---------- liveness figures ----------
    const firstCall = new Map<string, NonNullable<typeof tap.calls[number]>>();
    for (const c of tap.calls) {
      const k = `${c.room}#${String(c.session)}`;
      if (!firstCall.has(k)) firstCall.set(k, c);
    }
    const decidedByRoom = new Map<string, number[]>();
    for (const a of sim.assignments) {
      const xs = decidedByRoom.get(a.room_id) ?? [];
      xs.push(a.at);
      decidedByRoom.set(a.room_id, xs);
    }
    const toCall: number[] = [];
    /** Rooms of the sessions (with a free slot) slower than the p95 bound: their timelines when the check fails. */
    const slowRooms: string[] = [];
    /** Sessions (with a free slot) slower than the p95 bound, by the excuses their waits had (none: unexcused). */
    const slowBy: Record<string, number> = {};
    const toDecided: number[] = [];
    const toCallAll: number[] = [];
    let neverCalled = 0;
    for (const x of sessionLog) {
      const c = firstCall.get(`${x.room}#${x.session}`);
      if (!c) {
        neverCalled++;
        continue;
      }
      const d = Math.max(0, c.start - x.acceptedAt);
      toCallAll.push(d);
      if (!x.hadFreeSlot) continue;
      toCall.push(d);
      if (d > WEBHOOK_TO_ASSIGN_P95_MS) {
        slowRooms.push(x.room);
        const why = [...(liveness.roomExcuses.get(`${x.room}#${x.session}`) ?? [])].sort().join(' + ') || 'none';
        slowBy[why] = (slowBy[why] ?? 0) + 1;
      }
      const at = (decidedByRoom.get(x.room) ?? []).find((t) => t >= c.start);
      if (at !== undefined) toDecided.push(Math.max(0, at - x.acceptedAt));
    }
    const webhookToAssign = latencies(toCall);

    for (const room of overCapacity) implicate(room, 'on an agent over capacity');
    if (!(webhookToAssign.p95 <= WEBHOOK_TO_ASSIGN_P95_MS)) for (const room of slowRooms) implicate(room, 'webhook → assign call slower than the p95 bound');
    for (const [k] of twice) implicate(k.slice(0, k.lastIndexOf('#')), 'assigned twice in one session');
    for (const m of mismatches) implicate(/^room (\S+):/.exec(m)?.[1] ?? '', 'Qiscus and the database disagree');
    for (const v of violations) implicate(v.room, 'liveness: waited with a free agent');
    implicated.delete('');

    // Timelines of the rooms a check failed on: what the driver did, what Qiscus saw, what the database recorded.
    const forensics: string[] = [];
    const perCheck = new Map<string, number>();
    const chosen = [...implicated].filter(([, why]) => {
      const n = perCheck.get(why) ?? 0;
      perCheck.set(why, n + 1);
      return n < (why === 'on an agent over capacity' ? 2 * (capacity + 1) : 2); // a few rooms per failed check
    });
    for (const [room, why] of chosen) {
      const lines: Array<{ at: number; text: string }> = [...(events.get(room) ?? [])];
      for (const a of sim.assignments) {
        if (a.room_id !== room) continue;
        const what = a.status === 0 ? 'left hanging' : `answered ${a.status}${a.fault ? ` (${a.fault})` : ''}${a.repeat ? ' (repeat)' : ''}`;
        lines.push({ at: a.at, text: `qiscus: assign agent ${a.agent_id} → ${what}; session ${a.session}` });
      }
      for (const c of tap.calls) {
        if (c.room !== room) continue;
        lines.push({ at: c.start, text: `tap: call #${c.n} to agent ${c.agent} starts (driver session ${String(c.session)})` });
        if (c.end !== undefined) {
          const how = c.upstreamError ? 'Qiscus unreachable' : c.clientGone ? 'the listener went away' : `answer ${String(c.status)}`;
          lines.push({ at: c.end, text: `tap: call #${c.n} ends: ${how}` });
        }
      }
      for (const v of violations) {
        if (v.room !== room) continue;
        lines.push({ at: v.firstSeen, text: `watch: agent ${v.agent} free for the waiting room` });
        lines.push({ at: v.detectedAt, text: `watch: VIOLATION, still no call after ${(v.ageMs / 1000).toFixed(2)} s: ${v.counts}; db: ${v.db}` });
      }
      const ms = (col: string) => `(extract(epoch from ${col}) * 1000)::float8`;
      const wh = await pool.query<{ at: number; kind: string; outcome: string; session_id: string; id: string }>(
        `select ${ms('received_at')} as at, kind, outcome, session_id::text, id::text
         from allocator.webhooks where room_id = $1`,
        [room],
      );
      for (const w of wh.rows) lines.push({ at: w.at, text: `db: webhook #${w.id} ${w.kind} → ${w.outcome}, session ${w.session_id}` });
      const ss = await pool.query<Record<string, unknown> & { id: string; at: number }>(
        `select id::text, ${ms('queued_at')} as at, state::text, agent_id::text, prior_service_id::text,
                service_id::text, ${ms('assigned_at')} as assigned, ${ms('resolved_at')} as resolved,
                ${ms('failed_at')} as failed, last_error
         from allocator.sessions where room_id = $1`,
        [room],
      );
      for (const x of ss.rows) {
        lines.push({ at: x.at, text: `db: session ${x.id} queued (prior service ${String(x.prior_service_id)}); ends ${String(x.state)}, agent ${String(x.agent_id)}, service ${String(x.service_id)}` });
        if (x.assigned) lines.push({ at: Number(x.assigned), text: `db: session ${x.id} assigned` });
        if (x.resolved) lines.push({ at: Number(x.resolved), text: `db: session ${x.id} resolved` });
        if (x.failed) lines.push({ at: Number(x.failed), text: `db: session ${x.id} failed: ${String(x.last_error)}` });
      }
      const at = await pool.query<{ at: number; fin: number | null; id: string; session_id: string; agent_id: string; number: number; outcome: string | null; error: string | null }>(
        `select ${ms('a.reserved_at')} as at, ${ms('a.finished_at')} as fin, a.id::text, a.session_id::text,
                a.agent_id::text, a.number, a.outcome, a.error
         from allocator.attempts a join allocator.sessions s on s.id = a.session_id where s.room_id = $1`,
        [room],
      );
      for (const a of at.rows) {
        lines.push({ at: a.at, text: `db: attempt ${a.id} (session ${a.session_id}, #${a.number}) reserves agent ${a.agent_id}` });
        if (a.fin) lines.push({ at: a.fin, text: `db: attempt ${a.id} → ${String(a.outcome)}${a.error ? `: ${a.error.slice(0, 120)}` : ''}` });
      }
      if (lines.length) {
        const from = Math.min(...lines.map((l) => l.at));
        const to = Math.max(...lines.map((l) => l.at));
        for (const t of tap.pulls) if (t >= from && t <= to) lines.push({ at: t, text: 'tap: a listener pulls the roster' });
        for (const v of routeVersions) if (v.post >= from && v.pre <= to) lines.push({ at: v.pre, text: `routes changed: ${v.what}` });
        for (const c of membershipChanges) if (c.at >= from && c.at <= to) lines.push({ at: c.at, text: `Qiscus: agent ${c.agent} now in divisions {${c.divisions.join(',')}}` });
      }
      lines.sort((x, y) => x.at - y.at);
      forensics.push(`room ${room} (${why}):`);
      for (const l of lines.slice(0, 80)) forensics.push(`  ${((l.at - t0) / 1000).toFixed(3).padStart(8)} s  ${l.text}`);
    }

    const simFaults = sim.stats.faults;
    fault('Qiscus 5xx', simFaults.error);
    fault('Qiscus 429 + Retry-After', simFaults.rate429);
    fault('Qiscus hang (no answer)', simFaults.hang);
    fault('Qiscus assigned, then answered 500', simFaults.acceptThenFail);
    fault('Qiscus answer delayed (5-300 ms, or a spike)', simFaults.latency);
    fault('late copy of a webhook', customers.lateRedeliveries);
    faults['PostgreSQL seconds down'] = Math.round(pgDownMs / 100) / 10;

    const processes = slots.map((s) => ({
      name: s.name,
      kills: s.kills,
      starts: s.starts,
      alive: s.running && s.ready,
      errorLines: s.errorLines().length,
    }));
    const startFailures = slots.flatMap((s) => s.startFailures);
    const errorExamples = slots.flatMap((s) => s.errorLines().slice(0, 3).map((l) => `${s.name}: ${l.slice(0, 300)}`));

    const ms = (x: number) => (Number.isNaN(x) ? '-' : `${Math.round(x)} ms`);
    const lf = liveness.figures;

    const sample = (xs: string[]) => (xs.length ? xs.slice(0, 5).join('; ') + (xs.length > 5 ? `; … (${xs.length})` : '') : undefined);
    const checks: Check[] = [
      {
        name: 'accepted webhooks not applied',
        ok: notApplied.length === 0 && problems.length === 0,
        value: String(notApplied.length),
        detail: sample([...notApplied, ...problems]),
      },
      {
        name: 'late copies of accepted webhooks that changed something',
        ok: changedByCopy.length === 0,
        value: String(changedByCopy.length),
        detail: sample(changedByCopy),
      },
      {
        name: `highest load of any agent in Qiscus (capacity ${capacity})`,
        ok: sim.maxLoadSeenAll() <= capacity,
        value: String(sim.maxLoadSeenAll()),
        detail:
          sim.maxLoadSeenAll() > capacity
            ? sim
                .agents()
                .filter((a) => sim!.maxLoadSeen(a.id) > capacity)
                .map((a) => `agent ${a.id}: ${sim!.maxLoadSeen(a.id)}`)
                .join(', ')
            : undefined,
      },
      {
        name: 'rooms assigned twice in one session',
        ok: twice.length === 0,
        value: String(twice.length),
        detail: sample(twice.map(([k, e]) => `${k}: ${e.fresh} fresh assignments, agents ${[...e.agents].join(',')}`)),
      },
      {
        name: 'assign calls for a room another agent held',
        ok: secondAgentCalls === 0,
        value: String(secondAgentCalls),
        detail: sample(secondAgentExamples),
      },
      {
        name: 'sessions assigned in the database without a call Qiscus performed',
        ok: assignedWithoutCall.length === 0,
        value: String(assignedWithoutCall.length),
        detail: sample(assignedWithoutCall.map((x) => `room ${x.room_id} session ${x.id} → agent ${x.agent_id}`)),
      },
      {
        name: 'Qiscus and the database disagree on an open room',
        ok: mismatches.length === 0,
        value: String(mismatches.length),
        detail: sample(mismatches),
      },
      {
        name: 'drained: every session resolved or failed',
        ok: drained && (states.waiting ?? 0) + (states.reserved ?? 0) + (states.assigned ?? 0) === 0,
        value: drained ? `yes (${drainSeconds.toFixed(1)} s)` : 'no',
        detail: drained ? undefined : `states ${JSON.stringify(states)}; ${inflight.size} webhooks in flight`,
      },
      {
        name: 'allocator.check_invariants()',
        ok: invariants.rows.length === 0,
        value: invariants.rows.length === 0 ? 'empty' : `${invariants.rows.length} rows`,
        detail: sample(invariants.rows.map((x) => `${x.problem}: ${x.detail}`)),
      },
      {
        name: 'agent load back to zero (database and Qiscus)',
        ok: loads.rows[0]!.load === 0 && sim.agents().every((a) => a.rooms.length === 0),
        value: `${loads.rows[0]!.load} / ${sim.agents().reduce((n, a) => n + a.rooms.length, 0)}`,
        detail: leftLoad.rows.length ? leftLoad.rows.map((a) => `agent ${a.id}: our_load ${a.our_load}`).join(', ') : undefined,
      },
      {
        name: "routed rooms reserved only for agents of their route's divisions (or overflowed, or no route)",
        ok: routed.violations.length === 0,
        value: `${routed.violations.length} of ${Object.values(routed.reservations).reduce((a, b) => a + b, 0) + routed.violations.length} reservations`,
        detail: sample(routed.violations),
      },
      {
        name: `division membership changes in Qiscus in the database within ${MEMBERSHIP_PICKUP_MS / 1000} s`,
        ok: lateChanges.length === 0,
        value: `${membershipChanges.length - lateChanges.length} of ${membershipChanges.length} (longest ${
          lags.length ? `${(Math.max(...lags.map((x) => x ?? Infinity)) / 1000).toFixed(1)} s` : '-'
        })`,
        detail: sample(lateChanges.map((c) => `agent ${c.agent} → {${c.divisions.join(',')}} at ${((c.at - t0) / 1000).toFixed(1)} s: ${c.lag == null ? 'never' : `${(c.lag / 1000).toFixed(1)} s`}`)),
      },
      {
        name: `liveness: a waiting room with a free agent gets its assign call within ${BOUND_MS / 1000} s`,
        ok: violations.length === 0,
        value: `${violations.length} violations (${lf.conditions} conditions seen, longest unexcused wait ${(lf.maxAgeMs / 1000).toFixed(2)} s)`,
        detail: violations.length
          ? violations
              .slice(0, 8)
              .map((v) => `room ${v.room} / agent ${v.agent}${v.agents.length > 1 ? ` (free too: ${v.agents.slice(1).join(', ')})` : ''} [${v.cause}] (${v.context}): no call for ${(v.ageMs / 1000).toFixed(2)} s; ${v.counts}; calls: ${v.calls}; db: ${v.db}`)
              .join('\n       ') + (violations.length > 8 ? `\n       … (${violations.length})` : '')
          : undefined,
      },
      {
        name: `webhook 2xx → assign call, p95 ≤ ${WEBHOOK_TO_ASSIGN_P95_MS / 1000} s (sessions that found a free slot)`,
        ok: webhookToAssign.n > 0 && webhookToAssign.p95 <= WEBHOOK_TO_ASSIGN_P95_MS,
        value: `${ms(webhookToAssign.p95)} (n ${webhookToAssign.n}; p50 ${ms(webhookToAssign.p50)}, p99 ${ms(webhookToAssign.p99)}, max ${ms(webhookToAssign.max)})`,
      },
      {
        name: `settled within ${SETTLE_MS / 1000} s after the traffic stopped`,
        ok: settleMs !== null && settleMs <= SETTLE_MS,
        value: settleMs === null ? 'never' : `${(settleMs / 1000).toFixed(2)} s`,
      },
      {
        name: 'processes (re)started and serving within 30 s',
        ok: startFailures.length === 0,
        value: `${startFailures.length} failed`,
        detail: sample(startFailures),
      },
      {
        name: 'web and listener processes alive at the end',
        ok: processes.every((p) => p.alive),
        value: `${processes.filter((p) => p.alive).length}/${processes.length}`,
      },
      {
        name: 'error lines in process logs',
        ok: errorExamples.length === 0,
        value: String(processes.reduce((n, p) => n + p.errorLines, 0)),
        detail: sample(errorExamples),
      },
    ];

    const report: ChaosReport = {
      seed,
      startedAt: t0,
      load: { start: loadAtStart, end: os.loadavg()[0]!, cores: os.cpus().length },
      chaosSeconds,
      drainSeconds,
      drained,
      agents: nAgents,
      capacity,
      customers,
      webhooks: {
        sent,
        accepted: accepted.size,
        acceptedByKind: countBy([...accepted.values()], (a) => a.kind),
        notAccepted,
        outcomes,
        rows: rows.rows.length,
        acceptedNotApplied: notApplied.length,
        appliedWithout200,
      },
      sessions: {
        opened,
        assigned: everAssigned,
        resolved: states.resolved ?? 0,
        failed: states.failed ?? 0,
        cancelled: states.cancelled ?? 0,
        open: (states.waiting ?? 0) + (states.reserved ?? 0) + (states.assigned ?? 0),
        failedReasons: Object.fromEntries(reasons.rows.map((x) => [x.reason, x.n])),
      },
      qiscus: {
        assignCalls,
        maxLoadSeen: sim.maxLoadSeenAll(),
        roomsAssignedTwice: twice.length,
        secondAgentCalls,
        reopenedAfterResolution: reopened,
        countedExternal,
      },
      faults,
      routing: {
        ...routed,
        ...membership,
        routeChanges: routeVersions.length - 1,
        membershipChanges: faults['division membership changed in Qiscus'] ?? 0,
        divisions: Object.entries(DIVISIONS).map(
          ([id, name]) => `${name} (${id}): agents ${sim!.agents().filter((a) => initialDivisions(a.id).includes(Number(id))).map((a) => a.id).join(', ')}`,
        ),
      },
      processes,
      liveness: {
        ...lf,
        violations,
        settleMs,
        webhookToAssign,
        webhookToAssignDecided: latencies(toDecided),
        webhookToAssignAll: latencies(toCallAll),
        sessionsWithoutCall: neverCalled,
        slowSessionsByExcuse: slowBy,
      },
      checks,
      ok: checks.every((c) => c.ok),
      forensics,
    };
    return report;
  } finally {
    globalThis.fetch = realFetch;
    watch?.stop();
    await Promise.allSettled(slots.map((s) => s.stop()));
    await tap?.close().catch(() => {});
    await sim?.close().catch(() => {});
    await pool?.end().catch(() => {});
    await srv?.stop().catch(() => {});
    // CHAOS_KEEP_DATA=1 keeps the database's files for a look afterwards (start it with startEmbeddedPostgres).
    if (process.env.CHAOS_KEEP_DATA) log(`[chaos] database files kept in ${dataDir}`);
    else await rm(path.dirname(dataDir), { recursive: true, force: true }).catch(() => {});
  }
}

export interface Latencies {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
}

function latencies(xs: number[]): Latencies {
  return { n: xs.length, p50: percentile(xs, 50), p95: percentile(xs, 95), p99: percentile(xs, 99), max: xs.length ? Math.max(...xs) : NaN };
}

function countBy<T>(xs: T[], key: (x: T) => string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const x of xs) out[key(x)] = (out[key(x)] ?? 0) + 1;
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// Printing
// ------------------------------------------------------------------------------------------------------------------

export function formatReport(r: ChaosReport): string {
  const out: string[] = [];
  const row = (k: string, v: string | number) => out.push(`  ${k.padEnd(58)} ${v}`);
  const table = (o: Record<string, number>) =>
    Object.entries(o)
      .sort((a, b) => b[1] - a[1])
      .forEach(([k, v]) => row(`  ${k}`, v));
  out.push(`chaos run: seed ${r.seed}, ${r.chaosSeconds.toFixed(0)} s of chaos, ${r.drainSeconds.toFixed(1)} s to heal and drain`);
  out.push(`  ${r.agents} agents of capacity ${r.capacity}; 2 web and 3 listener processes; the Qiscus simulator on loopback`);
  out.push(`  machine: ${r.load.cores} cores, load average ${r.load.start.toFixed(1)} at the start, ${r.load.end.toFixed(1)} at the end`);
  out.push('customers');
  row('rooms (new customers)', r.customers.rooms);
  row('returning customers (same room, new session)', r.customers.returning);
  row('repeated allocation webhooks (customer wrote again)', r.customers.duplicateMessages);
  row('allocation webhooks sent again after no 200', r.customers.resentNewRequests);
  row('resolutions sent again after no 200', r.customers.resentResolutions);
  row('rooms resolved within 0.1-0.5 s of their assignment', r.customers.fastResolutions);
  row('customers back within a second of their resolution', r.customers.fastReturns);
  out.push('webhooks');
  row('sent', r.webhooks.sent);
  row('accepted (200)', `${r.webhooks.accepted} (${Object.entries(r.webhooks.acceptedByKind).map(([k, v]) => `${k} ${v}`).join(', ')})`);
  row('rows in allocator.webhooks', r.webhooks.rows);
  row('applied, but the 200 was lost (process killed)', r.webhooks.appliedWithout200);
  row('accepted but not applied', r.webhooks.acceptedNotApplied);
  out.push('  not accepted, by answer:');
  table(r.webhooks.notAccepted);
  out.push('  accepted, by outcome:');
  table(r.webhooks.outcomes);
  out.push('sessions');
  row('opened', r.sessions.opened);
  row('assigned', r.sessions.assigned);
  row('resolved', r.sessions.resolved);
  row('failed', r.sessions.failed);
  for (const [k, v] of Object.entries(r.sessions.failedReasons)) row(`  ${k.slice(0, 48)}`, v);
  if (r.sessions.cancelled) row('cancelled', r.sessions.cancelled);
  row('still open', r.sessions.open);
  out.push('Qiscus (simulator)');
  row(`highest load of any agent (capacity ${r.capacity})`, r.qiscus.maxLoadSeen);
  row('rooms assigned twice in one session', r.qiscus.roomsAssignedTwice);
  row('assign calls for a room another agent held', r.qiscus.secondAgentCalls);
  row('rooms held again after their resolution', r.qiscus.reopenedAfterResolution);
  row('  of them counted by the database on their agent at the end', r.qiscus.countedExternal);
  out.push('  assign_agent calls, by answer:');
  table(r.qiscus.assignCalls);
  out.push('faults injected');
  table(r.faults);
  const ro = r.routing;
  out.push('routing by division');
  for (const d of ro.divisions) row(`  ${d.split(':')[0]!}`, d.split(': ')[1]!);
  row('routes changed while rooms waited / membership changes in Qiscus', `${ro.routeChanges} / ${ro.membershipChanges}`);
  const lagged = ro.membershipLagMs.filter((x): x is number => x !== null);
  row(
    'membership changes in the database after (max, of agents)',
    `${lagged.length ? `${(Math.max(...lagged) / 1000).toFixed(1)} s` : '-'} (${lagged.length} of ${ro.membershipLagMs.length})`,
  );
  row('the database went back to an older membership', ro.membershipReverted.length);
  for (const x of ro.membershipReverted.slice(0, 3)) out.push(`    ${x}`);
  out.push('  reservations, by what allowed them:');
  table(ro.reservations);
  if (ro.violations.length) row('  NOT allowed by the route', ro.violations.length);
  out.push('  assignments, by what allowed their reservation:');
  table(ro.assigned);
  out.push('processes');
  for (const p of r.processes) row(p.name, `${p.alive ? 'alive' : 'DEAD'}, killed ${p.kills}, started ${p.starts}, error lines ${p.errorLines}`);
  const lv = r.liveness;
  const ms = (x: number) => (Number.isNaN(x) ? '-' : `${Math.round(x)} ms`);
  const lat = (l: Latencies) => `p50 ${ms(l.p50)}, p95 ${ms(l.p95)}, p99 ${ms(l.p99)}, max ${ms(l.max)} (n ${l.n})`;
  out.push('liveness');
  row('webhook 2xx → assign call (sessions with a free slot)', lat(lv.webhookToAssign));
  row('webhook 2xx → Qiscus decided it (same, with its latency)', lat(lv.webhookToAssignDecided));
  row('webhook 2xx → assign call (every session, queueing too)', lat(lv.webhookToAssignAll));
  if (Object.keys(lv.slowSessionsByExcuse).length) {
    out.push(`  sessions with a free slot called later than ${WEBHOOK_TO_ASSIGN_P95_MS / 1000} s, by what held them (liveness.ts):`);
    table(lv.slowSessionsByExcuse);
  }
  row('sessions accepted that never had an assign call', lv.sessionsWithoutCall);
  row('settle time after the traffic stopped', lv.settleMs === null ? 'never' : `${(lv.settleMs / 1000).toFixed(2)} s`);
  row(`(room, free agent) conditions seen / served within ${BOUND_MS / 1000} s`, `${lv.conditions} / ${lv.servedWithinBound}`);
  row('longest unexcused wait of a room with a free agent', `${(lv.maxAgeMs / 1000).toFixed(2)} s`);
  row('violations (rooms the database gave up on, apart)', `${lv.violations.length} (${lv.gaveUp.length})`);
  if (lv.violations.length) {
    out.push('  violations, by what the database showed (liveness.ts, causeOf):');
    table(countBy(lv.violations, (v) => v.cause));
  }
  out.push('  conditions excused, by excuse (see liveness.ts):');
  table(lv.excused);
  row('samples / longest gap between two / driver stalls', `${lv.samples} / ${lv.maxSampleGapMs} ms / ${lv.stalls}`);
  row('samples with the database probe over 0.5 s / slowest probe', `${lv.slowDatabase} / ${lv.maxProbeMs} ms`);
  out.push('checks');
  for (const c of r.checks) {
    out.push(`  ${c.ok ? 'ok  ' : 'FAIL'} ${c.name.padEnd(58)} ${c.value}`);
    if (!c.ok && c.detail) out.push(`       ${c.detail}`);
  }
  if (!r.ok && r.forensics.length) out.push('timelines of rooms behind the failed checks', ...r.forensics);
  out.push(r.ok ? 'all checks passed' : `${r.checks.filter((c) => !c.ok).length} check(s) FAILED (seed ${r.seed})`);
  return out.join('\n');
}

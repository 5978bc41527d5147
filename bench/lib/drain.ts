/**
 * One cold drain: BENCH_DRAIN_ROOMS (20,000) rooms already queued, BENCH_DRAIN_AGENTS (10,000) agents at the
 * default capacity 2 (so every room can go at once), the simulator answering at once; then the draining
 * process(es) start and we time from their spawn to the moment the last room's outcome is committed.
 *
 * Peers, each on a fresh clone of the migrated template:
 *   - listener(s): `src/listener/main.ts` as `npm run listener` runs it (LOG_LEVEL=warn, LISTENER_CONCURRENCY =
 *     BENCH_LISTENER_CONCURRENCY, default the shipped 32); the rooms are rows of allocator.sessions, the agents rows of
 *     allocator.agents (the listener's roster pull at start finds them all unchanged).
 *   - graphile-worker (bench/lib/gw-worker.ts): the same 20,000 assign calls as jobs (room i → agent ⌈i/2⌉, the
 *     pairs need no choosing), queued with graphile_worker.add_jobs; its task POSTs assign_agent with fetch.
 *
 * Clocks: the bench process's performance.now(). The simulator (in this process) notes the time of every
 * successful assign call; after the last one the database is polled every 20 ms until every outcome is durable
 * (sessions assigned / no job left). Rates:
 *   roomsPerSecond   rooms / (spawn → last outcome committed): the headline, startup included;
 *   steady           rooms / (first → last assign call);
 *   first5k, last5k  the rate of the first and of the last 5,000 assign calls (of those made, if the run timed
 *                    out): decay shows as last < first.
 * Options: analyze (ANALYZE after the rooms are created, as autovacuum would eventually; off = statistics that lag
 * a burst on a never-analysed database), snapshot (another session holds a REPEATABLE READ snapshot open on the
 * same database for the whole run: the xmin horizon is pinned, so nothing the drain deletes or updates can be
 * pruned or vacuumed meanwhile).
 */
import path from 'node:path';
import pg from 'pg';
import { DEFAULT_LISTENER_CONCURRENCY } from '../../src/config/index.ts';
import { runMigrations as gwMigrations, Logger as GwLogger } from 'graphile-worker';
import type { Simulator } from '../../src/simulator/qiscus-simulator.ts';
import { processTree, startCpu, type CpuReport } from './cpu.ts';
import { profileArgs } from './cpuprofile.ts';
import { holdSnapshot, releaseSnapshot, type BenchDatabase } from './db.ts';
import { loggedPlans, logOffset, pgssReset, pgssTop, type LoggedPlan, type PgssRow } from './pgss.ts';
import { root, spawnService, type Service } from './procs.ts';
import type { BenchContext, Goal } from './results.ts';
import { APP_ID, baseEnv, INSERT_AGENTS_SQL, INSERT_DIVISIONS_SQL, SECRET_KEY, startSim } from './stack.ts';
import { envInt, round, Samples, sleep } from './stats.ts';


export type Peer = { kind: 'listener'; listeners: number } | { kind: 'gw'; batched: boolean };

export interface DrainOptions {
  rooms: number;
  agents: number;
  /** LISTENER_CONCURRENCY of each listener. */
  listenerConcurrency: number;
  /** graphile-worker's concurrentJobs. */
  gwConcurrency: number;
  analyze: boolean;
  snapshot: boolean;
  /** Routing (issue 13): this many divisions, a route per division by channel, four rooms in five routed (one
   * per division in turn), the rest for anyone; every agent in one division, one in ten in two. 0: no routes. */
  divisions: number;
  /** Give up after this long (the run is then reported as incomplete, with what was done). */
  timeoutMs: number;
  /** The roster was pulled a moment before (allocator.roster_pulls), as a listener that ran before this one, or
   * runs beside it, leaves it: the listener serves at once and pulls beside its first calls (a restart, a deploy, a
   * listener added). Off: a first start, the roster pulled before the first call. */
  rosterPulled: boolean;
}

export function drainOptions(over: Partial<DrainOptions> = {}): DrainOptions {
  const rooms = envInt('BENCH_DRAIN_ROOMS', 20_000);
  return {
    rooms,
    agents: envInt('BENCH_DRAIN_AGENTS', Math.ceil(rooms / 2)),
    listenerConcurrency: envInt('BENCH_LISTENER_CONCURRENCY', DEFAULT_LISTENER_CONCURRENCY),
    gwConcurrency: envInt('BENCH_GW_CONCURRENCY', 10),
    analyze: true,
    snapshot: false,
    divisions: 0,
    timeoutMs: envInt('BENCH_DRAIN_TIMEOUT_SECONDS', 240) * 1000,
    rosterPulled: true,
    ...over,
  };
}

export interface DrainRun {
  label: string;
  peer: Peer;
  analyzed: boolean;
  snapshot: boolean;
  rooms: number;
  rosterPulled: boolean;
  /** Rooms whose outcome was committed (all of them unless the run timed out). */
  done: number;
  completed: boolean;
  /** Spawn → last outcome committed. */
  seconds: number;
  roomsPerSecond: number;
  /** Spawn → first assign call (process start, roster pull, first reservation or fetch). */
  startupSeconds: number | null;
  steadyRoomsPerSecond: number | null;
  first5kRoomsPerSecond: number | null;
  last5kRoomsPerSecond: number | null;
  /** last5k / first5k. */
  decay: number | null;
  /** Last assign call → every outcome committed. */
  commitLagMs: number | null;
  cpu: CpuReport;
  /** Milliseconds of CPU per room, by process group (peer = the listener(s) or graphile-worker). */
  cpuMsPerRoom: Record<string, number | null>;
  /**
   * Transactions committed or rolled back in the run's database per room (pg_stat_database, which PostgreSQL
   * flushes within a second): how many round trips the peer made per room. For the intermittent slow rounds of two
   * listeners: more calls per room (wake-ups that find nothing) or the same calls, each dearer.
   */
  transactionsPerRoom: number | null;
  /** Tables that autovacuum analysed or vacuumed during the run, and when (seconds after it began; a replan follows). */
  autovacuum: string[];
  memory: Array<{ name: string; peakMiB: number | null }>;
  checks: Record<string, number | boolean | null>;
  /** BENCH_PGSS=1: the costliest statements of the run (also in bench/results/profiles/<label>-pgss.txt). */
  pgss?: PgssRow[];
  /** BENCH_AUTO_EXPLAIN: sampled plans by statement (also in bench/results/profiles/<label>-plans.txt). */
  plans?: Array<Omit<LoggedPlan, 'worst'>>;
}

export function peerName(p: Peer): string {
  if (p.kind === 'listener') return `${p.listeners} listener${p.listeners > 1 ? 's' : ''}`;
  return p.batched ? 'graphile-worker, batched' : 'graphile-worker';
}

/** The time of every successful assign call, noted as the simulator logs it. */
function watchCalls(sim: Simulator) {
  const times = new Samples();
  let other = 0;
  const log = sim.assignments;
  const push = log.push.bind(log);
  log.push = (...items) => {
    const t = performance.now();
    for (const e of items) {
      if (e.status !== 200 || e.repeat) other++;
      else times.push(t);
    }
    return push(...items);
  };
  return { times, ok: () => times.length, other: () => other };
}

const quietGwLogger = new GwLogger(() => () => {});

/** Creates the rooms (or jobs) and agents, before any clock starts. */
async function prepare(c: pg.Client, db: BenchDatabase, peer: Peer, o: DrainOptions): Promise<void> {
  if (peer.kind === 'listener') {
    await c.query(INSERT_AGENTS_SQL, [1, o.agents]);
    if (o.rosterPulled) {
      await c.query(`update allocator.roster_pulls set started_at = clock_timestamp(), agents = $1`, [o.agents]);
    }
    if (o.divisions > 0) {
      await c.query(INSERT_DIVISIONS_SQL, [o.agents, o.divisions]);
      await c.query(`insert into allocator.routes (channel_id, division_ids)
                     select g, array[g] from generate_series(1, $1::int) g`, [o.divisions]);
    }
    await c.query(
      `insert into allocator.sessions (room_id, source, channel_id, queued_at)
       select (3000000000 + g)::text, 'qiscus', case when $2::int > 0 and g % 5 <> 0 then (g % $2::int) + 1 end,
              clock_timestamp()
       from generate_series(1, $1::int) g`,
      [o.rooms, o.divisions],
    );
  } else {
    await gwMigrations({ connectionString: db.url, logger: quietGwLogger });
    await c.query(
      `select count(*) from graphile_worker.add_jobs(array(
         select row('assign', json_build_object('room_id', (3000000000 + g)::text, 'agent_id', (g + 1) / 2),
                    null, null, null, null, null, null)::graphile_worker.job_spec
         from generate_series(1, $1::int) g order by g))`,
      [o.rooms],
    );
  }
  if (o.analyze) await c.query('analyze');
  // Start every run from a clean checkpoint, so none of them pays for the previous one's writes.
  await c.query('checkpoint').catch(() => {});
}

async function durableCount(c: pg.Client, peer: Peer, rooms: number): Promise<number> {
  if (peer.kind === 'listener') {
    const r = await c.query<{ n: number }>(`select count(*)::int as n from allocator.sessions where state = 'assigned'`);
    return r.rows[0]!.n;
  }
  const r = await c.query<{ n: number }>(`select count(*)::int as n from graphile_worker._private_jobs`);
  return rooms - r.rows[0]!.n;
}

async function checksFor(
  c: pg.Client,
  peer: Peer,
  sim: Simulator,
  calls: { ok: number; other: number },
): Promise<Record<string, number>> {
  if (peer.kind === 'listener') {
    const r = await c.query<Record<string, number>>(
      `select (select count(*)::int from allocator.sessions where state = 'assigned') as assigned,
              (select count(*)::int from allocator.attempts where outcome is distinct from 'assigned') as failed_attempts,
              (select count(*)::int from allocator.check_invariants()) as problems,
              (select autoanalyze_count::int from pg_stat_user_tables where relid = 'allocator.sessions'::regclass) as "sessionsAutoanalyzed",
              (select autoanalyze_count::int from pg_stat_user_tables where relid = 'allocator.agents'::regclass) as "agentsAutoanalyzed",
              (select autovacuum_count::int from pg_stat_user_tables where relid = 'allocator.sessions'::regclass) as "sessionsAutovacuumed"`,
    );
    return { ...r.rows[0]!, okCalls: calls.ok, otherCalls: calls.other, simMaxLoadSeen: sim.maxLoadSeenAll() };
  }
  const r = await c.query<{ left: number; retried: number }>(
    `select count(*)::int as left, count(*) filter (where attempts > 1)::int as retried from graphile_worker._private_jobs`,
  );
  return { jobsLeft: r.rows[0]!.left, okCalls: calls.ok, otherCalls: calls.other, simMaxLoadSeen: sim.maxLoadSeenAll() };
}

function spawnPeer(peer: Peer, db: BenchDatabase, sim: Simulator, o: DrainOptions): Service[] {
  const env = baseEnv({ databaseUrl: db.url, sim, env: { LISTENER_CONCURRENCY: String(o.listenerConcurrency) } });
  if (peer.kind === 'listener') {
    return Array.from({ length: peer.listeners }, (_, i) =>
      spawnService(`listener-${i + 1}`, 'src/listener/main.ts', env, profileArgs()),
    );
  }
  return [
    spawnService(
      peer.batched ? 'graphile-worker-batched' : 'graphile-worker',
      path.join(root, 'bench', 'lib', 'gw-worker.ts'),
      {
        DATABASE_URL: db.url,
        QISCUS_BASE_URL: sim.url,
        QISCUS_APP_ID: APP_ID,
        QISCUS_SECRET_KEY: SECRET_KEY,
        GW_CONCURRENCY: String(o.gwConcurrency),
        GW_BATCHED: peer.batched ? '1' : '0',
      },
      profileArgs(),
    ),
  ];
}

const perSecond = (n: number, ms: number) => (Number.isFinite(ms) && ms > 0 ? Math.round((n * 1000) / ms) : null);

export async function drainRun(ctx: BenchContext, peer: Peer, o: DrainOptions, label: string): Promise<DrainRun> {
  const db = await ctx.server.createDatabase(label);
  const c = new pg.Client({ connectionString: db.url, application_name: 'allocator-bench' });
  await c.connect();
  const sim = await startSim(o.agents, peer.kind === 'listener' ? o.divisions : 0);
  let snap: pg.Client | null = null;
  let procs: Service[] = [];
  try {
    await prepare(c, db, peer, o);
    if (o.snapshot) snap = await holdSnapshot(db.url);
    await pgssReset(c);
    const transactions = () =>
      c
        .query<{ n: string }>(
          `select pg_stat_force_next_flush(), (select xact_commit + xact_rollback from pg_stat_database
                                               where datname = current_database()) as n`,
        )
        .then((r) => Number(r.rows[0]!.n));
    const transactionsBefore = await transactions();
    const runStart = (await c.query<{ t: Date }>(`select clock_timestamp() as t`)).rows[0]!.t;
    const logFrom = logOffset(ctx.server.logFile);
    const watch = watchCalls(sim);
    const pgPids = () => (ctx.server.postmasterPid ? processTree(ctx.server.postmasterPid) : []);
    const cpu = startCpu({
      peer: () => procs.map((p) => p.pid),
      postgres: pgPids,
      'bench+simulator': () => [process.pid],
    });
    const t0 = performance.now();
    procs = spawnPeer(peer, db, sim, o);
    const deadline = t0 + o.timeoutMs;
    let done = 0;
    let completed = false;
    let end = NaN;
    // BENCH_DRAIN_ANALYZE_AT=n: one ANALYZE of the hot tables once n calls were made (what autovacuum does at a
    // moment it chooses): the statistics of a half-drained queue, and every cached plan made again from them.
    let analyzeAt = envInt('BENCH_DRAIN_ANALYZE_AT', 0);
    for (;;) {
      if (analyzeAt > 0 && watch.ok() >= analyzeAt) {
        analyzeAt = 0;
        const tables = peer.kind === 'listener' ? 'allocator.sessions, allocator.agents, allocator.attempts' : 'graphile_worker._private_jobs';
        const verb = process.env.BENCH_DRAIN_ANALYZE_VERB === 'vacuum analyze' ? 'vacuum analyze' : 'analyze';
        await c.query(`${verb} ${tables}`);
      }
      for (const p of procs) {
        if (p.child.exitCode !== null || p.child.signalCode !== null) {
          throw new Error(`${p.name} exited:\n${p.lines.slice(-20).join('\n')}`);
        }
      }
      const allCalled = watch.ok() >= o.rooms;
      if (allCalled) {
        done = await durableCount(c, peer, o.rooms);
        if (done >= o.rooms) {
          end = performance.now();
          completed = true;
          break;
        }
      }
      if (performance.now() > deadline) {
        done = await durableCount(c, peer, o.rooms);
        end = performance.now();
        break;
      }
      await sleep(allCalled ? 20 : 100);
    }
    const cpuReport = cpu.stop();
    const memory = procs.map((p) => ({ name: p.name, peakMiB: p.memory().peak }));
    await Promise.all(procs.map((p) => p.stop()));
    await sleep(1100); // the peers' last statistics reach pg_stat_database
    const transactionsPerRoom = done > 0 ? round(((await transactions()) - transactionsBefore) / done) : null;
    const autovacuum = (
      await c.query<{ t: string }>(
        `select relname || ' ' || concat_ws(', ',
                                            case when last_autoanalyze >= $1 then format('analyze at %s s',
                                              round(extract(epoch from last_autoanalyze - $1)::numeric, 1)) end,
                                            case when last_autovacuum >= $1 then format('vacuum at %s s',
                                              round(extract(epoch from last_autovacuum - $1)::numeric, 1)) end) as t
         from pg_stat_user_tables
         where schemaname in ('allocator', 'graphile_worker')
           and greatest(last_autoanalyze, last_autovacuum) >= $1
         order by relname`,
        [runStart],
      )
    ).rows.map((r) => r.t);
    if (snap) {
      await releaseSnapshot(snap);
      snap = null;
    }
    const pgss = await pgssTop(c, db.name);
    const plans = loggedPlans(ctx.server.logFile, logFrom, db.name);
    const checks = await checksFor(c, peer, sim, { ok: watch.ok(), other: watch.other() });
    const perRoom = (group: string) => {
      const cores = cpuReport.cores[group];
      return cores == null || done === 0 ? null : round((cores * cpuReport.wallSeconds * 1000) / done);
    };
    // First and last 5,000 of the calls made (of all of them, unless the run timed out).
    const t = watch.times.values();
    const n = t.length;
    const k = Math.min(5000, Math.floor(n / 4));
    const first = k > 1 ? perSecond(k - 1, t[k - 1]! - t[0]!) : null;
    const last = k > 1 ? perSecond(k - 1, t[n - 1]! - t[n - k]!) : null;
    return {
      label,
      peer,
      analyzed: o.analyze,
      snapshot: o.snapshot,
      rooms: o.rooms,
      rosterPulled: o.rosterPulled,
      done,
      completed,
      seconds: round((end - t0) / 1000),
      roomsPerSecond: Math.round((done * 1000) / (end - t0)),
      startupSeconds: n > 0 ? round((t[0]! - t0) / 1000) : null,
      steadyRoomsPerSecond: n > 1 ? perSecond(n - 1, t[n - 1]! - t[0]!) : null,
      first5kRoomsPerSecond: first,
      last5kRoomsPerSecond: last,
      decay: first && last ? round(last / first) : null,
      commitLagMs: completed && n > 0 ? round(end - t[n - 1]!) : null,
      cpu: cpuReport,
      cpuMsPerRoom: { peer: perRoom('peer'), postgres: perRoom('postgres'), 'bench+simulator': perRoom('bench+simulator') },
      transactionsPerRoom,
      autovacuum,
      memory,
      checks,
      ...(pgss ? { pgss: pgss.slice(0, 15) } : {}),
      ...(plans ? { plans: plans.slice(0, 15).map(({ worst: _w, ...p }) => p) } : {}),
    };
  } finally {
    await Promise.all(procs.map((p) => p.stop()));
    if (snap) await snap.end().catch(() => {});
    await sim.close();
    await c.end();
    await db.drop();
  }
}

/** One line for the log. */
export function describe(r: DrainRun): string {
  const cpu = Object.entries(r.cpuMsPerRoom)
    .map(([k, v]) => `${k} ${v ?? '—'}`)
    .join(', ');
  return (
    `${peerName(r.peer)}${r.snapshot ? ' + snapshot' : ''}${r.analyzed ? '' : ' (no ANALYZE)'}` +
    `${r.peer.kind === 'listener' && !r.rosterPulled ? ' (first start)' : ''}: ` +
    `${r.roomsPerSecond} rooms/s (${r.done}/${r.rooms} in ${r.seconds} s${r.completed ? '' : ', TIMED OUT'}; ` +
    `startup ${r.startupSeconds} s, steady ${r.steadyRoomsPerSecond}/s, first 5k ${r.first5kRoomsPerSecond}/s, ` +
    `last 5k ${r.last5kRoomsPerSecond}/s); CPU ms/room: ${cpu}; transactions/room ${r.transactionsPerRoom ?? '—'}; ` +
    `autovacuum during it: ${r.autovacuum.length ? r.autovacuum.join(', ') : 'none'}; ` +
    `others ${r.cpu.othersCores} cores; ` +
    `peak RSS ${r.memory.map((m) => m.peakMiB).join('/')} MiB`
  );
}

/**
 * What every drain part checks of its runs: nothing broken (no agent over capacity in the simulator, no invariant
 * of check_invariants(), no failed attempt or call), and whether every run drained all its rooms in time. The
 * checks run after the draining processes were stopped (gracefully).
 */
export function drainChecks(part: string, runs: DrainRun[]): Goal[] {
  const listeners = runs.filter((r) => r.peer.kind === 'listener');
  const cut = runs.filter((r) => !r.completed);
  return [
    {
      part,
      goal: 'no agent over capacity, no invariant broken, no failed attempt',
      measured: Math.max(0, ...listeners.map((r) => Number(r.checks.problems ?? 0))),
      bound: '= 0 problems, max load ≤ 2',
      met:
        runs.every((r) => Number(r.checks.simMaxLoadSeen) <= 2 && r.checks.otherCalls === 0) &&
        // A run cut short stopped its listener mid-drain: a reservation it handed back is no failure.
        listeners.every((r) => r.checks.problems === 0 && (r.checks.failed_attempts === 0 || !r.completed)),
    },
    {
      part,
      goal: 'every run drained all its rooms within the time limit',
      measured: cut.length,
      bound: '= 0 runs cut short',
      met: cut.length === 0,
      note: cut.map((r) => `${peerName(r.peer)}${r.snapshot ? ' + snapshot' : ''}${r.analyzed ? '' : ' (no ANALYZE)'}: ${r.done}/${r.rooms} in ${r.seconds} s`).join('; ') || undefined,
    },
  ];
}

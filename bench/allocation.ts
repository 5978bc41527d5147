/**
 * 2. Allocation: BENCH_ALLOC_ROOMS (20,000) rooms waiting at once and enough agents that capacity is never the
 * limit; rooms assigned per second end to end (reserve in SQL, assign call to the simulator, confirm in SQL) by 1
 * and by 3 listener processes (LISTENER_CONCURRENCY = BENCH_LISTENER_CONCURRENCY, default 32, the production
 * default). Baseline from the same run: allocator.reserve() + allocator.confirm() in a tight SQL loop by as many
 * connections as the listeners keep calls in flight (8 and 24), with no HTTP and no listener.
 * Also the listeners' peak RSS (VmHWM) under this load, against their RSS when idle after start.
 *
 * The clock is PostgreSQL's: from the commit that makes the rooms visible to the last assigned_at.
 * Knobs: BENCH_ALLOC_ROOMS (20000), BENCH_ALLOC_AGENTS (0.6 × rooms, at the default max load of 2),
 * BENCH_LISTENER_CONCURRENCY (32, the shipped default).
 */
import pg from 'pg';
import { DEFAULT_LISTENER_CONCURRENCY } from '../src/config/index.ts';
import { processTree, startCpu, type CpuReport } from './lib/cpu.ts';
import { profileArgs } from './lib/cpuprofile.ts';
import { connectClients, endClients } from './lib/db.ts';
import type { Service } from './lib/procs.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { INSERT_AGENTS_SQL, startListeners, startSim } from './lib/stack.ts';
import { envInt, ratio, round, sleep } from './lib/stats.ts';

interface RunResult {
  mode: string;
  concurrency: number;
  rooms: number;
  agents: number;
  /** From the commit of the rooms to the last assignment, PostgreSQL clock. */
  seconds: number;
  roomsPerSecond: number;
  assigned: number;
  failedAttempts: number;
  invariantProblems: number;
  simMaxLoadSeen?: number;
  simAssignCalls?: number;
  cpu: CpuReport;
  memory?: Array<{ name: string; idle: number | null; peak: number | null }>;
}

async function prepare(url: string, agents: number): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url, application_name: 'allocator-bench' });
  await c.connect();
  await c.query(INSERT_AGENTS_SQL, [1, agents]);
  await c.query('vacuum analyze allocator.agents');
  return c;
}

/** Inserts the rooms in one transaction; returns the database time right after they became visible. */
async function enqueue(c: pg.Client, rooms: number): Promise<Date> {
  await c.query('begin');
  await c.query(
    `insert into allocator.sessions (room_id, source, queued_at)
     select (3000000000 + g)::text, 'qiscus', clock_timestamp() from generate_series(1, $1::int) g`,
    [rooms],
  );
  // The statistics autovacuum would soon gather after such a burst, there from the start so every run plans alike.
  await c.query('analyze allocator.sessions');
  await c.query('commit');
  return (await c.query<{ t: Date }>('select clock_timestamp() as t')).rows[0]!.t;
}

/** Waits until every room is assigned; returns the database time of the last assignment. */
async function waitAssigned(c: pg.Client, rooms: number, procs: Service[], timeoutMs: number): Promise<Date> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const r = await c.query<{ n: number; failed: number; last: Date | null }>(
      `select count(*) filter (where state = 'assigned')::int as n,
              count(*) filter (where state = 'failed')::int as failed,
              max(assigned_at) as last
       from allocator.sessions`,
    );
    const row = r.rows[0]!;
    if (row.n + row.failed >= rooms) return row.last!;
    for (const p of procs) {
      if (p.child.exitCode !== null) throw new Error(`${p.name} exited:\n${p.lines.slice(-20).join('\n')}`);
    }
    if (Date.now() > end) throw new Error(`only ${row.n} of ${rooms} rooms assigned after ${timeoutMs} ms`);
    await sleep(200);
  }
}

async function outcomeChecks(c: pg.Client) {
  const r = await c.query<{ assigned: number; failed_attempts: number; problems: number }>(
    `select (select count(*)::int from allocator.sessions where state = 'assigned') as assigned,
            (select count(*)::int from allocator.attempts where outcome is distinct from 'assigned') as failed_attempts,
            (select count(*)::int from allocator.check_invariants()) as problems`,
  );
  return r.rows[0]!;
}

async function listenerRun(
  ctx: BenchContext,
  listeners: number,
  rooms: number,
  agents: number,
  concurrency: number,
): Promise<RunResult> {
  const db = await ctx.server.createDatabase(`alloc_l${listeners}`);
  const c = await prepare(db.url, agents);
  const sim = await startSim(agents);
  const procs = await startListeners(
    { databaseUrl: db.url, sim, env: { LISTENER_CONCURRENCY: String(concurrency) }, nodeArgs: profileArgs() },
    listeners,
  );
  // The listeners synced the roster from the simulator at start: every agent must still be there and online.
  const online = (
    await c.query<{ n: number }>(
      `select count(*)::int as n from allocator.agent_load where available and load < capacity`,
    )
  ).rows[0]!.n;
  if (online !== agents) throw new Error(`after the roster sync ${online} of ${agents} agents are available`);
  const idle = procs.map((p) => ({ name: p.name, rss: p.memory().rss }));

  const pgPids = () => (ctx.server.postmasterPid ? processTree(ctx.server.postmasterPid) : []);
  const cpu = startCpu({
    listeners: () => procs.map((p) => p.pid),
    'bench+simulator': () => [process.pid],
    postgres: pgPids,
  });
  const t0 = await enqueue(c, rooms);
  const last = await waitAssigned(c, rooms, procs, Math.max(120_000, rooms * 20));
  const cpuReport = cpu.stop();
  const memory = procs.map((p, i) => ({ name: p.name, idle: idle[i]!.rss, peak: p.memory().peak }));
  await Promise.all(procs.map((p) => p.stop()));
  const checks = await outcomeChecks(c);
  const seconds = (last.getTime() - t0.getTime()) / 1000;
  const okCalls = sim.assignments.filter((a) => a.status === 200 && !a.repeat).length;
  const result: RunResult = {
    mode: `${listeners} listener${listeners > 1 ? 's' : ''}`,
    concurrency: listeners * concurrency,
    rooms,
    agents,
    seconds: round(seconds),
    roomsPerSecond: Math.round(checks.assigned / seconds),
    assigned: checks.assigned,
    failedAttempts: checks.failed_attempts,
    invariantProblems: checks.problems,
    simMaxLoadSeen: sim.maxLoadSeenAll(),
    simAssignCalls: okCalls,
    cpu: cpuReport,
    memory,
  };
  await sim.close();
  await c.end();
  await db.drop();
  return result;
}

async function sqlRun(ctx: BenchContext, workers: number, rooms: number, agents: number): Promise<RunResult> {
  const db = await ctx.server.createDatabase(`alloc_sql${workers}`);
  const c = await prepare(db.url, agents);
  const conns = await connectClients(db.url, workers);
  // Plans warmed as in a long-running listener: one reserve on each connection with nothing waiting.
  await Promise.all(conns.map((w) => w.query('select * from allocator.reserve()')));
  const pgPids = () => (ctx.server.postmasterPid ? processTree(ctx.server.postmasterPid) : []);
  const cpu = startCpu({ bench: () => [process.pid], postgres: pgPids });
  const t0 = await enqueue(c, rooms);
  let service = 900_000_000;
  await Promise.all(
    conns.map(async (w) => {
      for (;;) {
        const r = await w.query<{ attempt_id: string }>('select attempt_id from allocator.reserve()');
        const row = r.rows[0];
        if (!row) return;
        await w.query('select allocator.confirm($1, $2)', [row.attempt_id, service++]);
      }
    }),
  );
  const cpuReport = cpu.stop();
  await endClients(conns);
  const last = await waitAssigned(c, rooms, [], 10_000);
  const checks = await outcomeChecks(c);
  const seconds = (last.getTime() - t0.getTime()) / 1000;
  await c.end();
  await db.drop();
  return {
    mode: `SQL loop, ${workers} connections`,
    concurrency: workers,
    rooms,
    agents,
    seconds: round(seconds),
    roomsPerSecond: Math.round(checks.assigned / seconds),
    assigned: checks.assigned,
    failedAttempts: checks.failed_attempts,
    invariantProblems: checks.problems,
    cpu: cpuReport,
  };
}

export async function runAllocation(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const rooms = envInt('BENCH_ALLOC_ROOMS', 20_000);
  const agents = envInt('BENCH_ALLOC_AGENTS', Math.ceil(rooms * 0.6));
  const concurrency = envInt('BENCH_LISTENER_CONCURRENCY', DEFAULT_LISTENER_CONCURRENCY);

  const runs: Record<string, RunResult> = {};
  const steps: Array<[string, () => Promise<RunResult>]> = [
    ['sql1', () => sqlRun(ctx, concurrency, rooms, agents)],
    ['l1', () => listenerRun(ctx, 1, rooms, agents, concurrency)],
    ['sql3', () => sqlRun(ctx, 3 * concurrency, rooms, agents)],
    ['l3', () => listenerRun(ctx, 3, rooms, agents, concurrency)],
  ];
  for (const [key, run] of steps) {
    ctx.log(`${key}: ${rooms} rooms, ${agents} agents ...`);
    const r = await run();
    runs[key] = r;
    ctx.log(`${r.mode}: ${r.roomsPerSecond} rooms/s (${r.seconds} s, ${r.assigned} assigned, problems ${r.invariantProblems})`);
  }
  const { l1, l3, sql1, sql3 } = runs as Record<'l1' | 'l3' | 'sql1' | 'sql3', RunResult>;
  const goalRatio = ratio(l3.roomsPerSecond, sql3.roomsPerSecond);
  const perRoom = (r: RunResult, group: string) => {
    const cores = r.cpu.cores[group];
    return cores == null || r.assigned === 0 ? null : round((cores * r.cpu.wallSeconds * 1000) / r.assigned);
  };
  const peak = (r: RunResult) => Math.max(...(r.memory ?? []).map((m) => m.peak ?? 0));
  const idleMax = (r: RunResult) => Math.max(...(r.memory ?? []).map((m) => m.idle ?? 0));

  return {
    name: 'allocation',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { rooms, agents, defaultMaxLoad: 2, listenerConcurrency: concurrency, agentSyncSeconds: 3600 },
    rows: [
      { part: 'allocation', what: 'rooms assigned/s, 1 listener', value: l1.roomsPerSecond, unit: 'rooms/s', baseline: `SQL reserve+confirm, ${sql1.concurrency} conns`, baselineValue: sql1.roomsPerSecond, ratio: ratio(l1.roomsPerSecond, sql1.roomsPerSecond) },
      { part: 'allocation', what: 'rooms assigned/s, 3 listeners', value: l3.roomsPerSecond, unit: 'rooms/s', baseline: `SQL reserve+confirm, ${sql3.concurrency} conns`, baselineValue: sql3.roomsPerSecond, ratio: goalRatio },
      { part: 'allocation', what: 'rooms assigned/s, 3 listeners', value: l3.roomsPerSecond, unit: 'rooms/s', baseline: 'same, 1 listener', baselineValue: l1.roomsPerSecond, ratio: ratio(l3.roomsPerSecond, l1.roomsPerSecond) },
      { part: 'allocation', what: 'PostgreSQL CPU per room, 3 listeners', value: perRoom(l3, 'postgres'), unit: 'ms', baseline: `same, SQL loop ${sql3.concurrency} conns`, baselineValue: perRoom(sql3, 'postgres'), ratio: ratio(perRoom(l3, 'postgres'), perRoom(sql3, 'postgres')) },
      { part: 'allocation', what: 'client CPU per room, 3 listeners', value: perRoom(l3, 'listeners'), unit: 'ms', baseline: 'pg client of the SQL loop', baselineValue: perRoom(sql3, 'bench'), ratio: ratio(perRoom(l3, 'listeners'), perRoom(sql3, 'bench')) },
      { part: 'memory', what: 'listener peak RSS, 1 listener', value: peak(l1), unit: 'MiB', baseline: 'listener RSS idle after start', baselineValue: idleMax(l1), ratio: ratio(peak(l1), idleMax(l1)) },
      { part: 'memory', what: 'listener peak RSS, max of 3', value: peak(l3), unit: 'MiB', baseline: 'listener RSS idle after start', baselineValue: idleMax(l3), ratio: ratio(peak(l3), idleMax(l3)) },
    ],
    goals: [
      {
        part: 'allocation',
        goal: '3 listeners ≥ ½ × tight-SQL rate (same concurrency)',
        measured: goalRatio,
        bound: '≥ 0.5',
        met: goalRatio === null ? null : goalRatio >= 0.5,
      },
      {
        part: 'allocation',
        goal: 'no agent over capacity, no invariant broken',
        measured: Math.max(l1.invariantProblems, l3.invariantProblems, sql1.invariantProblems, sql3.invariantProblems),
        bound: '= 0 problems, max load ≤ 2',
        met:
          [l1, l3, sql1, sql3].every((r) => r.invariantProblems === 0 && r.assigned === rooms) &&
          [l1, l3].every((r) => (r.simMaxLoadSeen ?? 0) <= 2),
      },
    ],
    details: { runs: [sql1, l1, sql3, l3] },
  };
}

if (isMain(import.meta.url)) await standalone(runAllocation, 'allocation');

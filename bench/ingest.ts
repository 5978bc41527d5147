/**
 * Ingest: allocation webhooks under a closed-loop load of BENCH_CONNECTIONS (64) webhooks in flight. Phases, each
 * on a fresh database, run back to back and alternated over BENCH_ROUNDS (3) rounds (order reversed every other
 * round); values are medians over rounds, ratios medians of the per-round ratios:
 *   - web: `npm run web` (HTTP → zod → group commit through allocator.accept_requests → 200), a new room per
 *     webhook;
 *   - plain (the peer of issue 12): bench/lib/plain-service.ts, node:http + pg, one INSERT per webhook into a table
 *     shaped like allocator.webhooks, the same pool size (10), no framework, validation or idempotence;
 *   - repeats: the web again, the allocation webhook repeated for BENCH_REPEAT_ROOMS (1,000) rooms already waiting
 *     (Qiscus sends it on every customer message until an agent is assigned): answered already_queued;
 *   - database limit: allocator.accept_new_request in a tight loop on BENCH_SQL_CLIENTS (10) connections, no HTTP;
 *   - HTTP limit: a bare Hono route (same @hono/node-server stack) with no validation and no database.
 * Also CPU per webhook of each process and the web process's peak RSS (VmHWM) against its RSS idle after start.
 *
 * Knobs: BENCH_SECONDS (10), BENCH_WARMUP_SECONDS (2), BENCH_CONNECTIONS (64), BENCH_SQL_CLIENTS (10),
 * BENCH_ROUNDS (3), BENCH_REPEAT_ROOMS (1000).
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { profileArgs } from './lib/cpuprofile.ts';
import { connectClients, endClients, pgssWanted, withClient, type BenchDatabase } from './lib/db.ts';
import { pgssReset, pgssTop, type PgssRow } from './lib/pgss.ts';
import { httpLoad, type LoadResult } from './lib/http-load.ts';
import { processTree, startCpu, type CpuGroups, type CpuReport } from './lib/cpu.ts';
import { PLAIN_TABLE_SQL } from './lib/plain-service.ts';
import type { Service } from './lib/procs.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { alternate, medianOf, medianRatio, pairRow } from './lib/rounds.ts';
import { newRequestBody, startBareHono, startPlainService, startSim, startWeb } from './lib/stack.ts';
import { envInt, envNum, round, roundSummary, Samples, summarize, type Summary } from './lib/stats.ts';

interface SqlLoadResult {
  clients: number;
  seconds: number;
  calls: number;
  rps: number;
  latencyMs: Summary;
  errors: number;
  /** Calls made, warm-up included. */
  sent: number;
}

/** Milliseconds of CPU per operation from a CpuReport group (null when not measured). */
function cpuPerOp(cpu: CpuReport, group: string, ops: number): number | null {
  const cores = cpu.cores[group];
  if (cores == null || ops === 0) return null;
  return round((cores * cpu.wallSeconds * 1000) / ops);
}

/** The database's limit: accept_new_request in a tight loop, one connection per worker. */
async function sqlLoop(
  url: string,
  clients: number,
  durationMs: number,
  warmupMs: number,
  cpuGroups: CpuGroups,
): Promise<SqlLoadResult & { cpu: CpuReport }> {
  const conns = await connectClients(url, clients);
  const cpu = startCpu(cpuGroups);
  const lat = new Samples();
  let calls = 0;
  let errors = 0;
  let seq = 0;
  const start = performance.now();
  const from = start + warmupMs;
  const until = from + durationMs;
  await Promise.all(
    conns.map(async (c) => {
      for (;;) {
        const t0 = performance.now();
        if (t0 >= until) return;
        const room = String(5_000_000_000 + seq++);
        try {
          await c.query('select outcome, session_id, webhook_id from allocator.accept_new_request($1::jsonb, $2::text)', [
            newRequestBody(room),
            randomUUID(),
          ]);
          const t1 = performance.now();
          if (t0 >= from && t1 <= until) {
            calls++;
            lat.push(t1 - t0);
          }
        } catch {
          errors++;
        }
      }
    }),
  );
  const cpuReport = cpu.stop(); // before the connections (and their backends) go
  await endClients(conns);
  return {
    cpu: cpuReport,
    clients,
    seconds: durationMs / 1000,
    calls,
    rps: Math.round(calls / (durationMs / 1000)),
    latencyMs: roundSummary(summarize(lat.values())),
    errors,
    sent: seq,
  };
}

/** A web-like service process under the closed-loop load: rate, latency, CPU per process, peak RSS. */
async function serviceLoad(
  proc: Service,
  url: string,
  o: { connections: number; durationMs: number; warmupMs: number; body: (i: number) => string; pgPids: () => number[] },
): Promise<ServiceRun> {
  const idle = proc.memory().rss;
  const cpu = startCpu({ loadgen: () => [process.pid], server: () => [proc.pid], postgres: o.pgPids });
  const r = await httpLoad({ url: `${url}/api/v1/new_request`, connections: o.connections, durationMs: o.durationMs, warmupMs: o.warmupMs, body: o.body });
  const cpuReport = cpu.stop();
  const peak = proc.memory().peak;
  await proc.stop();
  return { ...r, cpu: cpuReport, memory: { idle, peak } };
}

async function countRows(url: string, sql: string): Promise<number> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<{ n: number }>(sql)).rows[0]!.n;
  } finally {
    await c.end();
  }
}

type ServiceRun = LoadResult & {
  cpu: CpuReport;
  memory: { idle: number | null; peak: number | null };
  stored?: number;
  /** BENCH_PGSS=1: the costliest statements of the phase (also in bench/results/profiles/<database>-pgss.txt). */
  pgss?: PgssRow[];
};

/** With BENCH_PGSS=1, pg_stat_statements of `db` over `f` (reset before, the costliest statements after). */
async function profiled(db: BenchDatabase, f: () => Promise<ServiceRun>): Promise<ServiceRun> {
  if (!pgssWanted()) return f();
  await withClient(db.url, pgssReset);
  const r = await f();
  const top = await withClient(db.url, (c) => pgssTop(c, db.name));
  return { ...r, pgss: top?.slice(0, 12) };
}
type SqlRun = SqlLoadResult & { cpu: CpuReport };
type Phase = ServiceRun | SqlRun;

export async function runIngest(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const seconds = envNum('BENCH_SECONDS', 10);
  const warmup = envNum('BENCH_WARMUP_SECONDS', 2);
  const connections = envInt('BENCH_CONNECTIONS', 64);
  const sqlClients = envInt('BENCH_SQL_CLIENTS', 10);
  const rounds = Math.max(1, envInt('BENCH_ROUNDS', 3));
  const repeatRooms = envInt('BENCH_REPEAT_ROOMS', 1000);
  const durationMs = seconds * 1000;
  const warmupMs = warmup * 1000;
  const pgPids = () => (ctx.server.postmasterPid ? processTree(ctx.server.postmasterPid) : []);
  const load = { connections, durationMs, warmupMs, pgPids };
  let base = 1_000_000_000;
  const distinct = () => {
    const first = (base += 100_000_000);
    let seq = 0;
    return () => newRequestBody(String(first + seq++));
  };

  const phases: Array<[string, () => Promise<Phase>]> = [
    // HTTP limit: bare Hono, no database.
    ['bare', async () => {
      const { proc, url } = await startBareHono();
      return serviceLoad(proc, url, { ...load, body: distinct() });
    }],
    // Database limit: the SQL function in a tight loop.
    ['sql', async () => {
      const db = await ctx.server.createDatabase('ingest_sql');
      const r = await sqlLoop(db.url, sqlClients, durationMs, warmupMs, { loadgen: () => [process.pid], postgres: pgPids });
      await db.drop();
      return r;
    }],
    // The peer: node:http + pg, one INSERT per webhook.
    ['plain', async () => {
      const db = await ctx.server.createDatabase('ingest_plain');
      await withClient(db.url, (c) => c.query(PLAIN_TABLE_SQL));
      const { proc, url } = await startPlainService(db.url);
      const r = await profiled(db, () => serviceLoad(proc, url, { ...load, body: distinct() }));
      r.stored = await countRows(db.url, 'select count(*)::int as n from bench_plain.requests');
      await db.drop();
      return r;
    }],
    // The web process, a new room per webhook.
    ['web', async () => {
      const db = await ctx.server.createDatabase('ingest_web');
      // The web needs no Qiscus; the simulator is only there for the environment shape.
      const sim = await startSim(0);
      const { web, url } = await startWeb({ databaseUrl: db.url, sim, nodeArgs: profileArgs() });
      const r = await profiled(db, () => serviceLoad(web, url, { ...load, body: distinct() }));
      await sim.close();
      r.stored = await countRows(db.url, 'select count(*)::int as n from allocator.sessions');
      await db.drop();
      return r;
    }],
    // The web process, the allocation webhook repeated for rooms already waiting (Qiscus sends it on every
    // customer message until an agent is assigned): answered already_queued, nothing but the webhook row written.
    ['repeats', async () => {
      const db = await ctx.server.createDatabase('ingest_repeats');
      const first = 6_000_000_000;
      await withClient(db.url, async (c) => {
        await c.query(
          `insert into allocator.sessions (room_id, source)
           select ($1::bigint + g)::text, 'qiscus' from generate_series(0, $2::int - 1) g`,
          [first, repeatRooms],
        );
        await c.query('analyze allocator.sessions');
      });
      const sim = await startSim(0);
      const { web, url } = await startWeb({ databaseUrl: db.url, sim, nodeArgs: profileArgs() });
      let seq = 0;
      const r = await profiled(db, () =>
        serviceLoad(web, url, { ...load, body: () => newRequestBody(String(first + (seq++ % repeatRooms))) }),
      );
      await sim.close();
      r.stored = await countRows(db.url, 'select count(*)::int as n from allocator.sessions');
      await db.drop();
      return r;
    }],
  ];
  const show = (key: string, r: Phase) =>
    `${key}: ${r.rps}/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms` +
    ('memory' in r ? `, peak RSS ${r.memory.peak} MiB` : '') +
    `, others ${r.cpu.othersCores} cores`;
  ctx.log(`${rounds} round(s) of: bare Hono, direct SQL (${sqlClients} connections), plain service, web, web repeats; ${connections} connections, ${seconds} s each`);
  const runs = await alternate<Phase>(ctx, rounds, phases, show);
  const bare = runs.bare as ServiceRun[];
  const sql = runs.sql as SqlRun[];
  const plain = runs.plain as ServiceRun[];
  const web = runs.web as ServiceRun[];
  const repeats = runs.repeats as ServiceRun[];

  const rps = (r: Phase) => r.rps;
  const p50 = (r: Phase) => r.latencyMs.p50;
  const p99 = (r: Phase) => r.latencyMs.p99;
  const cpuOf = (group: string) => (r: Phase) => cpuPerOp(r.cpu, group, r.sent);
  const row = (what: string, unit: string, a: Phase[], b: Phase[], baseline: string, f: (r: Phase) => number | null) =>
    pairRow('ingest', what, unit, a, b, baseline, f);
  const vsPlain = medianRatio(web, plain, rps);
  const p50VsPlain = medianRatio(web, plain, p50);
  const vsSql = medianRatio(web, sql, rps);
  const peak = (r: Phase) => ('memory' in r ? r.memory.peak : null);
  const idle = (r: Phase) => ('memory' in r ? r.memory.idle : null);

  return {
    name: 'ingest',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { seconds, warmupSeconds: warmup, connections, sqlClients, rounds, repeatRooms, webPoolSize: 10, plainPoolSize: 10 },
    rows: [
      row('webhooks/s, web, distinct rooms', 'req/s', web, plain, 'plain node:http + pg, one INSERT each', rps),
      row('webhook p50 latency, web', 'ms', web, plain, 'plain service p50', p50),
      row('webhook p99 latency, web', 'ms', web, plain, 'plain service p99', p99),
      row('web process CPU per webhook', 'ms', web, plain, 'plain service CPU per webhook', cpuOf('server')),
      row('PostgreSQL CPU per webhook, web', 'ms', web, plain, 'same, plain service', cpuOf('postgres')),
      row('webhooks/s, web, repeats (room already waiting)', 'req/s', repeats, web, 'web, distinct rooms', rps),
      row('webhooks/s, web, repeats (room already waiting)', 'req/s', repeats, plain, 'plain service', rps),
      row('webhook p50 latency, web, repeats', 'ms', repeats, web, 'web, distinct rooms', p50),
      row('PostgreSQL CPU per repeat webhook', 'ms', repeats, web, 'same, distinct rooms', cpuOf('postgres')),
      row('web process CPU per repeat webhook', 'ms', repeats, web, 'same, distinct rooms', cpuOf('server')),
      row('webhooks/s, web, distinct rooms', 'req/s', web, sql, `direct SQL loop, ${sqlClients} conns`, rps),
      row('webhooks/s, web, distinct rooms', 'req/s', web, bare, 'bare Hono, no DB', rps),
      row('webhook p50 latency, web', 'ms', web, sql, 'direct SQL p50', p50),
      row('webhook p50 latency, web', 'ms', web, bare, 'bare Hono p50', p50),
      row('PostgreSQL CPU per webhook, web', 'ms', web, sql, 'PostgreSQL CPU per direct call', cpuOf('postgres')),
      {
        part: 'memory',
        what: 'web peak RSS under ingest',
        value: medianOf(web, peak),
        unit: 'MiB',
        baseline: 'web RSS idle after start',
        baselineValue: medianOf(web, idle),
        ratio: medianOf(web, (r) => { const p = peak(r); const i = idle(r); return p && i ? p / i : null; }),
      },
    ],
    goals: [
      { part: 'ingest', goal: 'web webhooks/s ≥ 1.0 × plain node:http + pg service', measured: vsPlain, bound: '≥ 1.0', met: vsPlain === null ? null : vsPlain >= 1 },
      { part: 'ingest', goal: 'web p50 latency no worse than the plain service', measured: p50VsPlain, bound: '≤ 1.0', met: p50VsPlain === null ? null : p50VsPlain <= 1 },
      { part: 'ingest', goal: 'web webhooks/s ≥ ½ × direct-SQL calls/s', measured: vsSql, bound: '≥ 0.5', met: vsSql === null ? null : vsSql >= 0.5 },
      {
        part: 'ingest',
        goal: 'repeats queue nothing: sessions after the repeats phase = rooms waiting before',
        measured: Math.max(...repeats.map((r) => r.stored ?? 0)),
        bound: `= ${repeatRooms}`,
        met: repeats.every((r) => r.stored === repeatRooms),
      },
    ],
    details: {
      note:
        'Closed loop: each connection sends its next request when the previous answer is read. rps counts 2xx answers ' +
        'completed in the measured window; cpu.cores is the average number of cores each process used (others = the ' +
        'rest of the machine: other test suites ran on the same two cores). Values are medians over rounds; ratios ' +
        'medians of the per-round ratios (the phases of a round run back to back, order reversed every other round).',
      bareHono: bare,
      directSql: sql,
      plain,
      web,
      repeats,
    },
  };
}

if (isMain(import.meta.url)) await standalone(runIngest, 'ingest');

/**
 * 1. Ingest: allocation webhooks for distinct rooms under load, through the web process (HTTP → zod → one SQL
 * call → commit → 200). Baselines from the same run:
 *   - database limit: the same SQL function, allocator.accept_new_request, called in a tight loop by
 *     BENCH_SQL_CLIENTS connections (default 10, the web process's pool size), no HTTP;
 *   - HTTP limit: a bare Hono route (same @hono/node-server stack) with no validation and no database.
 * Also the web process's peak RSS (VmHWM) under this load, against its RSS when idle after start.
 *
 * Knobs: BENCH_SECONDS (10), BENCH_WARMUP_SECONDS (2), BENCH_CONNECTIONS (32), BENCH_SQL_CLIENTS (10),
 * BENCH_ROUNDS (1: with more, the phases alternate and the median round is reported).
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { profileArgs } from './lib/cpuprofile.ts';
import { connectClients, endClients } from './lib/db.ts';
import { httpLoad, type LoadResult } from './lib/http-load.ts';
import { processTree, startCpu, type CpuGroups, type CpuReport } from './lib/cpu.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { newRequestBody, startBareHono, startSim, startWeb } from './lib/stack.ts';
import { envInt, envNum, ratio, round, roundSummary, Samples, summarize, type Summary } from './lib/stats.ts';

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

function median<T>(xs: T[], key: (x: T) => number): T {
  const s = [...xs].sort((a, b) => key(a) - key(b));
  return s[Math.floor((s.length - 1) / 2)]!;
}

export async function runIngest(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const seconds = envNum('BENCH_SECONDS', 10);
  const warmup = envNum('BENCH_WARMUP_SECONDS', 2);
  const connections = envInt('BENCH_CONNECTIONS', 32);
  const sqlClients = envInt('BENCH_SQL_CLIENTS', 10);
  const rounds = Math.max(1, envInt('BENCH_ROUNDS', 1));
  const durationMs = seconds * 1000;
  const warmupMs = warmup * 1000;
  const pgPids = () => (ctx.server.postmasterPid ? processTree(ctx.server.postmasterPid) : []);

  const bare: Array<LoadResult & { cpu: CpuReport }> = [];
  const sql: Array<SqlLoadResult & { cpu: CpuReport }> = [];
  const web: Array<
    LoadResult & { cpu: CpuReport; memory: { idle: number | null; peak: number | null }; stored: number }
  > = [];

  for (let round_ = 1; round_ <= rounds; round_++) {
    // HTTP limit: bare Hono, no database.
    {
      ctx.log(`round ${round_}: bare Hono route, ${connections} connections, ${seconds} s`);
      const { proc, url } = await startBareHono();
      let seq = 0;
      const cpu = startCpu({ loadgen: () => [process.pid], server: () => [proc.pid] });
      const r = await httpLoad({
        url: `${url}/api/v1/new_request`,
        connections,
        durationMs,
        warmupMs,
        body: () => newRequestBody(String(1_000_000_000 + seq++)),
      });
      bare.push({ ...r, cpu: cpu.stop() });
      await proc.stop();
      ctx.log(`bare Hono: ${r.rps} req/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms`);
    }

    // Database limit: the SQL function in a tight loop.
    {
      ctx.log(`round ${round_}: accept_new_request in a tight loop, ${sqlClients} connections, ${seconds} s`);
      const db = await ctx.server.createDatabase('ingest_sql');
      const r = await sqlLoop(db.url, sqlClients, durationMs, warmupMs, { loadgen: () => [process.pid], postgres: pgPids });
      sql.push(r);
      await db.drop();
      ctx.log(`direct SQL: ${r.rps} calls/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms`);
    }

    // The web process.
    {
      ctx.log(`round ${round_}: web process, ${connections} connections, ${seconds} s`);
      const db = await ctx.server.createDatabase('ingest_web');
      // The web needs no Qiscus; the simulator is only there for the environment shape.
      const sim = await startSim(0);
      const { web: proc, url } = await startWeb({ databaseUrl: db.url, sim, nodeArgs: profileArgs() });
      const idle = proc.memory().rss;
      let seq = 0;
      const cpu = startCpu({ loadgen: () => [process.pid], web: () => [proc.pid], postgres: pgPids });
      const r = await httpLoad({
        url: `${url}/api/v1/new_request`,
        connections,
        durationMs,
        warmupMs,
        body: () => newRequestBody(String(2_000_000_000 + seq++)),
      });
      const cpuReport = cpu.stop();
      const peak = proc.memory().peak;
      await proc.stop();
      await sim.close();
      const c = new pg.Client({ connectionString: db.url });
      await c.connect();
      const stored = (await c.query<{ n: number }>(`select count(*)::int as n from allocator.sessions`)).rows[0]!.n;
      await c.end();
      await db.drop();
      web.push({ ...r, cpu: cpuReport, memory: { idle, peak }, stored });
      ctx.log(`web: ${r.rps} req/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms, peak RSS ${peak} MiB`);
    }
  }

  const b = median(bare, (x) => x.rps);
  const s = median(sql, (x) => x.rps);
  const w = median(web, (x) => x.rps);
  const ingestRatio = ratio(w.rps, s.rps);

  return {
    name: 'ingest',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { seconds, warmupSeconds: warmup, connections, sqlClients, rounds, webPoolSize: 10 },
    rows: [
      { part: 'ingest', what: 'webhooks/s (web process)', value: w.rps, unit: 'req/s', baseline: 'direct SQL loop', baselineValue: s.rps, ratio: ingestRatio },
      { part: 'ingest', what: 'webhooks/s (web process)', value: w.rps, unit: 'req/s', baseline: 'bare Hono, no DB', baselineValue: b.rps, ratio: ratio(w.rps, b.rps) },
      { part: 'ingest', what: 'webhook p50 latency', value: w.latencyMs.p50, unit: 'ms', baseline: 'direct SQL p50', baselineValue: s.latencyMs.p50, ratio: ratio(w.latencyMs.p50, s.latencyMs.p50) },
      { part: 'ingest', what: 'webhook p99 latency', value: w.latencyMs.p99, unit: 'ms', baseline: 'direct SQL p99', baselineValue: s.latencyMs.p99, ratio: ratio(w.latencyMs.p99, s.latencyMs.p99) },
      { part: 'ingest', what: 'webhook p50 latency', value: w.latencyMs.p50, unit: 'ms', baseline: 'bare Hono p50', baselineValue: b.latencyMs.p50, ratio: ratio(w.latencyMs.p50, b.latencyMs.p50) },
      { part: 'ingest', what: 'webhook p99 latency', value: w.latencyMs.p99, unit: 'ms', baseline: 'bare Hono p99', baselineValue: b.latencyMs.p99, ratio: ratio(w.latencyMs.p99, b.latencyMs.p99) },
      { part: 'ingest', what: 'web process CPU per webhook', value: cpuPerOp(w.cpu, 'web', w.sent), unit: 'ms', baseline: 'bare Hono CPU per request', baselineValue: cpuPerOp(b.cpu, 'server', b.sent), ratio: ratio(cpuPerOp(w.cpu, 'web', w.sent), cpuPerOp(b.cpu, 'server', b.sent)) },
      { part: 'ingest', what: 'PostgreSQL CPU per webhook', value: cpuPerOp(w.cpu, 'postgres', w.sent), unit: 'ms', baseline: 'PostgreSQL CPU per direct call', baselineValue: cpuPerOp(s.cpu, 'postgres', s.sent), ratio: ratio(cpuPerOp(w.cpu, 'postgres', w.sent), cpuPerOp(s.cpu, 'postgres', s.sent)) },
      { part: 'memory', what: 'web peak RSS under ingest', value: w.memory.peak, unit: 'MiB', baseline: 'web RSS idle after start', baselineValue: w.memory.idle, ratio: ratio(w.memory.peak, w.memory.idle) },
    ],
    goals: [
      {
        part: 'ingest',
        goal: 'web webhooks/s ≥ ½ × direct-SQL calls/s',
        measured: ingestRatio,
        bound: '≥ 0.5',
        met: ingestRatio === null ? null : ingestRatio >= 0.5,
      },
    ],
    details: {
      bareHono: bare,
      directSql: sql,
      web,
      note:
        'Closed loop: each connection sends its next request when the previous answer is read. rps counts 2xx answers ' +
        'completed in the measured window; cpu.cores is the average number of cores each process used (others = the ' +
        'rest of the machine). Ratios compare the median round of each phase.',
      roundsMedianOf: rounds,
      webStoredSessions: w.stored,
    },
  };
}

if (isMain(import.meta.url)) await standalone(runIngest, 'ingest');

/**
 * Where a cold drain's database time goes, without the noise of a load: `allocator.reserve(null, 8)` (what a
 * listener with 8 free pipeline places asks) and `allocator.report()` of 8 assignments, under EXPLAIN (ANALYZE,
 * BUFFERS) in a rolled-back transaction, in the states a drain passes through:
 *   start          20,000 rooms waiting, 10,000 free agents, ANALYZE done;
 *   start, fresh   the same, never analysed (the planner sees the migration's empty tables);
 *   15k drained    after 15,000 of the rooms were reserved and confirmed (8 at a time, like a listener), no snapshot;
 *   15k, vacuumed  the same after a VACUUM (as when autovacuum happens to run during a drain);
 *   15k, pinned    the same while another session held a REPEATABLE READ snapshot from before the drain.
 * Buffers touched are the noise-free twin of time. Every nested statement's plan (auto_explain at NOTICE level, in
 * this session only) is summed by statement, so the costly one is named; the full plans of one call are written
 * too. Output: bench/results/drainplans.json and drainplans.txt.
 *
 * Knobs: BENCH_DRAIN_ROOMS (20000), BENCH_DRAIN_AGENTS (rooms / 2), BENCH_PLANS_REPS (5).
 */
import { writeFile } from 'node:fs/promises';
import pg from 'pg';
import type { BenchDatabase } from './lib/db.ts';
import { drainOptions } from './lib/drain.ts';
import { isMain, partTimer, resultFile, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { INSERT_AGENTS_SQL } from './lib/stack.ts';
import { envInt, round } from './lib/stats.ts';
import { table } from './lib/table.ts';
import { parsePlan, sessionAutoExplain } from './lib/pgss.ts';
import { median } from './lib/rounds.ts';

interface Nested {
  statement: string;
  calls: number;
  buffers: number;
}

interface StateResult {
  state: string;
  reserve: { ms: number | null; buffers: number | null; rows: number };
  report: { ms: number | null; buffers: number | null };
  /** Nested statements of one reserve(null, 8) call, costliest first (auto_explain, timing off: buffers). */
  nested: Nested[];
  /** The same for one report() of 8 assignments. */
  reportNested: Nested[];
  deadTuples: { sessions: number | null; sessionsQueueIndexPages: number | null };
  plans: string;
}

const RESERVE = 'select * from allocator.reserve(null, 8)';

async function connect(url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url, application_name: 'allocator-bench-plans' });
  await c.connect();
  return c;
}

function buffersOf(plan: string): number {
  const m = /Buffers: shared((?: \w+=\d+)+)/.exec(plan);
  if (!m) return 0;
  return [...m[1]!.matchAll(/=(\d+)/g)].reduce((a, x) => a + Number(x[1]), 0);
}

/** EXPLAIN (ANALYZE, BUFFERS) of `sql` inside a transaction that is rolled back: execution time and buffers. */
async function explain(c: pg.Client, sql: string, params: unknown[] = []): Promise<{ ms: number; buffers: number; text: string }> {
  await c.query('begin');
  try {
    const r = await c.query<{ 'QUERY PLAN': string }>(`explain (analyze, buffers) ${sql}`, params);
    const text = r.rows.map((x) => x['QUERY PLAN']).join('\n');
    const ms = Number(/Execution Time: ([\d.]+) ms/.exec(text)?.[1] ?? NaN);
    return { ms, buffers: buffersOf(text), text };
  } finally {
    await c.query('rollback');
  }
}

/**
 * Runs `body` in a transaction that is rolled back, with auto_explain logging the plan of every nested statement
 * to this client as NOTICEs while `body` says so (`explainOn()`), then sums them by statement.
 */
async function nestedPlans(
  c: pg.Client,
  body: (explainOn: () => Promise<void>) => Promise<void>,
): Promise<{ nested: Nested[]; plans: string }> {
  const notices: string[] = [];
  const onNotice = (n: { message?: string }) => notices.push(n.message ?? '');
  await sessionAutoExplain(c, { active: false, timing: false });
  c.on('notice', onNotice);
  await c.query('begin');
  try {
    await body(async () => {
      await c.query('set local auto_explain.log_min_duration = 0');
    });
  } finally {
    await c.query('rollback');
    c.off('notice', onNotice);
  }
  const by = new Map<string, Nested>();
  for (const n of notices) {
    const parsed = parsePlan(n);
    if (!parsed) continue;
    const e = by.get(parsed.statement) ?? { statement: parsed.statement, calls: 0, buffers: 0 };
    e.calls += 1;
    e.buffers += parsed.buffers;
    by.set(parsed.statement, e);
  }
  const nested = [...by.values()]
    .sort((a, b) => b.buffers - a.buffers);
  return { nested, plans: notices.join('\n\n') };
}

/** Reserves and confirms `n` rooms, `batch` at a time, as a listener would (without the HTTP call). */
async function drainSome(c: pg.Client, n: number, batch: number): Promise<void> {
  let done = 0;
  let service = 800_000_000;
  while (done < n) {
    const r = await c.query<{ attempt_id: string }>('select attempt_id from allocator.reserve(null, $1)', [Math.min(batch, n - done)]);
    if (r.rows.length === 0) throw new Error(`only ${done} of ${n} rooms could be reserved`);
    await c.query('select * from allocator.report($1::jsonb)', [
      JSON.stringify(r.rows.map((x) => ({ attempt: x.attempt_id, outcome: 'assigned', service: service++ }))),
    ]);
    done += r.rows.length;
  }
}

async function measure(c: pg.Client, state: string, reps: number): Promise<StateResult> {
  const res: Array<{ ms: number; buffers: number; rows: number }> = [];
  for (let i = 0; i < reps; i++) {
    const e = await explain(c, RESERVE);
    res.push({ ms: e.ms, buffers: e.buffers, rows: Number(/rows=(\d+) loops/.exec(e.text.split('\n')[0]!)?.[1] ?? 0) });
  }
  // report() of 8 fresh reservations, in one transaction rolled back afterwards.
  const rep: Array<{ ms: number; buffers: number }> = [];
  for (let i = 0; i < reps; i++) {
    await c.query('begin');
    try {
      const r = await c.query<{ attempt_id: string }>(RESERVE);
      const outcomes = JSON.stringify(r.rows.map((x, k) => ({ attempt: x.attempt_id, outcome: 'assigned', service: 700_000_000 + k })));
      const e = await c.query<{ 'QUERY PLAN': string }>('explain (analyze, buffers) select * from allocator.report($1::jsonb)', [outcomes]);
      const text = e.rows.map((x) => x['QUERY PLAN']).join('\n');
      rep.push({ ms: Number(/Execution Time: ([\d.]+) ms/.exec(text)?.[1] ?? NaN), buffers: buffersOf(text) });
    } finally {
      await c.query('rollback');
    }
  }
  const reservePlans = await nestedPlans(c, async (on) => {
    await on();
    await c.query(RESERVE);
  });
  const reportPlans = await nestedPlans(c, async (on) => {
    const r = await c.query<{ attempt_id: string }>(RESERVE);
    await on();
    await c.query('select * from allocator.report($1::jsonb)', [
      JSON.stringify(r.rows.map((x, k) => ({ attempt: x.attempt_id, outcome: 'assigned', service: 700_000_000 + k }))),
    ]);
  });
  const dead = await c.query<{ dead: number; pages: number }>(
    `select (select n_dead_tup::int from pg_stat_user_tables where relid = 'allocator.sessions'::regclass) as dead,
            (select relpages::int from pg_class where oid = 'allocator.sessions_queue'::regclass) as pages`,
  );
  const m = (xs: number[]) => {
    const v = median(xs);
    return v === null ? null : round(v);
  };
  return {
    state,
    reserve: { ms: m(res.map((x) => x.ms)), buffers: m(res.map((x) => x.buffers)), rows: res[0]?.rows ?? 0 },
    report: { ms: m(rep.map((x) => x.ms)), buffers: m(rep.map((x) => x.buffers)) },
    nested: reservePlans.nested,
    reportNested: reportPlans.nested,
    deadTuples: { sessions: dead.rows[0]?.dead ?? null, sessionsQueueIndexPages: dead.rows[0]?.pages ?? null },
    plans: `### reserve(null, 8)\n\n${reservePlans.plans}\n\n### report() of 8\n\n${reportPlans.plans}`,
  };
}

async function freshDb(ctx: BenchContext, label: string, rooms: number, agents: number, analyze: boolean): Promise<{ db: BenchDatabase; c: pg.Client }> {
  const db = await ctx.server.createDatabase(label);
  const c = await connect(db.url);
  await c.query(INSERT_AGENTS_SQL, [1, agents]);
  await c.query(
    `insert into allocator.sessions (room_id, source, queued_at)
     select (3000000000 + g)::text, 'qiscus', clock_timestamp() from generate_series(1, $1::int) g`,
    [rooms],
  );
  if (analyze) await c.query('analyze');
  return { db, c };
}

export async function runDrainPlans(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const { rooms, agents } = drainOptions();
  const reps = Math.max(1, envInt('BENCH_PLANS_REPS', 5));
  const drained = Math.max(0, rooms - Math.min(5000, Math.floor(rooms / 4)));
  const states: StateResult[] = [];

  {
    ctx.log('start (analysed)');
    const { db, c } = await freshDb(ctx, 'plans_start', rooms, agents, true);
    states.push(await measure(c, 'start', reps));
    ctx.log(`after ${drained} drained, no snapshot`);
    await drainSome(c, drained, 8);
    states.push(await measure(c, `${drained} drained`, reps));
    // The same after a VACUUM, as when autovacuum happens to run during a drain: what the dead versions cost.
    await c.query('vacuum allocator.sessions, allocator.agents, allocator.attempts');
    states.push(await measure(c, `${drained} drained, vacuumed`, reps));
    await c.end();
    await db.drop();
  }
  {
    ctx.log('start (never analysed)');
    const { db, c } = await freshDb(ctx, 'plans_fresh', rooms, agents, false);
    states.push(await measure(c, 'start, never analysed', reps));
    await c.end();
    await db.drop();
  }
  {
    ctx.log(`after ${drained} drained, snapshot held`);
    const { db, c } = await freshDb(ctx, 'plans_pinned', rooms, agents, true);
    const snap = await connect(db.url);
    await snap.query('begin isolation level repeatable read');
    await snap.query('select count(*) from allocator.sessions');
    await drainSome(c, drained, 8);
    states.push(await measure(c, `${drained} drained, snapshot held`, reps));
    await snap.query('commit');
    await snap.end();
    await c.end();
    await db.drop();
  }

  const base = states[0]!;
  const txt = [
    `# allocator.reserve(null, 8) and report() of 8, EXPLAIN (ANALYZE, BUFFERS), median of ${reps}; ${rooms} rooms, ${agents} agents`,
    '',
    table(
      ['state', 'reserve ms', 'reserve buffers', 'rows', 'report(8) ms', 'report buffers', 'dead tuples', 'sessions_queue pages'],
      states.map((s) => [s.state, s.reserve.ms, s.reserve.buffers, s.reserve.rows, s.report.ms, s.report.buffers, s.deadTuples.sessions, s.deadTuples.sessionsQueueIndexPages]),
    ),
    '',
    ...states.flatMap((s) => [
      `## ${s.state}: nested statements of one reserve(null, 8), by buffers`,
      '',
      table(['calls', 'buffers', 'statement'], s.nested.slice(0, 12).map((n) => [n.calls, n.buffers, n.statement])),
      '',
      `## ${s.state}: nested statements of one report() of 8 assignments, by buffers`,
      '',
      table(['calls', 'buffers', 'statement'], s.reportNested.slice(0, 12).map((n) => [n.calls, n.buffers, n.statement])),
      '',
    ]),
    ...states.flatMap((s) => [`## ${s.state}: plans (auto_explain)`, '', s.plans, '']),
  ].join('\n');
  await writeFile(resultFile('drainplans', 'txt'), txt);

  const rows = states.slice(1).flatMap((s) => [
    { part: 'drainplans', what: `reserve(null, 8) buffers, ${s.state}`, value: s.reserve.buffers, unit: 'pages', baseline: 'start, analysed', baselineValue: base.reserve.buffers, ratio: s.reserve.buffers && base.reserve.buffers ? round(s.reserve.buffers / base.reserve.buffers) : null },
    { part: 'drainplans', what: `reserve(null, 8) time, ${s.state}`, value: s.reserve.ms, unit: 'ms', baseline: 'start, analysed', baselineValue: base.reserve.ms, ratio: s.reserve.ms && base.reserve.ms ? round(s.reserve.ms / base.reserve.ms) : null },
  ]);
  return {
    name: 'drainplans',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { rooms, agents, reps, drained, batch: 8 },
    rows,
    goals: [],
    details: { states: states.map(({ plans: _p, ...s }) => s), plansFile: 'bench/results/drainplans.txt' },
  };
}

if (isMain(import.meta.url)) await standalone(runDrainPlans, 'drainplans');

/**
 * 4. Scale: the time of one reservation (allocator.reserve()) with 1k, 10k, 100k and 1M waiting rooms and with
 * 10, 1k and 10k agents, with a history of 1M resolved sessions in the same table; plus EXPLAIN (ANALYZE,
 * BUFFERS) of the reservation, with the plans of the statements inside it (auto_explain, nested).
 *
 * The moment measured is the usual one under load: every agent is full except one, whose room was just resolved
 * ("one free slot"). Also the wake-up that finds nothing to do ("no free agent": every agent full, rooms waiting),
 * which happens on every webhook while the queue is long. Each reservation runs in a transaction that is rolled
 * back, so every repetition sees the same data. The baseline of each cell is the smallest cell (1k rooms,
 * 10 agents) of the same run; buffers touched per reservation is the noise-free twin of the time.
 *
 * Data is generated set-based (insert ... select generate_series), then VACUUM ANALYZE, as autovacuum would.
 * Knobs: BENCH_SCALE_MAX (1000000: the largest waiting-room count), BENCH_SCALE_HISTORY (1000000 resolved rows),
 * BENCH_SCALE_AGENTS ("10,1000,10000"), BENCH_SCALE_REPS (30).
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { sessionAutoExplain } from './lib/pgss.ts';
import { isMain, partTimer, resultFile, resultsDir, standalone, type BenchContext, type PartResult, type Row } from './lib/results.ts';
import { envInt, ratio, roundSummary, summarize, type Summary } from './lib/stats.ts';

type Scenario = 'one free slot' | 'no free agent';

interface Cell {
  waiting: number;
  agents: number;
  scenario: Scenario;
  reserveMs: Summary;
  /** From EXPLAIN (ANALYZE, BUFFERS) of select * from allocator.reserve(). */
  explainMs: number | null;
  buffers: number | null;
  /** The statements inside reserve(), each with its duration and plan (auto_explain), when available. */
  nested?: Array<{ ms: number; plan: string }>;
  found: boolean;
}

const SIZES = [1_000, 10_000, 100_000, 1_000_000];

async function connect(url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url, application_name: 'allocator-bench' });
  await c.connect();
  return c;
}

async function setAgents(c: pg.Client, n: number, scenario: Scenario): Promise<void> {
  // Agents above n were never referenced (the history uses agents 1..10 and every reservation was rolled back), so
  // skip the foreign-key checks: each would scan the sessions table, which has no index on agent_id for history.
  let replica = true;
  try {
    await c.query('set session_replication_role = replica');
  } catch {
    replica = false; // not a superuser: the checked delete is slow but correct
  }
  await c.query('delete from allocator.agents where id > $1', [n]);
  if (replica) await c.query('set session_replication_role = default');
  await c.query(
    `insert into allocator.agents (id, name, email, qiscus_load, synced_at)
     select g, 'Agent ' || g, 'agent' || g || '@example.com', 0, now() from generate_series(1, $1::int) g
     where not exists (select from allocator.agents a where a.id = g)`,
    [n],
  );
  // Everyone full (the guard allows load = capacity), idle since a different moment each.
  await c.query(`update allocator.agents set our_load = 2, last_assigned_at = now() - make_interval(secs => id)`);
  if (scenario === 'one free slot') {
    await c.query(`update allocator.agents set our_load = 1 where id = $1`, [n]);
  }
  await c.query('vacuum analyze allocator.agents');
}

async function measure(url: string, reps: number): Promise<{ ms: Summary; found: boolean }> {
  const c = await connect(url);
  try {
    const once = async () => {
      await c.query('begin');
      const t0 = performance.now();
      const r = await c.query('select * from allocator.reserve()');
      const t1 = performance.now();
      await c.query('rollback');
      return { ms: t1 - t0, found: r.rows.length > 0 };
    };
    for (let i = 0; i < 8; i++) await once(); // plans cached and settled, as on a listener's pooled connection
    const samples: number[] = [];
    let found = false;
    for (let i = 0; i < reps; i++) {
      const r = await once();
      samples.push(r.ms);
      found = r.found;
    }
    return { ms: roundSummary(summarize(samples)), found };
  } finally {
    await c.end();
  }
}

interface ExplainNode {
  'Shared Hit Blocks'?: number;
  'Shared Read Blocks'?: number;
}

async function explain(url: string, nested: boolean): Promise<{ ms: number | null; buffers: number | null; nested?: Cell['nested'] }> {
  const c = await connect(url);
  const plans: Array<{ ms: number; plan: string }> = [];
  try {
    for (let i = 0; i < 8; i++) {
      await c.query('begin');
      await c.query('select * from allocator.reserve()');
      await c.query('rollback');
    }
    let autoExplain = false;
    if (nested) {
      try {
        await sessionAutoExplain(c, { active: true, timing: true });
        autoExplain = true;
        c.on('notice', (m) => {
          const text = String(m.message ?? '');
          const d = /^duration: ([\d.]+) ms\s+plan:\n?/.exec(text);
          if (d) plans.push({ ms: Number(d[1]), plan: text.slice(d[0].length) });
        });
      } catch {
        autoExplain = false; // not a superuser, or no auto_explain on this server: the outer plan only
      }
    }
    await c.query('begin');
    const r = await c.query<{ 'QUERY PLAN': Array<{ Plan: ExplainNode; 'Execution Time': number }> }>(
      'explain (analyze, buffers, format json) select * from allocator.reserve()',
    );
    await c.query('rollback');
    const top = r.rows[0]!['QUERY PLAN'][0]!;
    const buffers = (top.Plan['Shared Hit Blocks'] ?? 0) + (top.Plan['Shared Read Blocks'] ?? 0);
    return {
      ms: Math.round(top['Execution Time'] * 1000) / 1000,
      buffers,
      nested: autoExplain ? plans.filter((p) => !p.plan.includes('explain (analyze')) : undefined,
    };
  } finally {
    await c.end();
  }
}

export async function runScale(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const max = envInt('BENCH_SCALE_MAX', 1_000_000);
  const history = envInt('BENCH_SCALE_HISTORY', 1_000_000);
  const reps = envInt('BENCH_SCALE_REPS', 30);
  const agentCounts = (process.env.BENCH_SCALE_AGENTS ?? '10,1000,10000').split(',').map((s) => Number(s.trim()));
  const sizes = SIZES.filter((s) => s <= max);
  if (!sizes.includes(max) && max > 0) sizes.push(max);

  const db = await ctx.server.createDatabase('scale');
  const c = await connect(db.url);
  const load: Record<string, number> = {};
  const timed = async (label: string, sql: string, params: unknown[] = []) => {
    const t0 = performance.now();
    await c.query(sql, params);
    load[label] = Math.round(performance.now() - t0);
  };

  ctx.log(`history: ${history} resolved sessions`);
  await setAgents(c, 10, 'one free slot');
  await timed(
    'history rows',
    `insert into allocator.sessions (room_id, state, source, agent_id, attempts, service_id, queued_at, reserved_at,
                                     assigned_at, resolved_at, next_attempt_at, updated_at)
     select 'h' || g, 'resolved', 'qiscus', 1 + g % 10, 1, 100000000 + g, t, t + interval '1 s', t + interval '2 s',
            t + interval '10 min', t, t + interval '10 min'
     from generate_series(1, $1::int) g
     cross join lateral (select now() - interval '90 days' + g * interval '5 s') x(t)`,
    [history],
  );

  const cells: Cell[] = [];
  let have = 0;
  for (const waiting of sizes) {
    ctx.log(`waiting rooms: ${waiting}`);
    // Bulk load (new sessions wake the listeners once per statement: sessions_queued), then what autovacuum would do.
    await timed(
      `waiting rows to ${waiting}`,
      `insert into allocator.sessions (room_id, source, queued_at, next_attempt_at)
       select 'w' || g, 'qiscus', now() - interval '1 day' + g * interval '10 ms', now() - interval '1 day'
       from generate_series($1::int + 1, $2::int) g`,
      [have, waiting],
    );
    have = waiting;
    await timed(`vacuum analyze at ${waiting}`, 'vacuum analyze allocator.sessions');

    for (const agents of agentCounts) {
      for (const scenario of ['one free slot', 'no free agent'] as Scenario[]) {
        await setAgents(c, agents, scenario);
        const m = await measure(db.url, reps);
        const isGoalCell =
          (waiting === sizes[0] && agents === agentCounts[0]) || (waiting === sizes.at(-1) && agents === agentCounts.at(-1));
        const e = await explain(db.url, isGoalCell);
        cells.push({ waiting, agents, scenario, reserveMs: m.ms, explainMs: e.ms, buffers: e.buffers, nested: e.nested, found: m.found });
        ctx.log(`  ${agents} agents, ${scenario}: p50 ${m.ms.p50} ms, buffers ${e.buffers}${m.found ? '' : ' (nothing reserved)'}`);
      }
    }
  }
  await c.end();
  await db.drop();

  const cell = (w: number, a: number, s: Scenario) => cells.find((x) => x.waiting === w && x.agents === a && x.scenario === s);
  const rows: Row[] = [];
  for (const scenario of ['one free slot', 'no free agent'] as Scenario[]) {
    const base = cell(sizes[0]!, agentCounts[0]!, scenario)!;
    for (const x of cells.filter((y) => y.scenario === scenario)) {
      rows.push({
        part: 'scale',
        what: `reserve p50, ${x.waiting.toLocaleString('en-US')} waiting, ${x.agents.toLocaleString('en-US')} agents, ${scenario}`,
        value: x.reserveMs.p50,
        unit: 'ms',
        baseline: `${sizes[0]!.toLocaleString('en-US')} waiting, ${agentCounts[0]} agents`,
        baselineValue: base.reserveMs.p50,
        ratio: ratio(x.reserveMs.p50, base.reserveMs.p50),
      });
    }
    const big = cell(sizes.at(-1)!, agentCounts.at(-1)!, scenario)!;
    rows.push({
      part: 'scale',
      what: `buffers per reserve, ${big.waiting.toLocaleString('en-US')} waiting, ${big.agents.toLocaleString('en-US')} agents, ${scenario}`,
      value: big.buffers,
      unit: 'pages',
      baseline: `${sizes[0]!.toLocaleString('en-US')} waiting, ${agentCounts[0]} agents`,
      baselineValue: base.buffers,
      ratio: ratio(big.buffers, base.buffers),
    });
  }
  const small = cell(sizes[0]!, agentCounts[0]!, 'one free slot')!;
  const big = cell(sizes.at(-1)!, agentCounts.at(-1)!, 'one free slot')!;
  const goalRatio = ratio(big.reserveMs.p50, small.reserveMs.p50);

  // The plans, for people.
  const explainFile = resultFile('scale-explain', 'txt');
  const text = cells
    .filter((x) => x.nested)
    .map(
      (x) =>
        `==== ${x.waiting} waiting, ${x.agents} agents, ${x.scenario}: reserve() ${x.explainMs} ms, ${x.buffers} buffers\n\n` +
        x.nested!.map((p) => `-- ${p.ms} ms\n${p.plan}`).join('\n\n'),
    )
    .join('\n\n');
  await writeFile(explainFile, `${text}\n`);

  return {
    name: 'scale',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { waitingSizes: sizes, agentCounts, historyResolved: history, reps, defaultMaxLoad: 2 },
    rows,
    goals: [
      {
        part: 'scale',
        goal: `reserve with ${big.waiting.toLocaleString('en-US')} waiting & ${big.agents.toLocaleString('en-US')} agents ≤ 2 × with ${small.waiting.toLocaleString('en-US')} & ${small.agents}`,
        measured: goalRatio,
        bound: '≤ 2',
        met: goalRatio === null ? null : goalRatio <= 2,
      },
    ],
    details: {
      cells: cells.map(({ nested: _n, ...rest }) => rest),
      plans: cells.filter((x) => x.nested).map((x) => ({ waiting: x.waiting, agents: x.agents, scenario: x.scenario, nested: x.nested })),
      loadMs: load,
      explainFile: path.relative(path.join(resultsDir, '..', '..'), explainFile),
    },
  };
}

if (isMain(import.meta.url)) await standalone(runScale, 'scale');

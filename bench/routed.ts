/**
 * Routing at scale (issue 13): one reservation with 200 divisions, 10,000 agents (each in one division, one in ten
 * in a second) and 100,000 waiting rooms (four in five routed by their channel to one division, the rest to
 * anyone), every agent full but one ("one free slot", as in bench/scale.ts), against the same database with the
 * routes deleted (every room for anyone), in the same run. Also the cost of one roster sync of that size: the
 * agents list (allocator.sync_agents) and the divisions with their members (allocator.sync_divisions), as the
 * listener applies them after a pull. Each reservation runs in a rolled-back transaction, so every repetition sees
 * the same data.
 *
 * Knobs: BENCH_ROUTED_AGENTS (10000), BENCH_ROUTED_DIVISIONS (200), BENCH_ROUTED_ROOMS (100000), BENCH_ROUTED_REPS (30).
 */
import pg from 'pg';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { envInt, ratio, roundSummary, summarize, type Summary } from './lib/stats.ts';

async function timed(c: pg.Client, sql: string, params: unknown[], reps: number, rollback: boolean): Promise<{ ms: Summary; rows: number }> {
  const samples: number[] = [];
  let rows = 0;
  for (let i = 0; i < reps + 5; i++) {
    if (rollback) await c.query('begin');
    const t0 = performance.now();
    const r = await c.query(sql, params);
    const ms = performance.now() - t0;
    if (rollback) await c.query('rollback');
    if (i >= 5) samples.push(ms); // the first five settle the plans, as on a listener's pooled connection
    rows = r.rowCount ?? 0;
  }
  return { ms: roundSummary(summarize(samples)), rows };
}

export async function runRouted(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const agents = envInt('BENCH_ROUTED_AGENTS', 10_000);
  const divisions = envInt('BENCH_ROUTED_DIVISIONS', 200);
  const rooms = envInt('BENCH_ROUTED_ROOMS', 100_000);
  const reps = envInt('BENCH_ROUTED_REPS', 30);
  const db = await ctx.server.createDatabase('routed');
  const c = new pg.Client({ connectionString: db.url, application_name: 'allocator-bench' });
  await c.connect();
  try {
    // The roster as Qiscus's pages give it, and the divisions with their members
    const roster = JSON.stringify(
      Array.from({ length: agents }, (_, i) => ({
        id: i + 1, name: `Agent ${i + 1}`, email: `agent${i + 1}@example.com`, is_available: true,
        force_offline: false, current_customer_count: 0, type_as_string: 'agent',
      })),
    );
    const divisionList = JSON.stringify(Array.from({ length: divisions }, (_, d) => ({ id: d + 1, name: `Division ${d + 1}` })));
    const members: Array<{ division_id: number; agent_ids: number[] }> = Array.from({ length: divisions }, (_, d) => ({
      division_id: d + 1,
      agent_ids: [],
    }));
    for (let a = 1; a <= agents; a++) {
      members[a % divisions]!.agent_ids.push(a);
      if (a % 10 === 0) members[(a * 7 + 3) % divisions]!.agent_ids.push(a); // one in ten in a second division
    }
    const membersJson = JSON.stringify(members);
    const syncAgents = await timed(c, `select allocator.sync_agents($1::jsonb, now())`, [roster], 5, false);
    const syncDivisions = await timed(c, `select allocator.sync_divisions($1::jsonb, $2::jsonb)`, [divisionList, membersJson], 5, false);
    ctx.log(`routed: roster sync of ${agents} agents ${syncAgents.ms.p50} ms, divisions ${syncDivisions.ms.p50} ms`);

    // Everyone full but one agent, idle since a different moment each
    await c.query(`update allocator.agents set our_load = 2, last_assigned_at = now() - make_interval(secs => id::int)`);
    await c.query(`update allocator.agents set our_load = 1 where id = $1`, [agents]);
    // Routes by channel: channel d goes to division d; rooms on channel 0 match no route
    await c.query(
      `insert into allocator.routes (channel_id, division_ids, position)
       select d, array[d::bigint], d from generate_series(1, $1::int) d`,
      [divisions],
    );
    await c.query(
      `insert into allocator.sessions (room_id, source, channel_id, queued_at)
       select 'r' || g, 'qiscus', case when g % 5 = 0 then 0 else 1 + g % $2 end,
              now() - interval '1 hour' + make_interval(secs => g / 100.0)
       from generate_series(1, $1::int) g`,
      [rooms, divisions],
    );
    await c.query('vacuum analyze allocator.sessions, allocator.agents, allocator.agent_divisions');
    const routedCount = Number((await c.query(`select count(*) as n from allocator.sessions where division_ids is not null`)).rows[0].n);
    const reserveSql = `select * from allocator.reserve()`;
    const withRoutes = await timed(c, reserveSql, [], reps, true);
    await c.query('delete from allocator.routes'); // every waiting room for anyone again (reroute_waiting)
    await c.query('vacuum analyze allocator.sessions');
    const withoutRoutes = await timed(c, reserveSql, [], reps, true);
    ctx.log(`routed: reserve p50 ${withRoutes.ms.p50} ms with routes (${routedCount} routed rooms), ${withoutRoutes.ms.p50} ms without`);
    if (withRoutes.rows !== 1 || withoutRoutes.rows !== 1) throw new Error('a reservation found nothing: the setup is wrong');

    const r = ratio(withRoutes.ms.p50, withoutRoutes.ms.p50);
    return {
      name: 'routed',
      machine: ctx.machine,
      startedAt: timer.startedAt,
      seconds: timer.seconds(),
      params: { agents, divisions, rooms, routedRooms: routedCount, reps },
      rows: [
        { part: 'routed', what: `reserve p50, ${rooms.toLocaleString('en')} waiting (${routedCount.toLocaleString('en')} routed), ${divisions} divisions, ${agents.toLocaleString('en')} agents, one free slot`, value: withRoutes.ms.p50, unit: 'ms', baseline: 'same, routes deleted', baselineValue: withoutRoutes.ms.p50, ratio: r },
        { part: 'routed', what: 'reserve p99, the same', value: withRoutes.ms.p99, unit: 'ms', baseline: 'same, routes deleted', baselineValue: withoutRoutes.ms.p99, ratio: ratio(withRoutes.ms.p99, withoutRoutes.ms.p99) },
        { part: 'routed', what: `roster sync, ${agents.toLocaleString('en')} agents (sync_agents)`, value: syncAgents.ms.p50, unit: 'ms', baseline: '—', baselineValue: null, ratio: null },
        { part: 'routed', what: `division sync, ${divisions} divisions (sync_divisions)`, value: syncDivisions.ms.p50, unit: 'ms', baseline: '—', baselineValue: null, ratio: null },
      ],
      goals: [
        { part: 'routed', goal: 'reservation with routes ≤ 2 × without (p50)', measured: r, bound: '≤ 2', met: r === null ? null : r <= 2 },
      ],
      details: { withRoutes, withoutRoutes, syncAgents, syncDivisions },
    };
  } finally {
    await c.end().catch(() => {});
    await db.drop();
  }
}

if (isMain(import.meta.url)) await standalone(runRouted, 'routed');

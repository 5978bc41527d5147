/**
 * The rules a DBA changes in SQL (capacity, pause, priority by source, maximum wait, the agent choice function)
 * and the statistics views, on a real PostgreSQL. Each rule applies on the next reservation, without a restart.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { addAgents, assignAll, invariants, queue, reserve, resolve, sessionOf, setting } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks,
                                allocator.source_priority cascade`);
  // the capacity, the maximum wait and the attempts some tests change, back to their shipped defaults
  await db.pool.query(`update allocator.settings s set value = d.value from allocator.setting_defaults() d
                       where s.key = d.key and d.key in ('default_max_load', 'max_wait_seconds', 'max_attempts')`);
});
afterEach(async () => {
  expect(await invariants(db.pool)).toEqual([]);
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('rules', () => {
  it('a paused agent gets no new rooms and keeps the ones it has; unpausing resumes at once', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    await assignAll(db.pool);
    await db.pool.query(`update allocator.agents set paused = true where id = 1`);
    await queue(db.pool, 'b');
    expect(await reserve(db.pool)).toBeUndefined();
    expect((await sessionOf(db.pool, 'a')).state).toBe('assigned');
    const al = await db.pool.query(`select available, load from allocator.agent_load where id = 1`);
    expect(al.rows[0]).toEqual({ available: false, load: 1 });
    await db.pool.query(`update allocator.agents set paused = false where id = 1`);
    expect((await assignAll(db.pool)).map((r) => r.room_id)).toEqual(['b']);
  });

  it('serves higher-priority sources first, then arrival order; a change re-orders the waiting rooms', async () => {
    await db.pool.query(`insert into allocator.source_priority values ('wa', 10)`);
    const rooms: Array<[string, string]> = [['q1', 'qiscus'], ['w1', 'wa'], ['q2', 'qiscus'], ['w2', 'wa'], ['l1', 'line']];
    for (const [room, source] of rooms) {
      await queue(db.pool, room, newRequest(room, { source }));
    }
    const order = async () => (await db.pool.query(`select room_id from allocator.queue`)).rows.map((r) => r.room_id);
    expect(await order()).toEqual(['w1', 'w2', 'q1', 'q2', 'l1']);

    await db.pool.query(`update allocator.source_priority set priority = -1 where source = 'wa'`);
    await db.pool.query(`insert into allocator.source_priority values ('line', 5)`);
    expect(await order()).toEqual(['l1', 'q1', 'q2', 'w1', 'w2']);

    await addAgents(db.pool, [1], { max_load: 10 });
    expect((await assignAll(db.pool)).map((r) => r.room_id)).toEqual(['l1', 'q1', 'q2', 'w1', 'w2']);
  });

  it('a room waiting longer than max_wait_seconds leaves the queue as cancelled, with the reason', async () => {
    await queue(db.pool, 'old');
    await setting(db.pool, 'max_wait_seconds', '0.5');
    expect((await db.pool.query(`select * from allocator.sweep()`)).rows[0]).toEqual({ rescued: 0, cancelled: 0, pruned: 0 });
    await sleep(600);
    await queue(db.pool, 'young');
    expect((await db.pool.query(`select * from allocator.sweep()`)).rows[0]).toEqual({ rescued: 0, cancelled: 1, pruned: 0 });
    const s = await sessionOf(db.pool, 'old');
    expect(s.state).toBe('cancelled');
    expect(s.cancelled_at).toBeInstanceOf(Date);
    expect(s.last_error).toMatch(/longer than max_wait_seconds \(0.5 s\)/);
    expect((await db.pool.query(`select room_id from allocator.queue`)).rows).toEqual([{ room_id: 'young' }]);
    // the customer writes again: queued afresh
    expect((await queue(db.pool, 'old')).outcome).toBe('queued');
  });

  it('cancelling a room that holds a slot after a 5xx frees the slot; after an unanswered call, not before a pull after its lease', async () => {
    await addAgents(db.pool, [1, 2]);
    await queue(db.pool, 'a');
    await queue(db.pool, 'b');
    const ra = (await reserve(db.pool))!;
    const rb = (await reserve(db.pool))!;
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 502', null, true, false)`, [ra.attempt_id]);
    await db.pool.query(`select allocator.fail_transient($1, 'timeout', null, true, true)`, [rb.attempt_id]);
    await setting(db.pool, 'max_wait_seconds', '0.1');
    await sleep(150);
    expect((await db.pool.query(`select * from allocator.sweep()`)).rows[0].cancelled).toBe(2);
    const loads = async () =>
      (await db.pool.query(`select id::int, total_load::int from allocator.agents order by id`)).rows.map((x) => x.total_load);
    // the timed-out call may still land: its agent's slot stays, as a count Qiscus may show
    expect(await loads()).toEqual(ra.agent_id === '1' ? [0, 1] : [1, 0]);
    const roster = JSON.stringify([1, 2].map((id) => ({ id, is_available: true, current_customer_count: 0, type_as_string: 'agent' })));
    await db.pool.query(`select allocator.sync_agents($1, now())`, [roster]);
    expect(await loads()).toEqual(ra.agent_id === '1' ? [0, 1] : [1, 0]);
    // a pull that starts after the call's lease (30 s from its reservation, a moment ago)
    await db.pool.query(`select allocator.sync_agents($1, now() + allocator.lease())`, [roster]);
    expect(await loads()).toEqual([0, 0]);
  });

  it('a room that gives up (max_attempts) after an unanswered call keeps its agent counted until a pull after that call\'s lease', async () => {
    await addAgents(db.pool, [1]);
    await setting(db.pool, 'max_attempts', 1);
    await queue(db.pool, 'a');
    const r = (await reserve(db.pool))!;
    expect((await db.pool.query(`select allocator.fail_transient($1, 'timeout', null, true, true) as s`, [r.attempt_id])).rows[0].s).toBe('failed');
    expect((await db.pool.query(`select our_load, external_load from allocator.agents`)).rows[0]).toEqual({ our_load: 0, external_load: 1 });
  });

  it('honours a replaced agent_preference() on the next reservation, on the same connection', async () => {
    await addAgents(db.pool, [1, 2, 3], { max_load: 5 });
    const original = (
      await db.pool.query(`select pg_get_functiondef('allocator.agent_preference()'::regprocedure) as def`)
    ).rows[0].def as string;
    const c = await db.client(); // a long-lived connection, like a listener's
    await queue(c, 'a');
    expect((await reserve(c))?.agent_id).toBe('1'); // default: least loaded, then by id
    try {
      // a DBA's rule: most senior agent (lowest id) last, i.e. highest id first, regardless of load
      await db.pool.query(`
        create or replace function allocator.agent_preference() returns setof allocator.agents
        language sql stable as $$
          select a.* from allocator.eligible_agents a order by a.id desc
        $$`);
      for (const r of ['b', 'c']) await queue(c, r);
      expect((await reserve(c))?.agent_id).toBe('3');
      expect((await reserve(c))?.agent_id).toBe('3');

      // a careless rule that offers offline and full agents cannot overload or wake them
      await db.pool.query(`
        create or replace function allocator.agent_preference() returns setof allocator.agents
        language sql stable as $$ select a.* from allocator.agents a order by a.id desc $$`);
      await db.pool.query(`update allocator.agents set is_available = false where id = 3`);
      await db.pool.query(`update allocator.agents set max_load = 0 where id = 2`);
      for (let i = 0; i < 6; i++) await queue(c, `x${i}`);
      const got = await assignAll(c);
      expect(new Set(got.map((g) => g.agent_id))).toEqual(new Set(['1']));
      expect(got).toHaveLength(4); // agent 1: 5 slots, 1 used by 'a'
    } finally {
      await db.pool.query(original);
      await c.end();
    }
  });
});

describe('statistics views', () => {
  it('stats_live describes the queue and the agents now', async () => {
    await addAgents(db.pool, [1, 2, 3]);
    await db.pool.query(`update allocator.agents set is_available = false where id = 3`);
    for (let i = 0; i < 6; i++) await queue(db.pool, `r${i}`);
    const rs = await assignAll(db.pool); // 4 assigned (2 agents x 2)
    expect(rs).toHaveLength(4);
    const live = (await db.pool.query(`select * from allocator.stats_live`)).rows[0];
    expect(live).toMatchObject({
      waiting: '2', backing_off: '0', oldest_room_id: 'r4', assigning: '0', assigned_open: '4',
      agents_free: '0', agents_full: '2', agents_offline: '1', capacity_online: '4', load_online: '4',
    });
    expect(live.oldest_wait).toBeTruthy();
  });

  it('history views count assignments, failures and waiting times', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 10 });
    for (let i = 0; i < 5; i++) await queue(db.pool, `r${i}`);
    // r0 fails once (refused by agent 1), then everything is assigned
    const first = (await reserve(db.pool))!;
    await db.pool.query(`select allocator.fail_for_agent($1, 'agent cannot be assigned')`, [first.attempt_id]);
    await assignAll(db.pool);
    // pretend r4 waited 2 minutes
    await db.pool.query(`update allocator.sessions set queued_at = assigned_at - interval '2 minutes' where room_id = 'r4'`);
    await resolve(db.pool, 'r1');

    const tta = (await db.pool.query(`select period, assigned from allocator.stats_time_to_assign`)).rows;
    expect(tta).toEqual([
      { period: 'last hour', assigned: '5' },
      { period: 'last day', assigned: '5' },
    ]);
    const p = (await db.pool.query(`select extract(epoch from p90) as p90 from allocator.stats_time_to_assign limit 1`))
      .rows[0];
    expect(Number(p.p90)).toBeGreaterThan(30); // the 2-minute room pulls p90 up

    const today = (await db.pool.query(`select id, assigned_today, resolved_today from allocator.stats_agents_today`))
      .rows;
    const total = today.reduce((n, r) => n + Number(r.assigned_today), 0);
    expect(total).toBe(5);
    expect(today.reduce((n, r) => n + Number(r.resolved_today), 0)).toBe(1);

    const f = (await db.pool.query(`select outcome, error, times, rooms from allocator.stats_failures`)).rows;
    expect(f).toEqual([{ outcome: 'refused', error: 'agent cannot be assigned', times: '1', rooms: '1' }]);

    await queue(db.pool, 'still-waiting');
    const b = (await db.pool.query(`select bucket, assigned_last_day, waiting_now from allocator.stats_wait_buckets`))
      .rows;
    expect(b.map((x) => x.bucket)).toEqual(['< 10 s', '10-30 s', '30 s - 1 min', '1-5 min', '5-15 min', '> 15 min']);
    expect(b[0]).toMatchObject({ assigned_last_day: '4', waiting_now: '1' });
    expect(b[3]).toMatchObject({ assigned_last_day: '1', waiting_now: '0' });
  });

  it('live and history views use indexes, not scans, with many past sessions', async () => {
    // 100k resolved sessions from last month: the views must not read them
    await addAgents(db.pool, [1]);
    await db.pool.query(`
      insert into allocator.sessions (room_id, state, agent_id, queued_at, assigned_at, resolved_at)
      select 'old-' || g, 'resolved', 1, now() - interval '30 days', now() - interval '30 days', now() - interval '29 days'
      from generate_series(1, 100000) g`);
    await db.pool.query(`analyze allocator.sessions`);
    try {
      for (const view of ['stats_time_to_assign', 'stats_agents_today', 'stats_live', 'stats_wait_buckets', 'queue']) {
        const plan = JSON.stringify((await db.pool.query(`explain (format json) select * from allocator.${view}`)).rows[0]);
        expect(plan, view).not.toMatch(/"Node Type":"Seq Scan"[^{}]*"Relation Name":"sessions"/);
      }
    } finally {
      await db.pool.query(`delete from allocator.sessions where room_id like 'old-%'`);
    }
  });
});

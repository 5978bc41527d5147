/**
 * The set-at-a-time calls: reserve(owner, batch) hands out many reservations in one round trip, report() records
 * many outcomes in one, accept_requests() stores many webhooks of one kind in one (a bad one failing alone), and
 * batches of resolutions never deadlock with each other or with report().
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest, resolvedRequest, returningRequest } from '../support/fixtures.ts';
import { addAgents, assignAll, invariants, setting, loads, queue, resolve, sessionOf } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks, allocator.routes cascade`);
});
afterEach(async () => {
  expect(await invariants(db.pool)).toEqual([]);
});

describe('reserve(owner, batch)', () => {
  it('hands out up to `batch` pairs in arrival order, never beyond capacity', async () => {
    await addAgents(db.pool, [1, 2, 3]); // 6 slots
    for (let i = 1; i <= 10; i++) await queue(db.pool, `r${i}`);
    const first = (await db.pool.query(`select * from allocator.reserve(null, 4)`)).rows;
    expect(first.map((r) => r.room_id)).toEqual(['r1', 'r2', 'r3', 'r4']);
    const second = (await db.pool.query(`select * from allocator.reserve(null, 10)`)).rows;
    expect(second.map((r) => r.room_id)).toEqual(['r5', 'r6']); // 6 slots in all
    expect(Object.values(await loads(db.pool))).toEqual([2, 2, 2]);
  });

  it('two callers at once share the work without a room twice; one that passed over a busy agent wakes the others', async () => {
    await addAgents(db.pool, Array.from({ length: 20 }, (_, i) => i + 1));
    for (let i = 1; i <= 30; i++) await queue(db.pool, `r${i}`);
    const listen = await db.client();
    const heard: string[] = [];
    listen.on('notification', (n) => heard.push(n.payload ?? ''));
    await listen.query('listen allocator');
    const [a, b] = await Promise.all([
      db.pool.query(`select * from allocator.reserve(null, 25)`),
      db.pool.query(`select * from allocator.reserve(null, 25)`),
    ]);
    const rooms = [...a.rows, ...b.rows].map((r) => r.room_id);
    expect(new Set(rooms).size).toBe(rooms.length);
    // Each batch holds the agents it took until it commits: the other may pass them over and stop short. It then
    // says so (NOTIFY), and whoever looks again gets the rest.
    if (rooms.length < 30) {
      await new Promise((r) => setTimeout(r, 100));
      expect(heard).toContain('room');
      const rest = (await db.pool.query(`select * from allocator.reserve(null, 25)`)).rows.map((r) => r.room_id);
      rooms.push(...rest);
    }
    expect(rooms.sort()).toEqual(Array.from({ length: 30 }, (_, i) => `r${i + 1}`).sort());
  });
});

describe('reserve(owner, batch): two listeners at the same head', () => {
  it('a batch whose head another batch holds reads further down the queue, not one room at a time', async () => {
    await addAgents(db.pool, Array.from({ length: 20 }, (_, i) => i + 1));
    for (let i = 1; i <= 30; i++) await queue(db.pool, `r${i}`);
    const a = await db.client();
    const b = await db.client();
    try {
      await a.query('begin');
      const held = (await a.query(`select room_id from allocator.reserve(null, 12)`)).rows.map((r) => r.room_id);
      expect(held).toEqual(Array.from({ length: 12 }, (_, i) => `r${i + 1}`)); // uncommitted: r1-r12 locked
      await b.query('begin');
      await b.query(`set local track_functions = 'pl'`);
      const got = (await b.query(`select room_id from allocator.reserve(null, 4) order by attempt_id`)).rows.map((r) => r.room_id);
      expect(got).toEqual(['r13', 'r14', 'r15', 'r16']);
      // All four from the batch: before, it read only the first 8 agents and 8 rooms, all held by the other batch,
      // and the four went one at a time (reserve_next).
      const calls = await b.query(`select funcname, calls::int from pg_stat_xact_user_functions
                                   where schemaname = 'allocator' and funcname in ('reserve_batch', 'reserve_next')
                                   order by funcname`);
      expect(calls.rows).toEqual([{ funcname: 'reserve_batch', calls: 1 }]);
      await b.query('commit');
      await a.query('commit');
    } finally {
      await a.end();
      await b.end();
    }
  });
});

describe('reserve(owner, batch): the set-based pairing', () => {
  it('pairs the oldest rooms with the best agents, in order, each agent once per batch', async () => {
    await addAgents(db.pool, [1, 2, 3]);
    // Agent 2 had a room a moment ago: the least preferred (fewest rooms first, then idle longest, then id).
    await db.pool.query(`update allocator.agents set last_assigned_at = now() where id = 2`);
    for (const r of ['r1', 'r2', 'r3', 'r4']) await queue(db.pool, r);
    const rs = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 4)`)).rows;
    // 1, 3, then 2, each once in the batch; agent 1's second slot goes to r4 in the one-at-a-time step after it.
    expect(rs.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r1:1', 'r2:3', 'r3:2', 'r4:1']);
  });

  it('a room that excludes the batch\'s agent or waits for its last agent does not hold up the rooms behind it', async () => {
    await addAgents(db.pool, [1, 2, 3]);
    for (const r of ['r1', 'r2', 'r3']) await queue(db.pool, r);
    // r1 was refused by agent 1; r2 waits for agent 2 (its last agent, free but paused, so not in the batch)
    await db.pool.query(`update allocator.sessions set excluded_agents = '{1}' where room_id = 'r1'`);
    await db.pool.query(`update allocator.sessions set last_agent_id = 2 where room_id = 'r2'`);
    await db.pool.query(`update allocator.agents set paused = true where id in (2, 3)`);
    const rs = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 8)`)).rows;
    // Agent 2 paused is not eligible, so r2 may go to anyone: the oldest room agent 1 may take is r2.
    expect(rs.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r2:1', 'r3:1']);
    expect((await sessionOf(db.pool, 'r1')).state).toBe('waiting');
    // Agent 2 is back: r1 (refused by 1 only) goes to it.
    await db.pool.query(`update allocator.agents set paused = false where id = 2`);
    const more = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 8)`)).rows;
    expect(more.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r1:2']);
  });

  it('a retry waiting for its last agent, free and not in this batch, is left for that agent', async () => {
    await addAgents(db.pool, [1, 2]);
    await db.pool.query(`update allocator.agents set last_assigned_at = now() where id = 2`); // 2 after 1
    for (const r of ['r1', 'r2']) await queue(db.pool, r);
    await db.pool.query(`update allocator.sessions set last_agent_id = 2 where room_id = 'r1'`);
    const rs = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 1)`)).rows;
    expect(rs.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r2:1']); // r1 is for agent 2, still free
    const next = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 1)`)).rows;
    expect(next.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r1:2']);
  });

  it('with routes: each room to an agent of its divisions, a room nobody free may serve holds up nothing, overflow to anyone', async () => {
    // Divisions 10 and 20; agent 3 is in both, agent 4 in none; one room each.
    await addAgents(db.pool, [1, 2, 3, 4], { max_load: 1 });
    await db.pool.query(`update allocator.agents set division_ids = case id when 1 then '{10}'::bigint[]
                           when 2 then '{20}' when 3 then '{10,20}' else '{}' end`);
    await db.pool.query(`insert into allocator.routes (channel_id, division_ids, overflow_seconds)
                         values (10, '{10}', 3600), (20, '{20}', 3600), (30, '{30}', 3600)`);
    const routed = (room: string, channel: number | null) =>
      queue(db.pool, room, channel === null ? newRequest(room) : { ...newRequest(room), channel: { id: channel } });
    await routed('r1', 20);
    await routed('r2', 10);
    await routed('r3', null);
    await routed('r4', 30); // division 30 has nobody
    await routed('r5', 10);
    const rs = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 8)`)).rows;
    expect(rs.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r1:2', 'r2:1', 'r3:3']);
    // r5 waits for a free agent of division 10; r4 for its overflow: agent 4 may serve neither yet.
    const waiting = (await db.pool.query(`select room_id from allocator.queue order by position`)).rows;
    expect(waiting.map((r) => r.room_id)).toEqual(['r4', 'r5']);
    await db.pool.query(`update allocator.sessions set overflow_at = now() where room_id = 'r4'`);
    const next = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 8)`)).rows;
    expect(next.map((r) => `${r.room_id}:${r.agent_id}`)).toEqual(['r4:4']);
  });

  it.each([
    ['without routes', false],
    ['with every other room routed to a division all agents are in', true],
  ])('ten callers reserving batches of 8 at once, %s: never over capacity, never a room twice, and every slot filled with the oldest rooms', async (_, routed) => {
    const agents = Array.from({ length: 40 }, (_, i) => i + 1);
    await addAgents(db.pool, agents, { division_ids: '{7}' });
    if (routed) await db.pool.query(`insert into allocator.routes (channel_id, division_ids) values (7, '{7}')`);
    const capacity = (await db.pool.query(`select allocator.default_max_load() as n`)).rows[0].n as number;
    const rooms = Array.from({ length: 40 * capacity + 20 }, (_, i) => `r${String(i + 1).padStart(3, '0')}`);
    for (const [i, r] of rooms.entries()) await queue(db.pool, r, i % 2 ? { ...newRequest(r), channel: { id: 7 } } : newRequest(r));
    const got: string[] = [];
    const started = Date.now();
    await Promise.all(
      Array.from({ length: 10 }, async () => {
        for (;;) {
          const rs = (await db.pool.query(`select room_id, attempt_id from allocator.reserve(null, 8)`)).rows;
          if (rs.length === 0) return;
          got.push(...rs.map((r) => r.room_id));
          await db.pool.query(`select * from allocator.report($1::jsonb)`, [
            JSON.stringify(rs.map((r) => ({ attempt: r.attempt_id, outcome: 'assigned', service: null }))),
          ]);
        }
      }),
    );
    expect(new Set(got).size).toBe(got.length);
    expect(Math.max(...Object.values(await loads(db.pool)))).toBe(capacity);
    // Liveness: every slot was filled, and with the oldest rooms; the newest 20 wait, in order. Bound: the
    // callers stop only when a reserve returns nothing, so this is "all of it, at once".
    expect(got.sort()).toEqual(rooms.slice(0, 40 * capacity));
    const waiting = (await db.pool.query(`select room_id from allocator.queue order by position`)).rows;
    expect(waiting.map((r) => r.room_id)).toEqual(rooms.slice(40 * capacity));
    expect(Date.now() - started).toBeLessThan(30_000);
  });
});

describe('the cost of a large batch when few rooms wait', () => {
  it('reserving 16 places for the last room does not walk every free agent (buffers, the noise-free twin of time)', async () => {
    await db.pool.query(`insert into allocator.agents (id, name) select g, 'agent ' || g from generate_series(1, 3000) g`);
    await db.pool.query('analyze allocator.agents');
    await queue(db.pool, 'last');
    const plan = (await db.pool.query(`explain (analyze, buffers, format json) select * from allocator.reserve(null, 16)`)).rows[0]['QUERY PLAN'][0];
    expect((await sessionOf(db.pool, 'last')).state).toBe('reserved');
    const buffers = plan.Plan['Shared Hit Blocks'] + plan.Plan['Shared Read Blocks'];
    // One batch and one probe: a few hundred pages at most. Walking the 3,000 free agents one by one (as the
    // one-at-a-time step did, to find nothing) touched about ten per agent: 31,000.
    expect(buffers).toBeLessThan(1000);
  });

  it('a due room another caller holds costs no walk over the free agents; a retry that excludes agents still goes', async () => {
    await db.pool.query(`insert into allocator.agents (id, name) select g, 'agent ' || g from generate_series(1, 3000) g`);
    await db.pool.query('analyze allocator.agents');
    await queue(db.pool, 'held');
    const other = await db.client();
    try {
      await other.query('begin');
      await other.query(`select id from allocator.sessions where room_id = 'held' for no key update`);
      const buffersOf = async () => {
        const plan = (await db.pool.query(`explain (analyze, buffers, format json) select * from allocator.reserve(null, 16)`)).rows[0]['QUERY PLAN'][0];
        return plan.Plan['Shared Hit Blocks'] + plan.Plan['Shared Read Blocks'] as number;
      };
      expect(await buffersOf()).toBeLessThan(1000); // locking each of the 3,000 agents in turn: about 37,000
      expect((await sessionOf(db.pool, 'held')).state).toBe('waiting');
      // A room that refused the first 2,000 agents: the walk goes on past them to agent 2,001.
      await queue(db.pool, 'picky');
      await db.pool.query(`update allocator.sessions set excluded_agents = array(select generate_series(1, 2000)::bigint),
                                  attempts = 2000, reserved_at = now()
                           where room_id = 'picky'`);
      const r = (await db.pool.query(`select room_id, agent_id from allocator.reserve(null, 16)`)).rows;
      expect(r).toEqual([{ room_id: 'picky', agent_id: '2001' }]);
    } finally {
      await other.query('rollback');
      await other.end();
    }
    // Released: the room goes at the next call.
    expect((await db.pool.query(`select room_id from allocator.reserve(null, 16)`)).rows).toEqual([{ room_id: 'held' }]);
  });
});

/** What a listener runs every second besides reserve and report: the probe's rescue and the sweep. */
async function listenerChores(c: pg.ClientBase): Promise<void> {
  await c.query(`select allocator.rescue_abandoned()`);
  await c.query(`select * from allocator.sweep()`);
}

describe('plans that do not depend on the statistics', () => {
  it('reserve, report, the webhooks and the sweep never scan sessions, attempts, agents or webhooks, even when their plans were made on tiny tables', async () => {
    const c = await db.client();
    // Every connection's counts, not only c's: a pool connection that ran the previous test's invariant check
    // (which does scan) less than a second after its last flush keeps those counts pending for 10 s of idleness,
    // and they landed in the middle of this test. Each is flushed before counting.
    const pooled = await Promise.all(Array.from({ length: db.pool.totalCount }, () => db.pool.connect()));
    try {
      // Plans are cached per connection on first use: make them while every table holds a handful of rows.
      await addAgents(c, [1, 2, 3]);
      for (let round = 0; round < 8; round++) {
        for (const r of ['t1', 't2', 't3']) await queue(c, `${r}-${round}`);
        const rs = (await c.query(`select room_id, attempt_id from allocator.reserve(null, 3)`)).rows;
        await c.query(`select * from allocator.report($1::jsonb)`, [
          JSON.stringify(rs.map((r) => ({ attempt: r.attempt_id, outcome: 'assigned', service: round + 1 }))),
        ]);
        for (const r of rs) await resolve(c, r.room_id, round + 1);
        await listenerChores(c);
      }
      // Then the tables grow, with no ANALYZE (as in a burst): scans would now read thousands of pages.
      await c.query(`
        insert into allocator.agents (id, name) select g, 'agent ' || g from generate_series(100, 5099) g;
        insert into allocator.sessions (room_id, state, queued_at, resolved_at)
          select 'old-' || g, 'resolved', now() - interval '1 day', now() - interval '1 day' from generate_series(1, 30000) g;
        insert into allocator.attempts (session_id, agent_id, number, finished_at, outcome)
          select s.id, 100 + s.id % 5000, 1, now(), 'assigned' from allocator.sessions s where s.room_id like 'old-%';
        insert into allocator.webhooks (kind, room_id, outcome, payload)
          select 'new_request', 'old-' || g, 'queued', '{}'::jsonb from generate_series(1, 30000) g;`);
      const scans = async () => {
        for (const x of [c, ...pooled]) {
          await x.query(`select pg_stat_force_next_flush()`);
          await x.query(`select 1`); // the flush happens when the session goes idle
        }
        await c.query(`select pg_stat_clear_snapshot()`);
        const r = await c.query(
          `select relname, seq_scan from pg_stat_user_tables where schemaname = 'allocator'
             and relname in ('sessions', 'attempts', 'agents', 'webhooks') order by relname`,
        );
        return Object.fromEntries(r.rows.map((x) => [x.relname, Number(x.seq_scan)]));
      };
      const before = await scans();
      for (let round = 0; round < 5; round++) {
        for (const r of ['u1', 'u2', 'u3']) await queue(c, `${r}-${round}`);
        const rs = (await c.query(`select room_id, attempt_id from allocator.reserve(null, 3)`)).rows;
        expect(rs).toHaveLength(3);
        await c.query(`select * from allocator.report($1::jsonb)`, [
          JSON.stringify(rs.map((r) => ({ attempt: r.attempt_id, outcome: 'assigned', service: 100 + round }))),
        ]);
        for (const r of rs) await resolve(c, r.room_id, 100 + round);
        await listenerChores(c);
      }
      expect(await scans()).toEqual(before);
    } finally {
      for (const x of pooled) x.release();
      await c.end();
    }
  });
});

describe('report(outcomes)', () => {
  it('records every kind of outcome in one call, each as its own function would', async () => {
    await addAgents(db.pool, [1, 2, 3, 4]);
    for (const r of ['a', 'b', 'c', 'd']) await queue(db.pool, r);
    const rs = (await db.pool.query(`select * from allocator.reserve(null, 4)`)).rows;
    const by = Object.fromEntries(rs.map((r) => [r.room_id, r.attempt_id]));
    const out = await db.pool.query(`select attempt_id, result from allocator.report($1::jsonb)`, [
      JSON.stringify([
        { attempt: by.a, outcome: 'assigned', service: 5 },
        { attempt: by.b, outcome: 'transient', reason: 'HTTP 503', retry_after: null, maybe_assigned: true },
        { attempt: by.c, outcome: 'refused', reason: 'HTTP 400' },
        { attempt: by.d, outcome: 'released', reason: 'shutting down', delay: 0, maybe_assigned: false },
      ]),
    ]);
    expect(out.rows.map((r) => r.result)).toEqual(['true', 'waiting', 'waiting', 'waiting']);
    expect(await sessionOf(db.pool, 'a')).toMatchObject({ state: 'assigned', service_id: '5' });
    expect(await sessionOf(db.pool, 'b')).toMatchObject({ state: 'waiting', holds_slot: true });
    expect((await sessionOf(db.pool, 'c')).excluded_agents).toHaveLength(1);
    expect(await sessionOf(db.pool, 'd')).toMatchObject({ state: 'waiting', attempts: 0 });
  });

  it('confirms current reservations in one set; a stale one, one resolved in flight, one listed twice as confirm() would', async () => {
    await addAgents(db.pool, [1, 2, 3]);
    for (const r of ['a', 'b', 'c']) await queue(db.pool, r);
    const rs = (await db.pool.query(`select * from allocator.reserve(null, 3)`)).rows;
    const by = Object.fromEntries(rs.map((r) => [r.room_id, r]));
    await resolve(db.pool, 'b'); // resolved in Qiscus while its call was out: the answer then names a new service
    await db.pool.query(`update allocator.qiscus_health set down_since = now()`); // any answer says Qiscus is up
    const out = await db.pool.query(`select attempt_id, result from allocator.report($1::jsonb)`, [
      JSON.stringify([
        { attempt: by.a.attempt_id, outcome: 'assigned', service: 5 },
        { attempt: by.b.attempt_id, outcome: 'assigned', service: 6 },
        { attempt: by.c.attempt_id, outcome: 'assigned', service: 7 },
        { attempt: by.c.attempt_id, outcome: 'assigned', service: 7 },
      ]),
    ]);
    expect(out.rows.map((r) => r.result)).toEqual(['true', 'false', 'true', 'false']);
    expect(await sessionOf(db.pool, 'a')).toMatchObject({ state: 'assigned', service_id: '5', attempt_id: null, owner: null });
    expect(await sessionOf(db.pool, 'c')).toMatchObject({ state: 'assigned', service_id: '7', holds_slot: false });
    // b landed after its resolution: held without us until service 6's own resolution arrives
    expect(await sessionOf(db.pool, 'b')).toMatchObject({ state: 'resolved', late_service_id: '6', attempt_id: null });
    const agentOfB = Number(by.b.agent_id);
    const a = await db.pool.query(`select our_load, external_load from allocator.agents where id = $1`, [agentOfB]);
    expect(a.rows[0]).toEqual({ our_load: 0, external_load: 1 });
    const attempts = await db.pool.query(`select outcome, count(*)::int as n from allocator.attempts group by 1 order by 1`);
    expect(attempts.rows).toEqual([{ outcome: 'assigned', n: 2 }, { outcome: 'resolved', n: 1 }]);
    expect((await db.pool.query(`select down_since from allocator.qiscus_health`)).rows[0].down_since).toBeNull();
  });

  it('refuses an unknown outcome, changing nothing', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const r = (await db.pool.query(`select * from allocator.reserve()`)).rows[0];
    await expect(
      db.pool.query(`select * from allocator.report($1::jsonb)`, [JSON.stringify([{ attempt: r.attempt_id, outcome: 'maybe' }])]),
    ).rejects.toThrow(/unknown outcome/);
    expect((await sessionOf(db.pool, 'a')).state).toBe('reserved');
    await db.pool.query(`select allocator.confirm($1)`, [r.attempt_id]);
  });
});

describe('accept_new_requests(requests)', () => {
  it('does what the webhooks do one after another: repeats in the batch, every kind of room', async () => {
    // The same rooms twice, on a fresh slate each time: once the webhooks in one set-based call (a room's repeats in
    // later rounds; any error would fail it whole), once one call each.
    const setUp = async () => {
      await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks cascade`);
      await addAgents(db.pool, [1, 2]);
      await queue(db.pool, 'assigned');
      const a = (await db.pool.query(`select * from allocator.reserve()`)).rows[0];
      await db.pool.query(`select allocator.confirm($1, 400)`, [a.attempt_id]);
      await queue(db.pool, 'resolved');
      const r = (await db.pool.query(`select * from allocator.reserve()`)).rows[0];
      await db.pool.query(`select allocator.confirm($1, 500)`, [r.attempt_id]);
      await resolve(db.pool, 'resolved', 500);
      await queue(db.pool, 'in-flight');
      await db.pool.query(`select * from allocator.reserve()`); // its call is still out when the room is resolved
      await resolve(db.pool, 'in-flight', 600);
      await queue(db.pool, 'waiting');
    };
    const items = [
      newRequest('assigned'),
      returningRequest('in-flight', 600), // a returning customer while the last call may still land: waits for it
      newRequest('in-flight'),
      newRequest('new'),
      newRequest('new'),
      newRequest('new'),
      newRequest('resolved'), // a late copy of the webhook that opened the resolved session
      returningRequest('resolved', 500),
      newRequest('waiting'),
    ].map((payload, i) => ({ payload, request_id: `r${i}` }));
    const outcome = async () => {
      const s = await db.pool.query(
        `select room_id, state, prior_service_id, holds_slot, next_attempt_at > now() as backing_off, last_error
         from allocator.sessions order by room_id, id`,
      );
      const w = await db.pool.query(`select room_id, request_id, outcome from allocator.webhooks order by room_id, id`);
      return { sessions: s.rows, webhooks: w.rows };
    };

    await setUp();
    const together = (
      await db.pool.query(`select * from allocator.accept_new_requests($1::jsonb) order by ord`, [JSON.stringify(items)])
    ).rows;
    const afterBatch = await outcome();
    await setUp();
    const alone = [];
    for (const item of items) {
      alone.push((await db.pool.query(`select * from allocator.accept_new_request($1, $2)`, [item.payload, item.request_id])).rows[0]);
    }
    const afterAlone = await outcome();

    expect(together.map((r) => r.outcome)).toEqual([
      'already_assigned', 'queued', 'already_queued', 'queued', 'already_queued', 'already_queued', 'duplicate', 'queued',
      'already_queued',
    ]);
    expect(alone.map((r) => r.outcome)).toEqual(together.map((r) => r.outcome));
    expect(together.every((r) => r.session_id !== null && r.webhook_id !== null)).toBe(true);
    // a room's repeats name the session its first webhook opened
    expect(together[2].session_id).toBe(together[1].session_id);
    expect(together[5].session_id).toBe(together[3].session_id);
    expect(afterBatch).toEqual(afterAlone);
    expect(afterBatch.sessions.find((x) => x.room_id === 'in-flight' && x.state === 'waiting')).toMatchObject({
      backing_off: true,
      last_error: 'waiting for the answer of the assign call made for the previous session',
    });
  });

  it('a batch of repeats writes no session, so it does not hold the intake lock that moving the queue head needs', async () => {
    await queue(db.pool, 'r1');
    const c = await db.client();
    const intakeLocks = async () =>
      Number((await db.pool.query(
        `select count(*) as n from pg_locks where locktype = 'advisory' and classid = 1367 and objid = 0 and pid = $1`,
        [(await c.query(`select pg_backend_pid() as pid`)).rows[0].pid],
      )).rows[0].n);
    const send = (rooms: string[]) =>
      c.query(`select * from allocator.accept_new_requests($1::jsonb) order by ord`, [
        JSON.stringify(rooms.map((r, i) => ({ payload: newRequest(r), request_id: `q${i}` }))),
      ]);
    try {
      await c.query('begin');
      expect((await send(['r1', 'r1'])).rows.map((r) => r.outcome)).toEqual(['already_queued', 'already_queued']);
      expect(await intakeLocks()).toBe(0);
      expect((await send(['r2'])).rows.map((r) => r.outcome)).toEqual(['queued']);
      expect(await intakeLocks()).toBe(1); // held shared until commit (take_intake_lock)
      await c.query('commit');
    } finally {
      await c.end();
    }
  });
});

describe('accept_requests(kind, requests)', () => {
  const batch = (kind: string, items: Array<{ payload: unknown; request_id: string }>, q: Pick<pg.Pool, 'query'> = db.pool) =>
    q.query(`select * from allocator.accept_requests($1, $2::jsonb) order by ord`, [kind, JSON.stringify(items)]);

  it('stores a batch of allocation webhooks, each with its own outcome; a bad one fails alone', async () => {
    const res = await batch('new_request', [
      { payload: newRequest('x'), request_id: 'q1' },
      { payload: { ...newRequest('y'), room_id: '' }, request_id: 'q2' }, // no room: refused in SQL
      { payload: newRequest('x'), request_id: 'q3' }, // a repeat in the same batch
      { payload: newRequest('z'), request_id: 'q4' },
    ]);
    expect(res.rows.map((r) => [r.outcome, r.error_code])).toEqual([
      ['queued', null],
      [null, '22023'],
      ['already_queued', null],
      ['queued', null],
    ]);
    const w = await db.pool.query(`select request_id from allocator.webhooks order by id`);
    expect(w.rows.map((r) => r.request_id)).toEqual(['q1', 'q3', 'q4']);
  });

  it('stores a batch of resolutions: slots freed, a repeat and an unknown room answered, a bad one failing alone', async () => {
    await addAgents(db.pool, [1, 2]);
    for (const room of ['a', 'b', 'c']) await queue(db.pool, room);
    const assigned = await assignAll(db.pool);
    expect(assigned).toHaveLength(3);
    const res = await batch('close_request', [
      { payload: resolvedRequest('a'), request_id: 'r1' },
      { payload: resolvedRequest('a'), request_id: 'r2' }, // a repeat in the same batch
      { payload: { service: { room_id: ' ' } }, request_id: 'r3' }, // no room: refused in SQL
      { payload: resolvedRequest('b'), request_id: 'r4' },
      { payload: resolvedRequest('nobody'), request_id: 'r5' },
    ]);
    expect(res.rows.map((r) => [r.outcome, r.error_code])).toEqual([
      ['resolved', null],
      ['already_resolved', null],
      [null, '22023'],
      ['resolved', null],
      ['unknown_room', null],
    ]);
    const states = await db.pool.query(`select room_id, state::text from allocator.sessions order by room_id`);
    expect(states.rows).toEqual([
      { room_id: 'a', state: 'resolved' },
      { room_id: 'b', state: 'resolved' },
      { room_id: 'c', state: 'assigned' },
    ]);
    const load = await db.pool.query(`select sum(our_load)::int as n from allocator.agents`);
    expect(load.rows[0].n).toBe(1);
    expect(await invariants(db.pool)).toEqual([]);
  });

  it('refuses an unknown kind, changing nothing', async () => {
    await expect(batch('other', [{ payload: newRequest('x'), request_id: 'q1' }])).rejects.toThrow(/unknown kind/);
    expect((await db.pool.query(`select count(*)::int as n from allocator.webhooks`)).rows[0].n).toBe(0);
  });

  it('batches of resolutions beside reservations and reports of the same agents: no deadlock, nothing lost, every slot freed', async () => {
    // 10 agents of capacity 8, 6 rounds of 80 rooms: each round's rooms are reserved and confirmed through report()
    // in batches while the previous round's rooms are resolved in batches of random rooms (sorted, as the web app
    // sends them; a room in several batches), from four connections at once. Every agent has rooms all over each
    // batch, so a batch that locked its agents one resolution at a time would cross another's order. A deadlock
    // would surface as an error row or a thrown error.
    const AGENTS = 10;
    const ROUND = 80;
    await setting(db.pool, 'default_max_load', 8);
    await addAgents(db.pool, Array.from({ length: AGENTS }, (_, i) => i + 1));
    const clients = await Promise.all(Array.from({ length: 6 }, () => db.pool.connect()));
    const errors: string[] = [];
    let seed = 7;
    const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    try {
      let previous: string[] = [];
      for (let round = 0; round < 6; round++) {
        const rooms = Array.from({ length: ROUND }, (_, i) => `r${round}-${String(i).padStart(3, '0')}`);
        await batch('new_request', rooms.map((room) => ({ payload: newRequest(room), request_id: room })));
        const closing = previous;
        const resolvers = clients.slice(0, 4).map(async (c, k) => {
          for (let i = 0; i < closing.length / 4; i++) {
            const slice = [...new Set(Array.from({ length: 12 }, () => closing[Math.floor(random() * closing.length)]!))].sort();
            const res = await batch('close_request', slice.map((room) => ({ payload: resolvedRequest(room), request_id: `${room}-${k}` })), c);
            for (const r of res.rows) if (r.error_code) errors.push(`${r.error_code} ${r.error}`);
          }
          // Then every room, so that the round is surely resolved.
          const res = await batch('close_request', closing.map((room) => ({ payload: resolvedRequest(room), request_id: `${room}-all-${k}` })), c);
          for (const r of res.rows) if (r.error_code) errors.push(`${r.error_code} ${r.error}`);
        });
        const reservers = clients.slice(4).map(async (c) => {
          for (;;) {
            const got = (await c.query(`select * from allocator.reserve(null, 8)`)).rows;
            if (got.length === 0) return;
            await c.query(`select * from allocator.report($1::jsonb)`, [
              JSON.stringify(got.map((g) => ({ attempt: g.attempt_id, outcome: 'assigned' }))),
            ]);
          }
        });
        await Promise.all([...resolvers, ...reservers]);
        // What the reservers left for want of a free slot (the resolutions freed them meanwhile) is taken now.
        await assignAll(db.pool);
        previous = rooms;
      }
    } finally {
      for (const c of clients) c.release();
    }
    expect(errors).toEqual([]);
    // The last round is still open; every earlier one is resolved, and its slots freed.
    const open = await db.pool.query(`select state::text, count(*)::int as n from allocator.sessions group by 1 order by 1`);
    expect(open.rows).toEqual([
      { state: 'assigned', n: ROUND },
      { state: 'resolved', n: 5 * ROUND },
    ]);
    expect((await db.pool.query(`select sum(our_load)::int as n from allocator.agents`)).rows[0].n).toBe(ROUND);
    expect(await invariants(db.pool)).toEqual([]);
  });
});

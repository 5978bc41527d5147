/**
 * Routing by division in SQL: routes decide which divisions' agents may serve a room (first match by position),
 * overflow to anyone after its time, no head-of-line blocking, arrival order within a division, membership from
 * the roster pull, and a change of routes or membership applying to waiting rooms at once.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { addAgents, confirm, invariants, queue } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks,
                       allocator.routes, allocator.divisions cascade`);
});
afterEach(async () => {
  expect(await invariants(db.pool)).toEqual([]);
});

const SALES = 438;
const SUPPORT = 439;

/** Divisions and members as the roster pull hands them over. */
async function divisions(members: Record<number, number[]>) {
  await db.pool.query(`select allocator.sync_divisions($1::jsonb, $2::jsonb)`, [
    JSON.stringify(Object.keys(members).map((id) => ({ id: Number(id), name: `division ${id}` }))),
    JSON.stringify(Object.entries(members).map(([d, agents]) => ({ division_id: Number(d), agent_ids: agents }))),
  ]);
}

const room = (id: string, source = 'qiscus', channel?: number) =>
  queue(db.pool, id, newRequest(id, { source, ...(channel === undefined ? {} : { channel: { id: channel, name: 'c' } }) }));

/** Reserves and confirms everything assignable; returns "room→agent" in order. */
async function assignAll(): Promise<string[]> {
  const out: string[] = [];
  for (;;) {
    const r = (await db.pool.query(`select * from allocator.reserve()`)).rows[0];
    if (!r) return out;
    await confirm(db.pool, r.attempt_id);
    out.push(`${r.room_id}→${r.agent_id}`);
  }
}

describe('routes', () => {
  it('send routed rooms only to their divisions, unrouted rooms to anyone', async () => {
    await addAgents(db.pool, [1, 2, 3], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('wa', '{${SUPPORT}}')`);
    for (const r of ['w1', 'w2']) await room(r, 'wa');
    await room('q1', 'qiscus');
    const got = await assignAll();
    expect(got.filter((x) => x.startsWith('w'))).toEqual(['w1→2', 'w2→2']);
    expect(got.filter((x) => x.startsWith('q'))).toHaveLength(1);
  });

  it('never block the rooms behind on a room whose division has nobody free; keep arrival order within a division', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 1 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('wa', '{${SALES}}'), ('line', '{${SUPPORT}}')`);
    await db.pool.query(`update allocator.agents set paused = true where id = 1`); // sales is away
    await room('sales-1', 'wa');
    await room('support-1', 'line');
    await room('support-2', 'line');
    expect(await assignAll()).toEqual(['support-1→2']);
    await db.pool.query(`update allocator.agents set paused = false where id = 1`);
    expect(await assignAll()).toEqual(['sales-1→1']);
    const q = await db.pool.query(`select room_id, division_ids from allocator.queue`);
    expect(q.rows).toEqual([{ room_id: 'support-2', division_ids: [String(SUPPORT)] }]);
  });

  it('take the first match by position: a channel route before its source route; a webhook without channel skips channel routes', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`insert into allocator.routes (source, division_ids, position) values ('qiscus', '{${SUPPORT}}', 10)`);
    await db.pool.query(`insert into allocator.routes (channel_id, division_ids, position) values (4321, '{${SALES}}', 0)`);
    await room('widget', 'qiscus', 4321);
    await room('other-channel', 'qiscus', 99);
    await room('no-channel', 'qiscus');
    const q = await db.pool.query(`select room_id, division_ids from allocator.queue order by room_id`);
    expect(q.rows).toEqual([
      { room_id: 'no-channel', division_ids: [String(SUPPORT)] },
      { room_id: 'other-channel', division_ids: [String(SUPPORT)] },
      { room_id: 'widget', division_ids: [String(SALES)] },
    ]);
    const s = await db.pool.query(`select channel_id from allocator.sessions where room_id = 'widget'`);
    expect(s.rows[0].channel_id).toBe('4321');
  });

  it('overflow to any agent after overflow_seconds, and next_due_at wakes the listener for it', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [] });
    await db.pool.query(`update allocator.agents set paused = true where id = 1`);
    await db.pool.query(`insert into allocator.routes (source, division_ids, overflow_seconds) values ('wa', '{${SALES}}', 1)`);
    await room('w', 'wa');
    expect(await assignAll()).toEqual([]);
    const due = (await db.pool.query(`select allocator.next_due_at() as t`)).rows[0].t as Date;
    expect(due.getTime() - Date.now()).toBeLessThan(1100);
    await new Promise((r) => setTimeout(r, Math.max(0, due.getTime() - Date.now()) + 50));
    expect((await db.pool.query(`select division_ids from allocator.queue`)).rows[0].division_ids).toBeNull();
    expect(await assignAll()).toEqual(['w→2']);
  });

  it('apply a change of routes to the rooms already waiting, at once', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`update allocator.agents set paused = true where id = 2`);
    await room('w1', 'wa');
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('wa', '{${SUPPORT}}')`);
    expect(await assignAll()).toEqual([]); // support is paused; sales may not take it any more
    await db.pool.query(`update allocator.routes set division_ids = '{${SALES}}'`);
    expect(await assignAll()).toEqual(['w1→1']);
  });
});

describe('a change of routes racing the rooms', () => {
  it('a room reserved while the routes change waits again, if its call fails, under the new route', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('wa', '{${SALES}}')`);
    await room('w1', 'wa');
    const r = (await db.pool.query(`select * from allocator.reserve()`)).rows[0];
    expect(r.agent_id).toBe('1');
    await db.pool.query(`update allocator.routes set division_ids = '{${SUPPORT}}'`);
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 429', 0)`, [r.attempt_id]);
    const s = (await db.pool.query(`select state, division_ids from allocator.sessions where room_id = 'w1'`)).rows[0];
    expect(s).toEqual({ state: 'waiting', division_ids: [String(SUPPORT)] });
    await db.pool.query(`update allocator.sessions set next_attempt_at = now() where room_id = 'w1'`);
    expect(await assignAll()).toEqual(['w1→2']);
  });

  it('a webhook still being written when a change of routes commits gets the new route', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1], [SUPPORT]: [2] });
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('wa', '{${SALES}}')`);
    const webhook = await db.client();
    const dba = await db.client();
    try {
      await webhook.query('begin');
      await queue(webhook, 'w1', newRequest('w1', { source: 'wa' })); // read the routes: Sales
      // The change commits while the webhook's transaction is open: it waits for it (a moment), then reroutes.
      const change = dba.query(`update allocator.routes set division_ids = '{${SUPPORT}}'`);
      const early = await Promise.race([change.then(() => 'committed'), new Promise((r) => setTimeout(() => r('waiting'), 300))]);
      expect(early).toBe('waiting');
      await webhook.query('commit');
      await change;
      const s = (await db.pool.query(`select division_ids from allocator.sessions where room_id = 'w1'`)).rows[0];
      expect(s.division_ids).toEqual([String(SUPPORT)]);
      // And a DBA's transaction left open holds up no webhook: the reroute runs when it commits.
      await dba.query('begin');
      await dba.query(`update allocator.routes set division_ids = '{${SALES}}'`);
      await room('w2', 'wa'); // returns at once, with the routes still committed (Support)
      await dba.query('commit');
      const w = await db.pool.query(`select room_id, division_ids from allocator.sessions order by room_id`);
      expect(w.rows.map((x) => x.division_ids)).toEqual([[String(SALES)], [String(SALES)]]);
    } finally {
      await webhook.end();
      await dba.end();
    }
  });
});

describe('membership', () => {
  it('comes from the roster pull: an agent in two divisions, a change picked up at the next pull, views show it', async () => {
    await addAgents(db.pool, [1, 2], { max_load: 5 });
    await divisions({ [SALES]: [1, 2], [SUPPORT]: [2] });
    const al = await db.pool.query(`select id, division_ids from allocator.agent_load order by id`);
    expect(al.rows).toEqual([
      { id: '1', division_ids: [String(SALES)] },
      { id: '2', division_ids: [String(SALES), String(SUPPORT)] },
    ]);
    await db.pool.query(`insert into allocator.routes (source, division_ids) values ('line', '{${SUPPORT}}')`);
    await db.pool.query(`update allocator.agents set paused = true where id = 2`);
    await room('l1', 'line');
    const dq = await db.pool.query(`select id, waiting::int, agents_online::int, free_slots::int from allocator.division_queue`);
    expect(dq.rows).toEqual([
      { id: String(SALES), waiting: 0, agents_online: 1, free_slots: 5 },
      { id: String(SUPPORT), waiting: 1, agents_online: 0, free_slots: 0 },
    ]);
    expect(await assignAll()).toEqual([]);
    await divisions({ [SALES]: [1, 2], [SUPPORT]: [1, 2] }); // agent 1 joins support in Qiscus
    expect(await assignAll()).toEqual(['l1→1']);
    await divisions({ [SALES]: [2] }); // support deleted, agent 1 left sales
    expect((await db.pool.query(`select division_ids from allocator.agents where id = 1`)).rows[0].division_ids).toEqual([]);
  });
});

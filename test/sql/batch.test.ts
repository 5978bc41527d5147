/**
 * The set-at-a-time calls: reserve(owner, batch) hands out many reservations in one round trip, report() records
 * many outcomes in one, accept_new_requests() stores many allocation webhooks in one (a bad one failing alone).
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { addAgents, invariants, loads, queue, sessionOf } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks cascade`);
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
  it('stores a batch, each with its own outcome; a bad one fails alone', async () => {
    const res = await db.pool.query(`select * from allocator.accept_new_requests($1::jsonb) order by ord`, [
      JSON.stringify([
        { payload: newRequest('x'), request_id: 'q1' },
        { payload: { ...newRequest('y'), room_id: '' }, request_id: 'q2' }, // no room: refused in SQL
        { payload: newRequest('x'), request_id: 'q3' }, // a repeat in the same batch
        { payload: newRequest('z'), request_id: 'q4' },
      ]),
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
});

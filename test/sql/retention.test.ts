/**
 * Retention: finished sessions older than retention_days go with their attempts, and old webhooks with them, in
 * batches; open sessions, recent history, and everything when retention_days is 0, stay.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { addAgents, assignAll, queue, resolve, setting } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

const count = async (table: string) => (await db.pool.query(`select count(*)::int as n from allocator.${table}`)).rows[0].n;

describe('prune_history', () => {
  it('deletes what ended before the retention window, in batches, and nothing else', async () => {
    await addAgents(db.pool, [1], { max_load: 100 });
    for (let i = 0; i < 5; i++) await queue(db.pool, `old-${i}`);
    await queue(db.pool, 'open-old'); // still open after 40 days: it and its webhooks stay
    await assignAll(db.pool);
    for (let i = 0; i < 5; i++) await resolve(db.pool, `old-${i}`);
    // they ended 40 days ago
    await db.pool.query(`update allocator.sessions set resolved_at = now() - interval '40 days' where state = 'resolved'`);
    await db.pool.query(`update allocator.webhooks set received_at = now() - interval '40 days'`);
    await queue(db.pool, 'recent');
    await assignAll(db.pool);
    await resolve(db.pool, 'recent');
    expect(await count('sessions')).toBe(7);

    await setting(db.pool, 'retention_days', 0);
    expect((await db.pool.query(`select allocator.prune_history()`)).rows[0].prune_history).toBe(0);

    await setting(db.pool, 'retention_days', 30);
    expect((await db.pool.query(`select allocator.prune_history(2) as n`)).rows[0].n).toBe(4); // 2 sessions + 2 webhooks
    for (let i = 0; i < 10; i++) await db.pool.query(`select allocator.prune_history(2)`);
    const left = await db.pool.query(`select room_id from allocator.sessions order by room_id`);
    expect(left.rows.map((r) => r.room_id)).toEqual(['open-old', 'recent']);
    expect(await count('attempts')).toBe(2); // open-old's and recent's
    const hooks = await db.pool.query(`select room_id from allocator.webhooks order by id`);
    expect(hooks.rows.map((r) => r.room_id).sort()).toEqual(['open-old', 'recent', 'recent']);
    // the stats views still answer on what is left
    expect((await db.pool.query(`table allocator.stats_time_to_assign`)).rows).toHaveLength(2);
    // and the sweep does it too
    expect((await db.pool.query(`select * from allocator.sweep()`)).rows[0]).toMatchObject({ pruned: 0 });
  });
});

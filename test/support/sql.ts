/** Thin wrappers over the allocator's SQL functions, for tests that call the SQL core directly. */
import type pg from 'pg';
import type { Reservation } from '../../src/listener/allocator-loop.ts';
import { newRequest, resolvedRequest, type Json } from './fixtures.ts';

export type { Reservation };

type Q = Pick<pg.Pool, 'query'> | pg.ClientBase;

export async function addAgents(db: Q, ids: number[], extra: Record<string, unknown> = {}): Promise<void> {
  const cols = Object.keys(extra);
  for (const id of ids) {
    await db.query(
      `insert into allocator.agents (id, name${cols.map((c) => `, ${c}`).join('')})
       values ($1, $2${cols.map((_, i) => `, $${i + 3}`).join('')})`,
      [id, `agent ${id}`, ...Object.values(extra)],
    );
  }
}

export async function queue(db: Q, roomId: string, payload: Json = newRequest(roomId)) {
  const r = await db.query(`select * from allocator.accept_new_request($1::jsonb, 'test')`, [payload]);
  return r.rows[0] as { outcome: string; session_id: string; webhook_id: string };
}

export async function resolve(db: Q, roomId: string, serviceId?: number) {
  const r = await db.query(`select * from allocator.accept_close_request($1::jsonb, 'test')`, [
    resolvedRequest(roomId, serviceId),
  ]);
  return r.rows[0] as { outcome: string; session_id: string | null; webhook_id: string };
}

export async function reserve(db: Q): Promise<Reservation | undefined> {
  const r = await db.query(`select * from allocator.reserve()`);
  return r.rows[0];
}

export async function confirm(db: Q, attemptId: string, serviceId: number | null = null): Promise<boolean> {
  const r = await db.query(`select allocator.confirm($1, $2) as ok`, [attemptId, serviceId]);
  return r.rows[0].ok;
}

/** Reserves and confirms until nothing more can be assigned; returns what was assigned, in order. */
export async function assignAll(db: Q): Promise<Reservation[]> {
  const out: Reservation[] = [];
  for (;;) {
    const r = await reserve(db);
    if (!r) return out;
    await confirm(db, r.attempt_id);
    out.push(r);
  }
}

export async function setting(db: Q, key: string, value: string | number): Promise<void> {
  await db.query(`update allocator.settings set value = $2 where key = $1`, [key, String(value)]);
}

export async function invariants(db: Q): Promise<Array<{ problem: string; detail: string }>> {
  return (await db.query(`select * from allocator.check_invariants()`)).rows;
}

export async function sessionOf(db: Q, roomId: string) {
  const r = await db.query(`select * from allocator.sessions where room_id = $1 order by id desc limit 1`, [roomId]);
  return r.rows[0];
}

export async function loads(db: Q): Promise<Record<string, number>> {
  const r = await db.query(`select id, load from allocator.agent_load`);
  return Object.fromEntries(r.rows.map((x) => [x.id, x.load]));
}

/**
 * A listener's presence (src/listener/presence.ts): a connection of its own holding the advisory lock of a fresh
 * listener id. Reserve under `id`; end `client` and that listener is dead: rescue_abandoned() puts its
 * reservations back at once, whatever the lease.
 */
export async function listenerPresence(db: { client(): Promise<pg.Client> }): Promise<{ id: number; client: pg.Client }> {
  const client = await db.client();
  const id = (await client.query(`select nextval('allocator.listener_ids')::int as id`)).rows[0].id;
  await client.query(`select pg_advisory_lock(1365, $1)`, [id]);
  return { id, client };
}

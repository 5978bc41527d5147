/**
 * Pulls Qiscus's whole agent roster and hands it to SQL (allocator.sync_agents), which decides who is eligible
 * and how many rooms each agent holds that we did not assign.
 */
import type pg from 'pg';
import type { QiscusAgent } from '../qiscus/client.ts';

export interface RosterSource {
  listAllAgents(): Promise<QiscusAgent[]>;
}

export interface SyncResult {
  agents: number;
  changed: number;
  ms: number;
}

export async function syncRoster(pool: pg.Pool, qiscus: RosterSource): Promise<SyncResult> {
  const t0 = performance.now();
  // The database's clock, not ours: sync_agents compares it with assigned_at/resolved_at written by SQL.
  const started = (await pool.query<{ t: Date }>(`select clock_timestamp() as t`)).rows[0]!.t;
  const agents = await qiscus.listAllAgents();
  const res = await pool.query<{ n: number }>(`select allocator.sync_agents($1::jsonb, $2, true) as n`, [
    JSON.stringify(agents),
    started,
  ]);
  return { agents: agents.length, changed: res.rows[0]!.n, ms: performance.now() - t0 };
}

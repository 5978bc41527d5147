/**
 * Pulls Qiscus's whole agent roster, then its divisions and who is in each, and hands them to SQL
 * (allocator.sync_agents, allocator.sync_divisions), which decides who is eligible, how many rooms each agent holds
 * that we did not assign, and which rooms each may serve.
 */
import type pg from 'pg';
import type { QiscusAgent, QiscusDivision } from '../qiscus/client.ts';

export interface RosterSource {
  listAllAgents(): Promise<QiscusAgent[]>;
  listAllDivisions(): Promise<QiscusDivision[]>;
  listDivisionAgentIds(divisionId: number): Promise<number[]>;
}

export interface SyncResult {
  agents: number;
  changed: number;
  /** Divisions pulled; null when their pull failed (the last complete membership stands). */
  divisions: number | null;
  divisionError?: string;
  ms: number;
}

/** Division member lists pulled at once (one call per division per sync). */
const DIVISION_CONCURRENCY = 4;

export async function syncRoster(pool: pg.Pool, qiscus: RosterSource): Promise<SyncResult> {
  const t0 = performance.now();
  // The database's clock, not ours: sync_agents compares it with assigned_at/resolved_at written by SQL.
  const started = (await pool.query<{ t: Date }>(`select clock_timestamp() as t`)).rows[0]!.t;
  const agents = await qiscus.listAllAgents();
  const res = await pool.query<{ n: number }>(`select allocator.sync_agents($1::jsonb, $2, true) as n`, [
    JSON.stringify(agents),
    started,
  ]);
  const result: SyncResult = { agents: agents.length, changed: res.rows[0]!.n, divisions: null, ms: 0 };
  try {
    result.divisions = await syncDivisions(pool, qiscus);
  } catch (e) {
    // A failed or partial pull changes no membership; the agents' own sync above stands.
    result.divisionError = e instanceof Error ? e.message : String(e);
  }
  result.ms = performance.now() - t0;
  return result;
}

async function syncDivisions(pool: pg.Pool, qiscus: RosterSource): Promise<number> {
  const divisions = await qiscus.listAllDivisions();
  const members: Array<{ division_id: number; agent_ids: number[] }> = [];
  let next = 0;
  const worker = async () => {
    while (next < divisions.length) {
      const d = divisions[next++]!;
      members.push({ division_id: d.id, agent_ids: await qiscus.listDivisionAgentIds(d.id) });
    }
  };
  await Promise.all(Array.from({ length: Math.min(DIVISION_CONCURRENCY, divisions.length) }, worker));
  await pool.query(`select allocator.sync_divisions($1::jsonb, $2::jsonb)`, [
    JSON.stringify(divisions),
    JSON.stringify(members),
  ]);
  return divisions.length;
}

/**
 * Shared pieces of the liveness tests (free slots used within a second, dead listeners, evidence, outages): the
 * service as real processes at the SHIPPED defaults, a timed wait that states its bound, and the safety checks
 * every liveness test makes too.
 *
 * Knob: LIVENESS_OBSERVE_SECONDS (default 0). A test that misses its bound fails at the bound. With this set, it
 * keeps watching up to that many seconds after the bound's start, prints how long the thing really took (or that it
 * still had not happened), and carries on to its later checks; it fails all the same. That is how the "before"
 * figures of today's code are taken.
 */
import { expect } from 'vitest';
import { disposeAfterEach } from '../support/cleanup.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, sleep, startStack, type Stack } from '../support/processes.ts';
import type { SimAgentInit, SimulatorOptions, Simulator } from '../../src/simulator/qiscus-simulator.ts';

/**
 * The shipped defaults of the settings the liveness tests are about, written out (startStack() leaves them unset,
 * which is the same): AGENT_SYNC_SECONDS 30, SWEEP_SECONDS 5. QISCUS_TIMEOUT_MS (10 s), LISTENER_CONCURRENCY (32)
 * and lease_seconds (30) are left at their defaults.
 */
export const SHIPPED_ENV = { AGENT_SYNC_SECONDS: '30', SWEEP_SECONDS: '5' } as const;

export const OBSERVE_MS = Math.max(0, Number(process.env.LIVENESS_OBSERVE_SECONDS ?? 0) || 0) * 1000;

/** Agents 1..n (capacity: default_max_load). */
export const agents = (n: number, from = 1): SimAgentInit[] =>
  Array.from({ length: n }, (_, i) => ({ id: from + i, name: `Agent ${from + i}` }));

/** A supervisor: listed in the roster, may resolve rooms, never serves them. */
export const SUPERVISOR: SimAgentInit = { id: 900, name: 'Supervisor', type_as_string: 'supervisor' };

const disposeLater = disposeAfterEach();

/**
 * A database of its own, then simulator + web + listeners at the shipped defaults (plus `env`).
 * `capacity` sets `default_max_load` before anything starts, as a DBA would (README, "Tune"); the `capacity`
 * returned is default_max_load as the database then has it (the shipped default unless set).
 */
export async function liveStack(opts: {
  agents: SimAgentInit[];
  listeners?: number;
  env?: Record<string, string>;
  capacity?: number;
  sim?: SimulatorOptions;
}): Promise<{ db: TestDatabase; stack: Stack; sim: Simulator; capacity: number }> {
  const db = await createTestDatabase();
  disposeLater(() => db.drop());
  // drop() ends the pool and then drops the database WITH (FORCE); a client still closing then gets "terminating
  // connection due to administrator command", which an idle pool client re-emits on the pool: not a test failure.
  db.pool.on('error', () => {});
  if (opts.capacity !== undefined) {
    await db.pool.query(`update allocator.settings set value = $1 where key = 'default_max_load'`, [String(opts.capacity)]);
  }
  const capacity = (await db.pool.query<{ c: number }>(`select allocator.default_max_load() as c`)).rows[0]!.c;
  const stack = await startStack({
    databaseUrl: db.url,
    listeners: opts.listeners ?? 1,
    env: { ...SHIPPED_ENV, ...opts.env },
    sim: { ...opts.sim, agents: opts.agents },
  });
  disposeLater(() => stack.stop());
  return { db, stack, sim: stack.sim, capacity };
}

export function report(line: string): void {
  console.log(`[liveness] ${line}`);
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;

/**
 * Waits until `check` holds, at most `boundMs` after `from` (default: now). Returns the time it took from `from`.
 * Past the bound it fails, naming the bound; with LIVENESS_OBSERVE_SECONDS (see above) it watches on, and if the
 * check then holds it records the failure (expect.soft) and returns the time it really took.
 */
export async function withinBound(
  what: string,
  boundMs: number,
  check: () => Promise<unknown> | unknown,
  from = Date.now(),
  /** What is still missing, for the failure message. */
  missing?: () => Promise<string> | string,
): Promise<number> {
  const watchUntil = from + Math.max(boundMs, OBSERVE_MS);
  let lastError: unknown;
  for (;;) {
    let ok = false;
    try {
      ok = Boolean(await check());
    } catch (e) {
      lastError = e;
    }
    const took = Date.now() - from;
    if (ok) {
      if (took > boundMs) {
        // Late but done: the test fails, and (while observing) goes on to measure what comes after.
        report(`${what}: took ${seconds(took)}, bound ${seconds(boundMs)}`);
        expect.soft(took, `bound missed: ${what} took ${seconds(took)}, bound ${seconds(boundMs)}`).toBeLessThanOrEqual(boundMs);
      }
      return took;
    }
    if (Date.now() >= watchUntil) {
      let note = lastError ? ` (last check error: ${String(lastError)})` : '';
      if (missing) note += `; missing: ${await missing()}`;
      if (OBSERVE_MS > boundMs) report(`${what}: still not after ${seconds(took)}, bound ${seconds(boundMs)}`);
      throw new Error(`bound missed: ${what} not within ${seconds(boundMs)}${note}`);
    }
    await sleep(20);
  }
}

/** The latest session of each room, as allocator.sessions has it. */
async function sessionsOf(
  db: TestDatabase,
  rooms: string[],
): Promise<Map<string, { state: string; agent_id: number | null }>> {
  const r = await db.pool.query(
    `select distinct on (room_id) room_id, state::text, agent_id
     from allocator.sessions where room_id = any($1) order by room_id, id desc`,
    [rooms],
  );
  return new Map(r.rows.map((x) => [x.room_id, { state: x.state, agent_id: x.agent_id === null ? null : Number(x.agent_id) }]));
}

/**
 * Waits until every room is assigned (see `allAssigned`), at most `boundMs` after `from`; returns the time taken.
 * A miss names the rooms still missing.
 */
export function allAssignedWithin(
  what: string,
  boundMs: number,
  from: number,
  db: TestDatabase,
  sim: Simulator,
  rooms: string[],
): Promise<number> {
  return withinBound(what, boundMs, () => allAssigned(db, sim, rooms), from, () => notAssigned(db, sim, rooms));
}

/** Every room is on one agent in Qiscus, performed once, and assigned to that same agent in the database. */
async function allAssigned(db: TestDatabase, sim: Simulator, rooms: string[]): Promise<boolean> {
  const performed = performedByRoom(sim);
  if (rooms.some((r) => (performed.get(r) ?? 0) !== 1 || sim.agentOf(r) === null)) return false;
  const s = await sessionsOf(db, rooms);
  return rooms.every((r) => s.get(r)?.state === 'assigned' && s.get(r)?.agent_id === sim.agentOf(r));
}

/** The rooms `allAssigned` is still waiting for, with their state in Qiscus and in the database. */
async function notAssigned(db: TestDatabase, sim: Simulator, rooms: string[]): Promise<string> {
  const performed = performedByRoom(sim);
  const s = await sessionsOf(db, rooms);
  const left = rooms.filter(
    (r) => (performed.get(r) ?? 0) !== 1 || s.get(r)?.state !== 'assigned' || s.get(r)?.agent_id !== sim.agentOf(r),
  );
  const shown = left.slice(0, 10).map((r) => {
    const d = s.get(r);
    return `${r} (Qiscus: agent ${sim.agentOf(r)}, performed ${performed.get(r) ?? 0}x; db: ${d?.state ?? 'none'}, agent ${d?.agent_id ?? '-'})`;
  });
  return `${left.length} of ${rooms.length} rooms: ${shown.join(', ')}${left.length > 10 ? ', ...' : ''}`;
}

/** How many assign calls put an agent in each room (idempotent repeats to the same agent do not count). */
function performedByRoom(sim: Simulator): Map<string, number> {
  const n = new Map<string, number>();
  for (const a of sim.assignments) if (a.performed) n.set(a.room_id, (n.get(a.room_id) ?? 0) + 1);
  return n;
}

/**
 * Safety, checked by every liveness test: no agent ever above `capacity` (default_max_load, as liveStack returns
 * it), no room assigned twice.
 */
export function expectSafe(sim: Simulator, capacity: number): void {
  expect(sim.maxLoadSeenAll(), 'highest load any agent ever had in Qiscus').toBeLessThanOrEqual(capacity);
  const twice = [...performedByRoom(sim)].filter(([, n]) => n > 1);
  expect(twice, 'rooms an assign call put an agent in more than once').toEqual([]);
}

/** Posts the allocation webhook of every room, `concurrency` at a time; each must be accepted as `queued`. */
export async function queueRooms(sim: Simulator, rooms: string[], concurrency = 1): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < rooms.length) {
      const room = rooms[next++]!;
      const r = await sim.sendNewRequest(room);
      const outcome = (r.body as { outcome?: string } | null)?.outcome;
      if (r.status !== 200 || outcome !== 'queued') {
        throw new Error(`room ${room}: webhook answered ${r.status} ${JSON.stringify(r.body)}`);
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
}

export { eventually, sleep };

/**
 * Liveness (c): an outage of Qiscus is nobody's fault but Qiscus's.
 *
 * What is proven: Qiscus's assign API answers 503 to every call for two minutes while 40 rooms wait and 30 agents
 * (60 free slots) are online; then it is back. No room ends `failed` (allocator.sessions.state), Qiscus is probed,
 * not hammered, and once it answers again every room is served at once, not at the end of a backoff that grew
 * during the outage. The number of assign calls made during the outage is printed (`[liveness] outage: ...`).
 *
 * Bounds, at the shipped defaults (retry_base_seconds 2, max_attempts 8, sweep 5 s, roster every 30 s):
 *   - assign calls during the outage: at most 1.5 × its seconds + 10 ("on average at most one a second",
 *     with a margin for the first call of each room and for timing), i.e. ≤ 190 for two minutes;
 *   - no session `failed`, checked every second during the outage and at the end;
 *   - every room assigned (in Qiscus and in the database, same agent) within 10 s of Qiscus's return.
 * Safety: no agent above capacity (the shipped default_max_load) in Qiscus, no room put on an agent twice.
 *
 * Knob: LIVENESS_OUTAGE_SECONDS (default 120, the two minutes) for quicker local runs; the call bound
 * scales with it, but is too strict below half a minute or so (the first call of each of the 40 rooms alone is 40).
 * One test in its own file: it spends most of its time waiting.
 */
import { expect, it } from 'vitest';
import type { TestDatabase } from '../support/db.ts';
import {
  OBSERVE_MS, agents, allAssignedWithin, expectSafe, liveStack, queueRooms, report, sleep,
} from './harness.ts';

const OUTAGE_S = Math.max(1, Number(process.env.LIVENESS_OUTAGE_SECONDS ?? 120) || 120);
const MAX_CALLS = 1.5 * OUTAGE_S + 10;
const BACK_MS = 10_000;
const ROOMS = Array.from({ length: 40 }, (_, i) => `outage-${i}`);

async function failedRooms(db: TestDatabase): Promise<string[]> {
  const r = await db.pool.query(`select room_id from allocator.sessions where state = 'failed' order by room_id`);
  return r.rows.map((x) => x.room_id);
}

it(`Qiscus down for ${OUTAGE_S} s: probed not hammered, nothing failed, every room served within 10 s of its return`, async () => {
  const { db, sim, capacity } = await liveStack({ agents: agents(30) });
  sim.down({ status: 503 });
  await queueRooms(sim, ROOMS);

  const failedDuring = new Set<string>();
  while (sim.outage!.ms < OUTAGE_S * 1000) {
    for (const r of await failedRooms(db)) failedDuring.add(r);
    await sleep(Math.min(1000, OUTAGE_S * 1000 - sim.outage!.ms));
  }
  const out = sim.up();
  const upAt = Date.now();
  report(
    `outage: ${out.assignCalls} assign calls in ${(out.ms / 1000).toFixed(1)} s of outage ` +
      `(${(out.assignCalls / (out.ms / 1000)).toFixed(2)}/s; bound ${MAX_CALLS}), ${ROOMS.length} rooms waiting; ` +
      `${failedDuring.size} failed meanwhile`,
  );
  expect.soft(out.assignCalls, `assign calls during a ${OUTAGE_S} s outage`).toBeLessThanOrEqual(MAX_CALLS);
  expect.soft([...failedDuring], 'rooms that ended failed during the outage').toEqual([]);

  const took = await allAssignedWithin('every room assigned after Qiscus came back', BACK_MS, upAt, db, sim, ROOMS);
  report(`outage: every room assigned ${(took / 1000).toFixed(2)} s after Qiscus came back (bound 10 s)`);

  expect(await failedRooms(db), 'rooms that ended failed').toEqual([]);
  expectSafe(sim, capacity);
}, OUTAGE_S * 1000 + 60_000 + OBSERVE_MS);

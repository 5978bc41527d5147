/**
 * Invariant 9 at the shipped roster period (AGENT_SYNC_SECONDS 30): a roster pull that runs while an assign call
 * of ours is in flight cannot tell whether Qiscus's count includes that room, so the room is counted twice (ours
 * and "by hand") until a pull that started after the call ended. That pull must come within seconds, not at the
 * next scheduled sync: the agent is free in Qiscus and a room waits for it.
 */
import { afterEach, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startStack, type Stack } from '../support/processes.ts';
import { invariants, setting } from '../support/sql.ts';

let db: TestDatabase | undefined;
let stack: Stack | undefined;
afterEach(async () => {
  await stack?.stop();
  await db?.drop();
  stack = undefined;
  db = undefined;
});

const external = async () =>
  (await db!.pool.query(`select external_load from allocator.agents where id = 1`)).rows[0]?.external_load as number;

/**
 * One agent, at the shipped settings but for `maxLoad`. Qiscus performs room a's assignment at once but answers it
 * `answerDelayMs` later; meanwhile a second listener starts and pulls, and counts the room in flight as by hand.
 */
async function callInFlightDuringAPull(o: { maxLoad?: number; answerDelayMs: number }) {
  db = await createTestDatabase();
  if (o.maxLoad !== undefined) await setting(db.pool, 'default_max_load', o.maxLoad);
  stack = await startStack({ databaseUrl: db.url, listeners: 1, sim: { agents: [{ id: 1 }] } });
  const { sim } = stack;
  sim.setFaults({ answerDelayMs: o.answerDelayMs });
  expect((await sim.sendNewRequest('a')).status).toBe(200);
  await eventually('the call reached Qiscus', () => sim.agentOf('a') === 1);
  await stack.startListener();
  await eventually('the pull counted the room in flight as by hand', async () => (await external()) === 1, 5_000);
  return { db, sim };
}

it('a count made ambiguous by a call in flight during a pull is settled by the next pull, within seconds', async () => {
  const { db, sim } = await callInFlightDuringAPull({ maxLoad: 1, answerDelayMs: 6000 });
  sim.setFaults({ answerDelayMs: 0 });
  await eventually('room a confirmed', async () => {
    const r = await db!.pool.query(`select state from allocator.sessions where room_id = 'a'`);
    return r.rows[0]?.state === 'assigned';
  }, 10_000);

  // The agent resolves the room: Qiscus shows it free, and room b waits for it
  expect((await sim.resolve('a')).status).toBe(200);
  const t0 = Date.now();
  expect((await sim.sendNewRequest('b')).status).toBe(200);
  await eventually('room b assigned', () => sim.agentOf('b') === 1, 10_000, 20);
  const waited = Date.now() - t0;
  console.log(`[roster-evidence] room b assigned ${waited} ms after it arrived (next scheduled pull: up to 30 s)`);
  // a pull at most half a second after the last one (the evidence), plus the call: far below the 30 s period
  expect(waited).toBeLessThanOrEqual(3_000);
  expect(await external()).toBe(0);
  expect(sim.maxLoadSeenAll()).toBeLessThanOrEqual(1);
  expect(await invariants(db.pool)).toEqual([]);
}, 120_000);

it('while a room waits on such a count, the pull that settles it starts within half a second of the call ending', async () => {
  // Capacity 2, one agent. Room a's call is in flight when a second listener starts and pulls: Qiscus's 1 may be
  // room a or a room assigned by hand, so the agent counts as full (a, and 1 by hand). Room b waits on that count.
  // Pulls during the call cannot settle it; the first one after the call ended does. How soon it comes is the
  // room's wait: half a second at most after a pull (one page here), not the next probe's second plus a second.
  const { db, sim } = await callInFlightDuringAPull({ answerDelayMs: 3000 });
  expect((await sim.sendNewRequest('b')).status).toBe(200);
  sim.setFaults({ answerDelayMs: 0 });
  await eventually('room b assigned', () => sim.agentOf('b') === 1, 10_000, 20);
  const answered = sim.assignments.find((x) => x.room_id === 'a' && x.status === 200)!.answeredAt!;
  const assigned = sim.assignments.find((x) => x.room_id === 'b' && x.status === 200)!.at;
  console.log(`[roster-evidence] room b assigned ${assigned - answered} ms after room a's call ended`);
  // Measured: 75 and 274 ms; 975 and 1,068 ms when the pull waited for the next probe and a second after the last.
  // Bound: half a second between pulls, a pull and a call, with room for a loaded machine.
  expect(assigned - answered).toBeLessThan(900);
  expect(sim.maxLoadSeenAll()).toBeLessThanOrEqual(2);
  expect(await invariants(db.pool)).toEqual([]);
}, 60_000);

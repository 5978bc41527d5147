/**
 * Liveness in the SQL core: a dead listener's reservations come back at once (not at the end of the lease), a
 * resolution during a call is settled by evidence (who resolved it, which service the answer names, the next
 * roster pull), and an outage of Qiscus spends no attempts and lets one probe out per interval.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { resolvedRequest, returningRequest } from '../support/fixtures.ts';
import { addAgents, confirm, invariants, listenerPresence, loads, queue, resolve, sessionOf } from '../support/sql.ts';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await db.pool.query(`truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks cascade`);
  await db.pool.query(`update allocator.settings s set value = d.value from allocator.setting_defaults() d where s.key = d.key`);
  await db.pool.query(`update allocator.qiscus_health set down_since = null, probe_at = null, calls_while_down = 0`);
});
afterEach(async () => {
  expect(await invariants(db.pool)).toEqual([]);
});

const listener = () => listenerPresence(db);

async function reserveAs(owner: number | null) {
  return (await db.pool.query(`select * from allocator.reserve($1)`, [owner])).rows[0];
}

const rescueAbandoned = async () => (await db.pool.query(`select allocator.rescue_abandoned() as n`)).rows[0].n;

/** The Mark-as-Resolved webhook of `room`'s service `service`, resolved by agent `by`. */
const closeBy = (room: string, service: number, by: number) =>
  db.pool.query(`select * from allocator.accept_close_request($1::jsonb)`, [
    { ...resolvedRequest(room, service), resolved_by: { id: by, type: 'agent' } },
  ]);

/**
 * A call cut by its listener's death: reserved under a listener that then dies (kill -9: its connection goes, and
 * PostgreSQL drops its lock), rescued at once. Returns the reservation.
 */
async function cutCall() {
  const dying = await listener();
  const r = await reserveAs(dying.id);
  await dying.client.end();
  expect(await rescueAbandoned()).toBe(1);
  return r;
}

describe('a dead listener', () => {
  it("is seen at once: its reservations go back, holding their agents' slots, while a live one's stay", async () => {
    await addAgents(db.pool, [1, 2]);
    await queue(db.pool, 'a');
    await queue(db.pool, 'b');
    const alive = await listener();
    const dying = await listener();
    const ra = await reserveAs(alive.id);
    const rb = await reserveAs(dying.id);
    expect(await rescueAbandoned()).toBe(0);
    const seen = await db.pool.query(`select id, calls_in_flight::int as n from allocator.listeners order by id`);
    expect(seen.rows).toEqual([{ id: alive.id, n: 1 }, { id: dying.id, n: 1 }]);

    await dying.client.end(); // kill -9 or a lost machine: the connection goes, and PostgreSQL drops the lock
    expect(await rescueAbandoned()).toBe(1);
    expect(await sessionOf(db.pool, 'b')).toMatchObject({ state: 'waiting', holds_slot: true, agent_id: rb.agent_id });
    expect(await sessionOf(db.pool, 'a')).toMatchObject({ state: 'reserved' });
    // the retry goes to the same agent at once (the dead listener's call may have landed)
    const retry = await reserveAs(alive.id);
    expect(retry).toMatchObject({ room_id: 'b', agent_id: rb.agent_id, attempt: 2 });
    const outcome = await db.pool.query(`select outcome from allocator.attempts where id = $1`, [rb.attempt_id]);
    expect(outcome.rows[0].outcome).toBe('abandoned');
    await confirm(db.pool, ra.attempt_id);
    await confirm(db.pool, retry.attempt_id);
  });

  // Found by the chaos run (seed 3893881771): a kill cut a call to agent 8 for a room resolved meanwhile; a pull
  // 0.5 s after the rescue did not show it yet and the count went; the simulator applied the cut call 1.6 s after
  // its client was gone, while agent 8 had been given another room: 3 rooms at capacity 2.
  it('a room resolved while the dead listener called counts on its agent until a roster pull after the call\'s lease', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const dying = await listener();
    const r = await reserveAs(dying.id);
    await db.pool.query(`select * from allocator.accept_close_request($1::jsonb)`, [resolvedRequest('a', 5)]);
    await dying.client.end();
    expect(await rescueAbandoned()).toBe(1);
    const a = await db.pool.query(`select our_load, external_load from allocator.agents`);
    expect(a.rows[0]).toEqual({ our_load: 0, external_load: 1 });
    // Qiscus may still be applying the cut call: a pull that starts before its lease ends cannot tell
    await pull(0);
    expect((await loads(db.pool))['1']).toBe(1);
    // the first pull that starts after the lease settles it, either way
    await pull(0, r.lease_expires_at);
    expect((await loads(db.pool))['1']).toBe(0);
  });

  it('a count held for a call that may still land holds only itself: the agent\'s other by-hand rooms fall as usual', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const dying = await listener();
    await reserveAs(dying.id);
    await db.pool.query(`select * from allocator.accept_close_request($1::jsonb)`, [resolvedRequest('a', 5)]);
    await dying.client.end();
    expect(await rescueAbandoned()).toBe(1);
    await pull(2); // a room assigned by hand in the dashboard, besides (or with) the late call
    expect((await loads(db.pool))['1']).toBe(2);
    await pull(1); // the supervisor resolved it: that one goes at once, the held count stays
    expect((await loads(db.pool))['1']).toBe(1);
    await pull(0);
    expect((await loads(db.pool))['1']).toBe(1);
  });

  it('a call our client gave up on (no answer) for a room resolved meanwhile: the same; a 5xx is over at its answer', async () => {
    await addAgents(db.pool, [1, 2]);
    await queue(db.pool, 'a');
    await queue(db.pool, 'b');
    const ra = await reserveAs(null);
    const rb = await reserveAs(null);
    await resolve(db.pool, 'a', 5);
    await resolve(db.pool, 'b', 6);
    await db.pool.query(`select allocator.fail_transient($1, 'Timeout awaiting response', null, true, true)`, [ra.attempt_id]);
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 502', null, true, false)`, [rb.attempt_id]);
    expect(await loads(db.pool)).toEqual({ [ra.agent_id]: 1, [rb.agent_id]: 1 });
    await pull(0);
    expect(await loads(db.pool)).toEqual({ [ra.agent_id]: 1, [rb.agent_id]: 0 });
    await pull(0, ra.lease_expires_at);
    expect(await loads(db.pool)).toEqual({ [ra.agent_id]: 0, [rb.agent_id]: 0 });
  });

  it('a room waiting to retry a cut call, then resolved: the slot stays until a pull after that call\'s lease', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const r = await cutCall();
    expect(await sessionOf(db.pool, 'a')).toMatchObject({ state: 'waiting', holds_slot: true });
    // the cut call may land after the resolution: the agent would hold the room again
    await resolve(db.pool, 'a', 5);
    expect(await db.pool.query(`select our_load, external_load from allocator.agents`).then((x) => x.rows[0])).toEqual({
      our_load: 0,
      external_load: 1,
    });
    await pull(0);
    expect((await loads(db.pool))['1']).toBe(1);
    await pull(1, r.lease_expires_at); // it did land: Qiscus shows it, as a room we no longer serve
    expect((await loads(db.pool))['1']).toBe(1);
    await pull(0, new Date(Date.now() + 3_600_000)); // resolved again by hand: the count goes
    expect((await loads(db.pool))['1']).toBe(0);
  });

  // Seen in the chaos run after a PostgreSQL restart: the listeners' presences went with their connections, their
  // answered calls were rescued as unanswered, and the agents then resolved those rooms. An agent 30 s short of a
  // slot each time, while rooms waited.
  it('a room waiting to retry a cut call, resolved by that agent: it was in the room, so the call landed; free at once', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    await cutCall();
    await closeBy('a', 5, 1);
    expect((await loads(db.pool))['1']).toBe(0);
    // two such calls: the other may still land
    await queue(db.pool, 'b');
    await cutCall();
    await cutCall(); // its retry, to the same agent, cut too
    await closeBy('b', 6, 1);
    expect((await loads(db.pool))['1']).toBe(1);
  });

  // Found by review: each path that lets a slot go looks at every call of ours for the room to that agent, not only
  // the last one.
  it('a cut call whose late answer arrives after all: the call is over, nothing held for it', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const r = await cutCall();
    // the dead listener's answer reaches the database late (it was cut off from it, not dead): a 503
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 503', null, true, false)`, [r.attempt_id]);
    await resolve(db.pool, 'a', 7);
    expect((await loads(db.pool))['1']).toBe(0);
  });

  it('a cut call and a 5xx retry, resolved by that agent: either may have put it there, so the count stays', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    await cutCall();
    const retry = await reserveAs(null);
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 500', null, true, false)`, [retry.attempt_id]);
    await closeBy('a', 7, 1);
    expect((await loads(db.pool))['1']).toBe(1);
  });

  it('a returning customer who took over a cut call\'s slot, then resolved: that call may still land, the count stays', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const dying = await listener();
    await reserveAs(dying.id);
    await resolve(db.pool, 'a', 5);
    await queue(db.pool, 'a', returningRequest('a', 5)); // the customer writes again while the call is out: it waits
    await dying.client.end();
    expect(await rescueAbandoned()).toBe(1);
    expect(await sessionOf(db.pool, 'a')).toMatchObject({ state: 'waiting', holds_slot: true, agent_id: '1' });
    await closeBy('a', 6, 999); // resolved by an admin before the retry
    expect((await loads(db.pool))['1']).toBe(1);
  });

  it('a room waiting to retry after a 5xx, then resolved: the call is over, the slot is free at once', async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    const r = await reserveAs(null);
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 500', null, true, false)`, [r.attempt_id]);
    await resolve(db.pool, 'a', 5);
    expect((await loads(db.pool))['1']).toBe(0);
    await queue(db.pool, 'b');
    expect(await reserveAs(null)).toMatchObject({ room_id: 'b', agent_id: '1' });
  });
});

/** A roster pull of agent 1 showing `count` rooms, started at `startedAt` (default: now). */
async function pull(count: number, startedAt?: Date) {
  const roster = JSON.stringify([{ id: 1, is_available: true, current_customer_count: count, type_as_string: 'agent' },
    { id: 2, is_available: true, current_customer_count: 0, type_as_string: 'agent' }]);
  await db.pool.query(`select allocator.sync_agents($1, coalesce($2::timestamptz + interval '1 millisecond', now()))`, [
    roster,
    startedAt ?? null,
  ]);
}

describe('a resolution while the assign call is in flight', () => {

  it('frees the slot at once when the reserved agent resolved it (the assignment landed first)', async () => {
    await addAgents(db.pool, [7], { max_load: 1 });
    await queue(db.pool, 'a');
    await queue(db.pool, 'b');
    const r = await reserveAs(null);
    await closeBy('a', 11, 7);
    expect((await loads(db.pool))['7']).toBe(0);
    const next = await reserveAs(null); // b gets agent 7 now, before a's call reports
    expect(next).toMatchObject({ room_id: 'b', agent_id: '7' });
    expect(await confirm(db.pool, r.attempt_id, 11)).toBe(false); // a's late answer changes nothing
    expect((await loads(db.pool))['7']).toBe(1);
    await confirm(db.pool, next.attempt_id);
  });

  it("frees the slot when the answer names the resolved service; counts it until the next pull when not", async () => {
    await addAgents(db.pool, [1, 2]);
    await queue(db.pool, 'a');
    await queue(db.pool, 'b');
    const ra = await reserveAs(null);
    const rb = await reserveAs(null);
    await closeBy('a', 21, 999); // resolved by an admin
    await closeBy('b', 22, 999);
    expect(await confirm(db.pool, ra.attempt_id, 21)).toBe(false); // landed, then resolved: free
    expect(await confirm(db.pool, rb.attempt_id, 23)).toBe(false); // a new service: the agent may hold it
    expect(await loads(db.pool)).toEqual({ [ra.agent_id]: 0, [rb.agent_id]: 1 });
  });
});

describe('an outage of Qiscus', () => {
  async function failAll(n: number) {
    for (let i = 0; i < n; i++) {
      const r = await reserveAs(null);
      if (!r) return i;
      await db.pool.query(`select allocator.fail_transient($1, 'HTTP 503', null, false)`, [r.attempt_id]);
    }
    return n;
  }

  it('is declared after 5 failures in a row over 2+ rooms: no attempt spent, one probe a second, all due on return', async () => {
    await addAgents(db.pool, [1, 2, 3]);
    for (const room of ['a', 'b', 'c', 'd', 'e', 'f']) await queue(db.pool, room);
    expect(await failAll(5)).toBe(5);
    const status = await db.pool.query(`select status from allocator.qiscus_status`);
    expect(status.rows[0].status).toBe('down');
    // nobody has spent an attempt, and nobody waits for a backoff
    const s = await db.pool.query(`select count(*)::int as n from allocator.sessions where attempts > 0 or next_attempt_at > now()`);
    expect(s.rows[0].n).toBe(0);
    // the first probe is a second away
    expect(await reserveAs(null)).toBeUndefined();
    await db.pool.query(`update allocator.qiscus_health set probe_at = now()`);
    const probe = await reserveAs(null);
    expect(probe).toBeDefined();
    expect(await reserveAs(null)).toBeUndefined(); // one probe per interval, whoever asks
    await db.pool.query(`select allocator.fail_transient($1, 'HTTP 503', null, false)`, [probe.attempt_id]);
    expect((await sessionOf(db.pool, probe.room_id)).attempts).toBe(0);
    await db.pool.query(`update allocator.qiscus_health set probe_at = now()`);
    const next = await reserveAs(null);
    expect(await confirm(db.pool, next.attempt_id)).toBe(true); // Qiscus answers: up again
    expect((await db.pool.query(`select status, calls_while_down from allocator.qiscus_status`)).rows[0]).toEqual({
      status: 'up', calls_while_down: 2,
    });
    // every room is served at once
    const served = [];
    for (let r = await reserveAs(null); r; r = await reserveAs(null)) served.push(r.room_id);
    expect(served.sort()).toEqual(['a', 'b', 'c', 'd', 'e', 'f'].filter((x) => x !== next.room_id)); // 6 slots, 6 rooms
  });

  it("is not declared for one room's own trouble: its attempts and backoff count", async () => {
    await addAgents(db.pool, [1]);
    await queue(db.pool, 'a');
    for (let i = 0; i < 5; i++) {
      const r = await reserveAs(null);
      await db.pool.query(`select allocator.fail_transient($1, 'HTTP 500', null, false)`, [r.attempt_id]);
      // each failure set a backoff (shipped: from 2 s, doubling); its length is not what this tests: skip it
      expect((await sessionOf(db.pool, 'a')).next_attempt_at.getTime()).toBeGreaterThan(Date.now());
      await db.pool.query(`update allocator.sessions set next_attempt_at = now() where room_id = 'a'`);
    }
    expect((await db.pool.query(`select status from allocator.qiscus_status`)).rows[0].status).toBe('up');
    expect((await sessionOf(db.pool, 'a')).attempts).toBe(5);
  });
});

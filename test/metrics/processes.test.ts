/**
 * The metrics of the real processes (`npm run web`, `npm run listener`, `npm start`) with the Qiscus simulator as
 * Qiscus, scraped over HTTP and checked against the database: assignment outcomes against allocator.attempts,
 * Qiscus calls against what the simulator saw, the queue gauges against allocator.stats_live. And the log lines:
 * one per assignment outcome, and the webhook's request id from the access log to allocator.webhooks.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { freePort } from '../../src/db/embedded.ts';
import { startSimulator, type Simulator } from '../../src/simulator/qiscus-simulator.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { APP_ID, eventually, SECRET_KEY, spawnProc, startStack, type Proc, type Stack } from '../support/processes.ts';
import { scrape, type Scrape } from './prom-text.ts';

let db: TestDatabase | undefined;
let stack: Stack | undefined;
let proc: Proc | undefined;
let sim: Simulator | undefined;

afterEach(async () => {
  await stack?.stop();
  await proc?.stop(5000);
  await sim?.close();
  await db?.drop();
  stack = proc = sim = db = undefined;
});

const ASSIGN = 'POST /api/v1/admin/service/assign_agent';

async function attemptsByOutcome(db: TestDatabase): Promise<Record<string, number>> {
  const r = await db.pool.query(`select outcome, count(*)::int as n from allocator.attempts group by outcome`);
  return Object.fromEntries(r.rows.map((x) => [x.outcome ?? 'open', x.n]));
}

/** The queue gauges (any process's) equal allocator.stats_live read right after. */
async function expectQueueMatches(m: Scrape, db: TestDatabase) {
  const live = (await db.pool.query(`select * from allocator.stats_live`)).rows[0];
  const queued = (await db.pool.query(`select count(*)::int as n from allocator.queue`)).rows[0].n;
  expect(m.value('allocator_database_up')).toBe(1);
  expect(m.value('allocator_rooms_waiting')).toBe(queued);
  expect(m.value('allocator_rooms_waiting')).toBe(Number(live.waiting));
  expect(m.value('allocator_rooms_assigning')).toBe(Number(live.assigning));
  expect(m.value('allocator_rooms_assigned_open')).toBe(Number(live.assigned_open));
  for (const state of ['free', 'full', 'offline']) {
    expect(m.value('allocator_agents', { state }), state).toBe(Number(live[`agents_${state}`]));
  }
  const oldest = (await db.pool.query(`select coalesce(extract(epoch from oldest_wait), 0)::float8 as s from allocator.stats_live`))
    .rows[0].s;
  expect(Math.abs(m.value('allocator_oldest_wait_seconds') - oldest)).toBeLessThan(2);
}

const jsonLines = (p: Proc) =>
  p.lines.flatMap((l) => {
    try {
      return [JSON.parse(l) as Record<string, unknown>];
    } catch {
      return [];
    }
  });

describe('listener and web processes', () => {
  it('listener /metrics on METRICS_PORT and web /metrics match the database, a scripted 500 included', async () => {
    db = await createTestDatabase();
    stack = await startStack({
      databaseUrl: db.url,
      listeners: 0,
      sim: { agents: [{ id: 1 }, { id: 2 }, { id: 3, is_available: false }] },
    });
    // The first assign call fails with a 500 (transient: retried after the backoff), the rest succeed.
    stack.sim.setFaults({ script: [{ status: 500, body: { errors: 'internal server error' } }] });
    const metricsPort = await freePort();
    const listener = await stack.startListener({ METRICS_PORT: String(metricsPort) });
    await listener.waitFor(new RegExp(`"port":${metricsPort}.*metrics on`));
    const metricsUrl = `http://127.0.0.1:${metricsPort}`;
    expect((await fetch(`${metricsUrl}/healthz`)).status).toBe(200);

    // Two online agents of capacity 2: four rooms get an agent, the fifth waits.
    const rooms = ['7001', '7002', '7003', '7004', '7005'];
    for (const room of rooms) expect((await stack.sim.sendNewRequest(room)).status).toBe(200);
    await eventually(
      'four rooms assigned after the retry, one waiting',
      async () => {
        const by = await attemptsByOutcome(db!);
        const live = (await db!.pool.query(`select waiting, assigning from allocator.stats_live`)).rows[0];
        return by.assigned === 4 && by.transient === 1 && Number(live.waiting) === 1 && Number(live.assigning) === 0;
      },
      20_000,
    );

    const m = await scrape(`${metricsUrl}/metrics`);
    const by = await attemptsByOutcome(db);

    // Outcomes: the counters are the attempts the database recorded.
    expect(m.value('allocator_assignments_total', { outcome: 'assigned' })).toBe(by.assigned);
    expect(m.value('allocator_assignments_total', { outcome: 'transient' })).toBe(by.transient);
    expect(m.value('allocator_assignments_total', { outcome: 'refused' })).toBe(by.refused ?? 0);
    expect(m.value('allocator_assignments_total', { outcome: 'released' })).toBe(by.released ?? 0);
    expect(m.value('allocator_assignment_duration_seconds_count', { outcome: 'assigned' })).toBe(by.assigned);
    expect(m.value('allocator_assignments_in_flight')).toBe(0);

    // Qiscus calls: one per finished attempt, as the simulator counted them, the 500 among them.
    const simAssigns = Object.values(stack.sim.stats.requests[ASSIGN] ?? {}).reduce((a, n) => a + n, 0);
    const calls = m.sum('allocator_qiscus_request_duration_seconds_count', { operation: 'assign_agent' });
    expect(calls).toBe(by.assigned! + by.transient!);
    expect(calls).toBe(simAssigns);
    expect(m.value('allocator_qiscus_request_duration_seconds_count', { operation: 'assign_agent', status: '500' })).toBe(1);
    expect(m.value('allocator_qiscus_request_duration_seconds_count', { operation: 'assign_agent', status: '2xx' })).toBe(
      by.assigned,
    );
    expect(m.value('allocator_qiscus_errors_total', { operation: 'assign_agent', status: '500', kind: 'transient' })).toBe(1);
    expect(m.sum('allocator_qiscus_errors_total')).toBe(1);
    expect(m.sum('allocator_qiscus_request_duration_seconds_count', { operation: 'list_agents', status: '2xx' })).toBeGreaterThanOrEqual(1);

    // Lag from wake-up to reservation was measured; the roster was synced.
    expect(m.value('allocator_listener_lag_seconds_count')).toBeGreaterThanOrEqual(1);
    expect(m.value('allocator_listener_lag_seconds_sum')).toBeGreaterThan(0);
    expect(m.value('allocator_roster_syncs_total', { result: 'ok' })).toBeGreaterThanOrEqual(1);
    expect(m.value('allocator_roster_syncs_total', { result: 'error' })).toBe(0);
    expect(m.value('allocator_roster_agents')).toBe(3);
    expect(m.value('allocator_roster_last_sync_timestamp_seconds')).toBeGreaterThan(Date.now() / 1000 - 60);

    // The queue, seen from the listener: one waiting, both online agents full, one offline.
    await expectQueueMatches(m, db);
    expect(m.value('allocator_rooms_waiting')).toBe(1);
    expect(m.value('allocator_agents', { state: 'full' })).toBe(2);
    expect(m.value('allocator_agents', { state: 'offline' })).toBe(1);
    expect(m.has('process_cpu_user_seconds_total')).toBe(true);

    // The web process: webhooks by outcome as stored, and the same queue view.
    const w = await scrape(`${stack.webUrl}/metrics`);
    const stored = (await db.pool.query(`select kind, outcome, count(*)::int as n from allocator.webhooks group by 1, 2`)).rows;
    expect(stored).toEqual([{ kind: 'new_request', outcome: 'queued', n: 5 }]);
    expect(w.value('allocator_webhooks_total', { route: '/api/v1/new_request', outcome: 'queued' })).toBe(5);
    expect(w.value('allocator_webhook_duration_seconds_count', { route: '/api/v1/new_request', status: '200' })).toBe(5);
    await expectQueueMatches(w, db);
    expect(w.has('allocator_assignments_total')).toBe(false); // the listener's, not the web's

    // Logs: one JSON line per assignment outcome with room, agent, attempt and duration.
    const outcomes = jsonLines(listener).filter((l) => l.msg === 'assignment');
    expect(outcomes.filter((l) => l.outcome === 'assigned')).toHaveLength(4);
    const failed = outcomes.filter((l) => l.outcome === 'transient');
    expect(failed).toHaveLength(1);
    expect(failed[0]!.error).toMatch(/internal server error/);
    for (const l of outcomes) {
      expect(rooms).toContain(l.room);
      expect([1, 2]).toContain(l.agent);
      expect(l.attempt).toBeGreaterThanOrEqual(1);
      expect(typeof l.ms).toBe('number');
    }
    const retried = outcomes.find((l) => l.room === failed[0]!.room && l.outcome === 'assigned');
    expect(retried?.attempt).toBe(2);

    // Logs: each webhook's access line carries the request id stored with it.
    const access = jsonLines(stack.web).filter((l) => l.msg === 'request' && l.path === '/api/v1/new_request');
    expect(access).toHaveLength(5);
    const ids = (await db.pool.query(`select room_id, request_id from allocator.webhooks`)).rows;
    for (const l of access) {
      expect(ids).toContainEqual({ room_id: l.room_id, request_id: l.reqId });
    }
  });
});

describe('npm start (one process)', () => {
  it('serves web and listener metrics together at the app /metrics, without a metrics port', async () => {
    db = await createTestDatabase();
    sim = await startSimulator({ appId: APP_ID, secretKey: SECRET_KEY, agents: [{ id: 1 }] });
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    proc = spawnProc('start', 'src/main.ts', {
      DATABASE_URL: db.url,
      PORT: String(port),
      QISCUS_BASE_URL: sim.url,
      QISCUS_APP_ID: APP_ID,
      QISCUS_SECRET_KEY: SECRET_KEY,
      METRICS_PORT: String(await freePort()),
      WEBHOOK_SECRET: 'metrics-test-secret', // else npm start would generate one (test/ops/start.test.ts)
    });
    await proc.waitFor(/listening for allocator notifications/, 30_000);

    const reply = await fetch(`${url}/api/v1/new_request`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-webhook-secret': 'metrics-test-secret' },
      body: JSON.stringify(newRequest('7101')),
    });
    expect(reply.status).toBe(200);
    await eventually('the room assigned', async () => (await attemptsByOutcome(db!)).assigned === 1);

    const m = await scrape(`${url}/metrics`);
    expect(m.value('allocator_webhooks_total', { route: '/api/v1/new_request', outcome: 'queued' })).toBe(1);
    expect(m.value('allocator_assignments_total', { outcome: 'assigned' })).toBe(1);
    expect(m.value('allocator_qiscus_request_duration_seconds_count', { operation: 'assign_agent', status: '2xx' })).toBe(1);
    expect(m.value('allocator_roster_agents')).toBe(1);
    await expectQueueMatches(m, db);
    expect(m.value('allocator_rooms_assigned_open')).toBe(1);
    expect(m.value('allocator_agents', { state: 'free' })).toBe(1);
    expect(proc.lines.some((l) => /metrics on/.test(l))).toBe(false);
  });
});

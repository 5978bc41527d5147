/**
 * The web app's GET /metrics, scraped over HTTP and checked against the database it describes: the queue gauges
 * against allocator.stats_live and allocator.queue, the webhook counters against allocator.webhooks. Plus the
 * request id's trip from the HTTP header to allocator.webhooks.request_id, and scrapes with the database away.
 */
import net from 'node:net';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/db/embedded.ts';
import { createWebMetrics } from '../../src/http/metrics.ts';
import { createMetricsRegistry, registerQueueMetrics } from '../../src/metrics/index.ts';
import { get, post, startApp, testLogger, type RunningApp } from '../http/harness.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest, resolvedRequest } from '../support/fixtures.ts';
import { addAgents, confirm, reserve } from '../support/sql.ts';
import { parsePrometheus, scrape } from './prom-text.ts';

const NEW = '/api/v1/new_request';
const CLOSE = '/api/v1/close_request';
const SECRET = 's3cret';
const json = { 'content-type': 'application/json', 'x-webhook-secret': SECRET };

let db: TestDatabase;
let app: RunningApp;

beforeAll(async () => {
  db = await createTestDatabase();
  const registry = createMetricsRegistry();
  registerQueueMetrics(registry, db.pool);
  app = await startApp(db.url, { webhookSecret: SECRET, metrics: registry, observe: createWebMetrics(registry) });
});

afterAll(async () => {
  await app?.close();
  await db?.drop();
});

describe('GET /metrics on the web app', () => {
  it('matches the database: queue, agents, webhooks by outcome, latency by route and status', async () => {
    // Agent 1 takes one room, agent 2 three, agent 3 is offline.
    await addAgents(db.pool, [1], { max_load: 1 });
    await addAgents(db.pool, [2], { max_load: 3 });
    await addAgents(db.pool, [3], { is_available: false });

    const sent: Array<{ route: string; status: number }> = [];
    const send = async (route: string, body: unknown, headers: Record<string, string> = json) => {
      const r = await post(app.url + route, body, headers);
      sent.push({ route, status: r.status });
      return r;
    };
    for (const room of ['9001', '9002', '9003', '9004']) expect((await send(NEW, newRequest(room))).status).toBe(200);
    expect((await send(NEW, newRequest('9001'))).json.outcome).toBe('already_queued');
    expect((await send(CLOSE, resolvedRequest('9999'))).json.outcome).toBe('unknown_room');
    expect((await send(NEW, newRequest('9006', { room_id: null }))).status).toBe(422);
    expect((await send(NEW, '{"room_id": ', json)).status).toBe(400);
    expect((await send(NEW, newRequest('9005'), { 'content-type': 'application/json' })).status).toBe(401);

    // Two rooms assigned (agent 1 full), one reserved and not yet confirmed, one waiting; it waited 90 s.
    for (let i = 0; i < 2; i++) await confirm(db.pool, (await reserve(db.pool))!.attempt_id);
    expect(await reserve(db.pool)).toBeDefined();
    await db.pool.query(
      `update allocator.sessions set queued_at = queued_at - interval '90 seconds'
        where id = (select session_id from allocator.queue order by position limit 1)`,
    );
    await get(app.url + '/healthz'); // not a webhook: must not show up below

    const m = await scrape(app.url + '/metrics');
    const live = (await db.pool.query(`select * from allocator.stats_live`)).rows[0];
    const queue = (
      await db.pool.query(`select count(*)::int as n, coalesce(max(extract(epoch from waited)), 0)::float8 as oldest
                             from allocator.queue`)
    ).rows[0];

    // The queue view.
    expect(m.value('allocator_database_up')).toBe(1);
    expect(m.value('allocator_rooms_waiting')).toBe(queue.n);
    expect(m.value('allocator_rooms_waiting')).toBe(1);
    expect(m.value('allocator_oldest_wait_seconds')).toBeGreaterThanOrEqual(90);
    expect(Math.abs(m.value('allocator_oldest_wait_seconds') - queue.oldest)).toBeLessThan(2);
    expect(m.value('allocator_rooms_backing_off')).toBe(Number(live.backing_off));
    expect(m.value('allocator_rooms_assigning')).toBe(Number(live.assigning));
    expect(m.value('allocator_rooms_assigning')).toBe(1);
    expect(m.value('allocator_rooms_assigned_open')).toBe(Number(live.assigned_open));
    expect(m.value('allocator_rooms_assigned_open')).toBe(2);
    expect(m.value('allocator_agents', { state: 'free' })).toBe(Number(live.agents_free));
    expect(m.value('allocator_agents', { state: 'full' })).toBe(Number(live.agents_full));
    expect(m.value('allocator_agents', { state: 'offline' })).toBe(Number(live.agents_offline));
    expect([1, 2, 3].map((_, i) => m.value('allocator_agents', { state: ['free', 'full', 'offline'][i]! }))).toEqual([
      1, 1, 1,
    ]);
    expect(m.value('allocator_capacity_online')).toBe(Number(live.capacity_online));
    expect(m.value('allocator_load_online')).toBe(Number(live.load_online));

    // Webhooks the database stored, by route and outcome, are exactly the counters of stored outcomes.
    const stored = (
      await db.pool.query(`select kind, outcome, count(*)::int as n from allocator.webhooks group by 1, 2`)
    ).rows;
    expect(stored.length).toBeGreaterThan(0);
    for (const row of stored) {
      expect(m.value('allocator_webhooks_total', { route: `/api/v1/${row.kind}`, outcome: row.outcome })).toBe(row.n);
    }
    const storedTotal = stored.reduce((a, r) => a + r.n, 0);
    // ... and the refused ones are counted by why.
    expect(m.value('allocator_webhooks_total', { route: NEW, outcome: 'invalid' })).toBe(2);
    expect(m.value('allocator_webhooks_total', { route: NEW, outcome: 'unauthorized' })).toBe(1);
    expect(m.sum('allocator_webhooks_total')).toBe(storedTotal + 3);
    expect(m.sum('allocator_webhooks_total')).toBe(sent.length);

    // Latency: one observation per webhook, by route and status; the +Inf bucket equals the count.
    const byRouteStatus = new Map<string, number>();
    for (const s of sent) byRouteStatus.set(`${s.route} ${s.status}`, (byRouteStatus.get(`${s.route} ${s.status}`) ?? 0) + 1);
    for (const [key, n] of byRouteStatus) {
      const [route, status] = key.split(' ') as [string, string];
      expect(m.value('allocator_webhook_duration_seconds_count', { route, status }), key).toBe(n);
      expect(m.value('allocator_webhook_duration_seconds_bucket', { route, status, le: '+Inf' })).toBe(n);
      expect(m.value('allocator_webhook_duration_seconds_sum', { route, status })).toBeGreaterThan(0);
    }
    expect(m.sum('allocator_webhook_duration_seconds_count')).toBe(sent.length);
    expect(m.find('allocator_webhook_duration_seconds_count', { route: '/healthz' })).toEqual([]);
    expect(m.types.get('allocator_webhook_duration_seconds')).toBe('histogram');
    expect(m.types.get('allocator_webhooks_total')).toBe('counter');

    // Node's process metrics come along.
    expect(m.has('process_cpu_user_seconds_total')).toBe(true);
    expect(m.has('nodejs_eventloop_lag_seconds')).toBe(true);
  });

  it('needs no webhook secret, and answers 405 to other methods', async () => {
    expect((await get(app.url + '/metrics')).status).toBe(200);
    const r = await post(app.url + '/metrics', {}, json);
    expect(r.status).toBe(405);
    expect(r.headers.get('allow')).toBe('GET, HEAD');
  });

  it('follows the database between scrapes', async () => {
    const before = (await scrape(app.url + '/metrics')).value('allocator_rooms_waiting');
    await post(app.url + NEW, newRequest('9101'), json);
    await post(app.url + NEW, newRequest('9102'), json);
    const after = await scrape(app.url + '/metrics');
    expect(after.value('allocator_rooms_waiting')).toBe(before + 2);
    const n = (await db.pool.query(`select count(*)::int as n from allocator.queue`)).rows[0].n;
    expect(after.value('allocator_rooms_waiting')).toBe(n);
  });
});

describe('request id', () => {
  it('X-Request-Id is echoed, returned, and stored with the webhook', async () => {
    const r = await post(app.url + NEW, newRequest('9201'), { ...json, 'x-request-id': 'qiscus-req-7f3a' });
    expect(r.status).toBe(200);
    expect(r.headers.get('x-request-id')).toBe('qiscus-req-7f3a');
    expect(r.json.request_id).toBe('qiscus-req-7f3a');
    const row = (await db.pool.query(`select request_id from allocator.webhooks where id = $1`, [r.json.webhook_id]))
      .rows[0];
    expect(row.request_id).toBe('qiscus-req-7f3a');
  });

  it('without one, the generated id is the one returned and stored', async () => {
    const r = await post(app.url + CLOSE, resolvedRequest('9201'), json);
    expect(r.status).toBe(200);
    const id = r.headers.get('x-request-id');
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect(r.json.request_id).toBe(id);
    const row = (await db.pool.query(`select request_id from allocator.webhooks where id = $1`, [r.json.webhook_id]))
      .rows[0];
    expect(row.request_id).toBe(id);
  });
});

describe('queue gauges with the database away', () => {
  it('allocator_oldest_snapshot_seconds: a transaction left open shows, at least as old as it is', async () => {
    const c = await db.client();
    try {
      await c.query('begin isolation level repeatable read');
      await c.query('select count(*) from allocator.sessions');
      const opened = performance.now();
      await new Promise((r) => setTimeout(r, 1500));
      const m = await scrape(app.url + '/metrics');
      // the cluster's oldest: other test files' transactions may be older still, never younger
      expect(m.value('allocator_oldest_snapshot_seconds')).toBeGreaterThanOrEqual((performance.now() - opened) / 1000 - 0.1);
      await c.query('commit');
    } finally {
      await c.end();
    }
  });

  it('a refused connection: allocator_database_up 0, the queue gauges left out, the rest still served', async () => {
    const port = await freePort(); // nothing listens there
    const pool = new pg.Pool({ connectionString: `postgres://x:y@127.0.0.1:${port}/none`, connectionTimeoutMillis: 1000 });
    pool.on('error', () => {});
    try {
      const registry = createMetricsRegistry();
      registerQueueMetrics(registry, pool, { logger: testLogger });
      createWebMetrics(registry)({ route: NEW, method: 'POST', status: 503, seconds: 0.01, requestId: 'x' });
      const m = parsePrometheus(await registry.metrics());
      expect(m.value('allocator_database_up')).toBe(0);
      for (const name of ['allocator_rooms_waiting', 'allocator_oldest_wait_seconds', 'allocator_agents']) {
        expect(m.find(name), name).toEqual([]);
      }
      expect(m.value('allocator_webhooks_total', { route: NEW, outcome: 'unavailable' })).toBe(1);
    } finally {
      await pool.end();
    }
  });

  it('a database that never answers: the scrape returns within the timeout', async () => {
    // Accepts TCP connections and says nothing, like a host behind a dead proxy.
    const sockets = new Set<net.Socket>();
    const silent = net.createServer((s) => sockets.add(s));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as net.AddressInfo).port;
    const pool = new pg.Pool({ connectionString: `postgres://x:y@127.0.0.1:${port}/none`, connectionTimeoutMillis: 10_000 });
    pool.on('error', () => {});
    try {
      const registry = createMetricsRegistry({ defaultMetrics: false });
      registerQueueMetrics(registry, pool, { timeoutMs: 300 });
      const t0 = performance.now();
      const m = parsePrometheus(await registry.metrics());
      expect(performance.now() - t0).toBeLessThan(2000);
      expect(m.value('allocator_database_up')).toBe(0);
      expect(m.find('allocator_rooms_waiting')).toEqual([]);
    } finally {
      for (const s of sockets) s.destroy();
      silent.close();
      await pool.end().catch(() => {});
    }
  });
});

/**
 * The metric pieces in one process: the Qiscus decorator's status and kind labels against the simulator (a 429, a
 * 401, a refusal, a hang, a closed port), the listener's /metrics server, and the queue gauges costing one query per
 * scrape.
 */
import type pg from 'pg';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/db/embedded.ts';
import { createListenerMetrics } from '../../src/listener/metrics.ts';
import { createMetricsRegistry, registerQueueMetrics, startMetricsServer } from '../../src/metrics/index.ts';
import { createQiscusClient } from '../../src/qiscus/client.ts';
import { createQiscusMetrics } from '../../src/qiscus/metrics.ts';
import { startSimulator, type Simulator } from '../../src/simulator/qiscus-simulator.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { parsePrometheus, scrape } from './prom-text.ts';

const silent = pino({ level: 'silent' });

describe('Qiscus call metrics (decorator)', () => {
  let sim: Simulator;
  beforeAll(async () => {
    sim = await startSimulator({ appId: 'app', secretKey: 'secret', agents: [{ id: 1 }, { id: 2 }] });
  });
  afterAll(() => sim.close());

  const client = (baseUrl: string, secretKey = 'secret') =>
    createQiscusClient({ baseUrl, appId: 'app', secretKey, connectTimeoutMs: 300, responseTimeoutMs: 300 });

  it('labels each call by operation and status, and counts failures by kind', async () => {
    const registry = createMetricsRegistry({ defaultMetrics: false });
    const metrics = createQiscusMetrics(registry);
    const q = metrics.instrument(client(sim.url));
    const bad = metrics.instrument(client(sim.url, 'wrong'));
    const nowhere = metrics.instrument(client(`http://127.0.0.1:${await freePort()}`));

    sim.setFaults({
      script: [
        { status: 429, body: { errors: 'slow down' }, headers: { 'Retry-After': '1' } },
        { status: 200, body: 'not json' },
        { status: 200, hang: true },
      ],
      rejectAgents: new Set([2]),
    });
    // One after another, so the scripted answers meet the calls in this order.
    const calls: Array<() => Promise<unknown>> = [
      () => q.assignAgent('r1', 1), // 429
      () => q.assignAgent('r2', 1), // a 2xx that is not JSON
      () => q.assignAgent('r3', 1), // no answer: timeout
      () => q.assignAgent('r4', 1), // 200
      () => q.assignAgent('r5', 2), // refused (400)
      () => bad.assignAgent('r6', 1), // 401
      () => nowhere.assignAgent('r7', 1), // connection refused
      () => q.listAllAgents(),
    ];
    const outcomes: PromiseSettledResult<unknown>[] = [];
    for (const call of calls) outcomes.push(...(await Promise.allSettled([call()])));
    expect(outcomes.map((o) => o.status)).toEqual([
      'rejected', 'rejected', 'rejected', 'fulfilled', 'rejected', 'rejected', 'rejected', 'fulfilled',
    ]);

    const m = parsePrometheus(await registry.metrics());
    const count = (operation: string, status: string) =>
      m.sum('allocator_qiscus_request_duration_seconds_count', { operation, status });
    expect(count('assign_agent', '429')).toBe(1);
    expect(count('assign_agent', 'bad_answer')).toBe(1);
    expect(count('assign_agent', 'ETIMEDOUT')).toBe(1);
    expect(count('assign_agent', '2xx')).toBe(1);
    expect(count('assign_agent', '401')).toBe(1);
    expect(count('assign_agent', 'ECONNREFUSED')).toBe(1);
    expect(count('list_agents', '2xx')).toBe(1);
    expect(m.sum('allocator_qiscus_request_duration_seconds_count')).toBe(outcomes.length);

    const errors = (status: string, kind: string) =>
      m.sum('allocator_qiscus_errors_total', { operation: 'assign_agent', status, kind });
    expect(errors('429', 'transient')).toBe(1);
    expect(errors('bad_answer', 'transient')).toBe(1);
    expect(errors('ETIMEDOUT', 'transient')).toBe(1);
    expect(m.sum('allocator_qiscus_errors_total', { kind: 'rejected' })).toBe(1);
    expect(errors('401', 'config')).toBe(1);
    expect(errors('ECONNREFUSED', 'transient')).toBe(1);
    expect(m.sum('allocator_qiscus_errors_total')).toBe(6);
    // The timed-out call took about the timeout; its histogram sum says so.
    expect(m.value('allocator_qiscus_request_duration_seconds_sum', { operation: 'assign_agent', status: 'ETIMEDOUT' }))
      .toBeGreaterThan(0.25);
  });
});

describe('the metrics server (listener)', () => {
  it('serves /metrics and /healthz, 404 elsewhere, 405 for other methods, on a free port with port 0', async () => {
    const registry = createMetricsRegistry();
    createListenerMetrics(registry);
    const server = await startMetricsServer({ registry, port: 0, hostname: '127.0.0.1', logger: silent });
    try {
      expect(server.port).toBeGreaterThan(0);
      const base = `http://127.0.0.1:${server.port}`;
      const m = await scrape(`${base}/metrics`);
      expect(m.value('allocator_assignments_total', { outcome: 'assigned' })).toBe(0);
      expect(m.has('process_resident_memory_bytes') || m.has('process_cpu_user_seconds_total')).toBe(true);
      expect((await fetch(`${base}/healthz`)).status).toBe(200);
      expect((await fetch(`${base}/nope`)).status).toBe(404);
      expect((await fetch(`${base}/metrics`, { method: 'POST' })).status).toBe(405);
    } finally {
      await server.stop();
    }
  });

  it('refuses a port already taken (the caller logs it and runs without)', async () => {
    const registry = createMetricsRegistry({ defaultMetrics: false });
    const first = await startMetricsServer({ registry, port: 0, hostname: '127.0.0.1', logger: silent });
    try {
      await expect(startMetricsServer({ registry, port: first.port, hostname: '127.0.0.1', logger: silent })).rejects.toThrow(
        /EADDRINUSE/,
      );
    } finally {
      await first.stop();
    }
  });
});

describe('queue gauges', () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(() => db.drop());

  it('cost one query per scrape, however many gauges', async () => {
    let queries = 0;
    const counting = {
      query: (...args: unknown[]) => {
        queries++;
        return (db.pool.query as (...a: unknown[]) => Promise<unknown>)(...args);
      },
    } as unknown as pg.Pool;
    const registry = createMetricsRegistry({ defaultMetrics: false });
    registerQueueMetrics(registry, counting);
    await registry.metrics();
    expect(queries).toBe(1);
    await registry.metrics();
    expect(queries).toBe(2);
    const m = parsePrometheus(await registry.metrics());
    expect(queries).toBe(3);
    expect(m.value('allocator_rooms_waiting')).toBe(0);
    expect(m.value('allocator_oldest_wait_seconds')).toBe(0);
  });
});

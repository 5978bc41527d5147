import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { createQiscusClient, QiscusError, type QiscusClient } from '../../src/qiscus/client.ts';
import { messageFromBody, parseRetryAfter } from '../../src/qiscus/errors.ts';
import { maybeAssigned, unanswered } from '../../src/listener/allocator-loop.ts';
import { startSimulator, type Simulator, type SimulatorOptions } from '../../src/simulator/qiscus-simulator.ts';

const fixtures = path.join(import.meta.dirname, '..', 'fixtures');
const sims: Simulator[] = [];
afterEach(async () => {
  await Promise.all(sims.splice(0).map((s) => s.close()));
});

async function setup(opts: SimulatorOptions = {}): Promise<{ sim: Simulator; client: QiscusClient }> {
  const sim = await startSimulator({
    appId: 'app',
    secretKey: 'secret',
    seed: 1,
    agents: [
      { id: 1001, name: 'Ayu', email: 'ayu@example.com' },
      { id: 1002, name: 'Budi', is_available: false },
    ],
    ...opts,
  });
  sims.push(sim);
  const client = createQiscusClient({
    baseUrl: sim.url,
    appId: 'app',
    secretKey: 'secret',
    connectTimeoutMs: 300,
    responseTimeoutMs: 300,
  });
  return { sim, client };
}

/** Runs `p`, expects a QiscusError, returns it. */
async function failure(p: Promise<unknown>): Promise<QiscusError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(QiscusError);
  return e as QiscusError;
}

describe('agents', () => {
  it('reads one page', async () => {
    const { client } = await setup();
    const { agents, totalCount } = await client.listAgentsPage(1, 20);
    expect(totalCount).toBe(2);
    expect(agents).toEqual([
      { id: 1001, name: 'Ayu', email: 'ayu@example.com', is_available: true, force_offline: false, current_customer_count: 0, type_as_string: 'agent' },
      { id: 1002, name: 'Budi', email: 'agent1002@example.com', is_available: false, force_offline: false, current_customer_count: 0, type_as_string: 'agent' },
    ]);
  });

  it('pulls every page (45 agents, limit 20: 3 pages)', async () => {
    const { sim, client } = await setup({ agents: Array.from({ length: 45 }, (_, i) => ({ id: 1001 + i })) });
    sim.assignByHand('r1', 1045);
    const all = await client.listAllAgents(20);
    expect(all.map((a) => a.id)).toEqual(Array.from({ length: 45 }, (_, i) => 1001 + i));
    expect(all.at(-1)!.current_customer_count).toBe(1);
    expect(sim.stats.requests['GET /api/v2/admin/agents']).toEqual({ 200: 3 });
  });

  it('stops on an exact multiple without asking for an empty page, and on an empty roster', async () => {
    const { sim, client } = await setup({ agents: Array.from({ length: 40 }, (_, i) => ({ id: 1 + i })) });
    expect(await client.listAllAgents(20)).toHaveLength(40);
    expect(sim.stats.requests['GET /api/v2/admin/agents']).toEqual({ 200: 2 });
    const empty = await setup({ agents: [] });
    expect(await empty.client.listAllAgents(20)).toEqual([]);
  });

  it('does not loop forever when the server ignores `page`', async () => {
    let calls = 0;
    const server = createServer((_req, res) => {
      calls++;
      const agents = Array.from({ length: 2 }, (_, i) => ({ id: i + 1, name: 'x', is_available: true, type_as_string: 'agent' }));
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ data: { agents }, meta: { total_count: 5 } }));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const client = createQiscusClient({ baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, appId: 'a', secretKey: 's' });
      const all = await client.listAllAgents(2);
      expect(all).toHaveLength(2);
      expect(calls).toBe(4); // ceil(5/2) + 1
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  it('tolerates nulls and unknown fields', async () => {
    const server = createServer((_req, res) => {
      const agents = [{ id: 7, name: null, email: null, is_available: null, force_offline: null, current_customer_count: null, type_as_string: 'agent', extra: { x: 1 } }];
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ data: { agents }, meta: { total_count: 1, per_page: null } }));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const client = createQiscusClient({ baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, appId: 'a', secretKey: 's' });
      expect((await client.listAgentsPage(1, 10)).agents).toEqual([
        { id: 7, name: '', email: null, is_available: false, force_offline: false, current_customer_count: 0, type_as_string: 'agent' },
      ]);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  it('list errors are classified too', async () => {
    const { sim, client } = await setup({ faults: { faultsOnList: true, rate429: 1, retryAfterSeconds: 3 } });
    const e = await failure(client.listAllAgents());
    expect([e.kind, e.status, e.retryAfterSeconds]).toEqual(['transient', 429, 3]);
    sim.clearFaults();
    expect(await client.listAllAgents()).toHaveLength(2);
  });
});

describe('assignAgent', () => {
  it('returns the service id and sends the credentials', async () => {
    const { sim, client } = await setup();
    expect(await client.assignAgent('273683234', 1001)).toEqual({ serviceId: 115830000, agentId: 1001 });
    expect(sim.agentOf('273683234')).toBe(1001);
    // idempotent retry
    expect(await client.assignAgent('273683234', 1001)).toEqual({ serviceId: 115830000, agentId: 1001 });
  });

  it('500 → transient', async () => {
    const { sim, client } = await setup();
    sim.faults.script.push({ status: 500 });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.status, e.retryAfterSeconds]).toEqual(['transient', 500, undefined]);
    // Qiscus may have assigned before failing, but it answered: the call is over (src/listener/allocator-loop.ts)
    expect([maybeAssigned(e), unanswered(e)]).toEqual([true, false]);
  });

  it('502 with an HTML body → transient with a raw snippet as message', async () => {
    const { sim, client } = await setup();
    sim.faults.script.push({ status: 502, body: '<html>Bad Gateway</html>' });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.status, e.message]).toEqual(['transient', 502, 'HTTP 502: <html>Bad Gateway</html>']);
  });

  it('429 with Retry-After seconds → transient with retryAfterSeconds', async () => {
    const { client } = await setup({ faults: { rate429: 1, retryAfterSeconds: 4 } });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.status, e.retryAfterSeconds, e.message]).toEqual(['transient', 429, 4, 'Too many requests']);
    expect([maybeAssigned(e), unanswered(e)]).toEqual([false, false]);
  });

  it('429 with Retry-After as an HTTP date', async () => {
    const { sim, client } = await setup();
    const when = new Date(Date.now() + 30_000).toUTCString();
    sim.faults.script.push({ status: 429, headers: { 'retry-after': when } });
    const e = await failure(client.assignAgent('r1', 1001));
    expect(e.kind).toBe('transient');
    expect(e.retryAfterSeconds).toBeGreaterThanOrEqual(28);
    expect(e.retryAfterSeconds).toBeLessThanOrEqual(31);
  });

  it('hang → transient within the timeout', async () => {
    const { client } = await setup({ faults: { hangRate: 1 } });
    const t = Date.now();
    const e = await failure(client.assignAgent('r1', 1001));
    expect(e.kind).toBe('transient');
    expect(e.code).toBe('ETIMEDOUT');
    expect(Date.now() - t).toBeLessThan(1500);
    // no answer: Qiscus may still be working on the call, and apply it later
    expect([maybeAssigned(e), unanswered(e)]).toEqual([true, true]);
  });

  it('slow answer past the response timeout → transient', async () => {
    const { client } = await setup({ faults: { latencyMs: 800 } });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.code]).toEqual(['transient', 'ETIMEDOUT']);
  });

  it('connection refused → transient', async () => {
    const { sim } = await setup();
    const url = sim.url;
    await sim.close();
    const client = createQiscusClient({ baseUrl: url, appId: 'app', secretKey: 'secret', connectTimeoutMs: 300, responseTimeoutMs: 300 });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.code, e.status]).toEqual(['transient', 'ECONNREFUSED', undefined]);
    expect([maybeAssigned(e), unanswered(e)]).toEqual([false, false]); // it never reached Qiscus
  });

  it('a kept-alive connection the server closed as we reused it: sent again at once on a new one, once', async () => {
    // The server answers the first call, then drops the connection under the second without answering (as a
    // server or proxy whose keep-alive timeout ran out at that moment does); a new connection is answered.
    const answer = readFileSync(path.join(fixtures, 'assign-agent-response.json'), 'utf8');
    const seen: Array<{ socket: number }> = [];
    const sockets = new Map<object, number>();
    let dropEvery = false;
    const server = createServer((req, res) => {
      if (!sockets.has(req.socket)) sockets.set(req.socket, sockets.size + 1);
      const socket = sockets.get(req.socket)!;
      seen.push({ socket });
      req.resume();
      req.on('end', () => {
        if (dropEvery || (socket === 1 && seen.filter((x) => x.socket === 1).length === 2)) return req.socket.destroy();
        res.writeHead(200, { 'content-type': 'application/json' }).end(answer);
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const client = createQiscusClient({ baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, appId: 'a', secretKey: 's' });
      await client.assignAgent('r1', 1001);
      await client.assignAgent('r2', 1001); // on connection 1, dropped; sent again on connection 2
      expect(seen).toEqual([{ socket: 1 }, { socket: 1 }, { socket: 2 }]);
      // A server that drops every call: one resend, then the failure is the room's (transient, maybe landed).
      dropEvery = true;
      seen.length = 0;
      const e = await failure(client.assignAgent('r3', 1001));
      expect([e.kind, e.code]).toEqual(['transient', 'ECONNRESET']);
      expect(seen).toHaveLength(2);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  it('400 → rejected with the Qiscus message (string shape)', async () => {
    const { client } = await setup();
    const e = await failure(client.assignAgent('r1', 4242));
    expect([e.kind, e.status, e.message]).toEqual(['rejected', 400, 'agent not found']);
  });

  it('second agent on the room → rejected', async () => {
    const { client } = await setup();
    await client.assignAgent('r1', 1001);
    const e = await failure(client.assignAgent('r1', 1002));
    expect([e.kind, e.message]).toEqual(['rejected', 'room already has the maximum number of agents']);
  });

  it('401 → config with the Qiscus message (object shape)', async () => {
    const { sim } = await setup();
    const client = createQiscusClient({ baseUrl: sim.url, appId: 'app', secretKey: 'wrong' });
    const e = await failure(client.assignAgent('r1', 1001));
    expect([e.kind, e.status, e.message]).toEqual(['config', 401, 'Unauthorized']);
    const e2 = await failure(client.listAllAgents());
    expect(e2.kind).toBe('config');
  });

  it('403 → config, 404 → rejected, 503 with object error → transient', async () => {
    const { sim, client } = await setup();
    sim.faults.script.push(
      { status: 403, body: { errors: 'forbidden' } },
      { status: 404, body: { errors: { message: 'room not found' } } },
      { status: 503, body: { errors: { message: 'maintenance' } }, headers: { 'retry-after': '12' } },
    );
    const a = await failure(client.assignAgent('r1', 1001));
    const b = await failure(client.assignAgent('r1', 1001));
    const c = await failure(client.assignAgent('r1', 1001));
    expect([a.kind, a.message]).toEqual(['config', 'forbidden']);
    expect([b.kind, b.message]).toEqual(['rejected', 'room not found']);
    expect([c.kind, c.message, c.retryAfterSeconds]).toEqual(['transient', 'maintenance', 12]);
  });

  it('2xx with a garbage or wrongly shaped body → transient', async () => {
    const { sim, client } = await setup();
    sim.faults.script.push({ status: 200, body: 'garbage' }, { status: 200, body: { data: 'nope' } });
    const a = await failure(client.assignAgent('r1', 1001));
    expect([a.kind, a.status]).toEqual(['transient', 200]);
    expect(a.message).toMatch(/not JSON/);
    const b = await failure(client.assignAgent('r1', 1001));
    expect([b.kind, b.status]).toEqual(['transient', 200]);
    expect(b.message).toMatch(/unexpected answer shape/);
  });

  it('accepted-then-500 is transient, and the retry succeeds', async () => {
    const { sim, client } = await setup({ faults: { acceptThenFailRate: 1 } });
    expect((await failure(client.assignAgent('r1', 1001))).kind).toBe('transient');
    sim.clearFaults();
    expect(await client.assignAgent('r1', 1001)).toEqual({ serviceId: 115830000, agentId: 1001 });
    expect(sim.assignCount('r1')).toBe(1);
  });
});

describe('error helpers', () => {
  it('messageFromBody reads both shapes and falls back', () => {
    expect(messageFromBody('{ "errors": "agent not found", "status": 400 }', 400)).toBe('agent not found');
    expect(messageFromBody('{ "errors": { "message": "Unauthorized" }, "status": 401 }', 401)).toBe('Unauthorized');
    expect(messageFromBody('', 502, 'Bad Gateway')).toBe('HTTP 502 Bad Gateway');
    expect(messageFromBody('oops', 500)).toBe('HTTP 500: oops');
  });

  it('parseRetryAfter reads seconds and dates', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    expect(parseRetryAfter('5', now)).toBe(5);
    expect(parseRetryAfter('Thu, 01 Jan 2026 00:00:10 GMT', now)).toBe(10);
    expect(parseRetryAfter('Wed, 31 Dec 2025 00:00:00 GMT', now)).toBe(0);
    expect(parseRetryAfter('soon', now)).toBeUndefined();
    expect(parseRetryAfter(undefined, now)).toBeUndefined();
  });
});

describe('divisions', () => {
  it('reads every page of the divisions and of one division\'s agents (offline ones too)', async () => {
    const divisions = Object.fromEntries(Array.from({ length: 5 }, (_, i) => [400 + i, `Team ${i}`]));
    const agents = Array.from({ length: 7 }, (_, i) => ({ id: 1 + i, is_available: i % 2 === 0, divisions: [400, 400 + (i % 5)] }));
    const { client } = await setup({ divisions, agents });
    const all = await client.listAllDivisions(2);
    expect(all.map((d) => [d.id, d.name])).toEqual(Object.entries(divisions).map(([id, name]) => [Number(id), name]));
    expect(await client.listDivisionAgentIds(400, 3)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(await client.listDivisionAgentIds(402, 3)).toEqual([3]);
  });

  it('parses the fixtures: data is the array, with meta.total_page', async () => {
    const { DivisionsPageSchema, AgentsByDivisionPageSchema } = await import('../../src/qiscus/schemas.ts');
    const { fixture } = await import('../support/fixtures.ts');
    expect(DivisionsPageSchema.parse(fixture('divisions-page.json')).data.map((d) => d.id)).toEqual([438, 439]);
    expect(AgentsByDivisionPageSchema.parse(fixture('agents-by-division-page.json')).data.map((a) => a.id)).toEqual([1001]);
  });
});

import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startSimulator, type Simulator } from '../../src/simulator/qiscus-simulator.ts';

const fixture = (name: string): any => JSON.parse(readFileSync(new URL(`../fixtures/${name}`, import.meta.url), 'utf8'));
const keys = (o: object) => Object.keys(o).sort();

const AGENTS = '/api/v2/admin/agents';
const ASSIGN = '/api/v1/admin/service/assign_agent';
const AUTH = { 'Qiscus-App-Id': 'app', 'Qiscus-Secret-Key': 'secret' };

/** A webhook receiver standing in for our app: records what it got and answers 200. */
interface Received {
  path: string;
  query: URLSearchParams;
  body: any;
}
let receiver: Server;
let receiverUrl: string;
const received: Received[] = [];

beforeAll(async () => {
  receiver = createServer((req: IncomingMessage, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const u = new URL(req.url ?? '/', 'http://x');
      received.push({ path: u.pathname, query: u.searchParams, body: JSON.parse(Buffer.concat(chunks).toString()) });
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"result":"ok"}');
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  receiverUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}`;
});
afterAll(async () => {
  receiver.closeAllConnections();
  await new Promise((r) => receiver.close(r));
});

const sims: Simulator[] = [];
async function sim(opts: Parameters<typeof startSimulator>[0] = {}): Promise<Simulator> {
  const s = await startSimulator({
    appId: 'app',
    secretKey: 'secret',
    webhookBaseUrl: receiverUrl,
    seed: 42,
    agents: [
      { id: 1001, name: 'Ayu' },
      { id: 1002, name: 'Budi' },
      { id: 9, name: 'Boss', type_as_string: 'admin' },
    ],
    ...opts,
  });
  sims.push(s);
  return s;
}
afterEach(async () => {
  received.length = 0;
  await Promise.all(sims.splice(0).map((s) => s.close()));
});

async function assign(s: Simulator, room_id: string, agent_id: number, extra: Record<string, unknown> = {}) {
  const res = await fetch(`${s.url}${ASSIGN}`, {
    method: 'POST',
    headers: { ...AUTH, 'content-type': 'application/json' },
    body: JSON.stringify({ room_id, agent_id, max_agent: 1, ...extra }),
  });
  const text = await res.text();
  let body: any = text;
  try {
    body = JSON.parse(text);
  } catch {
    /* raw */
  }
  return { status: res.status, headers: res.headers, body };
}

async function listPage(s: Simulator, page: number, limit: number) {
  const res = await fetch(`${s.url}${AGENTS}?page=${page}&limit=${limit}`, { headers: AUTH });
  return { status: res.status, body: (await res.json()) as any };
}

describe('agents list', () => {
  it('pages in the fixture shape, with current_customer_count', async () => {
    const s = await sim({ agents: Array.from({ length: 45 }, (_, i) => ({ id: 1001 + i })) });
    s.assignByHand('r1', 1003);
    const p1 = await listPage(s, 1, 20);
    expect(p1.status).toBe(200);
    expect(keys(p1.body)).toEqual(keys(fixture('agents-page.json')));
    expect(p1.body.meta).toEqual({ per_page: 20, total_count: 45 });
    expect(p1.body.data.agents).toHaveLength(20);
    expect(keys(p1.body.data.agents[0])).toEqual(keys(fixture('agents-page.json').data.agents[0]));
    expect(p1.body.data.agents[2]).toMatchObject({ id: 1003, current_customer_count: 1, type_as_string: 'agent', type: 2 });
    const p3 = await listPage(s, 3, 20);
    expect(p3.body.data.agents.map((a: any) => a.id)).toEqual([1041, 1042, 1043, 1044, 1045]);
    expect((await listPage(s, 4, 20)).body.data.agents).toEqual([]);
  });

  it('reflects roster changes', async () => {
    const s = await sim();
    s.setAgent(1001, { is_available: false });
    s.removeAgent(1002);
    s.addAgent({ id: 1003, name: 'Citra', force_offline: true });
    const { body } = await listPage(s, 1, 20);
    expect(body.data.agents.map((a: any) => [a.id, a.is_available, a.force_offline])).toEqual([
      [9, true, false],
      [1001, false, false],
      [1003, true, true],
    ]);
  });
});

describe('auth and routing', () => {
  it('refuses missing or wrong credentials with the object error shape', async () => {
    const s = await sim();
    for (const headers of [{}, { ...AUTH, 'Qiscus-Secret-Key': 'nope' }]) {
      const res = await fetch(`${s.url}${AGENTS}`, { headers });
      expect(res.status).toBe(401);
      expect(await res.json()).toEqual(fixture('error-object.json'));
    }
    expect(s.stats.requests[`GET ${AGENTS}`]).toEqual({ 401: 2 });
  });

  it('accepts anything when no credentials are configured', async () => {
    const s = await sim({ appId: undefined, secretKey: undefined });
    expect((await fetch(`${s.url}${AGENTS}`)).status).toBe(200);
  });

  it('answers 404 to unknown routes and 400 to bad JSON', async () => {
    const s = await sim();
    expect((await fetch(`${s.url}/api/v1/nope`, { headers: AUTH })).status).toBe(404);
    const res = await fetch(`${s.url}${ASSIGN}`, { method: 'POST', headers: AUTH, body: '{nope' });
    expect(res.status).toBe(400);
    expect(typeof ((await res.json()) as any).errors).toBe('string');
  });
});

describe('assign_agent', () => {
  it('assigns in the fixture shape and records state', async () => {
    const s = await sim();
    const r = await assign(s, '273683234', 1001);
    expect(r.status).toBe(200);
    const fx = fixture('assign-agent-response.json');
    expect(keys(r.body)).toEqual(keys(fx));
    expect(keys(r.body.data.added_agent)).toEqual(keys(fx.data.added_agent));
    expect(keys(r.body.data.service)).toEqual(keys(fx.data.service));
    expect(r.body.data.service).toMatchObject({ id: 115830000, room_id: '273683234', is_resolved: false });
    expect(r.body.data.added_agent.id).toBe(1001);
    expect(s.agentOf('273683234')).toBe(1001);
    expect(s.roomsOf(1001)).toEqual(['273683234']);
    expect(s.assignCount('273683234')).toBe(1);
    expect(s.assignments).toMatchObject([{ room_id: '273683234', agent_id: 1001, status: 200, session: 1 }]);
    expect((await listPage(s, 1, 20)).body.data.agents.find((a: any) => a.id === 1001).current_customer_count).toBe(1);
  });

  it('is idempotent for the same agent and refuses a second agent', async () => {
    const s = await sim();
    const first = await assign(s, 'r1', 1001);
    const again = await assign(s, 'r1', 1001);
    expect(again.status).toBe(200);
    expect(again.body.data.service.id).toBe(first.body.data.service.id);
    const other = await assign(s, 'r1', 1002);
    expect(other.status).toBe(400);
    expect(other.body.errors).toBe('room already has the maximum number of agents');
    expect(s.assignCount('r1')).toBe(1);
    expect(s.roomsOf(1002)).toEqual([]);
    expect(s.assignments.map((a) => a.repeat ?? false)).toEqual([false, true, false]);
  });

  it('refuses unknown agents and non-agents with the string error shape', async () => {
    const s = await sim();
    for (const id of [4242, 9]) {
      const r = await assign(s, 'r1', id);
      expect(r.status).toBe(400);
      expect(r.body).toEqual(fixture('error-string.json'));
    }
  });

  it('assigns an offline agent but counts it', async () => {
    const s = await sim();
    s.setAgent(1002, { force_offline: true });
    expect((await assign(s, 'r1', 1002)).status).toBe(200);
    expect(s.stats.assignedWhileOffline).toBe(1);
  });

  it('tracks the highest load ever held', async () => {
    const s = await sim();
    await assign(s, 'a', 1001);
    await assign(s, 'b', 1001);
    s.assignByHand('c', 1001);
    await s.resolve('a');
    await s.resolve('b');
    expect(s.roomsOf(1001)).toEqual(['c']);
    expect(s.maxLoadSeen(1001)).toBe(3);
    expect(s.maxLoadSeen(1002)).toBe(0);
    expect(s.maxLoadSeenAll()).toBe(3);
  });

  it('by-hand assignment moves a room and blocks API assignment of another agent', async () => {
    const s = await sim();
    s.assignByHand('r1', 1001);
    s.assignByHand('r1', 1002);
    expect(s.roomsOf(1001)).toEqual([]);
    expect(s.agentOf('r1')).toBe(1002);
    expect((await assign(s, 'r1', 1001)).status).toBe(400);
    expect(s.assignCount('r1')).toBe(0);
  });
});

describe('webhooks', () => {
  it('resolve takes the room off the agent and posts Mark-as-Resolved', async () => {
    const s = await sim({ webhookSecret: 's3cret' });
    const a = await assign(s, '274083256', 1001);
    const out = await s.resolve('274083256', { notes: 'selesai.' });
    expect(out).toEqual({ status: 200, body: { result: 'ok' } });
    expect(s.agentOf('274083256')).toBeNull();
    expect(s.roomsOf(1001)).toEqual([]);
    expect(received).toHaveLength(1);
    const got = received[0]!;
    expect(got.path).toBe('/api/v1/close_request');
    expect(got.query.get('secret')).toBe('s3cret');
    const fx = fixture('mar-resolved.json');
    expect(keys(got.body)).toEqual(keys(fx));
    for (const k of ['customer', 'resolved_by', 'service'] as const) expect(keys(got.body[k])).toEqual(keys(fx[k]));
    expect(got.body.service).toMatchObject({ id: a.body.data.service.id, room_id: '274083256', is_resolved: true, notes: 'selesai.' });
    expect(typeof got.body.service.id).toBe('number');
    expect(got.body.resolved_by).toMatchObject({ id: 1001, type: 'agent' });
  });

  it('a room without an agent can be resolved by an admin', async () => {
    const s = await sim();
    await s.sendNewRequest('r9');
    await s.resolve('r9');
    expect(received[1]!.body.resolved_by.type).toBe('admin');
  });

  it('sendNewRequest posts the new-customer shape, then the returning shape after a resolution', async () => {
    const s = await sim({ webhookSecret: undefined });
    const first = await s.sendNewRequest('1905692', { name: 'sudah', email: 'sudah@gmail.com' });
    expect(first.status).toBe(200);
    const n = received[0]!;
    expect(n.path).toBe('/api/v1/new_request');
    expect(n.query.has('secret')).toBe(false);
    expect(keys(n.body)).toEqual(keys(fixture('caa-new-customer.json')));
    expect(n.body).toMatchObject({ room_id: '1905692', candidate_agent: null, latest_service: null, is_resolved: false, name: 'sudah' });
    expect(typeof JSON.parse(n.body.extras)).toBe('object');

    await assign(s, '1905692', 1002);
    await s.resolve('1905692');
    await s.sendNewRequest('1905692');
    const r = received[2]!;
    const fx = fixture('caa-returning-customer.json');
    expect(keys(r.body)).toEqual(keys(fx));
    expect(keys(r.body.latest_service)).toEqual(keys(fx.latest_service));
    expect(keys(r.body.candidate_agent)).toEqual(keys(fx.candidate_agent));
    expect(r.body).toMatchObject({ room_id: '1905692', is_resolved: true, latest_service: { is_resolved: true, room_id: '1905692' } });
    expect(r.body.latest_service.id).toBe(115830000);

    // The new session gets a new service and a fresh assignment count.
    const again = await assign(s, '1905692', 1001);
    expect(again.body.data.service.id).toBe(115830001);
    expect(s.assignCount('1905692')).toBe(1);
    expect(s.assignments.at(-1)!.session).toBe(2);
  });
});

describe('faults', () => {
  it('script answers in order, before random faults, and can accept', async () => {
    const s = await sim();
    s.faults.script.push(
      { status: 503, body: { errors: { message: 'down' } } },
      { status: 200, body: 'garbage' },
      { status: 500, accept: true },
    );
    s.setFaults({ errorRate: 1 });
    const a = await assign(s, 'r1', 1001);
    expect([a.status, a.body]).toEqual([503, { errors: { message: 'down' } }]);
    const b = await assign(s, 'r1', 1001);
    expect([b.status, b.body]).toEqual([200, 'garbage']);
    expect(s.agentOf('r1')).toBeNull();
    const c = await assign(s, 'r1', 1001);
    expect(c.status).toBe(500);
    expect(s.agentOf('r1')).toBe(1001);
    expect(s.stats.faults.script).toBe(3);
    expect([500, 502, 503]).toContain((await assign(s, 'r1', 1001)).status);
    expect(s.stats.faults.error).toBe(1);
  });

  it('errorRate answers 5xx without assigning', async () => {
    const s = await sim({ faults: { errorRate: 1 } });
    for (let i = 0; i < 6; i++) expect([500, 502, 503]).toContain((await assign(s, `r${i}`, 1001)).status);
    expect(s.roomsOf(1001)).toEqual([]);
    expect(s.stats.faults.error).toBe(6);
    expect(s.assignments.every((a) => a.fault === 'error')).toBe(true);
  });

  it('rate429 answers 429 with Retry-After', async () => {
    const s = await sim({ faults: { rate429: 1, retryAfterSeconds: 7 } });
    const r = await assign(s, 'r1', 1001);
    expect(r.status).toBe(429);
    expect(r.headers.get('retry-after')).toBe('7');
    expect(s.stats.faults.rate429).toBe(1);
  });

  it('acceptThenFailRate assigns and answers 500; the retry gets 200', async () => {
    const s = await sim({ faults: { acceptThenFailRate: 1 } });
    expect((await assign(s, 'r1', 1001)).status).toBe(500);
    expect(s.agentOf('r1')).toBe(1001);
    s.setFaults({ acceptThenFailRate: 0 });
    expect((await assign(s, 'r1', 1001)).status).toBe(200);
    expect(s.assignCount('r1')).toBe(1);
    expect(s.stats.faults.acceptThenFail).toBe(1);
  });

  it('rejectAgents answers 400 for those agents only', async () => {
    const s = await sim({ faults: { rejectAgents: new Set([1002]) } });
    const r = await assign(s, 'r1', 1002);
    expect([r.status, r.body.errors]).toEqual([400, 'agent cannot be assigned']);
    expect((await assign(s, 'r1', 1001)).status).toBe(200);
    expect(s.stats.faults.reject).toBe(1);
  });

  it('latency delays the answer (fixed and ranged)', async () => {
    const s = await sim({ faults: { latencyMs: 120 } });
    let t = Date.now();
    await assign(s, 'r1', 1001);
    expect(Date.now() - t).toBeGreaterThanOrEqual(100);
    s.setFaults({ latencyMs: [30, 60] });
    t = Date.now();
    await assign(s, 'r2', 1001);
    expect(Date.now() - t).toBeGreaterThanOrEqual(25);
    expect(s.stats.faults.latency).toBe(2);
  });

  it('faults reach the agents list only with faultsOnList', async () => {
    const s = await sim({ faults: { errorRate: 1 } });
    expect((await listPage(s, 1, 20)).status).toBe(200);
    s.setFaults({ faultsOnList: true });
    expect((await fetch(`${s.url}${AGENTS}`, { headers: AUTH })).status).toBeGreaterThanOrEqual(500);
    s.clearFaults();
    expect((await listPage(s, 1, 20)).status).toBe(200);
  });

  it('the same seed gives the same fault sequence', async () => {
    const run = async () => {
      const s = await sim({ seed: 7, faults: { errorRate: 0.5 } });
      const out: number[] = [];
      for (let i = 0; i < 12; i++) out.push((await assign(s, `r${i}`, 1001)).status);
      return out;
    };
    const a = await run();
    expect(await run()).toEqual(a);
    expect(new Set(a).size).toBeGreaterThan(1);
  });

  it('hang never answers, and close() ends hanging requests at once', async () => {
    const s = await sim({ faults: { hangRate: 1 } });
    const pending = assign(s, 'r1', 1001).then(
      () => 'answered',
      () => 'failed',
    );
    const raced = await Promise.race([pending, new Promise((r) => setTimeout(() => r('still hanging'), 200))]);
    expect(raced).toBe('still hanging');
    expect(s.stats.faults.hang).toBe(1);
    expect(s.assignments[0]).toMatchObject({ status: 0, fault: 'hang' });
    const t = Date.now();
    await s.close();
    expect(Date.now() - t).toBeLessThan(1000);
    expect(await pending).toBe('failed');
  });

  it('close() does not wait for a request sleeping in latency', async () => {
    const s = await sim({ faults: { latencyMs: 60_000 } });
    const pending = assign(s, 'r1', 1001).catch(() => 'failed');
    await new Promise((r) => setTimeout(r, 50));
    const t = Date.now();
    await s.close();
    expect(Date.now() - t).toBeLessThan(1000);
    expect(await pending).toBe('failed');
    expect(s.agentOf('r1')).toBeNull();
  });
});

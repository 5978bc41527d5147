/**
 * The simulator features the liveness tests rely on, checked on their own (no database, no processes): answers
 * delayed after the assignment is performed, calls dropped when their client is gone, the onAssigned hook,
 * resolveOnAssign, down()/up(), and the request logs (receivedAt, answeredAt, performed, listRequests).
 */
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { startSimulator, type PerformedAssignment, type Simulator } from '../../src/simulator/qiscus-simulator.ts';
import { disposeAfterEach } from '../support/cleanup.ts';
import { eventually, sleep } from '../support/processes.ts';
import { startWebhookReceiver, type WebhookReceiver } from '../support/webhook-receiver.ts';

const AUTH = { 'Qiscus-App-Id': 'app', 'Qiscus-Secret-Key': 'secret' };
let receiver: WebhookReceiver;
const closes = () => receiver.received.filter((w) => w.path === '/api/v1/close_request').map((w) => w.body);

beforeAll(async () => {
  receiver = await startWebhookReceiver({ ok: true, outcome: 'resolved' });
});
afterAll(() => receiver.close());

const closeLater = disposeAfterEach();
afterEach(() => void (receiver.received.length = 0));

async function sim(opts: Parameters<typeof startSimulator>[0] = {}): Promise<Simulator> {
  const s = await startSimulator({
    appId: 'app',
    secretKey: 'secret',
    webhookBaseUrl: receiver.url,
    seed: 5,
    agents: [{ id: 1 }, { id: 2 }],
    ...opts,
  });
  closeLater(() => s.close());
  return s;
}

async function assign(s: Simulator, room_id: string, agent_id: number, signal?: AbortSignal) {
  const res = await fetch(`${s.url}/api/v1/admin/service/assign_agent`, {
    method: 'POST',
    headers: { ...AUTH, 'content-type': 'application/json' },
    body: JSON.stringify({ room_id, agent_id, max_agent: 1 }),
    signal,
  });
  return { status: res.status, body: (await res.json()) as any };
}

it('answerDelayMs: the assignment is performed first, answered later; inFlight and the log show it', async () => {
  const s = await sim({ faults: { answerDelayMs: 300 } });
  const pending = assign(s, 'r1', 1);
  await eventually('performed', () => s.roomsOf(1).length === 1, 2000, 5);
  expect(s.inFlight()).toEqual({ notPerformed: 0, performed: 1 });
  expect(s.assignments[0]!.answeredAt).toBeUndefined();
  const r = await pending;
  expect(r.status).toBe(200);
  const e = s.assignments[0]!;
  expect(e.performed).toBe(true);
  expect(e.answeredAt! - e.at).toBeGreaterThanOrEqual(290);
  expect(e.receivedAt).toBeLessThanOrEqual(e.at);
  await eventually('nothing in flight', () => s.inFlight().performed === 0, 1000, 5);
});

it('a script step may delay its answer after performing', async () => {
  const s = await sim();
  s.setFaults({ script: [{ status: 500, accept: true, answerDelayMs: 200 }] });
  const t0 = Date.now();
  const r = await assign(s, 'r1', 1);
  expect(r.status).toBe(500);
  expect(Date.now() - t0).toBeGreaterThanOrEqual(190);
  expect(s.roomsOf(1)).toEqual(['r1']);
  expect(s.assignments[0]).toMatchObject({ status: 500, performed: true, fault: 'script' });
});

it('dropIfClientGone: a call whose client went away before it was handled never happens', async () => {
  const s = await sim({ faults: { latencyMs: 300, dropIfClientGone: true } });
  const ac = new AbortController();
  const gone = assign(s, 'r1', 1, ac.signal).catch(() => 'aborted');
  await eventually('received', () => s.inFlight().notPerformed === 1, 1000, 5);
  ac.abort();
  expect(await gone).toBe('aborted');
  await sleep(400);
  expect(s.droppedCalls).toBe(1);
  expect(s.roomsOf(1)).toEqual([]);
  expect(s.assignments).toEqual([]);
  expect((await assign(s, 'r2', 1)).status).toBe(200); // calls that stay are served as usual
});

it('onAssigned sees each performed assignment with the service id of the answer, not repeats', async () => {
  const seen: PerformedAssignment[] = [];
  const s = await sim({ onAssigned: (a) => seen.push(a) });
  const r = await assign(s, 'r1', 2);
  await assign(s, 'r1', 2); // repeat
  expect(seen).toEqual([{ roomId: 'r1', agentId: 2, serviceId: r.body.data.service.id, session: 1 }]);
});

it('resolveOnAssign: the room is resolved the moment it is assigned, webhook with the agent and the service id', async () => {
  const s = await sim({ resolveOnAssign: true, faults: { answerDelayMs: 100 } });
  const pending = assign(s, 'r1', 1);
  await eventually('performed and resolved', () => s.assignments.length === 1 && s.roomsOf(1).length === 0, 2000, 5);
  const r = await pending;
  expect(r.status).toBe(200);
  await eventually('webhook answered', () => s.autoResolutions[0]?.status === 200, 2000, 5);
  expect(closes()).toHaveLength(1);
  expect(closes()[0].resolved_by.id).toBe(1);
  expect(closes()[0].service.id).toBe(r.body.data.service.id);
  expect(closes()[0].service.room_id).toBe('r1');
  expect(s.autoResolutions[0]).toMatchObject({ room_id: 'r1', agent_id: 1, service_id: r.body.data.service.id });
  expect(s.maxLoadSeenAll()).toBe(1);

  s.resolveOnAssign = { by: 2 };
  await assign(s, 'r2', 1);
  await eventually('second webhook', () => closes().length === 2, 2000, 5);
  expect(closes()[1].resolved_by.id).toBe(2);
});

it('down()/up(): every assign call answers 503 and does nothing, counted; the list keeps working unless asked', async () => {
  const s = await sim();
  s.down();
  for (let i = 0; i < 3; i++) expect((await assign(s, `r${i}`, 1)).status).toBe(503);
  const list = await fetch(`${s.url}/api/v2/admin/agents?page=2&limit=1`, { headers: AUTH });
  expect(list.status).toBe(200);
  expect(s.listRequests.map((l) => l.page)).toEqual([2]);
  expect(s.outage).toMatchObject({ assignCalls: 3, listCalls: 0 });
  const report = s.up();
  expect(report).toMatchObject({ assignCalls: 3, listCalls: 0 });
  expect(s.outage).toBeNull();
  expect(s.roomsOf(1)).toEqual([]);
  expect((await assign(s, 'r0', 1)).status).toBe(200);

  s.down({ status: 502, list: true });
  expect((await fetch(`${s.url}/api/v2/admin/agents`, { headers: AUTH })).status).toBe(502);
  expect(s.up()).toMatchObject({ assignCalls: 0, listCalls: 1 });
});

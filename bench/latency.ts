/**
 * 3. Latency: with free agents, one room at a time: from the web process's 200 to the allocation webhook (the
 * room is committed) to the simulator receiving the assign call, p50/p95/p99. Each room is resolved (through the
 * web, as Qiscus would) once assigned, and the next one starts after a short pause, so every room finds an idle
 * listener and a free agent.
 * Baseline from the same run ("floor"): the same pipeline written as tightly as possible inside this process, on
 * the same database and simulator: accept_new_request on one connection, LISTEN on another, and on the
 * notification reserve() → assign call on a keep-alive socket → confirm(). What the real stack adds above this
 * is the cost of its processes (web, listener, got, pg-listen, pools).
 *
 * Pinned horizon (issue 12): the real stack twice more, each after BENCH_LATENCY_SERVED (20,000) rooms were queued,
 * counted on the 20 agents and resolved before the measured ones (the history), once with another session holding
 * a REPEATABLE READ snapshot open from before that history to the end (`begin isolation level repeatable read;
 * select count(*) from allocator.sessions;`, as a forgotten psql session would): none of the row versions or index
 * entries the history left can be cleaned while it lives, and whatever walks past them pays for each (an agent's
 * row keeps two versions per room it served). Ratios: with the snapshot against without it.
 *
 * Knobs: BENCH_LATENCY_ROOMS (300), BENCH_LATENCY_PAUSE_MS (5), BENCH_LATENCY_SERVED (20000).
 */
import http from 'node:http';
import pg from 'pg';
import { watchAssignments, type AssignWatch } from './lib/assign-watch.ts';
import { profileArgs } from './lib/cpuprofile.ts';
import { connectClients, endClients, holdSnapshot, releaseSnapshot } from './lib/db.ts';
import { postJson } from './lib/http-load.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { APP_ID, INSERT_AGENTS_SQL, newRequestBody, SECRET_KEY, startListeners, startSim, startWeb } from './lib/stack.ts';
import { envInt, ratio, roundSummary, Samples, sleep, summarize, type Summary } from './lib/stats.ts';

const AGENTS = 20;

interface LatencyRun {
  rooms: number;
  /** Room committed (200 received, or the SQL call returned) → assign call received by the simulator. */
  acceptedToAssignMs: Summary;
  /** Webhook sent → assign call received. */
  sentToAssignMs: Summary;
  /** Webhook sent → 200 received. */
  webhookMs: Summary;
}

async function waitState(c: pg.Client, room: string, state: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const r = await c.query<{ state: string }>(
      `select state from allocator.sessions where room_id = $1 order by id desc limit 1`,
      [room],
    );
    if (r.rows[0]?.state === state) return;
    if (Date.now() > end) throw new Error(`room ${room} not ${state} after ${ms} ms (is ${r.rows[0]?.state})`);
    await sleep(1);
  }
}

function closeBody(room: string, serviceId: number): string {
  return JSON.stringify({
    customer: { additional_info: [], avatar: null, name: `cust${room}`, user_id: `cust${room}@example.com` },
    resolved_by: { email: 'agent1@example.com', id: 1, is_available: true, name: 'Agent 1', type: 'agent' },
    service: { first_comment_id: '1', id: serviceId, is_resolved: true, last_comment_id: '2', notes: null, room_id: room, source: 'qiscus' },
  });
}

function finish(acc: Samples, sent: Samples, hook: Samples, rooms: number): LatencyRun {
  return {
    rooms,
    acceptedToAssignMs: roundSummary(summarize(acc.values())),
    sentToAssignMs: roundSummary(summarize(sent.values())),
    webhookMs: roundSummary(summarize(hook.values())),
  };
}

interface History {
  /** Rooms queued and resolved before the measured ones. */
  served: number;
  /** Another session holds a REPEATABLE READ snapshot from before that history to the end of the run. */
  snapshot: boolean;
}

/**
 * The queue's history: `served` rooms queued (through accept_new_requests, as the web writes them) and resolved
 * (the state change the served rooms' last versions have), in batches of 1,000; and what serving them did to the
 * agents: each room's agent counted once more, then once less (two row versions of an agent per room), as
 * reserve_batch and free_slot write them.
 */
async function serveHistory(c: pg.Client, served: number): Promise<void> {
  for (let from = 0; from < served; from += 1000) {
    const n = Math.min(1000, served - from);
    await c.query(`
      do $$ begin
        for i in 1 .. ${Math.ceil(n / AGENTS)} loop
          update allocator.agents set our_load = our_load + 1, last_assigned_at = clock_timestamp(),
                                      version = version + 1
          where id between 1 and ${AGENTS};
          update allocator.agents set our_load = our_load - 1, version = version + 1 where id between 1 and ${AGENTS};
        end loop;
      end $$`);
    const requests = Array.from({ length: n }, (_, i) => ({
      payload: JSON.parse(newRequestBody(String(6_000_000_000 + from + i))) as unknown,
      request_id: `history-${from + i}`,
    }));
    await c.query(`select count(*) from allocator.accept_new_requests($1::jsonb)`, [JSON.stringify(requests)]);
    await c.query(
      `update allocator.sessions set state = 'resolved', resolved_at = now(), updated_at = now()
       where state = 'waiting' and room_id::bigint between $1 and $2`,
      [6_000_000_000 + from, 6_000_000_000 + from + n - 1],
    );
  }
}

/** The real stack: web + 1 listener processes; with a history, the rooms served before and maybe a held snapshot. */
async function stackRun(
  ctx: BenchContext,
  rooms: number,
  pauseMs: number,
  history: History = { served: 0, snapshot: false },
): Promise<LatencyRun & { memory: unknown; history: History }> {
  const db = await ctx.server.createDatabase(history.snapshot ? 'latency_pinned' : history.served ? 'latency_history' : 'latency_stack');
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  await c.query(INSERT_AGENTS_SQL, [1, AGENTS]);
  const snap = history.snapshot ? await holdSnapshot(db.url) : null;
  await serveHistory(c, history.served);
  const sim = await startSim(AGENTS);
  const watch = watchAssignments(sim);
  const env = { databaseUrl: db.url, sim, nodeArgs: profileArgs() };
  const { web, url } = await startWeb(env);
  sim.webhookBaseUrl = url;
  const [listener] = await startListeners(env, 1);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const target = new URL(`${url}/api/v1/new_request`);
  const acc = new Samples();
  const sent = new Samples();
  const hook = new Samples();
  const warmup = 20;
  for (let i = 0; i < rooms + warmup; i++) {
    const room = String(7_000_000_000 + i);
    const assigned = watch.next(room);
    const t0 = performance.now();
    const r = await postJson(agent, target, newRequestBody(room));
    const t1 = performance.now();
    if (r.status !== 200) throw new Error(`webhook answered ${r.status}: ${r.text}`);
    const t2 = await assigned;
    if (i >= warmup) {
      acc.push(t2 - t1);
      sent.push(t2 - t0);
      hook.push(t1 - t0);
    }
    await waitState(c, room, 'assigned');
    const res = await sim.resolve(room);
    if (res.status !== 200) throw new Error(`resolution answered ${res.status}`);
    await sleep(pauseMs);
  }
  agent.destroy();
  const memory = { web: web.memory(), listener: listener!.memory() };
  await Promise.all([web.stop(), listener!.stop()]);
  if (snap) await releaseSnapshot(snap);
  await sim.close();
  await c.end();
  await db.drop();
  return { ...finish(acc, sent, hook, rooms), memory, history };
}

/** The floor: the same pipeline, as tight as it gets, in this process. */
async function floorRun(ctx: BenchContext, rooms: number, pauseMs: number): Promise<LatencyRun> {
  const db = await ctx.server.createDatabase('latency_floor');
  const [accept, listen, worker] = await connectClients(db.url, 3);
  await accept!.query(INSERT_AGENTS_SQL, [1, AGENTS]);
  const sim = await startSim(AGENTS);
  const watch: AssignWatch = watchAssignments(sim);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  const assignUrl = new URL(`${sim.url}/api/v1/admin/service/assign_agent`);
  const headers = { 'Qiscus-App-Id': APP_ID, 'Qiscus-Secret-Key': SECRET_KEY };
  let busy = false;
  let again = false;
  let failure: unknown = null;
  // The service each assign call opened: the resolution names it (one naming an earlier service is a late copy,
  // which closes nothing, see accept_close_request).
  const services = new Map<string, number>();
  const drain = async () => {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        for (;;) {
          const r = await worker!.query<{ attempt_id: string; room_id: string; agent_id: string }>(
            'select attempt_id, room_id, agent_id from allocator.reserve()',
          );
          const row = r.rows[0];
          if (!row) break;
          const res = await postJson(
            agent,
            assignUrl,
            JSON.stringify({ room_id: row.room_id, agent_id: Number(row.agent_id), max_agent: 1 }),
            headers,
          );
          const service = (JSON.parse(res.text) as { data?: { service?: { id?: number } } }).data?.service?.id ?? null;
          if (service !== null) services.set(row.room_id, service);
          await worker!.query('select allocator.confirm($1, $2)', [row.attempt_id, service]);
        }
      } while (again);
    } catch (e) {
      failure = e;
    } finally {
      busy = false;
    }
  };
  listen!.on('notification', () => void drain());
  await listen!.query('listen allocator');
  // Warm the plans of every statement, as a running listener has.
  await worker!.query('select * from allocator.reserve()');

  const acc = new Samples();
  const sent = new Samples();
  const hook = new Samples();
  const warmup = 20;
  for (let i = 0; i < rooms + warmup; i++) {
    const room = String(8_000_000_000 + i);
    const assigned = watch.next(room);
    const t0 = performance.now();
    await accept!.query('select * from allocator.accept_new_request($1::jsonb, $2)', [newRequestBody(room), `floor-${i}`]);
    const t1 = performance.now();
    const t2 = await assigned;
    if (failure) throw failure;
    if (i >= warmup) {
      acc.push(t2 - t1);
      sent.push(t2 - t0);
      hook.push(t1 - t0);
    }
    await waitState(accept!, room, 'assigned');
    await accept!.query('select * from allocator.accept_close_request($1::jsonb, $2)', [
      closeBody(room, services.get(room) ?? 1000 + i),
      `floor-close-${i}`,
    ]);
    await waitState(accept!, room, 'resolved');
    await sleep(pauseMs);
  }
  agent.destroy();
  await endClients([accept!, listen!, worker!]);
  await sim.close();
  await db.drop();
  return finish(acc, sent, hook, rooms);
}

export async function runLatency(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const rooms = envInt('BENCH_LATENCY_ROOMS', 300);
  const pauseMs = envInt('BENCH_LATENCY_PAUSE_MS', 5);
  ctx.log(`floor: ${rooms} rooms one at a time, in-process pipeline`);
  const floor = await floorRun(ctx, rooms, pauseMs);
  ctx.log(`floor: accepted→assign p50 ${floor.acceptedToAssignMs.p50} ms, p99 ${floor.acceptedToAssignMs.p99} ms`);
  ctx.log(`stack: ${rooms} rooms one at a time, web + 1 listener`);
  const stack = await stackRun(ctx, rooms, pauseMs);
  ctx.log(`stack: accepted→assign p50 ${stack.acceptedToAssignMs.p50} ms, p99 ${stack.acceptedToAssignMs.p99} ms`);
  const served = envInt('BENCH_LATENCY_SERVED', 20_000);
  ctx.log(`stack after ${served} rooms served, without and with a snapshot held from before them`);
  const unpinned = await stackRun(ctx, rooms, pauseMs, { served, snapshot: false });
  const pinned = await stackRun(ctx, rooms, pauseMs, { served, snapshot: true });
  ctx.log(
    `accepted→assign p50/p99: ${unpinned.acceptedToAssignMs.p50}/${unpinned.acceptedToAssignMs.p99} ms without, ` +
      `${pinned.acceptedToAssignMs.p50}/${pinned.acceptedToAssignMs.p99} ms with the snapshot`,
  );
  const a = stack.acceptedToAssignMs;
  const f = floor.acceptedToAssignMs;
  const pa = pinned.acceptedToAssignMs;
  const ua = unpinned.acceptedToAssignMs;
  const held = `snapshot held over ${served.toLocaleString('en-US')} rooms served`;
  return {
    name: 'latency',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { rooms, pauseMs, agents: AGENTS, warmupRooms: 20, served },
    rows: [
      { part: 'latency', what: 'accepted → assign call p50', value: a.p50, unit: 'ms', baseline: 'in-process floor p50', baselineValue: f.p50, ratio: ratio(a.p50, f.p50) },
      { part: 'latency', what: 'accepted → assign call p95', value: a.p95, unit: 'ms', baseline: 'in-process floor p95', baselineValue: f.p95, ratio: ratio(a.p95, f.p95) },
      { part: 'latency', what: 'accepted → assign call p99', value: a.p99, unit: 'ms', baseline: 'in-process floor p99', baselineValue: f.p99, ratio: ratio(a.p99, f.p99) },
      { part: 'latency', what: 'webhook sent → assign call p99', value: stack.sentToAssignMs.p99, unit: 'ms', baseline: 'in-process floor p99', baselineValue: floor.sentToAssignMs.p99, ratio: ratio(stack.sentToAssignMs.p99, floor.sentToAssignMs.p99) },
      { part: 'latency', what: `accepted → assign call p50, ${held}`, value: pa.p50, unit: 'ms', baseline: 'same without the snapshot', baselineValue: ua.p50, ratio: ratio(pa.p50, ua.p50) },
      { part: 'latency', what: `accepted → assign call p99, ${held}`, value: pa.p99, unit: 'ms', baseline: 'same without the snapshot', baselineValue: ua.p99, ratio: ratio(pa.p99, ua.p99) },
      { part: 'latency', what: `webhook 200 p50, ${held}`, value: pinned.webhookMs.p50, unit: 'ms', baseline: 'same without the snapshot', baselineValue: unpinned.webhookMs.p50, ratio: ratio(pinned.webhookMs.p50, unpinned.webhookMs.p50) },
    ],
    goals: [
      {
        part: 'latency',
        goal: 'accepted → assign call p99 < 25 ms',
        measured: a.p99,
        bound: '< 25 ms',
        met: Number.isFinite(a.p99) ? a.p99 < 25 : null,
      },
      {
        // the drain's bound under a held snapshot (≥ 0.8 × the rate without) turned into time: ≤ 1 / 0.8
        part: 'latency',
        goal: 'snapshot held: accepted → assign call p50 ≤ 1.25 × without',
        measured: ratio(pa.p50, ua.p50),
        bound: '≤ 1.25',
        met: Number.isFinite(pa.p50) && Number.isFinite(ua.p50) ? pa.p50 <= 1.25 * ua.p50 : null,
      },
    ],
    details: { stack, floor, unpinned, pinned },
  };
}

if (isMain(import.meta.url)) await standalone(runLatency, 'latency');

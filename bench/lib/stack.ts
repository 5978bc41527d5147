/**
 * Web and listener processes against one database, with the Qiscus simulator (in this process, answering at
 * once) as Qiscus. Logging is at warn so that it stays out of the measurement.
 */
import { freePort } from '../../src/db/embedded.ts';
import { startSimulator, type SimAgentInit, type Simulator } from '../../src/simulator/qiscus-simulator.ts';
import path from 'node:path';
import { root, spawnService, waitForHttp, waitForListeners, type Service } from './procs.ts';

export const APP_ID = 'bench-app';
export const SECRET_KEY = 'bench-secret-key';

/** An allocation webhook as Qiscus sends it for a new customer (test/fixtures/caa-new-customer.json). */
export function newRequestBody(roomId: string): string {
  return JSON.stringify({
    app_id: APP_ID,
    avatar_url: 'https://omnichannel.qiscus.com/img/ic_qiscus_client.png',
    candidate_agent: null,
    email: `cust${roomId}@example.com`,
    extras:
      '{"additional_extras":{"timezone_offset":7},"notes":null,"timezone_offset":null,"user_properties":[],"user_properties_migrated":true}',
    is_new_session: true,
    is_resolved: false,
    latest_service: null,
    name: `cust${roomId}`,
    room_id: roomId,
    source: 'qiscus',
  });
}

function simAgents(n: number, firstId = 1, divisions = 0): SimAgentInit[] {
  return Array.from({ length: n }, (_, i) => ({
    id: firstId + i,
    name: `Agent ${firstId + i}`,
    ...(divisions > 0 ? { divisions: divisionsOf(firstId + i, divisions) } : {}),
  }));
}

/** The teams of the routed benchmarks: agent `a` is in one of `n` divisions (1..n), one agent in ten in a second. */
export function divisionsOf(a: number, n: number): number[] {
  const first = ((a - 1) % n) + 1;
  const second = ((a * 7 + 3) % n) + 1;
  return a % 10 === 0 && second !== first ? [first, second] : [first];
}

/** The same divisions and memberships in SQL, set-based (as the roster pull would store them). */
export const INSERT_DIVISIONS_SQL = `
  with d as (insert into allocator.divisions (id, name)
             select g, 'Division ' || g from generate_series(1, $2::int) g returning id),
  m as (insert into allocator.agent_divisions (division_id, agent_id)
        select x.division_id, a.id
        from allocator.agents a,
             lateral (select ((a.id - 1) % $2) + 1 as division_id
                      union
                      select ((a.id * 7 + 3) % $2) + 1 where a.id % 10 = 0) x
        where a.id <= $1
        returning agent_id, division_id)
  update allocator.agents a set division_ids = m.ids
  from (select agent_id, array_agg(division_id order by division_id) as ids from m group by agent_id) m
  where a.id = m.agent_id`;

/** The same agents in SQL, set-based (names and emails as the simulator lists them, so a sync changes nothing). */
export const INSERT_AGENTS_SQL = `
  insert into allocator.agents (id, name, email, type, is_available, force_offline, present, qiscus_load, synced_at)
  select g, 'Agent ' || g, 'agent' || g || '@example.com', 'agent', true, false, true, 0, now()
  from generate_series($1::bigint, $2::bigint) g
  where not exists (select from allocator.agents a where a.id = g)`;

/** The simulator with `agents` agents and, if `divisions` > 0, that many divisions (see divisionsOf). */
export async function startSim(agents: number, divisions = 0): Promise<Simulator> {
  return startSimulator({
    appId: APP_ID,
    secretKey: SECRET_KEY,
    agents: simAgents(agents, 1, divisions),
    ...(divisions > 0
      ? { divisions: Object.fromEntries(Array.from({ length: divisions }, (_, i) => [i + 1, `Division ${i + 1}`])) }
      : {}),
  });
}

export interface StackEnv {
  databaseUrl: string;
  sim: Simulator;
  /** Extra environment for every process. */
  env?: Record<string, string>;
  /** Extra node arguments (e.g. --cpu-prof). */
  nodeArgs?: string[];
}

/** The environment every service process gets (as `npm run web` / `npm run listener` would read it). */
export function baseEnv(o: StackEnv): Record<string, string> {
  return {
    DATABASE_URL: o.databaseUrl,
    QISCUS_BASE_URL: o.sim.url,
    QISCUS_APP_ID: APP_ID,
    QISCUS_SECRET_KEY: SECRET_KEY,
    LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'warn',
    METRICS_PORT: '0',
    // One sync at start only: the roster does not change during a benchmark.
    AGENT_SYNC_SECONDS: '3600',
    ...o.env,
  };
}

export async function startWeb(o: StackEnv): Promise<{ web: Service; url: string }> {
  const port = await freePort();
  const web = spawnService('web', 'src/http/main.ts', { ...baseEnv(o), PORT: String(port) }, o.nodeArgs);
  const url = `http://127.0.0.1:${port}`;
  await waitForHttp(`${url}/healthz`, web);
  return { web, url };
}

/** Starts `n` listeners at once and waits until each has synced the roster and is listening. */
export async function startListeners(o: StackEnv, n: number): Promise<Service[]> {
  const procs = Array.from({ length: n }, (_, i) =>
    spawnService(`listener-${i + 1}`, 'src/listener/main.ts', baseEnv(o), o.nodeArgs),
  );
  await waitForListeners(o.databaseUrl, n, procs);
  return procs;
}

export async function startBareHono(nodeArgs: string[] = []): Promise<{ proc: Service; url: string }> {
  const port = await freePort();
  const script = path.join(root, 'bench', 'lib', 'bare-hono.ts');
  const proc = spawnService('bare-hono', script, { PORT: String(port) }, nodeArgs);
  const url = `http://127.0.0.1:${port}`;
  await waitForHttp(`${url}/healthz`, proc);
  return { proc, url };
}

/** The plain node:http + pg service of the ingest benchmark (bench/lib/plain-service.ts). */
export async function startPlainService(databaseUrl: string): Promise<{ proc: Service; url: string }> {
  const port = await freePort();
  const script = path.join(root, 'bench', 'lib', 'plain-service.ts');
  const proc = spawnService('plain-service', script, { DATABASE_URL: databaseUrl, PORT: String(port) });
  const url = `http://127.0.0.1:${port}`;
  await waitForHttp(`${url}/healthz`, proc);
  return { proc, url };
}

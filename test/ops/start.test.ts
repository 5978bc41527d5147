/**
 * `npm start` as a person runs it in a terminal: its own process group (the terminal's foreground job), the embedded
 * PostgreSQL, no WEBHOOK_SECRET. It generates a secret, keeps it beside DATA_DIR (mode 0600) and prints the webhook
 * URLs with it. Ctrl-C (SIGINT to the whole group) while an assign call is in flight: PostgreSQL, in a process group
 * of its own, stays up until the call has reported back and the service has stopped, then stops; nothing is lost.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { loadOrCreateWebhookSecret, webhookSecretFile } from '../../src/config/webhook-secret.ts';
import { freePort, startEmbeddedPostgres, tempDataDir } from '../../src/db/embedded.ts';
import { startSimulator, type Simulator } from '../../src/simulator/qiscus-simulator.ts';
import { newRequest } from '../support/fixtures.ts';
import { APP_ID, eventually, SECRET_KEY, sleep } from '../support/processes.ts';
import { root } from './compose-file.ts';

let sim: Simulator | undefined;
const cleanups: Array<() => Promise<void>> = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {});
  await sim?.close();
});

/** Whether PostgreSQL at `url` answers a query on a new connection now. */
async function answers(url: string): Promise<boolean> {
  const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 1000 });
  // PostgreSQL stopping sends every connection a FATAL 57P01, idle ones too: an answer, not an uncaught error
  c.on('error', () => {});
  try {
    await c.connect();
    await c.query('select 1');
    return true;
  } catch {
    return false;
  } finally {
    await c.end().catch(() => {});
  }
}

describe('the generated webhook secret', () => {
  it('is created once with mode 0600 beside DATA_DIR, then read back', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'allocator-secret-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const file = webhookSecretFile(path.join(dir, 'postgres'));
    expect(file).toBe(path.join(dir, 'webhook-secret'));
    const first = await loadOrCreateWebhookSecret(file);
    expect(first.created).toBe(true);
    expect(first.secret).toMatch(/^[A-Za-z0-9_-]{32}$/); // URL-safe: pasted into Qiscus as is
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    const again = await loadOrCreateWebhookSecret(file);
    expect(again).toEqual({ secret: first.secret, created: false });
    await writeFile(file, '');
    await expect(loadOrCreateWebhookSecret(file)).rejects.toThrow(/empty/);
  });
});

describe('npm start in a terminal', () => {
  it('prints URLs with a generated secret; Ctrl-C lets the call in flight report back before PostgreSQL stops', async () => {
    const dataDir = await tempDataDir('allocator-start-');
    cleanups.push(() => rm(path.dirname(dataDir), { recursive: true, force: true }));
    const [port, pgPort] = [await freePort(), await freePort()];
    sim = await startSimulator({ appId: APP_ID, secretKey: SECRET_KEY, agents: [{ id: 4001, name: 'Ayu' }] });

    const env: NodeJS.ProcessEnv = {
      ...process.env,
      DATA_DIR: dataDir,
      EMBEDDED_PG_PORT: String(pgPort),
      PORT: String(port),
      QISCUS_BASE_URL: sim.url,
      QISCUS_APP_ID: APP_ID,
      QISCUS_SECRET_KEY: SECRET_KEY,
      LOG_FORMAT: 'json',
      LOG_LEVEL: 'info',
    };
    // The shipped defaults otherwise (the roster is pulled when the listener starts: no shorter period needed).
    for (const k of ['DATABASE_URL', 'WEBHOOK_SECRET', 'WEBHOOK_SECRET_PREVIOUS', 'DASHBOARD_TOKEN', 'PUBLIC_URL']) delete env[k];
    for (const k of ['AGENT_SYNC_SECONDS', 'SWEEP_SECONDS', 'QISCUS_TIMEOUT_MS']) delete env[k];
    // detached: a process group of its own, as a shell gives a foreground job; Ctrl-C is SIGINT to that group.
    const child = spawn('npm', ['start'], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    cleanups.push(async () => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // gone
      }
    });
    const lines: Array<{ at: number; text: string }> = [];
    let partial = '';
    const onData = (b: Buffer) => {
      const parts = (partial + b.toString()).split('\n');
      partial = parts.pop()!;
      for (const text of parts) lines.push({ at: Date.now(), text });
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const output = () => lines.map((l) => l.text).join('\n');

    const banner = await eventually('the webhook URLs', () => /new_request\?secret=([\w-]+)/.exec(output()), 60_000, 100);
    const secret = banner![1]!;
    expect(output()).toMatch(/close_request\?secret=/);
    const file = path.join(path.dirname(dataDir), 'webhook-secret');
    expect((await readFile(file, 'utf8')).trim()).toBe(secret);
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    await eventually('the listener', () => /listening for allocator notifications/.test(output()), 30_000, 100);

    const webhook = (s?: string) =>
      fetch(`http://127.0.0.1:${port}/api/v1/new_request${s ? `?secret=${s}` : ''}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(newRequest('start-1')),
      });
    expect((await webhook()).status).toBe(401);
    const databaseUrl = `postgres://postgres:postgres@127.0.0.1:${pgPort}/allocator`;
    const one = async (sql: string) => {
      const c = new pg.Client(databaseUrl);
      await c.connect();
      try {
        return (await c.query(sql)).rows[0];
      } finally {
        await c.end();
      }
    };
    await eventually('the roster pulled', async () => (await one(`select count(*)::int as n from allocator.agents`)).n === 1);

    // Every assign call now takes 2.5 s: Ctrl-C lands while the room's call is in flight.
    sim.setFaults({ latencyMs: 2500 });
    expect(((await (await webhook(secret)).json()) as { outcome: string }).outcome).toBe('queued');
    await eventually(
      'the call in flight',
      async () => (await one(`select state from allocator.sessions where room_id = 'start-1'`))?.state === 'reserved',
    );

    const interrupted = Date.now();
    process.kill(-child.pid!, 'SIGINT');
    // PostgreSQL answers all along, until the service itself ends.
    let lastUp = 0;
    let firstDown = 0;
    let done = false;
    void exited.then(() => (done = true));
    while (!done) {
      const up = await answers(databaseUrl);
      if (up && !firstDown) lastUp = Date.now();
      if (!up && !firstDown) firstDown = Date.now();
      await sleep(50);
    }
    const code = await exited;
    expect(code, output()).toBe(0);

    const reported = lines.find((l) => /"msg":"assignment"/.test(l.text) && /"room":"start-1"/.test(l.text));
    expect(reported, output()).toBeDefined();
    expect(reported!.text).toMatch(/"outcome":"assigned"/);
    expect(reported!.at).toBeGreaterThan(interrupted + 1000); // the answer came well after Ctrl-C...
    expect(lastUp).toBeGreaterThanOrEqual(reported!.at - 100); // ...and PostgreSQL was up when it did
    expect(firstDown === 0 || firstDown > reported!.at).toBe(true);

    // Then it stopped: nothing answers on its port, nothing of the group is left.
    await eventually('PostgreSQL stopped', async () => !(await answers(databaseUrl)), 15_000);
    expect(() => process.kill(-child.pid!, 0)).toThrow();

    // Nothing lost: on the same data, the room is assigned and every invariant holds.
    const again = await startEmbeddedPostgres({ dataDir, port: pgPort, persistent: true });
    try {
      const c = new pg.Client(again.urlFor('allocator'));
      await c.connect();
      const s = (await c.query(`select state, agent_id from allocator.sessions where room_id = 'start-1'`)).rows;
      const problems = (await c.query(`select * from allocator.check_invariants()`)).rows;
      await c.end();
      expect(s).toEqual([{ state: 'assigned', agent_id: '4001' }]);
      expect(problems).toEqual([]);
    } finally {
      await again.stop();
    }
    expect(sim.agentOf('start-1')).toBe(4001);
  });
});

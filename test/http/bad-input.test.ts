/**
 * Bad input: each case gets its 4xx with a JSON error that says what is wrong (and names the field for a schema
 * violation), and leaves the database exactly as it was.
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest, resolvedRequest } from '../support/fixtures.ts';
import { post, rawRequest, snapshot, startApp, type RunningApp } from './harness.ts';

let db: TestDatabase;
let app: RunningApp;
const NEW = '/api/v1/new_request';
const CLOSE = '/api/v1/close_request';
const JSON_TYPE = { 'content-type': 'application/json' };

beforeAll(async () => {
  db = await createTestDatabase();
  app = await startApp(db.url);
  // Some state to protect: a queued room and a resolved one.
  expect((await post(app.url + NEW, newRequest('100'))).json.outcome).toBe('queued');
  expect((await post(app.url + NEW, newRequest('200'))).json.outcome).toBe('queued');
  expect((await post(app.url + CLOSE, resolvedRequest('200'))).json.outcome).toBe('resolved');
});
afterAll(async () => {
  await app?.close();
  await db?.drop();
});

interface Case {
  name: string;
  path?: string;
  method?: string;
  /** An object is sent as JSON; a string or bytes as they are. */
  body?: unknown;
  headers?: Record<string, string>;
  status: number;
  field?: string;
  /** A fragment the error message must contain. */
  says?: RegExp;
}

const base = newRequest('300'); // valid apart from what each case breaks
const deep = (n: number): unknown => (n === 0 ? 'x' : { a: deep(n - 1) });

const cases: Case[] = [
  // not JSON at all
  { name: 'malformed JSON', body: '{"room_id": "1"', status: 400, says: /malformed JSON/ },
  { name: 'trailing garbage after JSON', body: '{"room_id": "1"} x', status: 400, says: /malformed JSON/ },
  { name: 'empty body', body: '', status: 400, says: /empty/ },
  { name: 'whitespace body', body: ' \n\t ', status: 400, says: /empty/ },
  { name: 'invalid UTF-8', body: new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]), status: 400, says: /UTF-8/ },
  { name: 'JSON with single quotes', body: "{'room_id': '1'}", status: 400, says: /malformed JSON/ },
  // JSON, but not an object
  { name: 'JSON array', body: [base], status: 422, field: '$', says: /JSON object/ },
  { name: 'JSON null', body: 'null', status: 422, field: '$' },
  { name: 'JSON number', body: '42', status: 422, field: '$' },
  { name: 'JSON string', body: '"273683234"', status: 422, field: '$' },
  // room_id
  { name: 'room_id missing', body: { ...base, room_id: undefined }, status: 422, field: 'room_id', says: /required/ },
  { name: 'room_id null', body: { ...base, room_id: null }, status: 422, field: 'room_id' },
  { name: 'room_id empty', body: { ...base, room_id: '' }, status: 422, field: 'room_id', says: /empty/ },
  { name: 'room_id blank', body: { ...base, room_id: ' \t\n ' }, status: 422, field: 'room_id', says: /empty/ },
  { name: 'room_id boolean', body: { ...base, room_id: true }, status: 422, field: 'room_id' },
  { name: 'room_id object', body: { ...base, room_id: { id: 1 } }, status: 422, field: 'room_id' },
  { name: 'room_id array', body: { ...base, room_id: ['1'] }, status: 422, field: 'room_id' },
  { name: 'room_id fraction', body: { ...base, room_id: 1.5 }, status: 422, field: 'room_id' },
  { name: 'room_id negative', body: { ...base, room_id: -7 }, status: 422, field: 'room_id' },
  { name: 'room_id unsafe integer', body: '{"room_id": 123456789012345678901234567890}', status: 422, field: 'room_id' },
  { name: 'room_id too long', body: { ...base, room_id: '9'.repeat(129) }, status: 422, field: 'room_id', says: /128/ },
  { name: 'room_id with NUL', body: '{"room_id": "12\\u00003"}', status: 422, field: 'room_id', says: /NUL/ },
  // other fields the SQL reads, and jsonb's limits anywhere
  { name: 'NUL deep in extras', body: { ...base, extras: { a: ['ok', 'b\u0000'] } }, status: 422, field: 'extras.a.1', says: /NUL/ },
  { name: 'NUL in a key', body: '{"room_id": "1", "k\\u0000": 1}', status: 422, says: /NUL/ },
  { name: 'lone surrogate', body: '{"room_id": "1", "name": "\\ud800x"}', status: 422, field: 'name', says: /surrogate/ },
  { name: 'nesting 40000 deep', body: '{"room_id":"1","x":' + '{"a":'.repeat(40_000) + '1' + '}'.repeat(40_000) + '}', status: 422, says: /nested/ },
  { name: 'nesting 100 deep', body: { ...base, extras: deep(100) }, status: 422, says: /nested/ },
  { name: 'latest_service a string', body: { ...base, latest_service: 'x' }, status: 422, field: 'latest_service' },
  { name: 'latest_service.id a string', body: { ...base, latest_service: { id: '244' } }, status: 422, field: 'latest_service.id' },
  { name: 'latest_service.id beyond bigint', body: '{"room_id":"1","latest_service":{"id":1e30}}', status: 422, field: 'latest_service.id' },
  { name: 'latest_service.id fraction', body: { ...base, latest_service: { id: 2.5 } }, status: 422, field: 'latest_service.id' },
  { name: 'source a number', body: { ...base, source: 42 }, status: 422, field: 'source' },
  { name: 'candidate_agent an array', body: { ...base, candidate_agent: [] }, status: 422, field: 'candidate_agent' },
  // resolution webhook
  { name: 'close: service missing', path: CLOSE, body: { customer: {} }, status: 422, field: 'service', says: /required/ },
  { name: 'close: service null', path: CLOSE, body: { service: null }, status: 422, field: 'service' },
  { name: 'close: service a string', path: CLOSE, body: { service: '100' }, status: 422, field: 'service' },
  { name: 'close: room_id at top level only', path: CLOSE, body: { room_id: '100', service: { id: 1 } }, status: 422, field: 'service.room_id' },
  { name: 'close: service.room_id empty', path: CLOSE, body: { service: { room_id: ' ' } }, status: 422, field: 'service.room_id' },
  { name: 'close: service.id a string', path: CLOSE, body: { service: { room_id: '100', id: 'abc' } }, status: 422, field: 'service.id' },
  { name: 'close: service.id beyond bigint', path: CLOSE, body: '{"service":{"room_id":"100","id":9223372036854775808}}', status: 422, field: 'service.id' },
  { name: 'close: malformed JSON', path: CLOSE, body: '{"service":', status: 400 },
  // size, type, route
  { name: 'body over 256 KiB', body: { ...base, extras: 'x'.repeat(256 * 1024) }, status: 413, says: /larger/ },
  { name: 'close: body over 256 KiB', path: CLOSE, body: { ...resolvedRequest('100'), pad: 'x'.repeat(300_000) }, status: 413 },
  { name: 'text/plain', body: JSON.stringify(base), headers: { 'content-type': 'text/plain' }, status: 415, says: /not JSON/ },
  { name: 'form encoded', body: 'room_id=1', headers: { 'content-type': 'application/x-www-form-urlencoded' }, status: 415 },
  { name: 'application/jsonp', body: JSON.stringify(base), headers: { 'content-type': 'application/jsonp' }, status: 415 },
  { name: 'no content type', body: new Uint8Array(Buffer.from(JSON.stringify(base))), headers: {}, status: 415, says: /missing/ },
  { name: 'GET on a webhook', method: 'GET', status: 405 },
  { name: 'PUT on a webhook', method: 'PUT', body: base, status: 405 },
  { name: 'unknown route', path: '/api/v1/new_requests', body: base, status: 404 },
  { name: 'trailing slash', path: '/api/v1/new_request/', body: base, status: 404 },
  { name: 'root', path: '/', method: 'GET', status: 404 },
];

describe('bad input is refused with a JSON error and changes nothing', () => {
  it('has at least 20 cases', () => expect(cases.length).toBeGreaterThanOrEqual(20));

  for (const c of cases) {
    it(`${c.name} → ${c.status}`, async () => {
      const before = await snapshot(db.pool);
      const method = c.method ?? 'POST';
      const headers = c.headers ?? JSON_TYPE;
      const raw =
        c.body === undefined ? undefined
          : typeof c.body === 'string' || c.body instanceof Uint8Array ? c.body
            : JSON.stringify(c.body);
      const res = await fetch(app.url + (c.path ?? NEW), { method, headers, body: raw as RequestInit['body'] });
      const text = await res.text();
      expect(res.status, text).toBe(c.status);
      expect(res.headers.get('content-type')).toMatch(/^application\/json/);
      const json = JSON.parse(text);
      expect(json.ok).toBe(false);
      expect(typeof json.error).toBe('string');
      if (c.field !== undefined) expect(json.field).toBe(c.field);
      if (c.says) expect(json.error).toMatch(c.says);
      expect(await snapshot(db.pool)).toBe(before);
    });
  }
});

describe('bad HTTP on a raw socket', () => {
  const head = (extra: string) =>
    `POST ${NEW} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n${extra}\r\n`;

  it('a chunked body over 256 KiB without Content-Length → 413, while streaming', async () => {
    const before = await snapshot(db.pool);
    const chunk = 'x'.repeat(16 * 1024);
    const chunks = [`{"room_id":"400","pad":"`];
    for (let i = 0; i < 20; i++) chunks.push(chunk); // 320 KiB
    chunks.push(`"}`);
    const body = chunks.map((c) => `${Buffer.byteLength(c).toString(16)}\r\n${c}\r\n`);
    body.push('0\r\n\r\n');
    const r = await rawRequest(app.port, head('Transfer-Encoding: chunked\r\n'), body);
    expect(r.status).toBe(413);
    expect(JSON.parse(r.body.replace(/^[0-9a-f]+\r\n/, '').replace(/\r\n0\r\n\r\n$/, ''))).toMatchObject({ ok: false });
    expect(await snapshot(db.pool)).toBe(before);
  });

  it('a chunked body under the limit is served', async () => {
    const json = JSON.stringify(newRequest('401'));
    const r = await rawRequest(app.port, head('Transfer-Encoding: chunked\r\n'), [
      `${Buffer.byteLength(json).toString(16)}\r\n${json}\r\n0\r\n\r\n`,
    ]);
    expect(r.status).toBe(200);
    expect(r.body).toContain('"queued"');
  });

  it('a Content-Length over the limit → 413 before the body is read', async () => {
    const before = await snapshot(db.pool);
    const r = await rawRequest(app.port, head(`Content-Length: ${256 * 1024 + 1}\r\n`), ['{"room_id":"402"']);
    expect(r.status).toBe(413);
    expect(await snapshot(db.pool)).toBe(before);
  });

  it('a Content-Length shorter than the body: only that much is read, and it is malformed → 400', async () => {
    const before = await snapshot(db.pool);
    const json = JSON.stringify(newRequest('403'));
    const r = await rawRequest(app.port, head('Content-Length: 10\r\n') + json);
    expect(r.status).toBe(400);
    expect(await snapshot(db.pool)).toBe(before);
  });

  it('a body cut short (client hangs up) changes nothing and the server carries on', async () => {
    const before = await snapshot(db.pool);
    await new Promise<void>((resolve) => {
      const sock = net.connect(app.port, '127.0.0.1', () => {
        sock.write(head('Content-Length: 1000\r\n') + '{"room_id":"404"');
        setTimeout(() => { sock.destroy(); resolve(); }, 50);
      });
      sock.on('error', () => {});
    });
    expect(await snapshot(db.pool)).toBe(before);
    expect((await post(app.url + NEW, newRequest('100'))).json.outcome).toBe('already_queued');
  });

  const oddRequests: Array<[string, string]> = [
    ['bad percent-encoding in the path', 'GET /%ZZ%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'],
    ['absolute-form target', 'GET http://elsewhere.example/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'],
    ['asterisk target', 'OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'],
    ['broken Host header', 'GET /healthz HTTP/1.1\r\nHost: [::\r\nConnection: close\r\n\r\n'],
    ['HTTP/1.0 without Host', 'POST /api/v1/new_request HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'],
    ['bad query encoding on a webhook', 'POST /api/v1/new_request?secret=%E0%A4%A&x=%% HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}'],
    ['duplicate Content-Type', 'POST /api/v1/new_request HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}'],
  ];
  for (const [name, request] of oddRequests) {
    it(`${name} → a 4xx (or a plain answer), never a 5xx`, async () => {
      const before = await snapshot(db.pool);
      const r = await rawRequest(app.port, request);
      expect(r.status, r.raw).toBeGreaterThanOrEqual(200);
      expect(r.status, r.raw).toBeLessThan(500);
      expect(await snapshot(db.pool)).toBe(before);
    });
  }

  it('garbage instead of HTTP → 400 from the server, which carries on', async () => {
    const r = await rawRequest(app.port, 'HELLO\r\n\r\n');
    expect(r.status).toBe(400);
    const ok = await fetch(app.url + '/healthz');
    expect(ok.status).toBe(200);
  });
});

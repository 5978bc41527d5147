/**
 * The peer of the ingest benchmark: the plainest webhook service one would write by hand. node:http, the JSON body
 * parsed, room_id checked, one INSERT per webhook (autocommit) into a table shaped like allocator.webhooks on a
 * pg pool of 10 (the web app's pool size), then 200 with a small JSON answer. No framework, no validation
 * library, no logging, no batching, no idempotence. Run as its own process:
 *   DATABASE_URL=... PORT=... node --import tsx bench/lib/plain-service.ts
 * The table comes from PLAIN_TABLE_SQL (run by the benchmark before the service starts).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import pg from 'pg';

export const PLAIN_TABLE_SQL = `
  create schema if not exists bench_plain;
  create table if not exists bench_plain.requests (
    id          bigint generated always as identity primary key,
    room_id     text not null,
    source      text,
    request_id  text,
    payload     jsonb not null,
    received_at timestamptz not null default now()
  );
  create index if not exists requests_room on bench_plain.requests (room_id, id);`;

const MAX_BODY = 256 * 1024;

function answer(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function serve(): void {
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 10, application_name: 'bench-plain' });
  let seq = 0;
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/healthz') return answer(res, 200, { ok: true });
    if (req.method !== 'POST' || req.url !== '/api/v1/new_request') return answer(res, 404, { ok: false, error: 'not found' });
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= MAX_BODY) chunks.push(c);
    });
    req.on('end', () => {
      if (size > MAX_BODY) return answer(res, 413, { ok: false, error: 'body too large' });
      let body: { room_id?: unknown; source?: unknown };
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as typeof body;
      } catch {
        return answer(res, 400, { ok: false, error: 'malformed JSON' });
      }
      const room = typeof body.room_id === 'string' || typeof body.room_id === 'number' ? String(body.room_id) : '';
      if (!room) return answer(res, 422, { ok: false, error: 'room_id is required' });
      const source = typeof body.source === 'string' ? body.source : null;
      pool
        .query<{ id: string }>(
          'insert into bench_plain.requests (room_id, source, request_id, payload) values ($1, $2, $3, $4) returning id',
          [room, source, `plain-${process.pid}-${++seq}`, body],
        )
        .then(
          (r) => answer(res, 200, { ok: true, outcome: 'queued', room_id: room, id: r.rows[0]!.id }),
          () => answer(res, 503, { ok: false, error: 'database unavailable' }),
        );
    });
  });
  server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
    process.stdout.write(`plain service listening on ${(server.address() as AddressInfo).port}\n`);
  });
  const stop = () => server.close(() => void pool.end().then(() => process.exit(0)));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (process.argv[1]?.endsWith('plain-service.ts')) serve();

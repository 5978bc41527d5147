/**
 * Test harness for the HTTP app: the real app on a real loopback port, over a real database. Nothing mocked.
 */
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type pg from 'pg';
import { pino } from 'pino';
import { afterAll, beforeAll } from 'vitest';
import { createApp, type AppOptions } from '../../src/http/app.ts';
import { createPool } from '../../src/db/pool.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';

/** Quiet unless HTTP_TEST_LOG=debug (or another level) is set. */
export const testLogger = pino({ level: process.env.HTTP_TEST_LOG ?? 'silent' });

export interface RunningApp {
  url: string;
  port: number;
  pool: pg.Pool;
  close(): Promise<void>;
}

/** Starts the app on 127.0.0.1:<free port> with the production pool settings, against `databaseUrl`. */
export async function startApp(
  databaseUrl: string,
  opts: Partial<Omit<AppOptions, 'pool' | 'logger'>> & { poolMax?: number } = {},
): Promise<RunningApp> {
  const pool = createPool(databaseUrl, testLogger, { max: opts.poolMax });
  const app = createApp({ pool, logger: testLogger, ...opts });
  const { server, port } = await new Promise<{ server: ReturnType<typeof serve>; port: number }>((resolve) => {
    const s = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }, (info: AddressInfo) =>
      resolve({ server: s, port: info.port }),
    );
  });
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    pool,
    async close() {
      if ('closeAllConnections' in server) server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      await pool.end();
    },
  };
}

export interface Reply {
  status: number;
  headers: Headers;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  json: any;
  text: string;
}

/** POSTs `body` (an object is sent as JSON; a string or bytes as they are) and reads the JSON reply. */
export async function post(
  url: string,
  body: unknown,
  headers: Record<string, string> = { 'content-type': 'application/json' },
): Promise<Reply> {
  const raw = typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body);
  const res = await fetch(url, { method: 'POST', headers, body: raw as RequestInit['body'] });
  return read(res);
}

export async function get(url: string, init: RequestInit = {}): Promise<Reply> {
  return read(await fetch(url, init));
}

async function read(res: Response): Promise<Reply> {
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, json, text };
}

/**
 * Writes raw bytes to the server and returns the status line's code and the body: for requests fetch() will not
 * send (lying Content-Length, chunked bodies, broken HTTP).
 */
export function rawRequest(port: number, request: string | Buffer, chunks: Array<string | Buffer> = [])
  : Promise<{ status: number; body: string; raw: string }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    let data = '';
    sock.setTimeout(10_000, () => {
      sock.destroy();
      reject(new Error(`no answer; got so far: ${JSON.stringify(data)}`));
    });
    sock.on('data', (d) => {
      data += d.toString('latin1');
    });
    // The server may answer (413) and close before we finish writing: that is fine.
    sock.on('error', () => {});
    sock.on('close', () => {
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(data);
      const body = data.includes('\r\n\r\n') ? data.slice(data.indexOf('\r\n\r\n') + 4) : '';
      resolve({ status: m ? Number(m[1]) : 0, body, raw: data });
    });
    sock.on('connect', async () => {
      sock.write(request);
      for (const c of chunks) {
        if (sock.destroyed) break;
        sock.write(c);
        await new Promise((r) => setImmediate(r));
      }
    });
  });
}

/** A fingerprint of everything a webhook could change: equal before and after means "database unchanged". */
export async function snapshot(pool: pg.Pool): Promise<string> {
  const r = await pool.query(`
    select (select count(*) from allocator.webhooks) as webhooks,
           (select count(*) from allocator.sessions) as sessions,
           (select coalesce(md5(string_agg(s::text, '|' order by s.id)), '') from allocator.sessions s) as sessions_md5,
           (select coalesce(md5(string_agg(a::text, '|' order by a.id)), '') from allocator.agents a) as agents_md5`);
  return JSON.stringify(r.rows[0]);
}

/** A database of its own and the app over it, for the enclosing file or describe block (set up before its tests). */
export function appWithDatabase(): { readonly db: TestDatabase; readonly app: RunningApp } {
  const ctx = {} as { db: TestDatabase; app: RunningApp };
  beforeAll(async () => {
    ctx.db = await createTestDatabase();
    ctx.app = await startApp(ctx.db.url);
  });
  afterAll(async () => {
    await ctx.app?.close();
    await ctx.db?.drop();
  });
  return ctx;
}

/**
 * The HTTP baseline of the ingest benchmark: a bare Hono route on @hono/node-server (the same stack as the web
 * app) that reads the JSON body and answers JSON, with no validation, no logging and no database. Whatever the
 * web app does beyond this is the app's cost. Run as its own process: PORT=... node --import tsx bench/lib/bare-hono.ts
 */
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { Hono } from 'hono';

const app = new Hono();
app.post('/api/v1/new_request', async (c) => {
  const body = (await c.req.json()) as { room_id?: unknown };
  return c.json({ ok: true, outcome: 'queued', room_id: String(body.room_id) });
});
app.get('/healthz', (c) => c.json({ ok: true }));

const server = serve({ fetch: app.fetch, port: Number(process.env.PORT ?? 0) }, (info: AddressInfo) => {
  process.stdout.write(`bare hono listening on ${info.port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.on('SIGINT', () => server.close(() => process.exit(0)));

/**
 * Serving the app on a port, with a graceful stop. Separate from main.ts so that `npm start` (the whole service
 * in one process) can run the same server next to the listener.
 *
 * stop(): stop accepting, let in-flight requests finish (each webhook is one short statement, so whatever is
 * being answered is committed first), ask clients to drop keep-alive connections, and after `graceMs` cut what
 * is left. It does not end the pool: the caller owns it.
 */
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type pg from 'pg';
import type { Config } from '../config/index.ts';
import type { Logger } from '../log.ts';
import { registerQueueMetrics, type Registry } from '../metrics/index.ts';
import { createApp, NO_SECRET_WARNING, type AppOptions } from './app.ts';
import { createWebMetrics } from './metrics.ts';

export interface HttpServerOptions extends AppOptions {
  port: number;
  /** Default: all interfaces (a container must be reachable from outside). */
  hostname?: string;
  /** How long stop() waits for in-flight requests before closing their connections. Default 10 s. */
  graceMs?: number;
}

export interface HttpServer {
  port: number;
  /** e.g. http://localhost:8080 */
  url: string;
  stop(): Promise<void>;
}

export async function startHttpServer(opts: HttpServerOptions): Promise<HttpServer> {
  const { logger } = opts;
  // Ends the dashboard's event streams on stop(): they never end by themselves, and would hold stop() for graceMs.
  const endStreams = new AbortController();
  const app = createApp(opts.dashboard ? { ...opts, dashboard: { ...opts.dashboard, signal: endStreams.signal } } : opts);
  let stopping = false;

  // While stopping, each answer tells its client to close the connection, so none lingers in keep-alive.
  const fetch: typeof app.fetch = async (...args) => {
    const res = await app.fetch(...args);
    if (stopping) {
      try {
        res.headers.set('Connection', 'close');
      } catch {
        // immutable headers: the idle sweep in stop() closes the connection instead
      }
    }
    return res;
  };

  const { server, port } = await new Promise<{ server: ReturnType<typeof serve>; port: number }>(
    (resolve, reject) => {
      const s = serve({ fetch, port: opts.port, hostname: opts.hostname }, (info: AddressInfo) =>
        resolve({ server: s, port: info.port }),
      );
      s.once('error', reject); // e.g. EADDRINUSE
    },
  );
  server.on('error', (err) => logger.error({ err }, 'http server error'));

  let stopped: Promise<void> | undefined;
  const stop = () =>
    (stopped ??= (async () => {
      stopping = true;
      endStreams.abort();
      const force = setTimeout(() => {
        logger.warn('in-flight requests did not finish in time; closing their connections');
        if ('closeAllConnections' in server) server.closeAllConnections();
      }, opts.graceMs ?? 10_000);
      // close() closes the connections idle at that moment; this catches those that turn idle afterwards (an
      // in-flight request just answered), which would otherwise wait out the keep-alive timeout.
      const sweep = setInterval(() => {
        if ('closeIdleConnections' in server) server.closeIdleConnections();
      }, 100);
      try {
        await new Promise<void>((resolve) => server.close(() => resolve()));
      } finally {
        clearTimeout(force);
        clearInterval(sweep);
      }
    })());

  return { port, url: `http://localhost:${port}`, stop };
}

/**
 * The webhook app as configured by the environment (used by `npm run web` and `npm start`), with its metrics on
 * `metrics`: webhook latency, the queue gauges read from the database at scrape time, and GET /metrics itself.
 */
export function startWebFromConfig(
  config: Config,
  deps: { pool: pg.Pool; logger: Logger; metrics: Registry },
): Promise<HttpServer> {
  registerQueueMetrics(deps.metrics, deps.pool, { logger: deps.logger });
  if (!config.WEBHOOK_SECRET) deps.logger.warn(NO_SECRET_WARNING);
  if (config.DASHBOARD_TOKEN && config.DASHBOARD_TOKEN.length < 16) {
    deps.logger.warn('DASHBOARD_TOKEN is shorter than 16 characters: easy to guess (try `openssl rand -hex 16`)');
  }
  return startHttpServer({
    pool: deps.pool,
    logger: deps.logger,
    port: config.PORT,
    webhookSecret: config.WEBHOOK_SECRET,
    webhookSecretPrevious: config.WEBHOOK_SECRET_PREVIOUS,
    dashboard: config.DASHBOARD_TOKEN ? { token: config.DASHBOARD_TOKEN } : undefined,
    metrics: deps.metrics,
    observe: createWebMetrics(deps.metrics),
  });
}

/**
 * A tiny HTTP server for a process without a web app (the listener): `GET /metrics` in Prometheus text format and
 * `GET /healthz` (200 while the process runs; for a container healthcheck). Plain node:http: nothing else to load.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import type { Logger } from '../log.ts';

export interface MetricsServer {
  port: number;
  /** e.g. http://localhost:9464 */
  url: string;
  stop(): Promise<void>;
}

export async function startMetricsServer(opts: {
  registry: Registry;
  /** 0: any free port (see `port` on the result). */
  port: number;
  /** Default: all interfaces (Prometheus scrapes from another container). */
  hostname?: string;
  logger: Logger;
}): Promise<MetricsServer> {
  const { registry, logger } = opts;
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'Content-Type': 'application/json' }).end('{"ok":true}\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found: try /metrics or /healthz\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'Content-Type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
      (err: unknown) => {
        logger.error({ err }, 'metrics: cannot render');
        res.writeHead(500, { 'Content-Type': 'text/plain' }).end('metrics failed; see the log\n');
      },
    );
  });
  // Scrapes are one short request each; do not let a keep-alive connection hold stop() up.
  server.keepAliveTimeout = 5_000;

  const port = await new Promise<number>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.hostname, () => {
      server.off('error', reject);
      resolve((server.address() as AddressInfo).port);
    });
  });
  server.on('error', (err) => logger.error({ err }, 'metrics server error'));

  return {
    port,
    url: `http://localhost:${port}`,
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/**
 * What the processes' metrics share: one registry per process (see registry.ts), the queue gauges read from the
 * database (web and listener both export them), and the listener's small /metrics server. Each layer registers its
 * own metrics on that registry: ../http/metrics.ts (webhooks), ../listener/metrics.ts (assignments, roster sync),
 * ../qiscus/metrics.ts (Qiscus calls, through the listener's).
 * - `npm run web`: web metrics + queue gauges + process metrics, at the app's `GET /metrics`;
 * - `npm run listener`: listener metrics + queue gauges + process metrics, on METRICS_PORT (`/metrics`, `/healthz`);
 * - `npm start`: all of them in one registry, at the web app's `GET /metrics` (no extra port).
 */
export { createMetricsRegistry, type Registry } from './registry.ts';
export { registerQueueMetrics } from './queue.ts';
export { startMetricsServer, type MetricsServer } from './server.ts';

/**
 * Prometheus metrics for the allocator. Each process has its own registry (see registry.ts):
 * - `npm run web`: web metrics + queue gauges + process metrics, at the app's `GET /metrics`;
 * - `npm run listener`: listener metrics + queue gauges + process metrics, on METRICS_PORT (`/metrics`, `/healthz`);
 * - `npm start`: all of them in one registry, at the web app's `GET /metrics` (no extra port).
 */
export { createMetricsRegistry, LATENCY_BUCKETS, PREFIX, type Registry } from './registry.ts';
export { registerQueueMetrics, type QueueMetricsOptions, type QueueSnapshot } from './queue.ts';
export { createWebMetrics } from './web.ts';
export { createListenerMetrics, type ListenerMetrics } from './listener.ts';
export { createQiscusMetrics, statusLabel, type QiscusMetrics, type QiscusOperation } from './qiscus.ts';
export { startMetricsServer, type MetricsServer } from './server.ts';

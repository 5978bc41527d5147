/**
 * One prom-client Registry per process (never the library's global one): tests can build several side by side,
 * and `npm start` puts the web app's and the listener's metrics in the same one.
 */
import { collectDefaultMetrics, Registry } from 'prom-client';

export type { Registry };

/** Every metric of ours starts with this; the default process metrics keep their usual names. */
export const PREFIX = 'allocator_';

/** Latency buckets (seconds) shared by every layer's histograms: 1 ms to 10 s, where webhooks and Qiscus calls live. */
export const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** A fresh registry with Node's default process metrics (CPU, memory, event loop lag, GC, handles). */
export function createMetricsRegistry(opts: { defaultMetrics?: boolean } = {}): Registry {
  const registry = new Registry();
  if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: registry });
  return registry;
}

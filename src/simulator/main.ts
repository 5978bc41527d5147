import { createLogger } from '../log.ts';
import { onShutdown } from '../shutdown.ts';
import { startSimulator, type SimAgentInit } from './qiscus-simulator.ts';

/*
 * Standalone fake Qiscus for the demo and benchmarks.
 *   SIM_PORT (3900), SIM_AGENTS (12 agents, ids 1001..), QISCUS_APP_ID / QISCUS_SECRET_KEY (auth when set),
 *   SIM_WEBHOOK_URL (our app's base URL, for webhooks), SIM_LATENCY_MS ("50" or "20-80"), SIM_SEED.
 */

const log = createLogger(process.env.LOG_LEVEL ?? 'info', 'qiscus-simulator');

function intEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`${name} must be a non-negative integer, got "${raw}"`);
    process.exit(1);
  }
  return n;
}

function latencyEnv(): number | [number, number] {
  const raw = process.env.SIM_LATENCY_MS?.trim();
  if (!raw) return 0;
  const m = /^(\d+)(?:\s*[-,]\s*(\d+))?$/.exec(raw);
  if (!m) {
    console.error(`SIM_LATENCY_MS must be "ms" or "min-max", got "${raw}"`);
    process.exit(1);
  }
  return m[2] === undefined ? Number(m[1]) : [Number(m[1]), Number(m[2])];
}

const NAMES = ['Ayu', 'Budi', 'Citra', 'Dewi', 'Eka', 'Fajar', 'Gita', 'Hadi', 'Indah', 'Joko', 'Kartika', 'Lestari'];

const count = intEnv('SIM_AGENTS', 12);
const agents: SimAgentInit[] = Array.from({ length: count }, (_, i) => {
  const base = NAMES[i % NAMES.length]!;
  const name = i < NAMES.length ? base : `${base} ${Math.floor(i / NAMES.length) + 1}`;
  return { id: 1001 + i, name, email: `${name.toLowerCase().replace(/\s+/g, '.')}@example.com` };
});

const sim = await startSimulator({
  port: intEnv('SIM_PORT', 3900),
  agents,
  host: process.env.SIM_HOST ?? '127.0.0.1',
  appId: process.env.QISCUS_APP_ID || undefined,
  secretKey: process.env.QISCUS_SECRET_KEY || undefined,
  webhookBaseUrl: process.env.SIM_WEBHOOK_URL || undefined,
  webhookSecret: process.env.WEBHOOK_SECRET || undefined,
  faults: { latencyMs: latencyEnv() },
  seed: process.env.SIM_SEED ? intEnv('SIM_SEED', 0) : undefined,
});

log.info({ url: sim.url, agents: count, webhookBaseUrl: sim.webhookBaseUrl ?? null, seed: sim.seed }, 'Qiscus simulator listening');
console.log(sim.url);

onShutdown(log, {
  graceful: async () => {
    log.info({ stats: sim.stats }, 'stopping');
    await sim.close();
  },
});

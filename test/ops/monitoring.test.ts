/**
 * The compose `monitoring` profile and the Grafana dashboard, checked without a Docker engine: Prometheus scrapes
 * the web app and every listener where the compose file has them listen; Grafana gets the datasource and the
 * dashboard the files under ops/ provide, on this host's loopback only; and every metric a dashboard panel queries
 * is one the service exports (the registries of web, listener, Qiscus client and queue gauges, built here as the
 * processes build them).
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type pg from 'pg';
import { Histogram } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { createWebMetrics } from '../../src/http/metrics.ts';
import { createListenerMetrics } from '../../src/listener/metrics.ts';
import { createMetricsRegistry, registerQueueMetrics } from '../../src/metrics/index.ts';
import { envOf, loadCompose, resolveCompose, root } from './compose-file.ts';

const compose = loadCompose();
const services = compose.services;
const yamlFile = (p: string) => parse(readFileSync(path.join(root, p), 'utf8'));
const dashboardFile = 'ops/grafana/dashboards/allocator.json';
const dashboard = JSON.parse(readFileSync(path.join(root, dashboardFile), 'utf8'));

/** A service's bind mounts: host path (relative to the repository) → container path. */
function mounts(name: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const v of services[name]!.volumes ?? []) {
    const [host, container] = v.split(':');
    if (host!.startsWith('./')) out.set(host!.slice(2), container!);
  }
  return out;
}

/** Every `expr` in the dashboard JSON, wherever it sits. */
function exprs(x: unknown): string[] {
  if (Array.isArray(x)) return x.flatMap(exprs);
  if (x && typeof x === 'object') {
    return Object.entries(x).flatMap(([k, v]) => (k === 'expr' && typeof v === 'string' ? [v] : exprs(v)));
  }
  return [];
}

const PROMQL_WORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset']);

/** The metric names a PromQL expression reads: identifiers that are not functions, keywords, labels or strings. */
function metricsIn(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""') // strings
    .replace(/\{[^}]*\}/g, '') // label matchers
    .replace(/\[[^\]]*\]/g, '') // ranges, [$__rate_interval]
    .replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ''); // label lists
  return [...bare.matchAll(/\b[a-zA-Z_:][\w:]*\b(?!\s*\()/g)].map((m) => m[0]).filter((w) => !PROMQL_WORDS.has(w));
}

/** The series names the processes export: each metric, and a histogram's _bucket, _sum and _count. */
function exportedSeries(): Set<string> {
  // One registry with everything `npm start` registers (web + listener + queue gauges + process metrics); the
  // queue gauges read the database only when scraped, and nothing here scrapes.
  const registry = createMetricsRegistry();
  createWebMetrics(registry);
  createListenerMetrics(registry);
  registerQueueMetrics(registry, {} as pg.Pool);
  const names = new Set<string>();
  for (const m of registry.getMetricsAsArray()) {
    const { name } = m as unknown as { name: string };
    names.add(name);
    if (m instanceof Histogram) for (const s of ['_bucket', '_sum', '_count']) names.add(name + s);
  }
  return names;
}

describe('the Grafana dashboard', () => {
  it('queries only metrics the service exports', () => {
    const exported = exportedSeries();
    const queried = exprs(dashboard.panels);
    expect(queried.length).toBeGreaterThan(20);
    const unknown = queried.flatMap((e) => metricsIn(e).filter((m) => !exported.has(m)).map((m) => `${m} in ${e}`));
    expect(unknown).toEqual([]);
    // It shows each of the product's metrics: queue, longest wait, agents, assignments, failures, webhook latency.
    const used = new Set(queried.flatMap(metricsIn));
    for (const m of [
      'allocator_rooms_waiting',
      'allocator_oldest_wait_seconds',
      'allocator_agents',
      'allocator_assignments_total',
      'allocator_qiscus_errors_total',
      'allocator_webhook_duration_seconds_bucket',
      'allocator_qiscus_up',
    ]) {
      expect(used, m).toContain(m);
    }
  });

  it('reads expressions the way PromQL does', () => {
    expect(
      metricsIn('histogram_quantile(0.95, sum by (le, operation) (rate(allocator_qiscus_request_duration_seconds_bucket[$__rate_interval])))'),
    ).toEqual(['allocator_qiscus_request_duration_seconds_bucket']);
    expect(metricsIn('time() - max(allocator_roster_last_sync_timestamp_seconds)')).toEqual([
      'allocator_roster_last_sync_timestamp_seconds',
    ]);
    expect(metricsIn('sum(rate(x_total{outcome=~"a|b", route="/api"}[5m])) * 60 and on(job) up')).toEqual(['x_total', 'up']);
  });

  it('uses the provisioned datasource in every panel and query', () => {
    const ds = yamlFile('ops/grafana/provisioning/datasources/prometheus.yml').datasources;
    expect(ds).toHaveLength(1);
    const uids = new Set<string>();
    const walk = (x: unknown) => {
      if (Array.isArray(x)) return x.forEach(walk);
      if (x && typeof x === 'object') {
        for (const [k, v] of Object.entries(x)) {
          if (k === 'datasource') uids.add((v as { uid: string }).uid);
          else walk(v);
        }
      }
    };
    walk(dashboard.panels);
    expect([...uids]).toEqual([ds[0].uid]);
    expect(dashboard.uid).toMatch(/^[\w-]{1,40}$/);
  });
});

describe('docker compose --profile monitoring', () => {
  it('runs Prometheus and Grafana only in that profile, published on loopback only', () => {
    for (const name of ['prometheus', 'grafana']) {
      const s = services[name]!;
      expect(s.profiles, name).toEqual(['monitoring']);
      expect(s.image, name).toMatch(name === 'prometheus' ? /prom\/prometheus:v\d/ : /grafana\/grafana:\d/);
      for (const p of s.ports ?? []) expect(p, name).toMatch(/^127\.0\.0\.1:/);
    }
    for (const v of ['prometheus-data', 'grafana-data']) expect(Object.keys(compose.volumes ?? {})).toContain(v);
    // Its defaults interpolate with nothing set beyond what the stack itself needs.
    const resolved = resolveCompose({ QISCUS_APP_ID: 'a', QISCUS_SECRET_KEY: 'b' });
    expect(resolved.services.grafana!.ports).toEqual(['127.0.0.1:3000:3000']);
    expect(envOf(resolved.services.grafana!).GF_SECURITY_ADMIN_PASSWORD).toBe('admin');
  });

  it('Prometheus scrapes web and every listener replica where compose has them serve /metrics', () => {
    const m = mounts('prometheus');
    expect(m.get('ops/prometheus/prometheus.yml')).toBe('/etc/prometheus/prometheus.yml');
    const config = yamlFile('ops/prometheus/prometheus.yml');
    const jobs = Object.fromEntries(config.scrape_configs.map((j: { job_name: string }) => [j.job_name, j]));
    const resolved = resolveCompose({ QISCUS_APP_ID: 'a', QISCUS_SECRET_KEY: 'b' });
    const webPort = envOf(resolved.services.web!).PORT;
    expect(jobs.web.static_configs[0].targets).toEqual([`web:${webPort}`]);
    expect(jobs.web.metrics_path).toBe('/metrics');
    // Every replica: DNS discovery of the service name, on the listener's METRICS_PORT.
    const dns = jobs.listener.dns_sd_configs[0];
    expect(dns.names).toEqual(['listener']);
    expect(String(dns.port)).toBe(envOf(resolved.services.listener!).METRICS_PORT);
  });

  it('Grafana gets the datasource and the dashboard from ops/, and opens on the dashboard', () => {
    const m = mounts('grafana');
    expect(m.get('ops/grafana/provisioning')).toBe('/etc/grafana/provisioning');
    const dashboards = m.get('ops/grafana/dashboards')!;
    expect(dashboards).toBeDefined();
    for (const host of m.keys()) expect(existsSync(path.join(root, host)), host).toBe(true);

    const ds = yamlFile('ops/grafana/provisioning/datasources/prometheus.yml').datasources[0];
    const promUrl = new URL(ds.url);
    expect(promUrl.hostname).toBe('prometheus');
    expect(services.prometheus!.ports![0]).toMatch(new RegExp(`:${promUrl.port}$`));

    const provider = yamlFile('ops/grafana/provisioning/dashboards/allocator.yml').providers[0];
    expect(provider.options.path).toBe(dashboards);
    const home = envOf(services.grafana!).GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH!;
    expect(path.posix.dirname(home)).toBe(dashboards);
    expect(existsSync(path.join(root, 'ops/grafana/dashboards', path.posix.basename(home)))).toBe(true);
    expect(services.grafana!.depends_on).toEqual({ prometheus: { condition: 'service_healthy' } });
  });

  it('gives web the dashboard token and the secret being retired', () => {
    const resolved = resolveCompose({
      QISCUS_APP_ID: 'a',
      QISCUS_SECRET_KEY: 'b',
      DASHBOARD_TOKEN: 'tok',
      WEBHOOK_SECRET: 'new',
      WEBHOOK_SECRET_PREVIOUS: 'old',
    });
    expect(envOf(resolved.services.web!)).toMatchObject({
      DASHBOARD_TOKEN: 'tok',
      WEBHOOK_SECRET: 'new',
      WEBHOOK_SECRET_PREVIOUS: 'old',
    });
  });
});

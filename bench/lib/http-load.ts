/**
 * A closed-loop HTTP load generator on node:http keep-alive sockets: `connections` workers, each sending its next
 * request as soon as the previous answer is read. Requests completed during the warm-up are not counted.
 */
import http from 'node:http';
import { roundSummary, Samples, summarize, type Summary } from './stats.ts';

export interface LoadOptions {
  url: string;
  connections: number;
  durationMs: number;
  warmupMs: number;
  /** The JSON body of the i-th request (i counts from 0 across all workers). */
  body(i: number): string;
  headers?: Record<string, string>;
}

export interface LoadResult {
  connections: number;
  seconds: number;
  /** 2xx answers completed inside the measured window. */
  requests: number;
  /** Requests per second (2xx, measured window). */
  rps: number;
  /** Non-2xx answers and transport errors inside the window, by status ("error" for transport errors). */
  failures: Record<string, number>;
  /** Latency of the requests started inside the window, ms. */
  latencyMs: Summary;
  /** Every request sent, warm-up included. */
  sent: number;
}

export async function httpLoad(o: LoadOptions): Promise<LoadResult> {
  const u = new URL(o.url);
  const agent = new http.Agent({ keepAlive: true, maxSockets: o.connections, maxFreeSockets: o.connections });
  const start = performance.now();
  const from = start + o.warmupMs;
  const until = from + o.durationMs;
  const lat = new Samples();
  const failures: Record<string, number> = {};
  let ok = 0;
  let seq = 0;

  const send = (body: string) =>
    new Promise<number>((resolve, reject) => {
      const req = http.request(
        {
          agent,
          host: u.hostname,
          port: u.port,
          path: u.pathname + u.search,
          method: 'POST',
          headers: {
            'content-type': 'application/json',
            'content-length': Buffer.byteLength(body),
            ...o.headers,
          },
        },
        (res) => {
          res.on('data', () => {});
          res.on('end', () => resolve(res.statusCode ?? 0));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });

  const worker = async () => {
    for (;;) {
      const t0 = performance.now();
      if (t0 >= until) return;
      const body = o.body(seq++);
      let status: number | 'error';
      try {
        status = await send(body);
      } catch {
        status = 'error';
      }
      const t1 = performance.now();
      if (t0 >= from && t1 <= until) {
        if (typeof status === 'number' && status >= 200 && status < 300) {
          ok++;
          lat.push(t1 - t0);
        } else {
          failures[String(status)] = (failures[String(status)] ?? 0) + 1;
        }
      }
      if (status === 'error') await new Promise((r) => setTimeout(r, 10));
    }
  };
  await Promise.all(Array.from({ length: o.connections }, worker));
  agent.destroy();
  const seconds = o.durationMs / 1000;
  return {
    connections: o.connections,
    seconds,
    requests: ok,
    rps: Math.round(ok / seconds),
    failures,
    latencyMs: roundSummary(summarize(lat.values())),
    sent: seq,
  };
}

/** One POST on a keep-alive agent, resolving with status and body text (for the latency test). */
export function postJson(
  agent: http.Agent,
  url: URL,
  body: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        agent,
        host: url.hostname,
        port: url.port,
        path: url.pathname + url.search,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString() }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * A small reader of the Prometheus text format (what a scrape returns), so the tests check the bytes Prometheus
 * would read rather than prom-client's internal objects.
 */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Scrape {
  samples: Sample[];
  /** `# TYPE` lines: metric family name → counter, gauge, histogram, ... */
  types: Map<string, string>;
  /** The samples named `name` whose labels include all of `labels`. */
  find(name: string, labels?: Record<string, string>): Sample[];
  /** The single such sample's value; throws when there is none or more than one. */
  value(name: string, labels?: Record<string, string>): number;
  /** The sum of the matching samples' values (0 when none). */
  sum(name: string, labels?: Record<string, string>): number;
  has(name: string): boolean;
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*/g;

export function parsePrometheus(text: string): Scrape {
  const samples: Sample[] = [];
  const types = new Map<string, string>();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line) continue;
    if (line.startsWith('#')) {
      const t = /^# TYPE (\S+) (\S+)$/.exec(line);
      if (t) types.set(t[1]!, t[2]!);
      continue;
    }
    const m = LINE.exec(line);
    if (!m) throw new Error(`not a Prometheus sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(LABEL)) {
      labels[l[1]!] = l[2]!.replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
    }
    const v = m[3]!;
    // Like Prometheus (Go's ParseFloat), NaN and Inf in any case: prom-client writes "Nan".
    const lower = v.toLowerCase();
    const value = lower === 'nan' ? NaN : /^[+-]?inf$/.test(lower) ? (v.startsWith('-') ? -Infinity : Infinity) : Number(v);
    if (Number.isNaN(value) && lower !== 'nan') throw new Error(`bad value in: ${line}`);
    samples.push({ name: m[1]!, labels, value });
  }

  const find = (name: string, labels: Record<string, string> = {}) =>
    samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  return {
    samples,
    types,
    find,
    value(name, labels) {
      const found = find(name, labels);
      if (found.length !== 1) {
        throw new Error(`expected one sample ${name}${JSON.stringify(labels ?? {})}, found ${found.length}`);
      }
      return found[0]!.value;
    },
    sum: (name, labels) => find(name, labels).reduce((a, s) => a + s.value, 0),
    has: (name) => samples.some((s) => s.name === name),
  };
}

/** GETs a /metrics URL and parses it, checking the content type on the way. */
export async function scrape(url: string): Promise<Scrape> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`${url}: HTTP ${res.status}: ${await res.text()}`);
  const type = res.headers.get('content-type') ?? '';
  if (!type.startsWith('text/plain; version=0.0.4')) throw new Error(`${url}: content type ${type}`);
  return parsePrometheus(await res.text());
}

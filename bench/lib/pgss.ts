/**
 * PostgreSQL profiles of a measurement (see db.ts). BENCH_PGSS=1: pg_stat_statements, reset before, then the
 * statements of one database that cost the most, nested ones included (track = all; `top` says whether the
 * statement was sent by a client or ran inside a function, whose own time includes its nested statements').
 * BENCH_AUTO_EXPLAIN=<rate>: the plans auto_explain logged meanwhile, summed by statement.
 */
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type pg from 'pg';
import { pgssWanted } from './db.ts';
import { resultsDir } from './results.ts';
import { table } from './table.ts';

/**
 * Loads auto_explain into this session only, logging the plan (ANALYZE, BUFFERS) of every statement this client
 * runs, nested ones included, back to it as NOTICEs; from now on when `active`, else only once a transaction says
 * `set local auto_explain.log_min_duration = 0`. Needs a superuser (LOAD).
 */
export async function sessionAutoExplain(c: pg.Client, o: { active: boolean; timing: boolean }): Promise<void> {
  await c.query(`load 'auto_explain'`);
  for (const s of [
    `auto_explain.log_min_duration = ${o.active ? 0 : -1}`,
    'auto_explain.log_analyze = on',
    'auto_explain.log_buffers = on',
    `auto_explain.log_timing = ${o.timing ? 'on' : 'off'}`,
    'auto_explain.log_nested_statements = on',
    `auto_explain.log_level = 'notice'`,
    'client_min_messages = notice',
  ]) {
    await c.query(`set ${s}`);
  }
}

export interface PgssRow {
  top: boolean;
  calls: number;
  total_ms: number;
  mean_ms: number;
  rows: number;
  buffers_per_call: number;
  query: string;
}

export async function pgssReset(c: pg.Client): Promise<void> {
  if (pgssWanted()) await c.query('select pg_stat_statements_reset()');
}

/** The `limit` costliest statements of c's database since the reset; also written to bench/results/profiles/<label>-pgss.txt. */
export async function pgssTop(c: pg.Client, label: string, limit = 30): Promise<PgssRow[] | undefined> {
  if (!pgssWanted()) return undefined;
  const r = await c.query<PgssRow>(
    `select toplevel as top, calls::int, round(total_exec_time::numeric, 1)::float8 as total_ms,
            round(mean_exec_time::numeric, 3)::float8 as mean_ms, rows::int,
            round((shared_blks_hit + shared_blks_read)::numeric / greatest(calls, 1), 1)::float8 as buffers_per_call,
            left(regexp_replace(query, '\\s+', ' ', 'g'), 140) as query
     from pg_stat_statements
     where dbid = (select oid from pg_database where datname = current_database())
     order by total_exec_time desc
     limit $1`,
    [limit],
  );
  const dir = path.join(resultsDir, 'profiles');
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    path.join(dir, `${label}-pgss.txt`),
    `${table(
      ['top', 'calls', 'total ms', 'mean ms', 'rows', 'buffers/call', 'query'],
      r.rows.map((x) => [x.top ? 'yes' : 'nested', x.calls, x.total_ms, x.mean_ms, x.rows, x.buffers_per_call, x.query]),
    )}\n`,
  );
  return r.rows;
}

export interface LoggedPlan {
  statement: string;
  /** Plans logged (a sample of the calls: BENCH_AUTO_EXPLAIN is a rate). */
  sampled: number;
  buffersMean: number;
  buffersMax: number;
  /** The plan that touched the most buffers. */
  worst: string;
  /** Mean buffers per sampled call in each half minute since the first plan logged. */
  byHalfMinute: number[];
}

/**
 * One auto_explain entry (from the log, or a NOTICE): the statement's text on one line (shortened), its plan, and
 * the shared buffers its top node touched (its children's included).
 */
export function parsePlan(entry: string): { statement: string; plan: string; buffers: number } | null {
  const lines = entry.split('\n').map((l) => l.replace(/^\t/, ''));
  const q = lines.findIndex((l) => l.startsWith('Query Text: '));
  if (q < 0) return null;
  const text: string[] = [lines[q]!.slice('Query Text: '.length)];
  let i = q + 1;
  for (; i < lines.length && !/\(actual |\(cost=|never executed/.test(lines[i]!); i++) {
    if (!lines[i]!.startsWith('Query Parameters:')) text.push(lines[i]!);
  }
  const statement = text
    .join(' ')
    .replace(/Query Parameters: .*/, '')
    .replace(/\s+/g, ' ')
    .trim()
    .slice(0, 150);
  const plan = lines.slice(i).filter((l) => !/^\d{4}-\d\d-\d\d /.test(l)).join('\n');
  const m = /Buffers: shared((?: \w+=\d+)+)/.exec(plan);
  const buffers = m ? [...m[1]!.matchAll(/=(\d+)/g)].reduce((a, x) => a + Number(x[1]), 0) : 0;
  return { statement, plan, buffers };
}

/** Bytes in the server log now: pass it to `loggedPlans` to read only what was logged after. */
export function logOffset(file: string | null): number {
  if (!file) return 0;
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

/**
 * The auto_explain plans logged since `from` (BENCH_AUTO_EXPLAIN), summed by statement, costliest (total buffers)
 * first; also written to bench/results/profiles/<label>-plans.txt with the worst plan of each.
 */
export function loggedPlans(file: string | null, from: number, label: string, limit = 25): LoggedPlan[] | undefined {
  if (!file) return undefined;
  let text: string;
  try {
    text = readFileSync(file).subarray(from).toString('utf8');
  } catch {
    return undefined;
  }
  const all = text.split(/\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)/);
  const entries = all.filter((e) => e.includes('plan:'));
  // Autovacuum's own lines (log_autovacuum_min_duration = 0): when the statistics changed under the plans.
  const autovacuum = all
    .filter((e) => /automatic (analyze|vacuum) of table/.test(e))
    .map((e) => `${e.slice(11, 23)} ${/automatic (?:analyze|vacuum) of table "[^"]+"/.exec(e)?.[0] ?? ''}`);
  const t0 = entries.length ? Date.parse(entries[0]!.slice(0, 23).replace(' ', 'T') + 'Z') : 0;
  const by = new Map<string, { statement: string; n: number; sum: number; max: number; worst: string; buckets: Map<number, [number, number]> }>();
  for (const e of entries) {
    const parsed = parsePlan(e);
    if (!parsed) continue;
    const { statement, plan, buffers } = parsed;
    const bucket = Math.floor((Date.parse(e.slice(0, 23).replace(' ', 'T') + 'Z') - t0) / 30_000);
    const s = by.get(statement) ?? { statement, n: 0, sum: 0, max: -1, worst: '', buckets: new Map() };
    s.n += 1;
    s.sum += buffers;
    const b = s.buckets.get(bucket) ?? [0, 0];
    b[0] += 1;
    b[1] += buffers;
    s.buckets.set(bucket, b);
    if (buffers > s.max) {
      s.max = buffers;
      s.worst = plan;
    }
    by.set(statement, s);
  }
  const out = [...by.values()]
    .sort((a, b) => b.sum - a.sum)
    .slice(0, limit)
    .map((s) => ({
      statement: s.statement,
      sampled: s.n,
      buffersMean: Math.round((s.sum / s.n) * 10) / 10,
      buffersMax: s.max,
      worst: s.worst,
      byHalfMinute: [...s.buckets.entries()].sort((a, b) => a[0] - b[0]).map(([, [n, sum]]) => Math.round(sum / n)),
    }));
  const dir = path.join(resultsDir, 'profiles');
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    path.join(dir, `${label}-plans.txt`),
    [
      table(['sampled', 'buffers mean', 'buffers max', 'statement'], out.map((p) => [p.sampled, p.buffersMean, p.buffersMax, p.statement])),
      '',
      'Mean buffers per sampled call, by half minute of the run:',
      '',
      ...out.slice(0, 8).map((p) => `${p.byHalfMinute.join(' ')}  ← ${p.statement.slice(0, 90)}`),
      '',
      'Autovacuum during the run:',
      '',
      ...(autovacuum.length ? autovacuum : ['(none)']),
      '',
      ...out.flatMap((p) => [`## ${p.statement}`, `(worst of ${p.sampled} sampled: ${p.buffersMax} buffers)`, '', p.worst, '']),
    ].join('\n'),
  );
  return out;
}

/** What the numbers were measured on: every result file carries this. */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { sqlPatches, withClient } from './db.ts';

export interface MachineInfo {
  cpuModel: string;
  cores: number;
  ramGiB: number;
  os: string;
  node: string;
  postgres: string;
  postgresSource: string;
  postgresSettings: Record<string, string>;
  loadavgAtStart: number[];
  /** SQL files applied on top of the migrations (BENCH_SQL_PATCH); empty for the code as committed. */
  sqlPatches: string[];
  /** BENCH_APP_ROOT when the web and listener were run from a patched copy; null for this repository. */
  appRoot: string | null;
  /** The commit measured, and the files of db/ and src/ that differed from it (uncommitted work measured too). */
  git: { commit: string | null; dirty: string[] };
  at: string;
}

function gitState(): MachineInfo['git'] {
  const run = (args: string[]) => execFileSync('git', args, { cwd: process.env.BENCH_APP_ROOT ?? process.cwd(), encoding: 'utf8' });
  try {
    const commit = run(['rev-parse', '--short', 'HEAD']).trim();
    const dirty = run(['status', '--porcelain', '--', 'db', 'src'])
      .split('\n')
      .filter(Boolean)
      .map((l) => l.slice(3));
    return { commit, dirty };
  } catch {
    return { commit: null, dirty: [] };
  }
}

function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) return m[1]!.trim();
  } catch {
    /* not Linux */
  }
  return os.cpus()[0]?.model ?? 'unknown';
}

const SETTINGS = ['shared_buffers', 'fsync', 'synchronous_commit', 'max_connections', 'work_mem', 'wal_level'];

export async function machineInfo(databaseUrl: string, source: string): Promise<MachineInfo> {
  const { version, settings } = await withClient(databaseUrl, async (c) => {
    const v = await c.query<{ v: string }>(`select current_setting('server_version') as v`);
    const s = await c.query<{ name: string; setting: string }>(
      `select name, current_setting(name) as setting from pg_settings where name = any($1)`,
      [SETTINGS],
    );
    return { version: v.rows[0]!.v, settings: Object.fromEntries(s.rows.map((r) => [r.name, r.setting])) };
  });
  return {
    cpuModel: cpuModel(),
    cores: os.cpus().length,
    ramGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
    postgres: version,
    postgresSource: source,
    postgresSettings: settings,
    loadavgAtStart: os.loadavg().map((x) => Math.round(x * 100) / 100),
    sqlPatches: sqlPatches().map((f) => path.relative(process.cwd(), f)),
    appRoot: process.env.BENCH_APP_ROOT ? path.resolve(process.env.BENCH_APP_ROOT) : null,
    git: gitState(),
    at: new Date().toISOString(),
  };
}

export function machineLine(m: MachineInfo): string {
  return `${m.cpuModel}, ${m.cores} cores, ${m.ramGiB} GiB RAM, ${m.os}, Node ${m.node}, PostgreSQL ${m.postgres} (${m.postgresSource}), load average at start ${m.loadavgAtStart.join(' ')}${
    m.sqlPatches.length ? `, SQL patches: ${m.sqlPatches.join(', ')}` : ''
  }${m.appRoot ? `, app from ${m.appRoot}` : ''}${m.git?.commit ? `, commit ${m.git.commit}${m.git.dirty.length ? ` + ${m.git.dirty.length} uncommitted file(s) in db/ src/` : ''}` : ''}`;
}

/**
 * CPU time per process (Linux /proc), so each figure can say who was busy: the load generator, the web or
 * listener process, PostgreSQL, or someone else on this shared machine. Elsewhere every reading is null.
 */
import { readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';

const TICKS = 100; // USER_HZ: 100 on every mainstream Linux

/** User and system CPU seconds of one process. */
function cpuTimes(pid: number): { user: number; sys: number; total: number } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command (which may contain spaces) start after the last ')'.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const user = Number(f[11]) / TICKS; // utime (field 14)
    const sys = Number(f[12]) / TICKS; // stime (field 15)
    return { user, sys, total: user + sys };
  } catch {
    return null;
  }
}

/** Pids of `root` and all its descendants. */
export function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return [root];
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(e));
      children.set(ppid, list);
    } catch {
      /* exited meanwhile */
    }
  }
  const out: number[] = [];
  const stack = [root];
  while (stack.length) {
    const p = stack.pop()!;
    out.push(p);
    stack.push(...(children.get(p) ?? []));
  }
  return out;
}

/** Busy and total jiffies of the whole machine (all cores). */
function machineTicks(): { busy: number; total: number } | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const idle = (v[3] ?? 0) + (v[4] ?? 0); // idle + iowait
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
    return { busy: total - idle, total };
  } catch {
    return null;
  }
}

export type CpuGroups = Record<string, () => number[]>;

export interface CpuReport {
  /** Seconds of wall time measured. */
  wallSeconds: number;
  /** Cores used on average per group (1.0 = one core fully busy). */
  cores: Record<string, number | null>;
  /** The part of `cores` spent in the kernel (system time). */
  sysCores: Record<string, number | null>;
  /** Cores busy on the whole machine on average, ours and everyone else's; and how many there are. */
  machineBusyCores: number | null;
  machineCores: number;
  /** machineBusyCores minus our groups: other work on this shared machine during the measurement. */
  othersCores: number | null;
}

/**
 * Starts measuring. `groups` maps a label to a function listing the pids to count (evaluated at start and end;
 * processes that start or end in between are counted from when they are seen).
 */
export function startCpu(groups: CpuGroups): { stop(): CpuReport } {
  const t0 = performance.now();
  const m0 = machineTicks();
  const read = () => {
    const out: Record<string, Map<number, { total: number; sys: number }>> = {};
    for (const [label, pids] of Object.entries(groups)) {
      const m = new Map<number, { total: number; sys: number }>();
      for (const pid of pids()) {
        const s = cpuTimes(pid);
        if (s !== null) m.set(pid, s);
      }
      out[label] = m;
    }
    return out;
  };
  const c0 = read();
  return {
    stop() {
      const wall = (performance.now() - t0) / 1000;
      const c1 = read();
      const m1 = machineTicks();
      const cores: Record<string, number | null> = {};
      const sysCores: Record<string, number | null> = {};
      let ours = 0;
      for (const label of Object.keys(groups)) {
        const a = c0[label]!;
        const b = c1[label]!;
        if (b.size === 0) {
          cores[label] = null;
          sysCores[label] = null;
          continue;
        }
        let sec = 0;
        let sys = 0;
        for (const [pid, s] of b) {
          sec += s.total - (a.get(pid)?.total ?? 0);
          sys += s.sys - (a.get(pid)?.sys ?? 0);
        }
        cores[label] = Math.round((sec / wall) * 100) / 100;
        sysCores[label] = Math.round((sys / wall) * 100) / 100;
        ours += sec / wall;
      }
      const machineCores = os.cpus().length;
      let busy: number | null = null;
      if (m0 && m1 && m1.total > m0.total) {
        busy = Math.round(((m1.busy - m0.busy) / (m1.total - m0.total)) * machineCores * 100) / 100;
      }
      return {
        wallSeconds: Math.round(wall * 100) / 100,
        cores,
        sysCores,
        machineBusyCores: busy,
        machineCores,
        othersCores: busy === null ? null : Math.max(0, Math.round((busy - ours) * 100) / 100),
      };
    },
  };
}

/** Peak resident set (VmHWM) and current RSS of a process, in MiB; null when unknown. */
export function memoryMiB(pid: number): { peak: number | null; rss: number | null } {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => {
      const m = new RegExp(`^${key}:\\s*(\\d+) kB`, 'm').exec(status);
      return m ? Math.round((Number(m[1]) / 1024) * 10) / 10 : null;
    };
    return { peak: kb('VmHWM'), rss: kb('VmRSS') };
  } catch {
    return { peak: null, rss: null };
  }
}

/**
 * `npm run demo` headless for a few seconds, as a fresh machine would run it: embedded PostgreSQL, the service, the
 * Qiscus simulator and simulated customers in one process. Its `DEMO SUMMARY {json}` line must show rooms
 * assigned and resolved, no agent above its capacity, no room assigned twice and no broken invariant; and nothing
 * may be left behind (the temporary PostgreSQL stopped, its folder gone). Plus the live view's layout.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import type { DemoSummary } from '../../src/demo/summary.ts';
import { parseOptions, UsageError } from '../../src/demo/options.ts';
import { renderLines, renderPlainLine, visible, type AgentRow, type Snapshot } from '../../src/demo/view.ts';
import { root } from './compose-file.ts';

interface DemoRun {
  out: () => string;
  err: () => string;
  /** Resolves with the exit code; rejects (after SIGKILL) when the run takes longer than `ms`. */
  done: Promise<number | null>;
  /** Sends a signal to the demo's whole process group, as a terminal's Ctrl-C does. */
  signalGroup(signal: NodeJS.Signals): void;
}

function startDemo(args: string[], ms: number): DemoRun {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/demo/main.ts', ...args], {
    cwd: root,
    env: { ...process.env, NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // a process group of its own, like a terminal's foreground job
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const done = new Promise<number | null>((resolve, reject) => {
    const t = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`demo did not finish within ${ms} ms:\n${out.slice(-3000)}\n${err.slice(-2000)}`));
    }, ms);
    child.on('exit', (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
  return {
    out: () => out,
    err: () => err,
    done,
    signalGroup: (signal) => process.kill(-child.pid!, signal),
  };
}

async function runDemo(args: string[], ms: number): Promise<{ code: number | null; out: string; err: string }> {
  const run = startDemo(args, ms);
  const code = await run.done;
  return { code, out: run.out(), err: run.err() };
}

function summaryOf(out: string, err = ''): DemoSummary {
  const line = out.split('\n').find((l) => l.startsWith('DEMO SUMMARY '));
  expect(line, `no DEMO SUMMARY line:\n${out.slice(-3000)}\n${err.slice(-2000)}`).toBeDefined();
  return JSON.parse(line!.slice('DEMO SUMMARY '.length)) as DemoSummary;
}

/** The demo's PostgreSQL is stopped and its temporary folder gone. */
async function expectCleanedUp(out: string) {
  const m = /demo: PostgreSQL (\S+) \(data in (\S+)\)/.exec(out);
  expect(m, out.slice(0, 500)).not.toBeNull();
  expect(existsSync(m![2]!)).toBe(false);
  const client = new pg.Client({ connectionString: m![1]!, connectionTimeoutMillis: 2000 });
  await expect(client.connect()).rejects.toThrow();
}

describe('npm run demo', () => {
  it('runs headless for 8 s, assigns and resolves rooms within every limit, and cleans up', { timeout: 90_000 }, async () => {
    const { code, out, err } = await runDemo(['--seconds', '8', '--headless', '--seed', '7'], 80_000);
    const s = summaryOf(out, err);

    expect(s.failures).toEqual([]);
    expect(s.ok).toBe(true);
    expect(code, err.slice(-2000)).toBe(0);
    expect(s.agents).toBe(12);
    expect(s.arrived).toBeGreaterThan(20); // the opening burst alone is 36
    expect(s.webhooksAccepted).toBe(s.webhooksSent);
    expect(s.assigned).toBeGreaterThan(0);
    expect(s.resolved).toBeGreaterThan(0);
    expect(s.assigned).toBeLessThanOrEqual(s.arrived);
    expect(s.maxLoadSeen).toBeGreaterThan(0);
    expect(s.maxLoadSeen).toBeLessThanOrEqual(2);
    expect(s.capacity).toBe(2);
    expect(s.overCapacity).toEqual([]);
    expect(s.doubleAssignments).toBe(0);
    // two teams and a route: WhatsApp rooms were served, by Customer support only
    expect(s.routed).toBeGreaterThan(0);
    expect(s.routedOutside).toBe(0);
    expect(s.invariantProblems).toBe(0);
    expect(s.p50AssignSeconds).not.toBeNull();
    expect(s.p90AssignSeconds!).toBeGreaterThanOrEqual(s.p50AssignSeconds!);
    expect(s.maxWaitSeconds).toBeGreaterThanOrEqual(s.p90AssignSeconds!);

    // Headless: periodic plain lines and the summary, no escape codes.
    expect(out).toMatch(/^\[0:0\d\] queue \d+/m);
    expect(out).toMatch(/highest load on an agent/);
    expect(out).not.toContain('\x1b[');
    await expectCleanedUp(out);
  });

  it('ends early on Ctrl-C (SIGINT to its process group) with the summary, PostgreSQL still there to give it', { timeout: 90_000 }, async () => {
    const run = startDemo(['--seconds', '120', '--headless'], 80_000);
    const start = Date.now();
    while (!/^\[0:0[2-9]\] queue/m.test(run.out())) {
      if (Date.now() - start > 60_000) throw new Error(`no progress line:\n${run.out()}\n${run.err()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    // The dashboard of the run, with the token it printed.
    const [, url, token] = /^demo: dashboard (\S+) \(token (\w+)\)$/m.exec(run.out()) ?? [];
    expect(token, run.out().slice(0, 800)).toMatch(/^[0-9a-f]{32}$/);
    const snapshot = await fetch(`${url}/snapshot.json`, { headers: { authorization: `Bearer ${token}` } });
    expect(snapshot.status).toBe(200);
    expect(((await snapshot.json()) as { agents: unknown[] }).agents).toHaveLength(12);
    expect((await fetch(`${url}/snapshot.json`)).status).toBe(401);
    run.signalGroup('SIGINT');
    const code = await run.done;
    const s = summaryOf(run.out(), run.err());
    expect(s.failures).toEqual([]);
    expect(code, run.err().slice(-2000)).toBe(0);
    expect(s.seconds).toBeLessThan(60);
    expect(s.assigned).toBeGreaterThan(0);
    expect(run.out()).toMatch(/stopping early/);
    await expectCleanedUp(run.out());
  });

  it('rejects unknown options with a usage line and exit 2', async () => {
    const { code, err } = await runDemo(['--sconds', '3'], 30_000);
    expect(code).toBe(2);
    expect(err).toMatch(/unknown option "--sconds"/);
    expect(err).toMatch(/usage: npm run demo/);
  });
});

describe('demo options', () => {
  it('defaults to 60 s at ~3 customers/s, headless when stdout is not a terminal', () => {
    expect(parseOptions([], true)).toMatchObject({ seconds: 60, rate: 3, agents: 12, headless: false });
    expect(parseOptions([], false).headless).toBe(true);
    expect(parseOptions(['--seconds', '8', '--headless', '--rate=5', '--seed', '1'], true)).toMatchObject({
      seconds: 8,
      headless: true,
      rate: 5,
      seed: 1,
    });
    expect(() => parseOptions(['--seconds', 'soon'], true)).toThrow(UsageError);
    expect(() => parseOptions(['--seconds'], true)).toThrow(/--seconds needs a number/);
  });
});

describe('the live view', () => {
  const names = ['Ayu', 'Budi', 'Citra', 'Dewi', 'Eka', 'Fajar', 'Gita', 'Hadi', 'Indah', 'Joko', 'Kartika', 'Lestari'];
  const agents: AgentRow[] = names.map((name, i) => ({
    id: 1001 + i,
    name,
    available: i !== 2 && i !== 5,
    paused: i === 5,
    load: i === 9 ? 2 : i % 3,
    ourLoad: i === 9 ? 1 : i % 3,
    externalLoad: i === 9 ? 1 : 0,
    capacity: 2,
  }));
  const snap: Snapshot = {
    elapsed: 12.4,
    seconds: 60,
    agentsTotal: 12,
    rate: 3,
    waiting: 7,
    longestWait: 4.2,
    assigning: 1,
    perSecond: 3.4,
    p50: 0.02,
    p90: 3.1,
    agents,
    arrived: 80,
    returning: 6,
    assigned: 70,
    resolved: 50,
    webhooksAccepted: 150,
    webhooksSent: 150,
    history: [0, 2, 5, 7, 6, 7],
    events: [{ at: 10, text: 'Citra went offline in Qiscus' }],
    warnings: [],
    ending: false,
  };

  it('fits the terminal, shows every agent with a load bar and marks, and keeps its columns still', () => {
    for (const width of [80, 100, 160]) {
      const lines = renderLines(snap, width, true);
      for (const l of lines) expect(visible(l).length, `${width}: ${visible(l)}`).toBeLessThanOrEqual(width);
      const text = lines.map(visible).join('\n');
      for (const n of names) expect(text).toContain(n);
      expect(text).toMatch(/Queue +7 waiting +longest wait 4\.2 s/);
      expect(text).toMatch(/Ayu +░░░░░░░░ 0\/2/);
      expect(text).toMatch(/Budi +████░░░░ 1\/2/);
      expect(text).toMatch(/Citra +████████ 2\/2 offline/);
      expect(text).toMatch(/Fajar +████████ 2\/2 paused/);
      expect(text).toMatch(/Joko +████▓▓▓▓ 2\/2 \+1 hand/);
      expect(text).toContain('0:12 / 1:00');
    }
    // Two columns from 80 characters on; their position does not depend on the marks of the left column.
    const at80 = renderLines(snap, 80, false);
    const gita = at80.find((l) => l.includes('Gita'))!;
    const hadi = at80.find((l) => l.includes('Hadi'))!;
    expect(gita.indexOf('Gita')).toBe(hadi.indexOf('Hadi'));
    expect(renderLines(snap, 60, false).filter((l) => /\d\/2/.test(l))).toHaveLength(12);
  });

  it('has a plain one-line form for headless runs', () => {
    const line = renderPlainLine(snap);
    expect(line).toMatch(/^\[0:12\] queue 7 \(longest 4\.2 s\) · 3\.4 assignments\/s/);
    expect(line).toContain('away: Citra, Fajar (paused)');
    expect(line).toContain('by hand: Joko 1');
    expect(line).not.toContain('\x1b[');
  });
});

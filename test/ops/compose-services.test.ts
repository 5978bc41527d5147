/**
 * The compose services without Docker: each service's `command` run exactly as written (`npm run migrate`, `web`,
 * `listener`, `simulator`) with the environment the compose file gives it (interpolated as compose does), only the
 * addresses that Docker's network would provide swapped for loopback ones. Then their healthchecks, run as Docker
 * would run them, must pass; a webhook posted to web must end assigned by the listener through the simulator; and
 * SIGTERM to npm (what `docker stop` sends through tini) must stop each one cleanly with exit code 0.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../src/db/embedded.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { eventually, sleep } from '../support/processes.ts';
import { argvOf, envOf, execForm, loadDockerfile, resolveCompose, root, stageEnv, type ComposeFile } from './compose-file.ts';

interface Running {
  name: string;
  child: ChildProcess;
  output: string[];
  exited: Promise<number | null>;
}

const started: Running[] = [];

/** The image's ENV (NODE_ENV, npm's script shell, ...): every container of it starts with these. */
const imageEnv = stageEnv(loadDockerfile().at(-1)!);

/**
 * Runs argv in the repository (the image's WORKDIR) as a container would: the image's ENV, then the service's
 * environment; PATH/HOME from here. Its own process group, so that nothing outlives the test.
 */
function run(name: string, argv: string[], env: Record<string, string>): Running {
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: root,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, ...imageEnv, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  const output: string[] = [];
  child.stdout!.on('data', (b: Buffer) => output.push(b.toString()));
  child.stderr!.on('data', (b: Buffer) => output.push(b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const r = { name, child, output, exited };
  started.push(r);
  return r;
}

/** Is any process of r's group still running? */
function groupAlive(r: Running): boolean {
  try {
    process.kill(-r.child.pid!, 0);
    return true;
  } catch {
    return false;
  }
}

const tail = (r: Running) => r.output.join('').slice(-2500);

/** Runs a healthcheck's `test` as Docker would (CMD: exec form; CMD-SHELL: through sh) in the service's environment. */
async function healthcheck(test: string[], env: Record<string, string>): Promise<{ code: number | null; out: string }> {
  const [kind, ...rest] = test;
  const argv = kind === 'CMD-SHELL' ? ['sh', '-c', rest.join(' ')] : rest;
  const r = run('healthcheck', argv, env);
  const code = await Promise.race([r.exited, sleep(10_000).then(() => -1)]);
  if (code === -1) r.child.kill('SIGKILL');
  return { code, out: r.output.join('') };
}

async function healthy(what: string, test: string[], env: Record<string, string>, ms = 40_000): Promise<void> {
  let last = '';
  try {
    await eventually(
      `the ${what} healthcheck to pass`,
      async () => {
        const r = await healthcheck(test, env);
        last = `exit ${r.code}: ${r.out}`;
        return r.code === 0;
      },
      ms,
      300,
    );
  } catch (e) {
    throw new Error(`${String(e)}; last run: ${last}`);
  }
}

let db: TestDatabase;
let compose: ComposeFile;
const ports = { web: 0, metrics: 0, sim: 0 };
// AGENT_SYNC_SECONDS, SWEEP_SECONDS and the rest at the compose file's defaults (the shipped ones)
const vars = { QISCUS_APP_ID: 'compose-app', QISCUS_SECRET_KEY: 'compose-secret', WEBHOOK_SECRET: 'hook-secret' };

/** The service's compose environment, with loopback addresses where the compose network has service names. */
function envFor(service: string): Record<string, string> {
  const e = envOf(compose.services[service]!);
  const swap: Record<string, string> = {
    DATABASE_URL: db.url,
    PORT: String(ports.web),
    METRICS_PORT: String(ports.metrics),
    SIM_PORT: String(ports.sim),
    SIM_HOST: '127.0.0.1',
    SIM_WEBHOOK_URL: `http://127.0.0.1:${ports.web}`,
  };
  for (const [k, v] of Object.entries(swap)) if (k in e) e[k] = v;
  // `QISCUS_BASE_URL=http://simulator:3900`, as the README's demo-profile line sets it.
  if ('QISCUS_BASE_URL' in e) e.QISCUS_BASE_URL = `http://127.0.0.1:${ports.sim}`;
  return e;
}

beforeAll(async () => {
  db = await createTestDatabase();
  compose = resolveCompose(vars);
  ports.web = await freePort();
  ports.metrics = await freePort();
  ports.sim = await freePort();
});

afterAll(async () => {
  // Whatever is left of each process group (npm may be gone while its child lives on).
  for (const r of started) if (groupAlive(r)) process.kill(-r.child.pid!, 'SIGKILL');
  await db?.drop();
});

describe('the compose services, run as compose runs them', () => {
  it('migrate runs to completion, then web, simulator and listener pass their healthchecks and serve', { timeout: 120_000 }, async () => {
    const migrate = run('migrate', argvOf(compose.services.migrate!.command), envFor('migrate'));
    expect(await migrate.exited, tail(migrate)).toBe(0);
    expect(tail(migrate)).toMatch(/migrations: up to date/);

    const web = run('web', argvOf(compose.services.web!.command), envFor('web'));
    const sim = run('simulator', argvOf(compose.services.simulator!.command), envFor('simulator'));
    // The listener once Qiscus (the simulator) answers, as in production: it pulls the roster when it starts (a
    // failed pull is tried again within seconds, tested in test/listener/service.test.ts).
    try {
      await healthy('simulator', argvOf(compose.services.simulator!.healthcheck!.test), envFor('simulator'));
    } catch (e) {
      throw new Error(`${String(e)}\n--- simulator\n${tail(sim)}`);
    }
    const listener = run('listener', argvOf(compose.services.listener!.command), envFor('listener'));

    const checks: Array<[string, string[], Record<string, string>]> = [
      ['web', argvOf(compose.services.web!.healthcheck!.test), envFor('web')],
      ['listener', argvOf(compose.services.listener!.healthcheck!.test), envFor('listener')],
      // The image's own HEALTHCHECK, for its default command (web).
      ['Dockerfile HEALTHCHECK', ['CMD', ...dockerfileHealthcheck()], envFor('web')],
    ];
    try {
      for (const [what, test, env] of checks) await healthy(what, test, env);
    } catch (e) {
      throw new Error(`${String(e)}\n--- web\n${tail(web)}\n--- simulator\n${tail(sim)}\n--- listener\n${tail(listener)}`);
    }
    // postgres's healthcheck is pg_isready: the image has it; here it only has to be well-formed shell.
    expect(argvOf(compose.services.postgres!.healthcheck!.test)[0]).toBe('CMD-SHELL');

    // WEBHOOK_SECRET reached web; the listener reaches Qiscus (the simulator) with the app's credentials.
    const url = `http://127.0.0.1:${ports.web}/api/v1/new_request`;
    const body = JSON.stringify(newRequest('compose-room-1'));
    const headers = { 'content-type': 'application/json' };
    expect((await fetch(url, { method: 'POST', headers, body })).status).toBe(401);
    const ok = await fetch(`${url}?secret=${vars.WEBHOOK_SECRET}`, { method: 'POST', headers, body });
    expect(ok.status, await ok.clone().text()).toBeLessThan(300);
    await eventually(
      'the room assigned by the listener through the simulator',
      async () =>
        (await db.pool.query(`select 1 from allocator.sessions where room_id = 'compose-room-1' and state = 'assigned'`))
          .rowCount === 1,
      20_000,
    );

    // `docker stop`: SIGTERM to the container's main process (npm, under tini), which hands it to the service.
    for (const r of [listener, web, sim]) {
      r.child.kill('SIGTERM');
      const code = await Promise.race([r.exited, sleep(25_000).then(() => 'timeout')]);
      expect(code, `${r.name} after SIGTERM:\n${tail(r)}`).toBe(0);
      // npm did not leave the service behind, orphaned: the whole process group is gone.
      await eventually(`${r.name}'s processes to exit`, () => !groupAlive(r), 5000);
    }
    // And with web gone, its healthcheck fails.
    expect((await healthcheck(argvOf(compose.services.web!.healthcheck!.test), envFor('web'))).code).not.toBe(0);
  });
});

function dockerfileHealthcheck(): string[] {
  const final = loadDockerfile().at(-1)!;
  const hc = final.instructions.filter((i) => i.op === 'HEALTHCHECK').at(-1)!.args;
  // HEALTHCHECK [--options] CMD ["exec", "form"]
  return execForm(hc.slice(hc.indexOf('CMD') + 3));
}

/**
 * docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine: the compose file parsed and
 * interpolated as compose does it, every command an npm script that the test suite runs, the product's required
 * environment, healthchecks and start order; the Dockerfile multi-stage, non-root, with a healthcheck and no dev
 * dependencies.
 * compose-services.test.ts runs the services' commands and healthchecks for real.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { builtinModules } from 'node:module';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Role } from '../../src/config/index.ts';
import {
  argvOf,
  envOf,
  execForm,
  InterpolationError,
  interpolate,
  loadCompose,
  loadDockerfile,
  npmScriptOf,
  packageJson,
  resolveCompose,
  root,
  stageEnv,
} from './compose-file.ts';

/** The environment the product requires of every deployment (the first rows of the README's Configuration table). */
const SPEC_ENV = [
  'DATABASE_URL',
  'PORT',
  'QISCUS_BASE_URL',
  'QISCUS_APP_ID',
  'QISCUS_SECRET_KEY',
  'WEBHOOK_SECRET',
  'AGENT_SYNC_SECONDS',
  'LOG_LEVEL',
  'DASHBOARD_TOKEN',
];
const APP_SERVICES = ['migrate', 'web', 'listener'] as const;
const REQUIRED = { QISCUS_APP_ID: 'app-123', QISCUS_SECRET_KEY: 'secret-456' };

function filesUnder(dir: string, ext: RegExp): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = path.join(dir, f);
    if (statSync(p).isDirectory()) return f === 'node_modules' ? [] : filesUnder(p, ext);
    return ext.test(f) ? [p] : [];
  });
}

/** Every entry file that some test runs (spawned as a process or named in a test), from the test sources. */
function filesTheTestsRun(): string {
  const self = new Set([path.join(root, 'test/ops/compose.test.ts'), path.join(root, 'test/ops/compose-file.ts')]);
  return filesUnder(path.join(root, 'test'), /\.ts$/)
    .filter((f) => !self.has(f))
    .map((f) => readFileSync(f, 'utf8'))
    .join('\n');
}

describe('docker-compose.yml', () => {
  const compose = loadCompose();
  const services = compose.services;

  it('has postgres 17 with a volume and pg_isready, a one-shot migrate, web, listener and a demo simulator', () => {
    expect(Object.keys(services).sort()).toEqual([
      'grafana',
      'listener',
      'migrate',
      'postgres',
      'prometheus',
      'simulator',
      'web',
    ]);
    const pg = services.postgres!;
    expect(pg.image).toBe('postgres:17');
    const volume = (pg.volumes ?? []).find((v) => v.endsWith(':/var/lib/postgresql/data'));
    expect(volume, 'postgres data on a volume').toBeDefined();
    expect(Object.keys(compose.volumes ?? {})).toContain(volume!.split(':')[0]);
    expect(argvOf(pg.healthcheck?.test).join(' ')).toMatch(/pg_isready/);
    expect(services.simulator!.profiles).toEqual(['demo']);
    for (const name of ['migrate', 'web', 'listener', 'simulator']) {
      expect(services[name]!.image, name).toBe(services.web!.image);
      expect(services[name]!.build, name).toBe('.');
      expect(services[name]!.profiles ?? [], name).toEqual(name === 'simulator' ? ['demo'] : []);
    }
  });

  it('runs only npm scripts that exist and that the test suite runs', () => {
    const scripts = packageJson().scripts;
    const tested = filesTheTestsRun();
    const used = new Map<string, string>();
    for (const [name, s] of Object.entries(services)) {
      // PostgreSQL and the monitoring profile's Prometheus and Grafana run their images' own commands.
      if (name === 'postgres' || s.profiles?.includes('monitoring')) {
        expect(s.command).toBeUndefined();
        continue;
      }
      const script = npmScriptOf(s.command);
      expect(script, `${name}: ${JSON.stringify(s.command)} is not "npm run <script>"`).toBeDefined();
      used.set(name, script!);
      const body = scripts[script!];
      expect(body, `package.json has no "${script}" script`).toBeDefined();
      // Each of these scripts is `exec tsx <entry file>`; the suite spawns that entry file (as npm would run it).
      const entry = /^(?:exec )?tsx (\S+\.ts)$/.exec(body!)?.[1];
      expect(entry, `script "${script}" is "${body}"`).toBeDefined();
      expect(existsSync(path.join(root, entry!)), entry).toBe(true);
      expect(tested.includes(entry!), `no test runs ${entry} (npm run ${script})`).toBe(true);
    }
    expect(Object.fromEntries(used)).toEqual({
      migrate: 'migrate',
      web: 'web',
      listener: 'listener',
      simulator: 'simulator',
    });
  });

  it("gives web and listener every required variable, and each service the configuration it needs", () => {
    const resolved = resolveCompose(REQUIRED);
    for (const name of ['web', 'listener']) {
      const env = envOf(resolved.services[name]!);
      for (const v of SPEC_ENV) expect(Object.keys(env), `${name} lacks ${v}`).toContain(v);
    }
    const configText = readFileSync(path.join(root, 'src/config/index.ts'), 'utf8');
    for (const name of APP_SERVICES) {
      const env = envOf(resolved.services[name]!);
      // No typo'd names: every variable is one the config reads.
      for (const k of Object.keys(env)) expect(configText, `${name}: ${k} is not read by src/config`).toContain(`${k}:`);
      // And the config accepts it for the role of the process.
      expect(() => loadConfig(name as Role, env), name).not.toThrow();
      const config = loadConfig(name as Role, env);
      expect(config.DATABASE_URL).toBeDefined();
    }
    const listener = loadConfig('listener', envOf(resolved.services.listener!));
    expect(listener.QISCUS_APP_ID).toBe(REQUIRED.QISCUS_APP_ID);
    expect(listener.QISCUS_SECRET_KEY).toBe(REQUIRED.QISCUS_SECRET_KEY);
    expect(listener.QISCUS_BASE_URL).toBe('https://omnichannel.qiscus.com');
    expect(listener.AGENT_SYNC_SECONDS).toBe(30);
    expect(listener.LOG_LEVEL).toBe('info');
    expect(listener.WEBHOOK_SECRET).toBeUndefined(); // `WEBHOOK_SECRET=` in the container means unset
    const web = loadConfig('web', envOf(resolved.services.web!));
    expect(web.PORT).toBe(8080);
    expect(resolved.services.web!.ports).toContain('8080:8080');

    const simText = readFileSync(path.join(root, 'src/simulator/main.ts'), 'utf8');
    for (const k of Object.keys(envOf(resolved.services.simulator!))) {
      expect(simText, `simulator: ${k} is not read by src/simulator/main.ts`).toContain(k);
    }
  });

  it('points DATABASE_URL at the postgres service with its own credentials, whatever they are set to', () => {
    for (const vars of [REQUIRED, { ...REQUIRED, POSTGRES_USER: 'u1', POSTGRES_PASSWORD: 'p1', POSTGRES_DB: 'd1' }]) {
      const resolved = resolveCompose(vars);
      const pgEnv = envOf(resolved.services.postgres!);
      for (const name of APP_SERVICES) {
        const url = new URL(envOf(resolved.services[name]!).DATABASE_URL!);
        expect(url.hostname).toBe('postgres');
        expect(url.port).toBe('5432');
        expect(url.username).toBe(pgEnv.POSTGRES_USER);
        expect(url.password).toBe(pgEnv.POSTGRES_PASSWORD);
        expect(url.pathname).toBe(`/${pgEnv.POSTGRES_DB}`);
      }
    }
  });

  it('passes the shell/.env settings through and refuses to start without the Qiscus credentials', () => {
    const env = envOf(
      resolveCompose({
        ...REQUIRED,
        QISCUS_BASE_URL: 'http://simulator:3900',
        WEBHOOK_SECRET: 'w-s',
        AGENT_SYNC_SECONDS: '5', // not the default (30), to see it passed through: nothing runs here
        LOG_LEVEL: 'debug',
      }).services.listener!,
    );
    expect(env).toMatchObject({
      QISCUS_BASE_URL: 'http://simulator:3900',
      WEBHOOK_SECRET: 'w-s',
      AGENT_SYNC_SECONDS: '5',
      LOG_LEVEL: 'debug',
    });
    for (const missing of ['QISCUS_APP_ID', 'QISCUS_SECRET_KEY']) {
      const vars: Record<string, string | undefined> = { ...REQUIRED, [missing]: undefined };
      expect(() => resolveCompose(vars)).toThrow(InterpolationError);
      expect(() => resolveCompose(vars)).toThrow(new RegExp(missing));
      expect(() => resolveCompose({ ...vars, [missing]: '' })).toThrow(new RegExp(missing));
    }
    // The interpolation helper itself, on compose's forms.
    expect(interpolate('$${X}-${X:-d}-${Y-e}-${Z}', { X: '1' })).toBe('${X}-1-e-');
    expect(() => loadConfig('listener', { DATABASE_URL: 'postgres://x/y' })).toThrow(ConfigError);
  });

  it('starts in order: postgres healthy, then migrate to completion, then web and listener', () => {
    expect(services.migrate!.depends_on).toEqual({ postgres: { condition: 'service_healthy' } });
    expect(services.migrate!.restart).toBe('no');
    for (const name of ['web', 'listener']) {
      expect(services[name]!.depends_on, name).toEqual({
        postgres: { condition: 'service_healthy' },
        migrate: { condition: 'service_completed_successfully' },
      });
      expect(services[name]!.restart, name).toBe('unless-stopped');
      expect(services[name]!.init, `${name}: tini passes SIGTERM on`).toBe(true);
    }
    expect(services.listener!.deploy?.replicas).toBeGreaterThanOrEqual(2);
    expect(services.listener!.ports, 'replicas cannot share a host port').toBeUndefined();
  });

  it('has a healthcheck on every long-running service (the migrate job has none)', () => {
    for (const name of ['postgres', 'web', 'listener', 'simulator', 'prometheus', 'grafana']) {
      const h = services[name]!.healthcheck;
      expect(h?.test, name).toBeDefined();
      expect(argvOf(h!.test)[0], name).toMatch(/^CMD(-SHELL)?$/);
      expect(h!.interval && h!.timeout && h!.retries, name).toBeTruthy();
    }
    expect(argvOf(services.web!.healthcheck!.test).join(' ')).toMatch(/\/readyz/);
    expect(argvOf(services.listener!.healthcheck!.test).join(' ')).toMatch(/select 1/);
    expect(services.migrate!.healthcheck).toEqual({ disable: true });
  });
});

describe('Dockerfile', () => {
  const stages = loadDockerfile();
  const final = stages.at(-1)!;
  const ops = (op: string) => final.instructions.filter((i) => i.op === op);

  it('is multi-stage on node 20, and the final stage copies the production node_modules from an earlier one', () => {
    expect(stages.length).toBeGreaterThanOrEqual(2);
    for (const s of stages) expect(s.from).toMatch(/^node:20(\.|-|$)/);
    const deps = stages.find((s) => s.instructions.some((i) => i.op === 'RUN' && /\bnpm ci\b/.test(i.args)));
    expect(deps, 'a stage runs npm ci').toBeDefined();
    expect(deps).not.toBe(final);
    const ci = deps!.instructions.find((i) => i.op === 'RUN' && /\bnpm ci\b/.test(i.args))!;
    expect(ci.args).toMatch(/--omit=dev\b/);
    expect(ops('COPY').some((c) => c.args.includes(`--from=${deps!.name}`) && /\bnode_modules\b/.test(c.args))).toBe(
      true,
    );
  });

  it('installs nothing in the final stage (no dev dependencies, no build tools)', () => {
    for (const r of ops('RUN')) expect(r.args).not.toMatch(/\bnpm (ci|install|i)\b|apt-get|apk add/);
  });

  it('copies what the processes need at run time', () => {
    const copied = ops('COPY')
      .filter((c) => !c.args.includes('--from='))
      .flatMap((c) => execForm(c.args).slice(0, -1));
    for (const needed of ['package.json', 'tsconfig.json', '.gmrc', 'db', 'src']) expect(copied).toContain(needed);
    for (const c of copied) expect(existsSync(path.join(root, c)), c).toBe(true);
  });

  it('runs as the unprivileged node user, with a healthcheck, and `npm run web` by default', () => {
    const user = ops('USER').at(-1)?.args;
    expect(user).toBeDefined();
    expect(user).not.toMatch(/^(root|0)(:|$)/);
    const hc = ops('HEALTHCHECK').at(-1)?.args ?? '';
    expect(hc).toMatch(/\bCMD\b/);
    expect(hc).toMatch(/\/healthz/);
    const cmd = execForm(ops('CMD').at(-1)!.args);
    expect(npmScriptOf(cmd)).toBe('web');
    expect(ops('EXPOSE').map((e) => e.args).join(' ')).toMatch(/\b8080\b/);
    // npm's script shell must exec the service, or a SIGTERM forwarded by npm stops only the shell (see
    // compose-services.test.ts, which stops each service that way).
    expect(stageEnv(final).NPM_CONFIG_SCRIPT_SHELL).toBe('/bin/bash');
    expect(stageEnv(final).NODE_ENV).toBe('production');
  });

  it('has a .dockerignore that keeps local state and dependencies out of the context, and the sources in', () => {
    const ignored = readFileSync(path.join(root, '.dockerignore'), 'utf8')
      .split('\n')
      .map((l) => l.trim().replace(/^\/|\/$/g, ''))
      .filter((l) => l && !l.startsWith('#'));
    for (const p of ['node_modules', '.data', '.git', 'bench/results', 'coverage']) expect(ignored).toContain(p);
    for (const p of ['src', 'db', 'package.json', 'package-lock.json', 'tsconfig.json', '.gmrc']) {
      expect(ignored).not.toContain(p);
    }
  });

  it('needs no dev dependency at run time: every package src/ imports is a production dependency', () => {
    const { dependencies, devDependencies } = packageJson();
    const builtins = new Set(builtinModules);
    const offenders: string[] = [];
    for (const file of filesUnder(path.join(root, 'src'), /\.ts$/)) {
      const text = readFileSync(file, 'utf8');
      // Value imports only: `import type` and `export type` vanish when tsx strips the types.
      const specs = [
        ...text.matchAll(/^\s*(?:import|export)\s+(?!type\s)(?:[^'";]*?\sfrom\s+)?['"]([^'"]+)['"]/gm),
        ...text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g),
      ].map((m) => m[1]!);
      for (const spec of specs) {
        if (spec.startsWith('.') || spec.startsWith('node:') || builtins.has(spec)) continue;
        const pkg = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!;
        if (!(pkg in dependencies)) {
          offenders.push(`${path.relative(root, file)}: ${spec}${pkg in devDependencies ? ' (a devDependency)' : ''}`);
        }
      }
    }
    expect(offenders).toEqual([]);
  });
});

/**
 * docker-compose.yml and the Dockerfile as data, for tests that run without a Docker engine: the compose file parsed
 * with `yaml` (merge keys on, as compose reads them) and `${VAR:-default}` / `${VAR:?error}` interpolation done the
 * way compose does it.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface Healthcheck {
  test?: string[] | string;
  disable?: boolean;
  interval?: string;
  timeout?: string;
  retries?: number;
  start_period?: string;
}

export interface Service {
  image?: string;
  build?: unknown;
  command?: string[] | string;
  environment?: Record<string, string | number | boolean | null> | string[];
  depends_on?: Record<string, { condition?: string; required?: boolean }> | string[];
  healthcheck?: Healthcheck;
  ports?: string[];
  volumes?: string[];
  restart?: string;
  profiles?: string[];
  deploy?: { replicas?: number };
  init?: boolean;
}

export interface ComposeFile {
  services: Record<string, Service>;
  volumes?: Record<string, unknown>;
}

const composeText = () => readFileSync(path.join(root, 'docker-compose.yml'), 'utf8');

/** The compose file as written (variables not substituted). */
export function loadCompose(): ComposeFile {
  return parse(composeText(), { merge: true }) as ComposeFile;
}

export class InterpolationError extends Error {}

/** Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}. */
export function interpolate(value: string, vars: Record<string, string | undefined>): string {
  return value.replace(
    /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (m, name: string | undefined, op: string | undefined, arg: string | undefined, bare: string | undefined) => {
      if (m === '$$') return '$';
      if (bare) return vars[bare] ?? '';
      const v = vars[name!];
      const empty = v === undefined || v === '';
      switch (op) {
        case ':-':
          return empty ? (arg ?? '') : v!;
        case '-':
          return v === undefined ? (arg ?? '') : v;
        case ':?':
          if (empty) throw new InterpolationError(`required variable ${name} is missing a value: ${arg}`);
          return v!;
        case '?':
          if (v === undefined) throw new InterpolationError(`required variable ${name} is missing a value: ${arg}`);
          return v;
        default:
          return v ?? '';
      }
    },
  );
}

function deepInterpolate<T>(x: T, vars: Record<string, string | undefined>): T {
  if (typeof x === 'string') return interpolate(x, vars) as T;
  if (Array.isArray(x)) return x.map((v) => deepInterpolate(v, vars)) as T;
  if (x && typeof x === 'object') {
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, deepInterpolate(v, vars)])) as T;
  }
  return x;
}

/** The compose file as `docker compose config` would see it with these shell/.env variables. */
export function resolveCompose(vars: Record<string, string | undefined>): ComposeFile {
  return deepInterpolate(loadCompose(), vars);
}

/** A service's environment as a plain map of strings. */
export function envOf(s: Service): Record<string, string> {
  const e = s.environment ?? {};
  if (Array.isArray(e)) {
    return Object.fromEntries(
      e.map((kv) => {
        const i = kv.indexOf('=');
        return i < 0 ? [kv, ''] : [kv.slice(0, i), kv.slice(i + 1)];
      }),
    );
  }
  return Object.fromEntries(Object.entries(e).map(([k, v]) => [k, v === null ? '' : String(v)]));
}

/** A command as argv (compose runs a string command through no shell: it splits it on spaces). */
export function argvOf(command: string[] | string | undefined): string[] {
  if (command === undefined) return [];
  return Array.isArray(command) ? command : command.trim().split(/\s+/);
}

/** The npm script a command runs: "npm run web" → "web", "npm start" → "start"; undefined for anything else. */
export function npmScriptOf(command: string[] | string | undefined): string | undefined {
  const argv = argvOf(command);
  if (argv[0] !== 'npm') return undefined;
  if (argv.length === 2 && argv[1] === 'start') return 'start';
  if (argv.length === 3 && (argv[1] === 'run' || argv[1] === 'run-script')) return argv[2];
  return undefined;
}

export const packageJson = () =>
  JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as {
    scripts: Record<string, string>;
    dependencies: Record<string, string>;
    devDependencies: Record<string, string>;
  };

// ---------- Dockerfile ----------

export interface DockerInstruction {
  op: string;
  args: string;
}
export interface DockerStage {
  from: string;
  name?: string;
  instructions: DockerInstruction[];
}

/** The Dockerfile's stages: comments dropped, continuation lines joined. */
export function loadDockerfile(): DockerStage[] {
  const text = readFileSync(path.join(root, 'Dockerfile'), 'utf8');
  const logical: string[] = [];
  let current = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (current === '' && (line === '' || line.startsWith('#'))) continue;
    if (current !== '' && line.startsWith('#')) continue;
    if (line.endsWith('\\')) {
      current += line.slice(0, -1) + ' ';
      continue;
    }
    logical.push((current + line).trim());
    current = '';
  }
  if (current.trim()) logical.push(current.trim());

  const stages: DockerStage[] = [];
  for (const l of logical) {
    const m = /^(\S+)\s*(.*)$/.exec(l)!;
    const op = m[1]!.toUpperCase();
    const args = m[2]!;
    if (op === 'FROM') {
      const f = /^(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?/i.exec(args)!;
      stages.push({ from: f[1]!, name: f[2], instructions: [] });
    } else if (stages.length > 0) {
      stages.at(-1)!.instructions.push({ op, args });
    }
  }
  return stages;
}

/** The ENV of a stage (`ENV A=1 B=2` or the legacy `ENV A 1`), as a container of that image starts with it. */
export function stageEnv(stage: DockerStage): Record<string, string> {
  const env: Record<string, string> = {};
  for (const i of stage.instructions.filter((x) => x.op === 'ENV')) {
    if (!/^\S+=/.test(i.args)) {
      const [k, ...v] = i.args.split(/\s+/);
      env[k!] = v.join(' ');
      continue;
    }
    for (const m of i.args.matchAll(/(\S+?)=("(?:[^"\\]|\\.)*"|\S*)/g)) {
      env[m[1]!] = m[2]!.startsWith('"') ? (JSON.parse(m[2]!) as string) : m[2]!;
    }
  }
  return env;
}

/** A JSON-form argument list (`["npm", "run", "web"]`), or the words of a shell form. */
export function execForm(args: string): string[] {
  const t = args.trim();
  if (t.startsWith('[')) return JSON.parse(t) as string[];
  return t.split(/\s+/);
}

import { pino, type Logger } from 'pino';

/**
 * One pino logger for the process. JSON lines by default (what log shippers want); pretty when a person is
 * watching a terminal, unless LOG_FORMAT=json forces JSON.
 */
export function createLogger(level = process.env.LOG_LEVEL ?? 'info', name?: string): Logger {
  const pretty = process.stdout.isTTY && process.env.LOG_FORMAT !== 'json';
  return pino({
    level,
    name,
    base: { pid: process.pid },
    transport: pretty ? { target: 'pino-pretty', options: { colorize: true, ignore: 'pid,hostname' } } : undefined,
  });
}

export type { Logger };

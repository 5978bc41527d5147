import type { Logger } from './log.ts';

export interface ShutdownSteps {
  /** Stop taking work and let what is in flight finish; resolves to the exit code (0 when it says none). */
  graceful: () => Promise<number | void>;
  /** Hand work in flight back; resolves to the exit code (1 when it says none). */
  hurry?: () => Promise<number | void>;
}

/**
 * SIGINT/SIGTERM, the same for every entry point: run `graceful` (stop taking work, let what is in flight finish)
 * and exit. A second signal while waiting runs `hurry` (hand work back) and exits at once, or without `hurry` just
 * exits; a third exits without more ado. Returns the same stop request for callers that take it another way (the
 * demo's `q` key, and Ctrl-C as a key on its raw-mode terminal).
 */
export function onShutdown(logger: Logger, steps: ShutdownSteps): (reason: string) => void {
  let requests = 0;
  let first = 0;
  const request = (reason: string) => {
    requests++;
    if (requests === 1) {
      first = Date.now();
      const again = steps.hurry ? 'signal again to hurry' : 'signal again to exit now';
      logger.info({ signal: reason }, `shutting down: finishing work in flight (${again})`);
      steps.graceful().then(
        (code) => process.exit(code ?? 0),
        (e) => {
          logger.error({ err: String(e) }, 'shutdown failed');
          process.exit(1);
        },
      );
    } else if (requests === 2 && steps.hurry) {
      logger.warn('hurrying: handing work in flight back to the queue');
      steps.hurry().then(
        (code) => process.exit(code ?? 1),
        () => process.exit(1),
      );
    } else {
      process.exit(1);
    }
  };
  const onSignal = (signal: NodeJS.Signals) => {
    // Ctrl-C under `npm start` reaches us twice at once (from the terminal and forwarded by npm): one press.
    if (requests === 1 && Date.now() - first < 1000) return;
    request(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return request;
}

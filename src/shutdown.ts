import type { Logger } from './log.ts';

/**
 * SIGINT/SIGTERM, the same for every entry point: run `graceful` (stop taking work, let what is in flight finish)
 * and exit. A second signal while waiting runs `hurry` (hand work back) and exits at once, or without `hurry` just
 * exits; a third exits without more ado.
 */
export function onShutdown(logger: Logger, steps: { graceful: () => Promise<void>; hurry?: () => Promise<void> }) {
  let signals = 0;
  let first = 0;
  const handler = (signal: NodeJS.Signals) => {
    // Ctrl-C under `npm start` reaches us twice at once (from the terminal and forwarded by npm): one press.
    if (signals === 1 && Date.now() - first < 1000) return;
    if (signals === 0) first = Date.now();
    signals++;
    if (signals === 1) {
      const again = steps.hurry ? 'signal again to hurry' : 'signal again to exit now';
      logger.info({ signal }, `shutting down: finishing work in flight (${again})`);
      steps.graceful().then(
        () => process.exit(0),
        (e) => {
          logger.error({ err: String(e) }, 'shutdown failed');
          process.exit(1);
        },
      );
    } else if (signals === 2 && steps.hurry) {
      logger.warn('hurrying: handing work in flight back to the queue');
      steps.hurry().finally(() => process.exit(1));
    } else {
      process.exit(1);
    }
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

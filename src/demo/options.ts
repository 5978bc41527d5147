/** Command-line options of `npm run demo`. */

export interface DemoOptions {
  /** How long customers keep arriving. */
  seconds: number;
  /** Plain periodic lines instead of the live screen (automatic when stdout is not a terminal). */
  headless: boolean;
  /** Mean new customers per second (Poisson arrivals). */
  rate: number;
  /** Simulated agents (12 by default, capacity 2 each). */
  agents: number;
  /** Seed for the customers, handling times and the simulator: the same seed, the same story. */
  seed: number;
}

export const USAGE = `usage: npm run demo -- [--seconds N] [--rate R] [--agents N] [--seed S] [--headless]

  --seconds N   how long customers keep arriving (default 60; q or Ctrl-C ends early)
  --rate R      new customers per second, on average (default 3)
  --agents N    agents in the fake Qiscus, capacity 2 each (default 12)
  --seed S      reproduce a run
  --headless    plain lines and a summary instead of the live screen (automatic when stdout is not a terminal)
`;

export class UsageError extends Error {}

export function parseOptions(argv: string[], stdoutIsTTY: boolean): DemoOptions {
  const o: DemoOptions = {
    seconds: 60,
    headless: !stdoutIsTTY,
    rate: 3,
    agents: 12,
    seed: Math.floor(Math.random() * 2 ** 31),
  };
  const number = (flag: string, raw: string | undefined, min: number, max: number, integer = false): number => {
    const n = Number(raw);
    if (raw === undefined || raw.trim() === '' || !Number.isFinite(n) || n < min || n > max || (integer && !Number.isInteger(n))) {
      throw new UsageError(`${flag} needs ${integer ? 'an integer' : 'a number'} from ${min} to ${max}, got ${JSON.stringify(raw ?? '')}`);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.indexOf('=');
    const flag = eq > 0 ? arg.slice(0, eq) : arg;
    const value = () => (eq > 0 ? arg.slice(eq + 1) : argv[++i]);
    switch (flag) {
      case '--seconds':
        o.seconds = number(flag, value(), 1, 86_400);
        break;
      case '--rate':
        o.rate = number(flag, value(), 0.1, 1000);
        break;
      case '--agents':
        o.agents = number(flag, value(), 1, 200, true);
        break;
      case '--seed':
        o.seed = number(flag, value(), 0, 2 ** 32 - 1, true);
        break;
      case '--headless':
        o.headless = true;
        break;
      case '-h':
      case '--help':
        throw new UsageError('');
      default:
        throw new UsageError(`unknown option ${JSON.stringify(arg)}`);
    }
  }
  return o;
}

/**
 * Rounds on a noisy machine: run the phases of a comparison back to back, alternating their order, and report the
 * median over rounds of each value and of each per-round ratio.
 */
import type { BenchContext, Row } from './results.ts';
import { round } from './stats.ts';

/**
 * Runs `steps` `rounds` times, alternating the order (forward, then backward: A B B A ...), so slow drift of the
 * machine's load falls on every step alike.
 */
export async function alternate<T>(
  ctx: BenchContext,
  rounds: number,
  steps: Array<[string, () => Promise<T>]>,
  show: (key: string, r: T) => string,
): Promise<Record<string, T[]>> {
  const out: Record<string, T[]> = Object.fromEntries(steps.map(([k]) => [k, [] as T[]]));
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? steps : [...steps].reverse();
    for (const [key, run] of order) {
      ctx.log(`round ${i + 1}/${rounds}: ${key} ...`);
      const r = await run();
      out[key]!.push(r);
      ctx.log(`round ${i + 1}/${rounds}: ${show(key, r)}`);
    }
  }
  return out;
}

export function median(xs: Array<number | null | undefined>): number | null {
  const v = xs.filter((x): x is number => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
}

/** Median over rounds of a / b, each pair from the same round. */
export function medianRatio<T>(a: T[], b: T[], f: (x: T) => number | null | undefined): number | null {
  const rs = a.map((x, i) => {
    const p = f(x);
    const q = b[i] === undefined ? null : f(b[i]!);
    return p == null || q == null || q === 0 ? null : p / q;
  });
  const m = median(rs);
  return m === null ? null : round(m);
}

export function medianOf<T>(xs: T[], f: (x: T) => number | null | undefined): number | null {
  const m = median(xs.map(f));
  return m === null ? null : round(m);
}

/** A table row comparing phase `a` with phase `b` of the same rounds: medians of each, median of the per-round ratios. */
export function pairRow<T>(
  part: string,
  what: string,
  unit: string,
  a: T[],
  b: T[],
  baseline: string,
  f: (x: T) => number | null | undefined,
): Row {
  return { part, what, value: medianOf(a, f), unit, baseline, baselineValue: medianOf(b, f), ratio: medianRatio(a, b, f) };
}

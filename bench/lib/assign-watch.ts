/**
 * Notices the simulator's assign calls the moment they are decided, with a sub-millisecond clock: wraps `push`
 * of the simulator's assignment log (the entries' own `at` is Date.now(), whole milliseconds). Bench-only: the
 * simulator is not changed.
 */
import type { AssignmentLogEntry, Simulator } from '../../src/simulator/qiscus-simulator.ts';

export interface AssignWatch {
  /** Resolves with performance.now() of the next successful assign call for `roomId`. */
  next(roomId: string, timeoutMs?: number): Promise<number>;
}

export function watchAssignments(sim: Simulator): AssignWatch {
  const waiting = new Map<string, (t: number) => void>();
  const seen = new Map<string, number>();
  const log = sim.assignments;
  const push = log.push.bind(log);
  log.push = (...items: AssignmentLogEntry[]) => {
    const t = performance.now();
    for (const e of items) {
      if (e.status !== 200) continue;
      const w = waiting.get(e.room_id);
      if (w) {
        waiting.delete(e.room_id);
        w(t);
      } else {
        seen.set(e.room_id, t);
      }
    }
    return push(...items);
  };
  return {
    next(roomId, timeoutMs = 10_000) {
      const t = seen.get(roomId);
      if (t !== undefined) {
        seen.delete(roomId);
        return Promise.resolve(t);
      }
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiting.delete(roomId);
          reject(new Error(`no assign call for room ${roomId} within ${timeoutMs} ms`));
        }, timeoutMs);
        waiting.set(roomId, (x) => {
          clearTimeout(timer);
          resolve(x);
        });
      });
    },
  };
}

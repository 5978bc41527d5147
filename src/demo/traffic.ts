/**
 * The demo's people: customers who write in (Poisson arrivals, a burst at the start so that a queue forms, some of
 * them returning after an earlier resolution, some writing twice), and agents who resolve each room a random
 * handling time after Qiscus (the simulator) shows it assigned to them. Everything goes through the simulator, so
 * the service sees exactly what Qiscus would send.
 */
import type { Simulator, WebhookResult } from '../simulator/qiscus-simulator.ts';

export interface TrafficOptions {
  /** Mean new customers per second. */
  rate: number;
  /** Customers already writing when the demo starts. */
  burst: number;
  /** Handling time of a room, uniform in [min, max] milliseconds. */
  handleMs: [number, number];
  /** Chance that an arrival is a customer coming back to a resolved room (a new session in the same room). */
  returningShare: number;
  /** Chance, per arrival, that a waiting customer writes again (Qiscus repeats the allocation webhook). */
  repeatShare: number;
  /** Share of new rooms that come in through WhatsApp (source `wa`; the demo routes them to one team). */
  whatsappShare: number;
  rand: () => number;
}

export interface TrafficCounts {
  /** Customer sessions started: new rooms plus returning customers. */
  arrived: number;
  returning: number;
  /** Allocation webhooks repeated for a room already waiting. */
  repeats: number;
  /** Webhooks posted (both kinds) and how they were answered. */
  webhooksSent: number;
  webhooksAccepted: number;
  /** Non-2xx answers or transport errors, by status ("error" for no answer). */
  webhooksRejected: Record<string, number>;
  /** Resolutions posted by agents. */
  resolutions: number;
}

export class Traffic {
  readonly counts: TrafficCounts = {
    arrived: 0,
    returning: 0,
    repeats: 0,
    webhooksSent: 0,
    webhooksAccepted: 0,
    webhooksRejected: {},
    resolutions: 0,
  };
  /** The last webhook that was not accepted, for the screen. */
  lastRejection: string | undefined;

  private nextRoom = 1;
  /** Each room's channel (a returning customer writes through the same one). */
  private sources = new Map<string, string>();
  /** Rooms with a customer waiting or being served. */
  private open = new Set<string>();
  /** Rooms whose last session was resolved: a returning customer writes into one of these. */
  private closed: string[] = [];
  private inFlight = new Set<Promise<unknown>>();
  private arrivalTimer: NodeJS.Timeout | undefined;
  private watchTimer: NodeJS.Timeout | undefined;
  private resolveTimers = new Map<string, NodeJS.Timeout>();
  private burstTimers = new Set<NodeJS.Timeout>();
  private cursor = 0;
  private stopped = false;

  constructor(
    private readonly sim: Simulator,
    private readonly o: TrafficOptions,
  ) {}

  start(): void {
    for (let i = 0; i < this.o.burst; i++) {
      // Spread over half a second: a crowd, not one instant.
      const t = setTimeout(() => {
        this.burstTimers.delete(t);
        if (!this.stopped) this.arrive(false);
      }, this.o.rand() * 500);
      this.burstTimers.add(t);
    }
    this.scheduleArrival();
    this.watchTimer = setInterval(() => this.watchAssignments(), 50);
  }

  /** A room assigned outside the allocator (by hand in the dashboard): its agent resolves it like any other. */
  handled(roomId: string): void {
    this.open.add(roomId);
    this.scheduleResolve(roomId);
  }

  /** No more arrivals or resolutions. */
  stop(): void {
    this.stopped = true;
    clearTimeout(this.arrivalTimer);
    clearInterval(this.watchTimer);
    for (const t of [...this.resolveTimers.values(), ...this.burstTimers]) clearTimeout(t);
    this.resolveTimers.clear();
    this.burstTimers.clear();
  }

  /** Waits for the webhooks already posted to be answered (at most `ms`). */
  async settle(ms = 5000): Promise<void> {
    const deadline = new Promise<void>((r) => setTimeout(r, ms).unref());
    await Promise.race([Promise.allSettled([...this.inFlight]), deadline]);
  }

  private scheduleArrival(): void {
    if (this.stopped) return;
    const gapMs = (-Math.log(1 - this.o.rand()) / this.o.rate) * 1000; // exponential gaps: Poisson arrivals
    this.arrivalTimer = setTimeout(() => {
      if (this.stopped) return;
      this.arrive(this.o.rand() < this.o.returningShare);
      if (this.o.rand() < this.o.repeatShare) this.repeat();
      this.scheduleArrival();
    }, gapMs);
  }

  private arrive(returning: boolean): void {
    let room: string | undefined;
    if (returning && this.closed.length > 0) {
      room = this.closed.splice(Math.floor(this.o.rand() * this.closed.length), 1)[0];
    }
    if (room) this.counts.returning++;
    if (!room) {
      room = String(700_000 + this.nextRoom++);
      this.sources.set(room, this.o.rand() < this.o.whatsappShare ? 'wa' : 'qiscus');
    }
    this.open.add(room);
    this.counts.arrived++;
    this.post(this.sim.sendNewRequest(room, { source: this.sources.get(room) }));
  }

  /** A waiting customer writes again: Qiscus sends the allocation webhook once more; nothing may change. */
  private repeat(): void {
    const waiting = [...this.open].filter((r) => this.sim.agentOf(r) === null);
    const room = waiting[Math.floor(this.o.rand() * waiting.length)];
    if (room === undefined) return;
    this.counts.repeats++;
    this.post(this.sim.sendNewRequest(room, { source: this.sources.get(room) }));
  }

  /** New successful assignments in the simulator's log: the agent starts handling the room. */
  private watchAssignments(): void {
    const log = this.sim.assignments;
    for (; this.cursor < log.length; this.cursor++) {
      const a = log[this.cursor]!;
      if (a.status === 200 && !a.repeat && !this.resolveTimers.has(a.room_id)) this.scheduleResolve(a.room_id);
    }
  }

  private scheduleResolve(roomId: string): void {
    if (this.stopped) return;
    const [min, max] = this.o.handleMs;
    const t = setTimeout(() => {
      this.resolveTimers.delete(roomId);
      if (this.stopped || this.sim.agentOf(roomId) === null) return;
      this.counts.resolutions++;
      this.open.delete(roomId);
      // Once the resolution is answered, the customer may come back (a new session in the same room).
      this.post(this.sim.resolve(roomId), () => this.closed.push(roomId));
    }, min + this.o.rand() * (max - min));
    this.resolveTimers.set(roomId, t);
  }

  private post(p: Promise<WebhookResult>, onAccepted?: () => void): void {
    this.counts.webhooksSent++;
    const tracked = p.then(
      (r) => {
        if (r.status >= 200 && r.status < 300) {
          this.counts.webhooksAccepted++;
          onAccepted?.();
        } else {
          this.reject(String(r.status), `${r.status} ${JSON.stringify(r.body).slice(0, 120)}`);
        }
      },
      (e: unknown) => this.reject('error', String(e)),
    );
    this.inFlight.add(tracked);
    void tracked.finally(() => this.inFlight.delete(tracked));
  }

  private reject(key: string, text: string): void {
    this.counts.webhooksRejected[key] = (this.counts.webhooksRejected[key] ?? 0) + 1;
    this.lastRejection = text;
  }
}

--------------------------------------------------------------------------------------------------------------------
-- The allocation engine. Every decision about which room goes to which agent is made here, in SQL, so that any
-- number of web and listener processes can share one database and an agent can never exceed its capacity.
-- These files are the current definition of every function, view and trigger of schema `allocator`; `npm run
-- migrate` applies them in file-name order after the migrations (db/committed: tables, columns, indexes, data).
--
--   00-basics          json_bigint, the NOTIFY trigger function       06-rescue       dead listeners, leases, sweep
--   01-settings        defaults and one accessor per setting          07-roster       Qiscus's agent list
--   02-agents          capacity, the guard, agent_preference()        08-rules        priority, maximum wait
--   03-intake          the two webhooks                               09-qiscus-health outages of Qiscus
--   04-reservation     reserve(): which room goes to which agent      10-views        views for people, invariants
--   05-outcomes        confirm, fail_transient, fail_for_agent,       11-routing      routes and divisions
--                      release_reservation, report                12-retention    deleting old history
--
-- Plans: the entry points of the hot path (reserve, report, accept_requests and the ones it calls) and of the
-- listeners' periodic work (sweep, rescue_abandoned) run with `set enable_seqscan = off` and, for reserve and
-- report, `plan_cache_mode = force_generic_plan`; the functions they call inherit both. (rescue_abandoned, every
-- second on every listener, read all of sessions, 600 pages at 20,000 rooms, on a connection that had planned it
-- while the table was new.) A listener keeps its connections for days and PL/pgSQL caches each statement's plan per
-- connection: planned while a table was tiny (a new install, a burst the statistics have not seen), a lookup by
-- primary key became a sequential scan and stayed one as the table grew (a cold drain: report() read 900 pages per
-- call). Every statement of these paths has an index that serves it, so neither setting can make a plan worse; and
-- the generic plan is made once, where a custom plan (chosen because a LIMIT or an array is a parameter) was made
-- again on every call (0.1-0.2 ms each). Tested in test/sql/batch.test.ts (plans that do not depend on the
-- statistics). reserve and report also run with `enable_bitmapscan = off`: a bitmap scan reads every entry of its
-- range before it returns a row, where the hot path reads its indexes in their order and stops early. The lookups
-- of an agent by id set their own (see "Newest version first" in 02-agents.sql).
--
-- Shape of the data:
--   settings   tunables a DBA may change at any time (read on every call, so a change applies at once)
--   agents     one row per Qiscus agent; our_load = rooms we hold for it, guarded by a trigger
--   sessions   one row per (room, customer session); explicit states with one timestamp per transition
--   attempts   one row per reservation: who was tried, how it ended, why
--   webhooks   every accepted webhook, raw, with its arrival time and what it did
--
-- Life of a session (allocator.session_state), with the sub-states that decide an agent's slot:
--
--   new_request ─▶ waiting ──reserve()──▶ reserved ──confirm()──▶ assigned ──close_request──▶ resolved
--                   ▲   │                  │ (an assign call in flight, made by listener `owner`)
--                   │   │                  │
--                   │   │                  ├──close_request──▶ resolved, call in flight (attempt_id and lease kept)
--                   │   │                  │                    └─ when the call reports back or its listener dies:
--                   │   │                  │                       settled by evidence (settle_resolved_in_flight)
--                   │   │                  │                       └─ it may have landed after the resolution:
--                   │   │                  │                          the room counts on the agent (external_load)
--                   │   │                  │                          until a roster pull shows Qiscus's count
--                   │   │                  │                          (one after the call's lease if no answer
--                   │   │                  │                          came: Qiscus may still apply it);
--                   │   │                  │                          if the answer named the new service:
--                   │   │                  │                          resolved, late_service_id = that service,
--                   │   │                  │                          until its own close_request frees the count
--                   │   │                  │                          (not counted if that came first);
--                   │   │                  │                          late_landing_at = when. The customer's next
--                   │   │                  │                          session (waiting for that answer, or opened
--                   │   │                  │                          while the count is the room's) holds the
--                   │   │                  │                          agent's slot instead (follow_late_call)
--                   └───┼──────────────────┘ fail_transient, fail_for_agent, release_reservation, rescue
--                       │                    holds_slot: the call may have landed, so the waiting room keeps its
--                       │                    agent's slot and goes back to that agent first
--                       ├──holds_slot, and that call's confirm() arrives late──▶ assigned (no second call)
--                       ├──max_attempts used up, or refused by every agent──▶ failed
--                       ├──waited longer than max_wait_seconds─────────────▶ cancelled
--                       └──close_request──────────────────────────────────▶ resolved
--                                                                   (holds_slot after an unanswered call: the
--                                                                   slot counts on the agent until a pull after
--                                                                   that call's lease, as above)
--------------------------------------------------------------------------------------------------------------------

comment on type allocator.session_state is
  'waiting (queued; holds_slot: keeps its last agent''s slot after a call that may have landed, and that call''s '
  'late confirm assigns it), reserved (an assign call is in flight, by listener `owner`), assigned, resolved (with '
  'attempt_id set: resolved while its call was in flight, settled when the call reports back; with late_service_id '
  'set: that call landed after the resolution and opened this service, counted on agent_id until its own '
  'resolution, or until the customer''s next session takes the count over as a held slot; late_landing_at: when such '
  'a call was counted), failed (attempts used up or refused by every agent), cancelled (waited longer than '
  'max_wait_seconds).';

--------------------------------------------------------------------------------------------------------------------
-- Small helpers every other file uses.
--------------------------------------------------------------------------------------------------------------------

-- A JSON number as a bigint; null for anything else (a string, a fraction, a value out of range), so that odd
-- input can never make a webhook fail here.
create function allocator.json_bigint(v jsonb)
returns bigint
language plpgsql immutable
as $$
declare
  n numeric;
begin
  -- plpgsql, not SQL: an inlined SQL CASE may be constant-folded, casting before the type is checked
  if jsonb_typeof(v) is distinct from 'number' then
    return null;
  end if;
  n := (v #>> '{}')::numeric;
  if n <> trunc(n) or n not between -9223372036854775808 and 9223372036854775807 then
    return null;
  end if;
  return n::bigint;
end;
$$;

-- Wake-up hints. NOTIFY only says "look again"; the listener re-reads the tables, so a lost hint costs a sweep
-- period at worst. PostgreSQL folds identical notifications of one transaction into one, and the payload (the
-- trigger's argument: room, agent, settings) only tells a reader of the log why it woke.
create function allocator.notify()
returns trigger
language plpgsql
as $$
begin
  perform pg_notify('allocator', tg_argv[0]);
  return null;
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Heads. While an old snapshot lives (a DBA's transaction left open, a long report, a replica with
-- hot_standby_feedback), no row version changed since can be cleaned, nor its index entries: a scan from the start
-- of the queue or of the free agents walked past every room served and every agent's earlier load, and the next
-- room cost more with each one served (a cold drain under a held snapshot fell from 478 to 75 rooms/s). So those
-- two scans start from a head: a position in the index before which no live entry lies, kept in a sequence, where
-- setval() is not transactional: every session sees a move at once, a rollback does not undo it, and no dead row
-- versions pile up behind it. Two rules keep a head true:
--   up:   only to the first live entry, found by a scan from the head (what it walks, it walks once rather than on
--         every reservation), and only while no writer that could put an entry behind it is in a transaction:
--         such writers hold the head's lock shared until they commit; the mover tries it exclusively (never
--         waits) and leaves the head where it is when it cannot have it (advance_queue_head, advance_agent_head);
--   down: whoever puts a live entry behind the head (a webhook whose transaction began before the last move, an
--         agent's load going down, a priority removed, a DBA's edit) moves the head back to it (lower_head), in
--         the same transaction, before anyone can see the entry.
-- A head too low costs a longer walk, once; a head too high would hide a room or an agent, so every way an entry
-- can appear behind it goes through the second rule (sessions_queued, queue_head_behind, agent_head_behind).
-- Locks: key (1367, 0) for the queue (the intake lock: every statement that inserts sessions takes it), (1367, 2)
-- for the agents, (1367, 3) for a move back.
--------------------------------------------------------------------------------------------------------------------

-- The head's position (0 until it first moves). (PL/pgSQL: it keeps its plan; a SQL function would be planned
-- anew on every call from PL/pgSQL.)
create function allocator.head_position(head regclass)
returns bigint
language plpgsql stable
as $$
begin
  return coalesce(pg_sequence_last_value(head), 0);
end;
$$;

-- Moves `head` back to `target` if it is further on. The caller holds the head's lock shared, so no move up runs
-- until it commits; and moves back run one at a time, so that two cannot cross (a session lock, held for three
-- statements: released even on error, as a session lock would otherwise outlive it).
create function allocator.lower_head(head regclass, target bigint)
returns void
language plpgsql
as $$
begin
  if target >= allocator.head_position(head) then
    return;
  end if;
  perform pg_advisory_lock(1367, 3);
  begin
    if target < allocator.head_position(head) then
      perform setval(head, greatest(target, 0));
    end if;
    perform pg_advisory_unlock(1367, 3);
  exception when others or query_canceled then
    perform pg_advisory_unlock(1367, 3);
    raise;
  end;
end;
$$;

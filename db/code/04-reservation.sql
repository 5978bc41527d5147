--------------------------------------------------------------------------------------------------------------------
-- Choosing and reserving: which room goes to which agent next.
--------------------------------------------------------------------------------------------------------------------

-- May agent `candidate` take waiting room `q` now, routes aside? Due (not backing off), not holding another
-- agent's slot, not refused by this agent, and not waiting to be retried with another agent that is free and may
-- serve it (after a failure the call may in fact have reached Qiscus, so the retry goes to the same agent when it
-- can: the repeat is then harmless, not a second agent; when routes or membership changed meanwhile so that it may
-- not serve the room any more, it cannot). Inlined into head_rooms' queries and reserve_next's lock.
create function allocator.takeable(q allocator.sessions, candidate bigint)
returns boolean
language sql stable
as $$
  select not q.holds_slot
     and q.next_attempt_at <= now()
     and candidate <> all (q.excluded_agents)
     and (q.last_agent_id is null or q.last_agent_id = candidate
          or not exists (select from allocator.agent_now(q.last_agent_id) e
                         where allocator.can_take_room(e)
                           and allocator.may_serve(q.division_ids, q.overflow_at, e.division_ids)))
$$;

-- Rooms whose route's overflow time has passed may go to anyone from now on: they move to the queue for anyone
-- (division_ids and overflow_at cleared). Rooms being reserved right now are left to the next call.
-- (PL/pgSQL, not SQL: it runs on every reserve(), and a SQL function called from PL/pgSQL is planned anew on
-- every call, while PL/pgSQL keeps its plans.)
create function allocator.overflow_due()
returns void
language plpgsql
as $$
begin
  update allocator.sessions s set division_ids = null, overflow_at = null, updated_at = now()
  where s.id in (select q.id from allocator.sessions q
                 where q.state = 'waiting' and q.overflow_at <= now()
                 for no key update skip locked);
end;
$$;

-- Records the reservation of locked room `s` for `agent`, whose slot the caller has already taken (or the room
-- already holds), under a lease, on behalf of listener `owner`.
create function allocator.reserve_for(s allocator.sessions, agent bigint, owner integer)
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
as $$
begin
  insert into allocator.attempts (session_id, agent_id, number)
  values (s.id, agent, s.attempts + 1)
  returning id into attempt_id;

  update allocator.sessions q
  set state = 'reserved', agent_id = agent, attempt_id = reserve_for.attempt_id, attempts = q.attempts + 1,
      holds_slot = false, uncertain = s.holds_slot, reserved_at = now(), updated_at = now(),
      lease_expires_at = now() + allocator.lease(), owner = reserve_for.owner
  where q.id = s.id
  returning q.id, q.room_id, q.attempts, q.lease_expires_at
  into reserve_for.session_id, reserve_for.room_id, reserve_for.attempt, reserve_for.lease_expires_at;

  reserve_for.agent_id := agent;
  return next;
end;
$$;

-- The queue head (see "Heads" in 00-basics.sql): no fresh room (never reserved, priority 0: nearly every room)
-- waits with queued_at before it. Scans of fresh rooms start there, not at the start of the queue where the rooms
-- served since lie; rooms reserved before (retries keep their place) and rooms with a priority are the rest of the
-- queue: few, in an index of their own (sessions_queue_rest). In microseconds since the epoch. (Written with
-- immutable parts only, so that it is inlined: extract(epoch from timestamptz) is marked stable, and an immutable
-- SQL function with a stable body is run as a function of its own, parsed and planned on every call: 23 us, on
-- every new session.)
create function allocator.queue_position(queued_at timestamptz)
returns bigint
language sql immutable
as $$ select (extract(epoch from queued_at - timestamptz 'epoch') * 1000000)::bigint $$;

create function allocator.queue_head()
returns timestamptz
language plpgsql stable  -- PL/pgSQL: it keeps its plan
as $$
begin
  return timestamptz 'epoch' + allocator.head_position('allocator.queue_head') * interval '1 microsecond';
end;
$$;

-- Moves the queue head up to the oldest fresh room, or to now when none waits: the rooms served since the last
-- move are walked once here instead of by every reservation. Every new session holds the intake lock (1367, 0)
-- shared until it commits (take_intake_lock, queue_head_behind): tried exclusively, so that the next statement's
-- snapshot sees every fresh room there is. Called by reserve(), through advance_heads().
create function allocator.advance_queue_head()
returns void
language plpgsql
as $$
declare
  front timestamptz;
begin
  -- A snapshot taken before the lock (REPEATABLE READ) would miss rooms committed just before it.
  if current_setting('transaction_isolation') <> 'read committed' or not pg_try_advisory_lock(1367, 0) then
    return;
  end if;
  begin
    front := coalesce((select q.queued_at from allocator.sessions q
                       where q.state = 'waiting' and q.priority = 0 and q.reserved_at is null
                         and q.queued_at >= allocator.queue_head()
                       order by q.priority desc, q.queued_at, q.id
                       limit 1),
                      clock_timestamp());
    if allocator.queue_position(front) > allocator.head_position('allocator.queue_head') then
      perform setval('allocator.queue_head', allocator.queue_position(front));
    end if;
    perform pg_advisory_unlock(1367, 0);
  exception when others or query_canceled then
    perform pg_advisory_unlock(1367, 0);  -- a session lock outlives the error: never leave intake blocked
    raise;
  end;
end;
$$;

-- A fresh room queued behind the head moves it back: a webhook whose transaction began before the last move
-- (queued_at is the transaction's start), a room whose priority was removed, one a DBA moved forward. The caller
-- holds the intake lock shared (see advance_queue_head). Rare: the usual new room is queued after the head.
create function allocator.queue_fresh_room(queued_at timestamptz)
returns void
language plpgsql
as $$
begin
  if allocator.queue_position(queued_at) < allocator.head_position('allocator.queue_head') then
    perform allocator.lower_head('allocator.queue_head', allocator.queue_position(queued_at));
  end if;
end;
$$;

-- An open room that becomes fresh again (a new session: sessions_queued, 03-intake.sql).
create function allocator.queue_head_behind()
returns trigger
language plpgsql
as $$
begin
  perform pg_advisory_xact_lock_shared(1367, 0);
  perform allocator.queue_fresh_room(new.queued_at);
  return new;
end;
$$;

create trigger queue_head_behind
  before update of state, reserved_at, priority, queued_at on allocator.sessions
  for each row
  when (new.state = 'waiting' and new.reserved_at is null and new.priority = 0
        and (old.state <> 'waiting' or old.reserved_at is not null or old.priority <> 0
             or new.queued_at < old.queued_at))
  execute function allocator.queue_head_behind();

-- Moves both heads up, at most every 100 ms per connection: each move costs about 0.2 ms (a tried lock, a
-- subtransaction, a setval), a fifth of a busy reserve() when done on every call, while what a head left behind
-- for 100 ms costs a later scan only the entries of the rooms served meanwhile. Called by reserve().
create function allocator.advance_heads()
returns void
language plpgsql
as $$
begin
  if clock_timestamp() < coalesce(nullif(current_setting('allocator.heads_moved_at', true), '')::timestamptz,
                                  '-infinity') + interval '100 ms' then
    return;
  end if;
  perform allocator.advance_queue_head();
  perform allocator.advance_agent_head();
  perform set_config('allocator.heads_moved_at', clock_timestamp()::text, false);
end;
$$;

-- How many fresh rooms (never reserved, no priority) after the queue head are due, counted up to `n`: one read of
-- sessions_fresh from the head. (PL/pgSQL: it keeps its plans. Each probe here is written to read one index from
-- its start: with a long queue the planner would turn an EXISTS into a sequential scan that reads the whole
-- history.)
create function allocator.fresh_rooms_due(n integer)
returns integer
language plpgsql stable
as $$
begin
  return (select count(*) from (select from allocator.sessions q
                                where q.state = 'waiting' and q.priority = 0 and q.reserved_at is null
                                  and q.queued_at >= allocator.queue_head() and q.next_attempt_at <= now()
                                order by q.priority desc, q.queued_at, q.id
                                limit n) f);
end;
$$;

-- Is any waiting room due (not backing off)? A fresh room after the head, or any of the rest (retries, rooms
-- with a priority, rooms holding a slot) whose time has come: the first entry of sessions_due.
create function allocator.room_due()
returns boolean
language plpgsql stable
as $$
begin
  return allocator.fresh_rooms_due(1) > 0
      or coalesce((select min(q.next_attempt_at) from allocator.sessions q
                   where q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)) <= now(), false);
end;
$$;

-- How many rooms are due and hold no slot, counted up to `n`: fresh rooms after the queue head, then the rest in
-- the order their time came (sessions_due: only the due entries are read, however many rooms back off).
-- reserve_batch asks for no more agents than this, so that one room does not read and lock a whole batch of agents:
-- under an old snapshot the agents past the first few lie behind every version their load had since
-- (agents_accepting_by_load), so reading 64 candidates for one room walked 7,000 buffers with 20 agents and 20,000
-- rooms served.
create function allocator.rooms_due(n integer)
returns integer
language plpgsql stable
as $$
declare
  fresh integer := allocator.fresh_rooms_due(n);
begin
  if fresh = n then
    return n;
  end if;
  return fresh + (select count(*) from (select from allocator.sessions q
                                        where q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)
                                          and q.next_attempt_at <= now() and not q.holds_slot
                                        order by q.next_attempt_at
                                        limit n - fresh) r);
end;
$$;

-- May room `q` of the rest of the queue (retries, rooms with a priority) be among head_rooms' answer: routed to
-- anyone or to one of `divisions`, holding no slot, due, takeable by `candidate` (if given), not in `skipped`.
-- Inlined.
create function allocator.rest_room_fits(q allocator.sessions, divisions bigint[], candidate bigint,
                                         skipped bigint[])
returns boolean
language sql stable
as $$
  select (q.division_ids is null or q.division_key = any (divisions))
     and not q.holds_slot and q.next_attempt_at <= now()
     and (candidate is null or allocator.takeable(q, candidate)) and q.id <> all (skipped)
$$;

-- head_rooms' part of the rest of the queue: the first `n` in queue order that fit (rest_room_fits). Retries that
-- back off keep their place in the queue, so a read in queue order walks every one of them ahead of the first room
-- due: after a burst answered 429, 3,000 of them cost every reservation 6,000 buffers. So when few are due (at most
-- `few`: one read of sessions_due, in the order their time came, finds them all) those are read and sorted; when
-- many are due, the walk in queue order finds them among few that are not. Either way the answer is exact.
-- (PL/pgSQL: it keeps its plans, and chooses between the two.)
create function allocator.rest_rooms(n integer, divisions bigint[], candidate bigint, skipped bigint[])
returns table (id bigint, priority integer, queued_at timestamptz)
language plpgsql stable
as $$
declare
  few constant integer := 128;
  due bigint[] := array(select q.id from allocator.sessions q
                        where q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)
                          and q.next_attempt_at <= now()
                        order by q.next_attempt_at
                        limit few + 1);
begin
  if cardinality(due) <= few then
    return query
    select q.id, q.priority, q.queued_at
    from allocator.sessions q
    where q.id = any (due) and q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)
      and allocator.rest_room_fits(q, divisions, candidate, skipped)
    order by q.priority desc, q.queued_at, q.id
    limit n;
  else
    return query
    select q.id, q.priority, q.queued_at
    from allocator.sessions q
    where q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)
      and allocator.rest_room_fits(q, divisions, candidate, skipped)
    order by q.priority desc, q.queued_at, q.id
    limit n;
  end if;
end;
$$;

-- The first `n` waiting rooms in queue order that are due, hold no slot, are routed to anyone or to one of
-- `divisions`, and (`candidate` given) that agent may take (takeable), leaving out `skipped`. Read unlocked: the
-- caller locks what it takes. The queue is read in parts, each from an index of its own, so that no scan walks
-- over rooms it may not take, nor over rooms served since the queue head: fresh rooms for anyone, fresh rooms of
-- each division, the rest (retries, rooms with a priority: rest_rooms), and rooms routed to several divisions
-- (few: filtered on the divisions). Inlined into the caller's statement.
create function allocator.head_rooms(n integer, divisions bigint[], candidate bigint, skipped bigint[])
returns table (id bigint, priority integer, queued_at timestamptz)
language sql stable
as $$
  select c.id, c.priority, c.queued_at
  from ((select q.id, q.priority, q.queued_at
         from allocator.sessions q
         where q.state = 'waiting' and q.division_ids is null and q.priority = 0 and q.reserved_at is null
           and q.queued_at >= allocator.queue_head() and q.next_attempt_at <= now() and q.id <> all (skipped)
         order by q.priority desc, q.queued_at, q.id
         limit n)
        union all
        (select f.id, f.priority, f.queued_at
         from unnest(divisions) d(id)
         cross join lateral (select q.id, q.priority, q.queued_at
                             from allocator.sessions q
                             where q.state = 'waiting' and q.division_key = d.id and q.priority = 0
                               and q.reserved_at is null and q.queued_at >= allocator.queue_head()
                               and q.next_attempt_at <= now() and q.id <> all (skipped)
                             order by q.priority desc, q.queued_at, q.id
                             limit n) f)
        union all
        (select r.id, r.priority, r.queued_at from allocator.rest_rooms(n, divisions, candidate, skipped) r)
        union all
        (select q.id, q.priority, q.queued_at
         from allocator.sessions q
         where q.state = 'waiting' and q.division_ids is not null and q.division_key is null
           and q.division_ids && divisions and not q.holds_slot and q.next_attempt_at <= now()
           and (candidate is null or allocator.takeable(q, candidate)) and q.id <> all (skipped)
         order by q.priority desc, q.queued_at, q.id
         limit n)) c
  order by c.priority desc, c.queued_at, c.id
  limit n
$$;

-- Reserves up to `batch` assignments in one round trip, for listener `owner` (see listener_alive: if that listener
-- dies, its reservations are rescued at once instead of at the end of the lease). Returns no row when nothing can
-- be assigned now. The caller then calls Qiscus for each and reports back (confirm, fail_*, release_reservation;
-- or report() for many) before the lease ends.
-- Three steps, each a complete rule on its own: rooms holding a slot go back to their agent first (reserve_held);
-- then a batch of free agents is paired with a batch of rooms in a few set-based statements (reserve_batch: the
-- fast path of a busy queue); then one room at a time (reserve_next), which finds whatever the batch step could
-- not pair (a room that must wait for its last agent, a room routed further down the queue, an agent's second
-- free slot).
create function allocator.reserve(owner integer default null, batch integer default 1)
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
set enable_seqscan = off set enable_bitmapscan = off  -- see "Plans" in 00-basics.sql
set plan_cache_mode = force_generic_plan
as $$
declare
  taken integer := 0;
  got   integer;
begin
  perform allocator.advance_heads();
  if not allocator.room_due() then
    return;
  end if;
  perform allocator.overflow_due();
  -- While Qiscus is down, only its probe goes out: one call (see 09-qiscus-health.sql).
  if not allocator.may_call_qiscus() then
    return;
  end if;
  if exists (select from allocator.qiscus_health h where h.down_since is not null) then
    batch := 1;
  end if;
  while taken < batch loop
    return query select * from allocator.reserve_held(owner);
    get diagnostics got = row_count;
    exit when got = 0;
    taken := taken + 1;
  end loop;
  if taken < batch then
    return query select * from allocator.reserve_batch(owner, batch - taken);
    get diagnostics got = row_count;
    taken := taken + got;
  end if;
  -- One room at a time only while a room is still due: reserve_next walks every free agent before it says "none"
  -- (10,000 agents: 0.3 s), which the usual end of a call (the batch took the last rooms) must not pay.
  while taken < batch and allocator.room_due() loop
    return query select * from allocator.reserve_next(owner);
    get diagnostics got = row_count;
    exit when got = 0;
    taken := taken + 1;
  end loop;
  -- Another caller's reservation held an agent we passed over: it may leave a room that agent can take when it
  -- commits, and the caller that gave up would not look again. Wake the listeners after our commit.
  if current_setting('allocator.contended', true) = 'on' then
    perform pg_notify('allocator', 'room');
  end if;
end;
$$;

-- A room holding a slot goes back to its agent first: no slot to find, and the repeat is harmless if the earlier
-- call did reach Qiscus. The agent need only be online, not accepting: a paused agent keeps the retry of a room it
-- may already have. A held room whose agent went offline or vanished lets the slot go and queues like any other
-- (still preferring that agent, see takeable); then the next held room is looked at, so that one such room never
-- hides another that could go now. No row when no held room is due.
create function allocator.reserve_held(owner integer)
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
as $$
declare
  s allocator.sessions;
begin
  loop
    select q.* into s
    from allocator.sessions q
    where q.state = 'waiting' and q.holds_slot and q.next_attempt_at <= now()
    order by q.next_attempt_at, q.id
    limit 1
    for no key update of q skip locked;
    exit when s.id is null;
    if (allocator.agent_now(s.agent_id)).online then
      return query select * from allocator.reserve_for(s, s.agent_id, owner);
      return;
    end if;
    perform allocator.let_go_slot(s);  -- its call may still land
    update allocator.sessions q set holds_slot = false, uncertain = false, updated_at = now() where q.id = s.id;
  end loop;
end;
$$;

-- Up to `batch` assignments in a handful of statements, whatever the batch size: the best free agents
-- (agent_preference, locked, each at most once) paired in order with the oldest rooms they may take (takeable,
-- may_serve), locked, so that the oldest room goes to the best agent that may serve it. Rooms and agents another
-- reservation holds right now are passed over (SKIP LOCKED), as in reserve_next; a room the batch cannot pair (it
-- waits for its last agent, excludes the agents locked here, or is routed to none of them) is left for
-- reserve_next, which looks further.
create function allocator.reserve_batch(owner integer, batch integer)
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
as $$
declare
  candidates bigint[];
  agents     allocator.agents[];
  places     tid[];             -- where each of `agents` is (its latest version, locked)
  divisions  bigint[];
  routing    boolean;
  rooms      allocator.sessions[];
  heads      bigint[];
  s          allocator.sessions;
  pair_rooms bigint[] := '{}';
  paired     bigint[] := '{}';  -- the agent of each room in pair_rooms
  slots      tid[] := '{}';     -- where each agent of `paired` is
  choice     integer;           -- the index in `agents` of the agent chosen for a room
  i          integer;
  -- What other callers' batches may hold right now: two listeners' pipelines at the shipped LISTENER_CONCURRENCY
  -- (32; it was four at 16). A pass that came up short reads this much further (see below).
  others     constant integer := 64;
begin
  -- No more agents than rooms to pair (see rooms_due).
  batch := least(batch, allocator.rooms_due(batch));
  if batch = 0 then
    return;
  end if;
  -- Twice as many candidates as places: some may be locked by another reservation right now. If those leave us
  -- short while more agents are free, read once more, further down. Without that, a batch that asked while a
  -- bigger one held the first agents (or, below, the first rooms) went one room at a time (reserve_next, 2.5 ms a
  -- room): with two listeners draining together, one room in ten, and a third more PostgreSQL time per room.
  for pass in 1 .. 2 loop
    candidates := array(select p.id from allocator.agent_preference() p limit 2 * batch + (pass - 1) * others);
    if cardinality(candidates) = 0 then
      return;
    end if;
    -- Lock the first `batch` that are still free on their latest version, in order of preference, with the place
    -- of that version for the slot update below.
    select coalesce(array_agg(f.agent order by f.k), '{}'), coalesce(array_agg(f.place order by f.k), '{}')
    into agents, places
    from allocator.lock_free_agents(candidates, batch) with ordinality f(agent, place, k);
    if cardinality(agents) < least(batch, cardinality(candidates)) then
      perform set_config('allocator.contended', 'on', true);  -- see reserve()
    end if;
    exit when cardinality(agents) = batch or cardinality(candidates) < 2 * batch;
  end loop;
  if cardinality(agents) = 0 then
    return;
  end if;

  -- The rooms to pair, oldest first: the head of the rooms these agents may take (head_rooms), twice as many as
  -- there are agents (some may be held by another reservation right now). Without routes, any agent may take
  -- nearly any of them: locked as they are read. With routes, read unlocked, and each locked only once an agent
  -- is found for it, so that no room is held that this batch cannot pair.
  routing := exists (select from allocator.routes);
  divisions := array(select distinct d from unnest(agents) x, unnest(x.division_ids) d);
  if not routing then
    -- The same second pass as for the agents above, when another batch holds the head of the queue.
    for pass in 1 .. 2 loop
      heads := array(select h.id from allocator.head_rooms(2 * cardinality(agents) + (pass - 1) * others, divisions,
                                                           null, '{}') h);
      rooms := array(select q from allocator.sessions q
                     where q.id = any (heads)
                       and q.state = 'waiting' and not q.holds_slot and q.next_attempt_at <= now()
                     order by q.priority desc, q.queued_at, q.id
                     limit cardinality(agents)
                     for no key update of q skip locked);
      exit when cardinality(rooms) = cardinality(agents) or cardinality(heads) < 2 * cardinality(agents);
    end loop;
  else
    rooms := array(select q from allocator.sessions q
                   where q.id = any (array(select h.id from allocator.head_rooms(2 * cardinality(agents), divisions,
                                                                                  null, '{}') h))
                   order by q.priority desc, q.queued_at, q.id);
  end if;

  -- Pair in memory: each room, oldest first, with the best agent left that may take it.
  foreach s in array rooms loop
    exit when cardinality(paired) = cardinality(agents);
    choice := null;
    for i in 1 .. cardinality(agents) loop
      continue when agents[i].id = any (paired)
                 or not allocator.may_serve(s.division_ids, s.overflow_at, agents[i].division_ids);
      if (s.excluded_agents = '{}' and s.last_agent_id is null) or allocator.takeable(s, agents[i].id) then
        choice := i;
        exit;
      end if;
    end loop;
    continue when choice is null;
    if routing then
      -- Read unlocked: lock it now, and pair it only if nothing the choice rests on has changed meanwhile.
      select q.* into s from allocator.sessions q
      where q.id = s.id and q.state = 'waiting' and not q.holds_slot and q.next_attempt_at <= now()
        and q.division_ids is not distinct from s.division_ids and q.overflow_at is not distinct from s.overflow_at
        and q.excluded_agents = s.excluded_agents and q.last_agent_id is not distinct from s.last_agent_id
      for no key update of q skip locked;
      continue when not found;
    end if;
    pair_rooms := pair_rooms || s.id;
    paired := paired || agents[choice].id;
    slots := slots || places[choice];
  end loop;
  if cardinality(paired) = 0 then
    return;
  end if;

  -- The slots, each agent once, by the place of its latest version. Every agent is locked and was free on that
  -- version, so each is taken; the guard and its trigger still stand behind it.
  if allocator.take_slots(slots) <> cardinality(paired) then
    raise exception 'reserve_batch: not every slot of % taken', cardinality(paired);
  end if;

  return query
  with pairs as (
    select p.session_id, p.agent_id from unnest(pair_rooms, paired) p(session_id, agent_id)
  ), new_attempts as (
    insert into allocator.attempts (session_id, agent_id, number)
    select p.session_id, p.agent_id, q.attempts + 1
    from pairs p join allocator.sessions q on q.id = p.session_id
    returning id, attempts.session_id, attempts.agent_id
  )
  update allocator.sessions q
  set state = 'reserved', agent_id = n.agent_id, attempt_id = n.id, attempts = q.attempts + 1,
      holds_slot = false, uncertain = false, reserved_at = now(), updated_at = now(),
      lease_expires_at = now() + allocator.lease(), owner = reserve_batch.owner
  from new_attempts n
  where q.id = n.session_id
  returning n.id, q.id, q.room_id, n.agent_id, q.attempts, q.lease_expires_at;
end;
$$;

-- The next assignment: the best free agent (agent_preference) and the oldest waiting room that can take it.
-- Agent first, then room: concurrent callers each lock a different agent (SKIP LOCKED) and then each take the
-- oldest room nobody else holds, so rooms leave the queue in arrival order even under contention, and a caller
-- that finds no free agent returns at once without touching the queue. No row when nothing can be assigned now.
create function allocator.reserve_next(owner integer)
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
as $$
declare
  candidates refcursor;
  candidate  bigint;
  divisions  bigint[];
  s          allocator.sessions;
  routing    boolean := exists (select from allocator.routes);  -- no route: no waiting room is routed
  best       bigint;
  skipped    bigint[];
begin
  -- An explicit cursor fetches one agent at a time (a FOR-IN loop would read ten ahead).
  open candidates for select p.id from allocator.agent_preference() p;
  loop
    fetch candidates into candidate;
    exit when not found;

    -- Lock the agent, or move on if another reservation holds it right now. The check runs on the row's latest
    -- version (the cursor's snapshot may be older), so a room is only taken below once a slot is certain.
    select (f.agent).division_ids into divisions from allocator.lock_free_agents(array[candidate], 1) f;
    if not found then
      -- Skipped because another reservation holds it? Then that one may leave rooms this agent could take: say
      -- so, and reserve() wakes everyone once it commits.
      if allocator.can_take_room(allocator.agent_now(candidate)) then
        perform set_config('allocator.contended', 'on', true);
      end if;
      continue;
    end if;

    -- The oldest room this agent can take (head_rooms), locked, or, if another reservation holds it right now,
    -- passed over for the next.
    s := null;
    skipped := '{}';
    loop
      select h.id into best from allocator.head_rooms(1, divisions, candidate, skipped) h;
      exit when best is null;
      select q.* into s from allocator.sessions q
      where q.id = best and q.state = 'waiting' and allocator.takeable(q, candidate)
        and allocator.may_serve(q.division_ids, q.overflow_at, divisions)
      for no key update of q skip locked;
      exit when s.id is not null;
      skipped := skipped || best;
    end loop;
    -- Nothing this agent may take, and no routes: another agent may take only a room this one may not (one that
    -- refused this agent, or waits for its own last agent). None such is due: nobody will find one, so stop here
    -- rather than lock every free agent in turn (10,000 agents and one room another caller holds: 4 s).
    if s.id is null and not routing
       and not exists (select from allocator.sessions q
                       where q.state = 'waiting' and (q.reserved_at is not null or q.priority <> 0)
                         and q.next_attempt_at <= now() and not q.holds_slot
                         and (q.excluded_agents <> '{}' or q.last_agent_id is not null)) then
      close candidates;
      return;
    end if;
    continue when s.id is null;

    -- agent_preference() may be a DBA's own rule: its answer still has to pass the guarded update.
    continue when not allocator.take_slot(candidate);

    close candidates;
    return query select * from allocator.reserve_for(s, candidate, owner);
    return;
  end loop;
  close candidates;
end;
$$;

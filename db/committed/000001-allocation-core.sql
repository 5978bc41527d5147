--! Previous: -
--! Hash: sha1:d653da38a9f392c7012ba97f44efa8340f719014
--! Message: allocation core

--------------------------------------------------------------------------------------------------------------------
-- The allocation core. Every decision about which room goes to which agent is made here, in SQL, so that any
-- number of web and listener processes can share one database and an agent can never exceed its capacity.
--
-- Shape of the data:
--   settings   tunables a DBA may change at any time (read on every call, so a change applies at once)
--   agents     one row per Qiscus agent; `load` is the number of rooms we hold open for it, guarded by a trigger
--   sessions   one row per (room, customer session); explicit states with one timestamp per transition
--   attempts   one row per reservation: who was tried, how it ended, why
--   webhooks   every accepted webhook, raw, with its arrival time and what it did
--
-- Life of a session:
--   waiting ──reserve()──▶ reserved ──confirm()──▶ assigned ──resolve──▶ resolved
--      ▲                      │
--      └──fail_transient() / fail_for_agent() / release() / rescue_expired()
--   After a failure that Qiscus may have acted on anyway (timeout, 5xx, expired lease) the waiting room keeps its
--   agent's slot (holds_slot) and goes back to that agent first: a repeat is harmless, a second agent is not.
--   waiting|reserved ──(too many attempts, or refused by every agent)──▶ failed
--   waiting|reserved|assigned ──resolution webhook──▶ resolved
--------------------------------------------------------------------------------------------------------------------

create schema allocator;
comment on schema allocator is 'Qiscus agent allocator: queue, agents and the functions that assign rooms.';

--------------------------------------------------------------------------------------------------------------------
-- Settings
--------------------------------------------------------------------------------------------------------------------

create table allocator.settings (
  key         text primary key,
  value       text not null,
  description text
);
comment on table allocator.settings is 'Tunables, read on every call: an UPDATE here applies to the next reservation.';

insert into allocator.settings (key, value, description) values
  ('default_max_load',   '2',  'rooms an agent may hold at once unless agents.max_load says otherwise'),
  ('lease_seconds',      '60', 'how long a reservation may stay unconfirmed before rescue_expired() puts it back'),
  ('retry_base_seconds', '2',  'first backoff after a transient failure; doubles per attempt'),
  ('retry_max_seconds',  '300','cap of the backoff'),
  ('max_attempts',       '8',  'reservations of one session before it ends as failed');

-- Typed reads. A missing or unparsable value falls back to the default given, so a DBA typo cannot stop allocation.
create function allocator.setting_int(setting_key text, fallback integer)
returns integer
language sql stable
as $$
  select coalesce(
    (select case when value ~ '^\s*-?\d{1,9}\s*$' then value::integer end
       from allocator.settings where key = setting_key),
    fallback);
$$;

create function allocator.setting_num(setting_key text, fallback numeric)
returns numeric
language sql stable
as $$
  select coalesce(
    (select case when value ~ '^\s*\d{1,9}(\.\d{1,6})?\s*$' then value::numeric end
       from allocator.settings where key = setting_key),
    fallback);
$$;

create function allocator.default_max_load()
returns integer
language sql stable
as $$ select allocator.setting_int('default_max_load', 2) $$;

--------------------------------------------------------------------------------------------------------------------
-- Agents
--------------------------------------------------------------------------------------------------------------------

create table allocator.agents (
  id               bigint primary key,                    -- Qiscus agent id
  name             text not null default '',
  email            text,
  type             text not null default 'agent',         -- Qiscus type_as_string; only 'agent' serves rooms
  is_available     boolean not null default true,         -- Qiscus is_available
  force_offline    boolean not null default false,        -- Qiscus force_offline
  present          boolean not null default true,         -- false once the agent vanished from Qiscus's roster
  paused           boolean not null default false,        -- a DBA's pause, without touching Qiscus
  max_load         integer check (max_load >= 0),         -- null: settings.default_max_load
  load             integer not null default 0 check (load >= 0),          -- rooms we reserved or assigned, open
  external_load    integer not null default 0 check (external_load >= 0), -- rooms Qiscus shows that we did not assign
  external_seen    integer not null default 0,            -- external count computed by the last sync (see sync_agents)
  external_hold_until timestamptz,                        -- external_load may not fall before a pull started after this
  qiscus_load      integer,                               -- Qiscus current_customer_count at the last sync
  last_assigned_at timestamptz,                           -- tie-break: longest idle agent first
  synced_at        timestamptz,
  created_at       timestamptz not null default now()
);
comment on column allocator.agents.load is
  'Rooms this service holds open for the agent (reserved + assigned + waiting with holds_slot). Changed only by '
  'the allocator functions; '
  'a trigger refuses any increase beyond capacity.';
comment on column allocator.agents.external_load is
  'Rooms Qiscus shows the agent holding that we did not assign (assigned by hand), from the last roster sync.';

-- Capacity of one agent. Inlined by the planner where it is used in a query.
create function allocator.capacity(max_load integer)
returns integer
language sql stable
as $$ select coalesce(max_load, allocator.default_max_load()) $$;

-- The guard that nothing can bypass: whatever code (or person) raises an agent's load, the row is refused when
-- it would carry more rooms than the agent's capacity. The allocator's own update already checks, so this only
-- fires on a bug or a hand-written UPDATE.
create function allocator.guard_capacity()
returns trigger
language plpgsql
as $$
begin
  if new.load + new.external_load > allocator.capacity(new.max_load) then
    raise exception 'agent % would hold % rooms, capacity is %',
      new.id, new.load + new.external_load, allocator.capacity(new.max_load)
      using errcode = 'check_violation';
  end if;
  return new;
end;
$$;

create trigger guard_capacity
  before update of load on allocator.agents
  for each row when (new.load > old.load)
  execute function allocator.guard_capacity();

-- Agents that may take one more room right now.
create view allocator.eligible_agents as
  select a.*
  from allocator.agents a
  where a.type = 'agent'
    and a.present
    and a.is_available
    and not a.force_offline
    and not a.paused
    and a.load + a.external_load < coalesce(a.max_load, (select allocator.default_max_load()));
comment on view allocator.eligible_agents is 'Agents online, not paused, and below capacity: who can take a room now.';

-- Walking online agents from the least loaded one makes agent_preference() an index scan, however many agents
-- there are.
create index agents_online_by_load on allocator.agents ((load + external_load), last_assigned_at nulls first, id)
  where type = 'agent' and present and is_available and not force_offline and not paused;

-- The largest capacity any agent has: the default or the biggest per-agent max_load (one probe of agents_max_load).
create index agents_max_load on allocator.agents (max_load) where max_load is not null;

create function allocator.max_capacity()
returns integer
language sql stable
as $$
  select greatest(allocator.default_max_load(),
                  coalesce((select max(a.max_load) from allocator.agents a where a.max_load is not null), 0))
$$;

--------------------------------------------------------------------------------------------------------------------
-- Webhooks, sessions, attempts
--------------------------------------------------------------------------------------------------------------------

create table allocator.webhooks (
  id          bigint generated always as identity primary key,
  kind        text not null check (kind in ('new_request', 'close_request')),
  room_id     text not null,
  received_at timestamptz not null default now(),
  request_id  text,                  -- the HTTP request id, to follow one webhook from the log to this row
  outcome     text not null,         -- what applying it did: queued, already_queued, resolved, unknown_room, ...
  session_id  bigint,
  payload     jsonb not null         -- exactly what Qiscus sent
);
comment on table allocator.webhooks is 'Every accepted webhook, raw, with what it did. Written in the same transaction '
  'as its effect, so a webhook is either here and applied, or was never acknowledged.';
create index webhooks_room on allocator.webhooks (room_id, id);
create index webhooks_received_at on allocator.webhooks (received_at);

create type allocator.session_state as enum ('waiting', 'reserved', 'assigned', 'resolved', 'failed', 'cancelled');

create table allocator.sessions (
  id               bigint generated always as identity primary key,
  room_id          text not null,
  state            allocator.session_state not null default 'waiting',
  source           text,                     -- Qiscus channel source (qiscus, wa, line, ...)
  priority         integer not null default 0,       -- higher first; equal priority in arrival order
  prior_service_id bigint,                   -- latest_service.id of the opening webhook: tells a repeat from a new session
  service_id       bigint,                   -- Qiscus service id, from the assign answer or the resolution
  agent_id         bigint references allocator.agents (id),  -- reserved/assigned agent; kept afterwards as history
  attempt_id       bigint,                   -- the current reservation (attempts.id) while reserved
  attempts         integer not null default 0,       -- reservations made so far
  excluded_agents  bigint[] not null default '{}',   -- agents Qiscus refused for this room: never tried again
  holds_slot       boolean not null default false, -- waiting, but still counted on agent_id: see requeue()
  uncertain        boolean not null default false, -- a call for agent_id may have reached Qiscus: see requeue()
  last_agent_id    bigint,                   -- agent of the last failed try: preferred for the retry
  last_error       text,
  next_attempt_at  timestamptz not null default now(),   -- backoff: not reserved before this
  lease_expires_at timestamptz,              -- while reserved: rescue_expired() puts it back after this
  queued_at        timestamptz not null default now(),   -- arrival: the queue order, kept across retries
  reserved_at      timestamptz,
  assigned_at      timestamptz,
  resolved_at      timestamptz,
  failed_at        timestamptz,
  cancelled_at     timestamptz,
  updated_at       timestamptz not null default now(),
  constraint reserved_has_lease check (state <> 'reserved' or (agent_id is not null and attempt_id is not null
                                                                 and lease_expires_at is not null)),
  constraint assigned_has_agent check (state <> 'assigned' or agent_id is not null),
  constraint hold_is_waiting check (not holds_slot or (state = 'waiting' and agent_id is not null))
);
comment on table allocator.sessions is 'One row per customer session in a room. A room has at most one open session '
  '(waiting, reserved or assigned); a returning customer opens a new one.';

-- At most one open session per room: repeated allocation webhooks cannot queue a room twice.
create unique index sessions_one_open_per_room on allocator.sessions (room_id)
  where state in ('waiting', 'reserved', 'assigned');
create index sessions_room on allocator.sessions (room_id, id);
-- The queue, in the order it is served.
create index sessions_queue on allocator.sessions (priority desc, queued_at, id) where state = 'waiting';
-- "Is anything due at all?" in one probe.
create index sessions_due on allocator.sessions (next_attempt_at) where state = 'waiting';
-- Rescue of expired leases (reserved rooms, and rooms resolved while their call was in flight).
create index sessions_leases on allocator.sessions (lease_expires_at) where lease_expires_at is not null;
-- Rooms holding a slot after an ambiguous failure: retried first, with their agent.
create index sessions_held on allocator.sessions (next_attempt_at) where state = 'waiting' and holds_slot;
-- Open rooms per agent (load checks, roster sync).
create index sessions_open_by_agent on allocator.sessions (agent_id) where state in ('reserved', 'assigned');

create table allocator.attempts (
  id               bigint generated always as identity primary key,
  session_id       bigint not null references allocator.sessions (id) on delete cascade,
  agent_id         bigint not null references allocator.agents (id),
  number           integer not null,         -- 1 for the session's first reservation, 2 for the next, ...
  reserved_at      timestamptz not null default now(),
  finished_at      timestamptz,
  outcome          text check (outcome in ('assigned', 'transient', 'refused', 'expired', 'released', 'resolved', 'stale')),
  error            text
);
comment on table allocator.attempts is 'One row per reservation of a room for an agent, and how it ended.';
create index attempts_session on allocator.attempts (session_id);

--------------------------------------------------------------------------------------------------------------------
-- Wake-up hints. NOTIFY only says "look again"; the listener re-reads the tables, so a lost hint costs a sweep
-- period at worst. PostgreSQL folds identical notifications of one transaction into one.
--------------------------------------------------------------------------------------------------------------------

create function allocator.notify_room_waiting()
returns trigger
language plpgsql
as $$
begin
  perform pg_notify('allocator', 'room');
  return null;
end;
$$;

create trigger notify_room_waiting
  after insert or update of state, next_attempt_at on allocator.sessions
  for each row when (new.state = 'waiting' and new.next_attempt_at <= now())
  execute function allocator.notify_room_waiting();

create function allocator.notify_agent_free()
returns trigger
language plpgsql
as $$
begin
  perform pg_notify('allocator', 'agent');
  return null;
end;
$$;

-- Fires when an agent may have gained a free slot: a new agent, load down, capacity changed, back online or
-- unpaused. Not on load going up: a reservation is no news, and NOTIFY serialises commits.
create trigger notify_agent_added
  after insert on allocator.agents
  for each row
  when (new.type = 'agent' and new.present and new.is_available and not new.force_offline and not new.paused)
  execute function allocator.notify_agent_free();

create trigger notify_agent_free
  after update on allocator.agents
  for each row
  when (new.type = 'agent' and new.present and new.is_available and not new.force_offline and not new.paused
        and (new.load + new.external_load < old.load + old.external_load
             or new.max_load is distinct from old.max_load
             or not (old.type = 'agent' and old.present and old.is_available and not old.force_offline
                     and not old.paused)))
  execute function allocator.notify_agent_free();

create function allocator.notify_settings()
returns trigger
language plpgsql
as $$
begin
  perform pg_notify('allocator', 'settings');
  return null;
end;
$$;

create trigger notify_settings
  after insert or update or delete on allocator.settings
  for each statement
  execute function allocator.notify_settings();

--------------------------------------------------------------------------------------------------------------------
-- Webhooks in
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

-- Serialises all work on one room (webhooks of both kinds), so "is there an open session?" and "open one" cannot
-- interleave. Transaction-scoped: released at commit.
create function allocator.lock_room(room text)
returns void
language sql
as $$ select pg_advisory_xact_lock(1364, hashtext(room)) $$;

-- Custom Agent Allocation webhook. Qiscus sends it on every customer message while the room has no agent, so
-- most calls are repeats and must change nothing.
--   queued            a new waiting session was opened (new or returning customer)
--   already_queued    the room is already waiting
--   already_assigned  the room is reserved or assigned
--   duplicate         a late copy of a webhook that opened one of the room's sessions, since resolved
create function allocator.accept_new_request(payload jsonb, request_id text default null)
returns table (outcome text, session_id bigint, webhook_id bigint)
language plpgsql
as $$
declare
  room      text   := nullif(btrim(payload ->> 'room_id'), '');
  prior     bigint := allocator.json_bigint(payload -> 'latest_service' -> 'id');
  last      allocator.sessions;
  v_outcome text;
  v_session bigint;
begin
  if room is null then
    raise exception 'room_id is required' using errcode = 'invalid_parameter_value';
  end if;
  perform allocator.lock_room(room);

  select * into last from allocator.sessions s where s.room_id = room order by s.id desc limit 1;

  if last.state in ('waiting') then
    v_outcome := 'already_queued';
    v_session := last.id;
  elsif last.state in ('reserved', 'assigned') then
    v_outcome := 'already_assigned';
    v_session := last.id;
  elsif exists (select from allocator.sessions r
                where r.room_id = room and r.state = 'resolved' and r.prior_service_id is not distinct from prior) then
    -- Same latest_service as the webhook that opened a session since resolved: a redelivery, not a new customer
    -- message (a returning customer's webhook names the service that was just resolved, which no earlier session
    -- was opened after).
    v_outcome := 'duplicate';
    select r.id into v_session from allocator.sessions r
    where r.room_id = room and r.state = 'resolved' and r.prior_service_id is not distinct from prior
    order by r.id desc limit 1;
  else
    insert into allocator.sessions (room_id, source, prior_service_id)
    values (room, nullif(payload ->> 'source', ''), prior)
    returning id into v_session;
    v_outcome := 'queued';
  end if;

  insert into allocator.webhooks (kind, room_id, request_id, outcome, session_id, payload)
  values ('new_request', room, request_id, v_outcome, v_session, payload)
  returning id into webhook_id;

  outcome := v_outcome;
  session_id := v_session;
  return next;
end;
$$;

-- Frees an agent's slot. The caller holds the session row; this is the only place load goes down.
create function allocator.release_slot(agent bigint)
returns void
language sql
as $$ update allocator.agents set load = load - 1 where id = agent $$;

-- Mark-as-Resolved webhook: closes the room's open session and frees its agent's slot, whatever state it was in.
--   resolved          an open session was closed
--   already_resolved  the room's last session is resolved already (a repeat)
--   unknown_room      we never had this room
create function allocator.accept_close_request(payload jsonb, request_id text default null)
returns table (outcome text, session_id bigint, webhook_id bigint)
language plpgsql
as $$
declare
  room      text   := nullif(btrim(payload -> 'service' ->> 'room_id'), '');
  service   bigint := allocator.json_bigint(payload -> 'service' -> 'id');
  last      allocator.sessions;
  v_outcome text;
begin
  if room is null then
    raise exception 'service.room_id is required' using errcode = 'invalid_parameter_value';
  end if;
  perform allocator.lock_room(room);

  select * into last from allocator.sessions s where s.room_id = room order by s.id desc limit 1 for update;

  if last.id is null then
    v_outcome := 'unknown_room';
  elsif service is not null
        and (last.prior_service_id = service
             or exists (select from allocator.sessions r
                        where r.room_id = room and r.state = 'resolved' and r.service_id = service)) then
    -- A repeat of a resolution already applied: the open session, if any, is a returning customer's new one
    -- (opened after that service was resolved), so it must stay open.
    v_outcome := 'already_resolved';
  elsif last.state in ('waiting', 'reserved', 'assigned') then
    -- A reserved room keeps its slot (and its attempt and lease) until the call in flight reports back:
    -- settle_resolved_in_flight() then frees it, or counts the room on the agent if the call landed.
    if last.state = 'assigned' or last.holds_slot then
      perform allocator.release_slot(last.agent_id);
    end if;
    update allocator.sessions
    set state = 'resolved', resolved_at = now(), updated_at = now(), holds_slot = false, uncertain = false,
        attempt_id = case when last.state = 'reserved' then last.attempt_id end,
        lease_expires_at = case when last.state = 'reserved' then last.lease_expires_at end,
        service_id = coalesce(service, sessions.service_id)
    where id = last.id;
    v_outcome := 'resolved';
  else
    v_outcome := 'already_resolved';
  end if;

  insert into allocator.webhooks (kind, room_id, request_id, outcome, session_id, payload)
  values ('close_request', room, request_id, v_outcome, last.id, payload)
  returning id into webhook_id;

  outcome := v_outcome;
  session_id := last.id;
  return next;
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Choosing and reserving
--------------------------------------------------------------------------------------------------------------------

-- The rule for choosing agents: the agents that may take a room now, best first. A DBA may replace it with
-- CREATE OR REPLACE FUNCTION (same signature) to route differently. Whatever it returns, reserve() still locks
-- each agent and takes the slot through the guarded update, so a replaced rule can prefer badly but can never
-- overload an agent or wake one that is offline. Keep it one STABLE SQL SELECT: PostgreSQL then inlines it into
-- reserve()'s query and reads only the first rows from an index.
-- Default: fewest open rooms first (ours and those assigned by hand), then the agent idle longest.
-- The second bound on load is redundant for correctness; it turns the walk of agents_online_by_load into a range
-- that ends at the first load nobody can carry, so with every agent full the scan stops at once instead of
-- reading all online agents.
create function allocator.agent_preference()
returns setof allocator.agents
language sql stable
as $$
  select a.*
  from allocator.agents a
  where a.type = 'agent' and a.present and a.is_available and not a.force_offline and not a.paused
    and a.load + a.external_load < coalesce(a.max_load, (select allocator.default_max_load()))
    and a.load + a.external_load < (select allocator.max_capacity())
  order by a.load + a.external_load, a.last_assigned_at nulls first, a.id
$$;

-- Takes one slot of an agent if it is still eligible and below capacity. The guarded update is the capacity
-- check: it runs under the row lock, so two transactions cannot both take the last slot.
create function allocator.take_slot(agent bigint)
returns boolean
language plpgsql
as $$
begin
  update allocator.agents a
  set load = a.load + 1, last_assigned_at = now()
  where a.id = agent
    and a.type = 'agent' and a.present and a.is_available and not a.force_offline and not a.paused
    and a.load + a.external_load < allocator.capacity(a.max_load);
  return found;
end;
$$;

-- Records the reservation of locked room `s` for `agent`, whose slot the caller has already taken (or the room
-- already holds), under a lease.
create function allocator.reserve_for(s allocator.sessions, agent bigint)
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
      lease_expires_at = now() + make_interval(secs => allocator.setting_num('lease_seconds', 60))
  where q.id = s.id
  returning q.id, q.room_id, q.attempts, q.lease_expires_at
  into reserve_for.session_id, reserve_for.room_id, reserve_for.attempt, reserve_for.lease_expires_at;

  reserve_for.agent_id := agent;
  return next;
end;
$$;

-- Reserves the next assignment: the best free agent (agent_preference) and the oldest waiting room that can take
-- it. Agent first, then room: concurrent callers each lock a different agent (SKIP LOCKED) and then each take the
-- oldest room nobody else holds, so rooms leave the queue in arrival order even under contention, and a caller
-- that finds no free agent returns at once without touching the queue. Returns no row when nothing can be
-- assigned now. The caller then calls Qiscus and reports back (confirm, fail_*, release) before the lease ends.
create function allocator.reserve()
returns table (attempt_id bigint, session_id bigint, room_id text, agent_id bigint, attempt integer,
               lease_expires_at timestamptz)
language plpgsql
as $$
declare
  candidates refcursor;
  candidate  bigint;
  s          allocator.sessions;
begin
  -- The usual idle state (nothing due) answers from one probe of sessions_due. Written as min(), not EXISTS:
  -- with a long queue the planner would turn the EXISTS into a sequential scan that reads the whole history.
  if coalesce((select min(q.next_attempt_at) from allocator.sessions q where q.state = 'waiting') > now(), true) then
    return;
  end if;

  -- A room holding a slot goes back to its agent first: no slot to find, and the repeat is harmless if the
  -- earlier call did reach Qiscus. If that agent went offline or vanished, the slot is let go and the room
  -- queues like any other (still preferring that agent, see below).
  select q.* into s
  from allocator.sessions q
  where q.state = 'waiting' and q.holds_slot and q.next_attempt_at <= now()
  order by q.next_attempt_at
  limit 1
  for no key update of q skip locked;
  if s.id is not null then
    if exists (select from allocator.agents a
               where a.id = s.agent_id and a.type = 'agent' and a.present and a.is_available and not a.force_offline)
    then
      return query select * from allocator.reserve_for(s, s.agent_id);
      return;
    end if;
    perform allocator.release_slot(s.agent_id);
    update allocator.sessions q set holds_slot = false, uncertain = false, updated_at = now() where q.id = s.id;
  end if;

  -- An explicit cursor fetches one agent at a time (a FOR-IN loop would read ten ahead).
  open candidates for select p.id from allocator.agent_preference() p;
  loop
    fetch candidates into candidate;
    exit when not found;

    -- Lock the agent, or move on if another reservation holds it right now. The check runs on the row's latest
    -- version (the cursor's snapshot may be older), so a room is only taken below once a slot is certain.
    perform from allocator.agents a
    where a.id = candidate
      and a.type = 'agent' and a.present and a.is_available and not a.force_offline and not a.paused
      and a.load + a.external_load < allocator.capacity(a.max_load)
    for no key update skip locked;
    continue when not found;

    -- The oldest room this agent can take: due (not backing off), not refused by this agent, and not waiting to
    -- be retried with another agent that is free (after a failure the call may in fact have reached Qiscus, so
    -- the retry goes to the same agent when it can: the repeat is then harmless, not a second agent).
    s := null;
    select q.* into s
    from allocator.sessions q
    where q.state = 'waiting'
      and not q.holds_slot
      and q.next_attempt_at <= now()
      and candidate <> all (q.excluded_agents)
      and (q.last_agent_id is null or q.last_agent_id = candidate
           or not exists (select from allocator.eligible_agents e where e.id = q.last_agent_id))
    order by q.priority desc, q.queued_at, q.id
    limit 1
    for no key update of q skip locked;
    continue when s.id is null;

    -- agent_preference() may be a DBA's own rule: its answer still has to pass the guarded update.
    continue when not allocator.take_slot(candidate);

    close candidates;
    return query select * from allocator.reserve_for(s, candidate);
    return;
  end loop;
  close candidates;
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Reporting the outcome of a reservation
--------------------------------------------------------------------------------------------------------------------

-- Locks the session that a reservation is for, if that reservation is still the current one. A reservation that
-- was rescued, resolved or superseded meanwhile is stale and must change nothing.
create function allocator.lock_reservation(attempt bigint)
returns allocator.sessions
language sql
as $$
  select s.*
  from allocator.sessions s
  where s.id = (select a.session_id from allocator.attempts a where a.id = attempt)
    and s.attempt_id = attempt
    and s.state = 'reserved'
  for no key update;
$$;

-- A room resolved while its assign call was in flight keeps the agent's slot until the call reports back (see
-- accept_close_request): the call may yet put the agent in the room. Then: if the call may have landed, the room
-- is counted as one Qiscus shows the agent holding (external_load, which the next syncs recompute); otherwise the
-- slot is freed. Returns false when `attempt` is not such a reservation.
create function allocator.settle_resolved_in_flight(attempt bigint, maybe_landed boolean)
returns boolean
language plpgsql
as $$
declare
  s allocator.sessions;
begin
  select * into s from allocator.sessions q
  where q.attempt_id = attempt and q.state = 'resolved'
  for no key update;
  if s.id is null then
    return false;
  end if;
  if maybe_landed then
    -- The call may still land at Qiscus after the next pulls have started (up to its timeout, which is shorter than
    -- the lease): no pull that started before two leases from now may lower the count.
    update allocator.agents
    set load = load - 1, external_load = external_load + 1, external_seen = external_seen + 1,
        external_hold_until = now() + 2 * make_interval(secs => allocator.setting_num('lease_seconds', 60))
    where id = s.agent_id;
  else
    perform allocator.release_slot(s.agent_id);
  end if;
  update allocator.attempts set finished_at = now(), outcome = 'resolved', error = 'resolved while the call was in flight'
  where id = attempt;
  update allocator.sessions set attempt_id = null, lease_expires_at = null, updated_at = now() where id = s.id;
  return true;
end;
$$;

-- Qiscus accepted the assignment. Returns false if the reservation is no longer current (the lease was rescued
-- or the room was resolved meanwhile).
create function allocator.confirm(attempt bigint, service bigint default null)
returns boolean
language plpgsql
as $$
declare
  s allocator.sessions := allocator.lock_reservation(attempt);
begin
  if s.id is null then
    -- Qiscus did put the agent in the room: if the room was resolved meanwhile, it is open on that agent now.
    perform allocator.settle_resolved_in_flight(attempt, true);
    update allocator.attempts set outcome = 'stale', finished_at = now()
    where id = attempt and outcome is null;
    return false;
  end if;
  update allocator.attempts set finished_at = now(), outcome = 'assigned' where id = attempt;
  update allocator.sessions
  set state = 'assigned', assigned_at = now(), updated_at = now(), lease_expires_at = null, attempt_id = null,
      uncertain = false, service_id = coalesce(service, service_id), last_error = null
  where id = s.id;
  return true;
end;
$$;

-- Backoff before retry number n+1: base * 2^(n-1), capped, with "equal jitter" (between half and all of it) so
-- that rooms failed together do not come back together.
create function allocator.backoff(attempts integer)
returns interval
language sql volatile
as $$
  select make_interval(secs =>
    least(allocator.setting_num('retry_max_seconds', 300),
          allocator.setting_num('retry_base_seconds', 2) * power(2, least(greatest(attempts - 1, 0), 30)))
    * (0.5 + random() / 2));
$$;

-- Shared end of every unsuccessful reservation: the room goes back to its place in the queue (queued_at is
-- kept), or to failed when it has used up its attempts or every agent refused it.
-- `hold`: Qiscus may have made the assignment anyway (timeout, 5xx, lease expired mid-call). The agent's slot is
-- then kept for the room and the retry goes to the same agent, so the agent is never given a room in a slot that
-- may really be taken, and the room never gets a second agent. Otherwise the slot is freed. Once uncertain, a room
-- stays held through later failures (a 429 on the retry says nothing about the first call) until it is confirmed,
-- resolved, refused by that agent, or that agent goes offline.
create function allocator.requeue(s allocator.sessions, attempt bigint, how text, reason text, not_before timestamptz,
                                  exclude bigint default null, count_attempt boolean default true,
                                  hold boolean default false)
returns text
language plpgsql
as $$
declare
  excluded bigint[] := case when exclude is null then s.excluded_agents
                            else array_append(array_remove(s.excluded_agents, exclude), exclude) end;
  tries    integer  := s.attempts - case when count_attempt then 0 else 1 end;
  keep     boolean  := (hold or s.uncertain) and exclude is null;
  give_up  text;
begin
  update allocator.attempts set finished_at = now(), outcome = how, error = reason where id = attempt;

  if tries >= allocator.setting_int('max_attempts', 8) then
    give_up := format('gave up after %s attempts; last error: %s', tries, reason);
  elsif cardinality(excluded) > 0
        and not exists (select 1 from allocator.agents a
                        where a.type = 'agent' and a.present and a.id <> all (excluded)) then
    give_up := format('refused by every agent; last error: %s', reason);
  end if;

  if give_up is not null or not keep then
    perform allocator.release_slot(s.agent_id);
  end if;

  update allocator.sessions
  set state = case when give_up is null then 'waiting' else 'failed' end::allocator.session_state,
      failed_at = case when give_up is null then null else now() end,
      holds_slot = give_up is null and keep,
      uncertain = give_up is null and keep,
      last_error = coalesce(give_up, reason),
      attempts = tries,
      excluded_agents = excluded,
      -- a refused agent is not "the agent the call may have reached": nothing to repeat
      last_agent_id = case when exclude is null then s.agent_id end,
      next_attempt_at = not_before,
      attempt_id = null, lease_expires_at = null, updated_at = now()
  where id = s.id;
  return case when give_up is null then 'waiting' else 'failed' end;
end;
$$;

-- Qiscus failed in a way worth retrying (5xx, 429, timeout, network). The room keeps its place and is not
-- retried before its backoff (or Qiscus's Retry-After, whichever is later). The agent's slot is freed meanwhile,
-- unless `maybe_assigned`: the call may have gone through (a timeout, a 5xx), so the slot stays held and the
-- retry goes to the same agent (see requeue).
-- Returns the session's new state ('waiting' or 'failed'), or null when the reservation was stale.
create function allocator.fail_transient(attempt bigint, reason text, retry_after_seconds integer default null,
                                         maybe_assigned boolean default false)
returns text
language plpgsql
as $$
declare
  s allocator.sessions := allocator.lock_reservation(attempt);
begin
  if s.id is null then
    perform allocator.settle_resolved_in_flight(attempt, maybe_assigned);
    return null;
  end if;
  return allocator.requeue(s, attempt, 'transient', reason,
    now() + greatest(allocator.backoff(s.attempts), make_interval(secs => coalesce(retry_after_seconds, 0))),
    hold => maybe_assigned);
end;
$$;

-- Qiscus refused this agent for this room (a 4xx): the room never goes to that agent again and may go to
-- another one at once.
create function allocator.fail_for_agent(attempt bigint, reason text)
returns text
language plpgsql
as $$
declare
  s allocator.sessions := allocator.lock_reservation(attempt);
begin
  if s.id is null then
    perform allocator.settle_resolved_in_flight(attempt, false);
    return null;
  end if;
  return allocator.requeue(s, attempt, 'refused', reason, now(), exclude => s.agent_id);
end;
$$;

-- Hands a reservation back without counting it as an attempt: the listener is shutting down, or Qiscus rejected
-- our credentials (not the room's fault). The room may be retried after `delay_seconds`. `maybe_assigned` as in
-- fail_transient (a call cut short at shutdown may have reached Qiscus).
create function allocator.release(attempt bigint, reason text, delay_seconds integer default 0,
                                  maybe_assigned boolean default false)
returns text
language plpgsql
as $$
declare
  s allocator.sessions := allocator.lock_reservation(attempt);
begin
  if s.id is null then
    perform allocator.settle_resolved_in_flight(attempt, maybe_assigned);
    return null;
  end if;
  return allocator.requeue(s, attempt, 'released', reason, now() + make_interval(secs => delay_seconds),
                           count_attempt => false, hold => maybe_assigned);
end;
$$;

-- Puts back every reservation whose lease ran out (its listener died or hung). The room returns to its original
-- place in the queue at once, holding its agent's slot (the dead listener's call may have gone through); the
-- expiry counts as an attempt so a room that kills listeners ends as failed.
-- Returns how many were rescued.
create function allocator.rescue_expired()
returns integer
language plpgsql
as $$
declare
  s       allocator.sessions;
  rescued integer := 0;
begin
  for s in
    select * from allocator.sessions q
    where q.state = 'reserved' and q.lease_expires_at < now()
    order by q.lease_expires_at
    for update skip locked
  loop
    perform allocator.requeue(s, s.attempt_id, 'expired', 'lease expired before the assignment was confirmed', now(),
                              hold => true);
    rescued := rescued + 1;
  end loop;
  -- rooms resolved while a call was in flight, whose listener then died: the call may have landed
  for s in
    select * from allocator.sessions q
    where q.state = 'resolved' and q.attempt_id is not null and q.lease_expires_at < now()
    for update skip locked
  loop
    perform allocator.settle_resolved_in_flight(s.attempt_id, true);
    rescued := rescued + 1;
  end loop;
  return rescued;
end;
$$;

-- When the listener should look again at the latest, if nothing wakes it before: the next backoff to end or
-- lease to expire. Null when nothing is pending.
create function allocator.next_due_at()
returns timestamptz
language sql stable
as $$
  select least(
    (select min(next_attempt_at) from allocator.sessions where state = 'waiting' and next_attempt_at > now()),
    (select min(lease_expires_at) from allocator.sessions where state in ('reserved', 'resolved')
                                                               and lease_expires_at is not null));
$$;

--------------------------------------------------------------------------------------------------------------------
-- Roster
--------------------------------------------------------------------------------------------------------------------

-- Applies one pull of Qiscus's agent list (the `data.agents` objects of every page, as one jsonb array).
-- `started_at` is when the pull began: our assignments confirmed before it are surely in Qiscus's counts, so
--   external_load = current_customer_count - our rooms that Qiscus already counted
-- is the number of rooms assigned by hand. Rooms we assigned during the pull are not subtracted (they may be
-- counted twice until the next sync: too careful, never too loose); rooms we saw resolved during the pull are
-- subtracted (Qiscus resolves before it tells us, so a resolution we applied is never undone).
-- One pull can still undercount: a room Qiscus resolved a moment before the pull, whose resolution webhook we have
-- not stored yet, is still ours here and absent there. So the count rises at once but falls only as far as two
-- pulls in a row agree: a momentary dip never lets an agent be given one room too many.
-- With `complete` (every page was read) agents missing from the list are marked as no longer present.
create function allocator.sync_agents(roster jsonb, started_at timestamptz, complete boolean default true)
returns integer
language plpgsql
as $$
declare
  n integer;
begin
  with incoming as (
    select allocator.json_bigint(a -> 'id')                     as id,
           coalesce(a ->> 'name', '')                           as name,
           a ->> 'email'                                        as email,
           coalesce(a ->> 'type_as_string', 'agent')            as type,
           coalesce(a -> 'is_available' = 'true', false)          as is_available,
           coalesce(a -> 'force_offline' = 'true', false)         as force_offline,
           least(greatest(coalesce(allocator.json_bigint(a -> 'current_customer_count'), 0), 0), 100000)::integer
                                                                  as qiscus_load
    from jsonb_array_elements(roster) a
    where allocator.json_bigint(a -> 'id') is not null
  ),
  ours as (
    select s.agent_id, count(*)::integer as counted
    from allocator.sessions s
    where s.agent_id in (select id from incoming)
      and s.assigned_at < started_at
      and (s.state = 'assigned' or (s.state = 'resolved' and s.resolved_at >= started_at))
    group by s.agent_id
  )
  insert into allocator.agents as a (id, name, email, type, is_available, force_offline, present, qiscus_load,
                                     external_load, external_seen, synced_at)
  select i.id, i.name, i.email, i.type, i.is_available, i.force_offline, true, i.qiscus_load,
         greatest(i.qiscus_load - coalesce(o.counted, 0), 0), greatest(i.qiscus_load - coalesce(o.counted, 0), 0),
         now()
  from incoming i left join ours o on o.agent_id = i.id
  on conflict (id) do update
  set name = excluded.name, email = excluded.email, type = excluded.type, is_available = excluded.is_available,
      force_offline = excluded.force_offline, present = true, qiscus_load = excluded.qiscus_load,
      external_load = greatest(excluded.external_seen, least(a.external_load, a.external_seen),
                               case when a.external_hold_until > started_at then a.external_load else 0 end),
      external_seen = excluded.external_seen,
      synced_at = excluded.synced_at
  -- skip rewriting unchanged rows: no dead tuples and no wake-ups every sync
  where (a.name, a.email, a.type, a.is_available, a.force_offline, a.present, a.qiscus_load, a.external_load,
         a.external_seen)
        is distinct from
        (excluded.name, excluded.email, excluded.type, excluded.is_available, excluded.force_offline, true,
         excluded.qiscus_load,
         greatest(excluded.external_seen, least(a.external_load, a.external_seen),
                  case when a.external_hold_until > started_at then a.external_load else 0 end),
         excluded.external_seen);
  get diagnostics n = row_count;

  if complete then
    update allocator.agents a set present = false, synced_at = now()
    where a.present
      and a.id not in (select allocator.json_bigint(x -> 'id') from jsonb_array_elements(roster) x
                       where allocator.json_bigint(x -> 'id') is not null);
  end if;
  return n;
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Views for people
--------------------------------------------------------------------------------------------------------------------

-- The waiting rooms in the order they will be served.
create view allocator.queue as
  select s.room_id,
         row_number() over (order by s.priority desc, s.queued_at, s.id) as position,
         now() - s.queued_at as waited,
         s.attempts,
         s.last_error,
         s.next_attempt_at,
         s.priority,
         s.source,
         case when s.holds_slot then s.agent_id end as retry_agent_id,
         s.id as session_id
  from allocator.sessions s
  where s.state = 'waiting'
  order by position;
comment on view allocator.queue is 'Waiting rooms in serving order. next_attempt_at in the future means backing off.';

-- Per agent: can it take rooms, how many it holds, how many it may hold.
create view allocator.agent_load as
  select a.id,
         a.name,
         (a.type = 'agent' and a.present and a.is_available and not a.force_offline and not a.paused) as available,
         a.load + a.external_load as load,
         coalesce(a.max_load, (select allocator.default_max_load())) as capacity,
         a.load as our_load,
         a.external_load,
         a.qiscus_load,
         a.paused,
         a.last_assigned_at
  from allocator.agents a
  order by a.id;
comment on view allocator.agent_load is 'Per agent: available (online, not paused), load (ours + assigned by hand), capacity.';

-- Health check for tests and for a worried DBA: every row here is a broken invariant. Empty means healthy.
create function allocator.check_invariants()
returns table (problem text, detail text)
language sql stable
as $$
  select 'load counter differs from open sessions',
         format('agent %s: load %s, open sessions %s', a.id, a.load, coalesce(c.n, 0))
  from allocator.agents a
  left join (select s.agent_id, count(*) as n from allocator.sessions s
             where s.state in ('reserved', 'assigned') or s.holds_slot
                or (s.state = 'resolved' and s.attempt_id is not null)
             group by s.agent_id) c on c.agent_id = a.id
  where a.load <> coalesce(c.n, 0)
  union all
  select 'room with more than one open session', format('room %s: %s open', s.room_id, count(*))
  from allocator.sessions s
  where s.state in ('waiting', 'reserved', 'assigned')
  group by s.room_id
  having count(*) > 1;
$$;

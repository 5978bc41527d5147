--------------------------------------------------------------------------------------------------------------------
-- Routing by division. A DBA writes routes (allocator.routes): the first one matching a room's source and channel
-- (lowest position, then id) names the divisions whose agents may serve it, and after how long (overflow_seconds)
-- any agent may. Each waiting room carries its answer (sessions.division_ids, overflow_at), set when it is queued
-- and recomputed for every waiting room when the routes change; each agent carries its divisions
-- (agents.division_ids), set by the roster pull. may_serve() (02-agents.sql) is the one rule that joins the two.
--
--   route WhatsApp to support (division 439), anyone after five minutes:
--     insert into allocator.routes (source, division_ids, overflow_seconds) values ('wa', '{439}', 300);
--   a channel before its source's general route:
--     insert into allocator.routes (channel_id, division_ids, position) values (4321, '{438}', -1);
--   a division's queue:     select * from allocator.queue where division_ids @> '{439}';
--   every division:         table allocator.division_queue;
--------------------------------------------------------------------------------------------------------------------

-- The route of a room: the divisions that may serve it and when it overflows to anyone; no row when no route
-- matches (any agent). A webhook without `channel` matches only routes whose channel_id is null.
create function allocator.route_for(room_source text, room_channel bigint, queued_at timestamptz)
returns table (division_ids bigint[], overflow_at timestamptz)
language sql stable
as $$
  select r.division_ids, queued_at + make_interval(secs => r.overflow_seconds)
  from allocator.routes r
  where (r.source is null or r.source = room_source)
    and (r.channel_id is null or r.channel_id = room_channel)
  order by r.position, r.id
  limit 1
$$;

-- A new session takes its place: its source's priority and its route, in one statement (it runs for every new
-- session; each PL/pgSQL statement more costs a few microseconds a webhook). The queue head is moved back after the
-- statement, once for all its rows (sessions_queued, 03-intake.sql).
create function allocator.place_new_session()
returns trigger
language plpgsql
as $$
begin
  select allocator.priority_of(new.source), r.division_ids, r.overflow_at
  into new.priority, new.division_ids, new.overflow_at
  from (select) as one
  left join lateral allocator.route_for(new.source, new.channel_id, new.queued_at) r on true;
  return new;
end;
$$;

create trigger place_new_session
  before insert on allocator.sessions
  for each row execute function allocator.place_new_session();

-- The intake lock (key 1367, 0): every statement that inserts sessions holds it shared until it commits, taken
-- before its rows read the routes (in place_new_session: a volatile function, whose SELECT takes a snapshot after
-- the lock; the INSERT's own query must not read them, as its snapshot is older). It pairs with two exclusive
-- holders: reroute_waiting (without it, a session inserted by a webhook whose transaction was still open when a
-- change of routes committed kept the old route: it read the routes before the change, and the change's reroute
-- could not see it yet) and advance_queue_head (04-reservation.sql: it must see every fresh room queued before its
-- move).
create function allocator.take_intake_lock()
returns trigger
language plpgsql
as $$
begin
  perform pg_advisory_xact_lock_shared(1367, 0);
  return null;
end;
$$;

create trigger take_intake_lock
  before insert on allocator.sessions
  for each statement execute function allocator.take_intake_lock();

-- A change of routes applies to every open room not yet assigned (an overflow time already passed too): those
-- waiting, and those reserved, which wait again if their call fails. It wakes the listeners: a room may now go to
-- agents that could not take it before. It runs when the change commits (a deferred trigger), once per
-- transaction, after the webhooks being written right then have committed (the exclusive lock waits for their
-- shared ones, see take_intake_lock), so that it sees their rooms and they see the new routes: held only while
-- the change commits, so a DBA's transaction left open does not hold up webhooks.
create function allocator.reroute_waiting()
returns trigger
language plpgsql
as $$
begin
  if current_setting('allocator.rerouted', true) = 'on' then
    return null;
  end if;
  perform pg_advisory_xact_lock(1367, 0);
  update allocator.sessions s
  set division_ids = r.division_ids, overflow_at = r.overflow_at, updated_at = now()
  from allocator.sessions q
  left join lateral allocator.route_for(q.source, q.channel_id, q.queued_at) r on true
  where q.state in ('waiting', 'reserved') and s.id = q.id
    and (s.division_ids, s.overflow_at) is distinct from (r.division_ids, r.overflow_at);
  perform set_config('allocator.rerouted', 'on', true);
  perform pg_notify('allocator', 'room');
  return null;
end;
$$;

-- Every statement that changes the routes asks for a reroute at commit, even after one already ran in this
-- transaction (SET CONSTRAINTS ... IMMEDIATE).
create function allocator.routes_changed()
returns trigger
language plpgsql
as $$
begin
  perform set_config('allocator.rerouted', 'off', true);
  return null;
end;
$$;

create trigger routes_changed
  after insert or update or delete or truncate on allocator.routes
  for each statement execute function allocator.routes_changed();

create constraint trigger reroute_waiting
  after insert or update or delete on allocator.routes
  deferrable initially deferred
  for each row execute function allocator.reroute_waiting();

-- TRUNCATE has no row trigger: reroute at once.
create trigger reroute_truncated
  after truncate on allocator.routes
  for each statement execute function allocator.reroute_waiting();

-- Applies one complete pull of Qiscus's divisions (`divisions`: the `data` objects of every page, as one array) and
-- their members (`members`: [{"division_id": 438, "agent_ids": [1001, ...]}, ...], one per division). Call it only
-- when every page of every division was read: a failed or partial pull keeps the last complete one. Agents not
-- (yet) in allocator.agents are left out; the next pull after the agents' own finds them. Returns how many agents'
-- divisions changed (each such change wakes the listeners: see notify_agent_free).
create function allocator.sync_divisions(divisions jsonb, members jsonb)
returns integer
language plpgsql
as $$
declare
  n integer;
begin
  insert into allocator.divisions as d (id, name)
  select allocator.json_bigint(x -> 'id'), coalesce(x ->> 'name', '')
  from jsonb_array_elements(divisions) x
  where allocator.json_bigint(x -> 'id') is not null
  on conflict (id) do update set name = excluded.name, synced_at = now()
  where d.name is distinct from excluded.name;

  delete from allocator.divisions d
  where d.id not in (select allocator.json_bigint(x -> 'id') from jsonb_array_elements(divisions) x
                     where allocator.json_bigint(x -> 'id') is not null);

  create temporary table if not exists pulled_membership (division_id bigint, agent_id bigint) on commit drop;
  truncate pulled_membership;
  insert into pulled_membership
  select distinct allocator.json_bigint(m -> 'division_id'), allocator.json_bigint(a)
  from jsonb_array_elements(members) m, jsonb_array_elements(m -> 'agent_ids') a
  where allocator.json_bigint(m -> 'division_id') in (select id from allocator.divisions)
    and allocator.json_bigint(a) in (select id from allocator.agents);

  delete from allocator.agent_divisions ad
  where not exists (select from pulled_membership p where p.division_id = ad.division_id and p.agent_id = ad.agent_id);
  insert into allocator.agent_divisions (division_id, agent_id)
  select p.division_id, p.agent_id from pulled_membership p
  on conflict do nothing;

  update allocator.agents a
  set division_ids = coalesce(m.ids, '{}')
  from allocator.agents g
  left join (select ad.agent_id, array_agg(ad.division_id order by ad.division_id) as ids
             from allocator.agent_divisions ad group by ad.agent_id) m on m.agent_id = g.id
  where a.id = g.id and a.division_ids is distinct from coalesce(m.ids, '{}');
  get diagnostics n = row_count;
  return n;
end;
$$;

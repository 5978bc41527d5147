--------------------------------------------------------------------------------------------------------------------
-- Agents: who may take a room, and the capacity guard.
--
-- The predicates are stored generated columns of allocator.agents, named once (migration 3):
--   online      Qiscus may assign it rooms at all (type agent, listed, available, not forced offline)
--   accepting   online and not paused: may be given new rooms. A paused agent stays online: the retry of a room
--               whose slot it still holds goes to it (see reserve()), since the first call may have landed.
--   total_load  our_load + external_load: the rooms it holds, ours and those assigned by hand
-- and capacity() below is the one capacity expression.
--------------------------------------------------------------------------------------------------------------------

-- Capacity of one agent. Inlined by the planner where it is used in a query, which a sub-select would prevent: so
-- the default is read per agent row that has no max_load (setting() is cheap, and a DBA's change applies at once).
create function allocator.capacity(max_load integer)
returns integer
language sql stable
as $$ select coalesce(max_load, allocator.default_max_load()) $$;

-- May agent `a` be given one more room now: online, not paused (accepting), and below its capacity? The one
-- eligibility rule, inlined where it is used (the held-room retry alone asks less: only `online`, see reserve_held).
create function allocator.can_take_room(a allocator.agents)
returns boolean
language sql stable
as $$ select a.accepting and a.total_load < allocator.capacity(a.max_load) $$;

-- May an agent in `agent_divisions` serve a room routed to `room_divisions` (null: any agent) that overflows to
-- anyone at `overflow_at` (null: never)? Never null (reserve_batch asks it outside a WHERE). Inlined where
-- used. Routes themselves: 11-routing.sql.
create function allocator.may_serve(room_divisions bigint[], overflow_at timestamptz, agent_divisions bigint[])
returns boolean
language sql stable
as $$
  select room_divisions is null or coalesce(overflow_at <= now(), false)
      or coalesce(room_divisions && agent_divisions, false)
$$;

-- The largest capacity any agent has: the default or the biggest per-agent max_load (one probe of agents_max_load).
-- (PL/pgSQL: it runs on every reservation, and a SQL function with a sub-select is planned anew on every call.)
create function allocator.max_capacity()
returns integer
language plpgsql stable
as $$
begin
  return greatest(allocator.default_max_load(),
                  coalesce((select max(a.max_load) from allocator.agents a where a.max_load is not null), 0));
end;
$$;

-- The guard that nothing can bypass: whatever code (or person) raises an agent's load, the row is refused when
-- it would carry more rooms than the agent's capacity. The allocator's own update already checks, so this only
-- fires on a bug or a hand-written UPDATE. (A BEFORE trigger sees the generated total_load of the old row, so the
-- sum is written out.)
create function allocator.guard_capacity()
returns trigger
language plpgsql
as $$
begin
  if new.our_load + new.external_load > allocator.capacity(new.max_load) then
    raise exception 'agent % would hold % rooms, capacity is %',
      new.id, new.our_load + new.external_load, allocator.capacity(new.max_load)
      using errcode = 'check_violation';
  end if;
  return new;
end;
$$;

create trigger guard_capacity
  before update of our_load on allocator.agents
  for each row when (new.our_load > old.our_load)
  execute function allocator.guard_capacity();

-- Newest version first. Every room changes its agent's load twice, and the load is indexed, so each change is a
-- new row version. While an old snapshot pins the horizon none can be cleaned, and a lookup by the primary key
-- walks every version the agent had since (20 agents, 20,000 rooms served: 800 buffers per lookup). The allocator's
-- own changes of the load raise agents.version, and agents_newest (id, version desc) lists an agent's versions
-- newest first: the lookups below stop at the first entry, whatever the history (migration 12). Each runs without
-- sorts or bitmap scans, its own setting: it needs neither, and with them the planner found the primary key and a
-- sort of the one row it expects, or a bitmap scan, as cheap, and either reads every version.

-- The latest version of agent `agent` this statement can see, unlocked; null when there is none.
create function allocator.agent_now(agent bigint)
returns allocator.agents
language plpgsql stable
set enable_bitmapscan = off set enable_sort = off
as $$
declare
  a allocator.agents;
begin
  select x.* into a from allocator.agents x where x.id = agent order by x.version desc limit 1;
  return a;
end;
$$;

-- Locks agent `agent` (FOR NO KEY UPDATE) and returns the place of its latest row version, for an update by TID in
-- the caller's next statement (a new snapshot, which sees that version; the lock keeps it the latest). Null when
-- there is no such agent.
create function allocator.lock_agent(agent bigint)
returns tid
language plpgsql
set enable_bitmapscan = off set enable_sort = off
as $$
declare
  place tid;
begin
  select a.ctid into place
  from allocator.agents a
  where a.id = agent
  order by a.version desc
  limit 1
  for no key update;
  return place;
end;
$$;

-- The first `n` of `candidates`, in their order, that may take a room on their latest version (can_take_room),
-- locked (FOR NO KEY UPDATE), with the place of that version; a candidate another transaction holds is passed over
-- (SKIP LOCKED). For reserve(): its batch (reserve_batch) and its one room at a time (reserve_next).
create function allocator.lock_free_agents(candidates bigint[], n integer)
returns table (agent allocator.agents, place tid)
language plpgsql
set enable_bitmapscan = off set enable_sort = off
as $$
begin
  return query
  select l.a, l.place
  from unnest(candidates) with ordinality c(id, n)
  cross join lateral (select a, a.ctid as place
                      from allocator.agents a
                      where a.id = c.id
                      order by a.version desc
                      limit 1
                      for no key update of a skip locked) l
  where allocator.can_take_room(l.a)
  order by c.n
  limit lock_free_agents.n;
end;
$$;

-- Locks agents `ids` (FOR NO KEY UPDATE) in id order, each read newest version first (lock_agent): the order in
-- which report(), batches of resolutions and returning customers lock agents, so that they never deadlock.
create function allocator.lock_agents(ids bigint[])
returns void
language plpgsql
as $$
declare
  agent bigint;
begin
  foreach agent in array array(select distinct x from unnest(ids) x where x is not null order by x) loop
    perform allocator.lock_agent(agent);
  end loop;
end;
$$;

-- Frees one of an agent's slots. The caller holds the session row that had it. (The other way our_load goes down
-- is a room handed to Qiscus's count, hand_slot_to_qiscus.)
create function allocator.free_slot(agent bigint)
returns void
language plpgsql
as $$
declare
  place tid := allocator.lock_agent(agent);
begin
  update allocator.agents a set our_load = a.our_load - 1, version = a.version + 1 where a.ctid = place;
end;
$$;

-- Takes one slot of each agent whose latest version is at `places` (see lock_agent: the caller holds the locks) that
-- still accepts rooms and is below capacity; returns how many. The guarded update is the capacity check: it runs
-- under the row lock, so two transactions cannot both take the last slot. (The guard in a sub-select: as a plain
-- condition it matches the predicate of agents_accepting_by_load, and a plan made on a small table walked that
-- index, past every version of every agent an old snapshot keeps, instead of going straight to the places.)
create function allocator.take_slots(places tid[])
returns integer
language plpgsql
as $$
declare
  taken integer;
begin
  update allocator.agents a
  set our_load = a.our_load + 1, last_assigned_at = now(), version = a.version + 1
  where a.ctid = any (places) and (select allocator.can_take_room(a));
  get diagnostics taken = row_count;
  return taken;
end;
$$;

-- Takes one slot of an agent if it still accepts rooms and is below capacity (take_slots).
create function allocator.take_slot(agent bigint)
returns boolean
language plpgsql
as $$
begin
  return allocator.take_slots(array[allocator.lock_agent(agent)]) = 1;
end;
$$;

-- Agents that may take one more room right now.
create view allocator.eligible_agents as
  select a.*
  from allocator.agents a
  where allocator.can_take_room(a);
comment on view allocator.eligible_agents is 'Agents online, not paused, and below capacity: who can take a room now.';

-- An agent's place in the default order of agent_preference(), as one number: total_load (up to 4,095; above,
-- one band), then last_assigned_at to the microsecond, until 2055; an agent never assigned comes first, by id (so
-- that ten thousand new agents are not one tie the head cannot pass). The agent head (see "Heads" in
-- 00-basics.sql) is such a number: no agent that may take a room comes before it. Written exactly as the index
-- agents_accepting_by_load (migration 7), which the planner matches once this is inlined.
create function allocator.agent_position(total_load integer, last_assigned_at timestamptz, id bigint)
returns bigint
language sql immutable
as $$
  select (least(total_load, 4095)::bigint << 50)
         + case when last_assigned_at is null then least(greatest(id, 0), 562949953421311)
                else least(greatest(floor(extract(epoch from last_assigned_at - timestamptz '2020-01-01 00:00:00+00')
                                          * 1000000),
                                    0),
                           1125899906842623)::bigint
           end
$$;

-- The agents that may take a room now, fewest open rooms first (ours and those assigned by hand), then the agent
-- idle longest (never assigned: first, by id): the default rule of agent_preference(). The scan
-- starts at the agent head, past the entries of agents' earlier loads that an old snapshot keeps. The upper bound is
-- redundant for correctness; it turns the walk of agents_accepting_by_load into a range that ends at the first
-- load nobody can carry, so with every agent full the scan stops at once instead of reading all online agents.
create function allocator.agents_by_load()
returns setof allocator.agents
language sql stable
as $$
  select a.*
  from allocator.agents a
  where allocator.can_take_room(a)
    and allocator.agent_position(a.total_load, a.last_assigned_at, a.id)
        >= (select allocator.head_position('allocator.agent_head'))
    and allocator.agent_position(a.total_load, a.last_assigned_at, a.id)
        < (select least(allocator.max_capacity(), 4096))::bigint << 50
  order by allocator.agent_position(a.total_load, a.last_assigned_at, a.id), a.id
$$;

-- The rule for choosing agents: the agents that may take a room now, best first. A DBA may replace it with
-- CREATE OR REPLACE FUNCTION (same signature) to route differently; `npm run migrate` keeps a replaced rule (see
-- src/db/migrate.ts). Whatever it returns, reserve() still locks each agent and takes the slot through the guarded
-- update, so a replaced rule can prefer badly but can never overload an agent or wake one that is offline. Keep it
-- one STABLE SQL SELECT: PostgreSQL then inlines it into reserve()'s query and reads only the first rows from an
-- index. Default: agents_by_load(), above.
create function allocator.agent_preference()
returns setof allocator.agents
language sql stable
as $$ select * from allocator.agents_by_load() $$;

-- Moves the agent head up to the first agent that may take a room: the entries of agents' earlier loads passed
-- since the last move are walked once here instead of by every reservation. A reservation only moves an agent
-- further on (its load goes up); whoever may move one back (a load going down, an agent back online or unpaused,
-- a capacity raised, a new agent) holds the agent head's lock (1367, 2) shared until it commits
-- (agent_head_behind): tried exclusively, so that the next statement's snapshot sees every such change. When no
-- agent may take a room, the head stays. Called by reserve(), through advance_heads().
create function allocator.advance_agent_head()
returns void
language plpgsql
as $$
declare
  front bigint;
begin
  if current_setting('transaction_isolation') <> 'read committed' or not pg_try_advisory_lock(1367, 2) then
    return;
  end if;
  begin
    front := (select allocator.agent_position(p.total_load, p.last_assigned_at, p.id)
              from allocator.agents_by_load() p limit 1);
    if front > allocator.head_position('allocator.agent_head') then
      perform setval('allocator.agent_head', front);
    end if;
    perform pg_advisory_unlock(1367, 2);
  exception when others or query_canceled then
    perform pg_advisory_unlock(1367, 2);  -- a session lock outlives the error
    raise;
  end;
end;
$$;

-- An agent that may now come before the agent head moves it back (see advance_agent_head). From an AFTER trigger:
-- it sees the generated total_load and accepting of the new row.
create function allocator.agent_head_behind()
returns trigger
language plpgsql
as $$
begin
  perform pg_advisory_xact_lock_shared(1367, 2);
  if tg_table_name = 'settings' then
    perform allocator.lower_head('allocator.agent_head', 0);  -- every agent's capacity may have changed
  else
    perform allocator.lower_head('allocator.agent_head',
                                 allocator.agent_position(new.total_load, new.last_assigned_at, new.id));
  end if;
  return null;
end;
$$;

create trigger agent_head_behind_new
  after insert on allocator.agents
  for each row when (new.accepting)
  execute function allocator.agent_head_behind();

create trigger agent_head_behind
  after update on allocator.agents
  for each row
  when (new.accepting
        and (not old.accepting or new.total_load < old.total_load or new.max_load is distinct from old.max_load
             or coalesce(new.last_assigned_at, '-infinity') < coalesce(old.last_assigned_at, '-infinity')))
  execute function allocator.agent_head_behind();

create trigger agent_head_behind_settings
  after insert or update or delete or truncate on allocator.settings
  for each statement
  execute function allocator.agent_head_behind();

-- Fires when an agent may have gained a free slot or new rooms to serve: a new agent, load down, capacity changed,
-- back online or unpaused, divisions changed. Not on load going up: a reservation is no news, and NOTIFY
-- serialises commits.
create trigger notify_agent_added
  after insert on allocator.agents
  for each row when (new.accepting)
  execute function allocator.notify('agent');

create trigger notify_agent_free
  after update on allocator.agents
  for each row
  when (new.accepting
        and (new.total_load < old.total_load or new.max_load is distinct from old.max_load or not old.accepting
             or new.division_ids is distinct from old.division_ids))
  execute function allocator.notify('agent');

-- An agent that sessions or attempts name stays: deleting it is refused, as the foreign keys did before migration
-- 13 (which see: checking them on every reservation walked every version of the agent an old snapshot keeps).
-- Marking it gone is the roster's way (present = false); the history keeps naming it. An agent deleted takes its
-- division membership with it, as the foreign key's cascade did before migration 15.
create function allocator.agents_in_history()
returns trigger
language plpgsql
as $$
begin
  if exists (select from allocator.sessions s where s.agent_id = old.id)
     or exists (select from allocator.attempts t where t.agent_id = old.id) then
    raise exception 'agent % is named by sessions or attempts', old.id
      using errcode = 'foreign_key_violation',
            hint = 'An agent that left Qiscus stays, marked present = false; delete its history first to remove it.';
  end if;
  delete from allocator.agent_divisions ad where ad.agent_id = old.id;
  return old;
end;
$$;

create trigger agents_in_history
  before delete on allocator.agents
  for each row
  execute function allocator.agents_in_history();

-- agents.id is unique, kept by this trigger rather than by a unique index (migration 15: under an old snapshot, a
-- unique index made every change of an agent's load read every version the agent had since). An insert, or a
-- change of id, takes the lock for adding agents (1367, 5: advisory, until commit; one lock however many rows, so
-- that a pull of ten thousand new agents does not fill the lock table) and then looks for the id: of two
-- transactions adding the same agent, the second waits for the first, then sees its row and fails as a unique
-- index would (23505). Adding agents is rare: a roster pull's new agents (sync_agents takes the same lock), a
-- DBA's insert.
create function allocator.agents_unique_id()
returns trigger
language plpgsql
as $$
begin
  if tg_op = 'UPDATE' and new.id = old.id then
    return new;
  end if;
  -- The look must see what was committed up to the lock: a REPEATABLE READ snapshot, taken earlier, would not.
  -- (SERIALIZABLE finds the conflict itself.)
  if current_setting('transaction_isolation') = 'repeatable read' then
    raise exception 'agents are added under READ COMMITTED or SERIALIZABLE, not REPEATABLE READ'
      using errcode = 'feature_not_supported',
            hint = 'agents.id is kept unique by a trigger that must see the latest committed rows.';
  end if;
  perform pg_advisory_xact_lock(1367, 5);
  if exists (select from allocator.agents a where a.id = new.id) then
    raise exception 'duplicate key value violates unique constraint "agents_id"'
      using errcode = 'unique_violation', detail = format('Key (id)=(%s) already exists.', new.id);
  end if;
  return new;
end;
$$;

create trigger agents_unique_id
  before insert or update of id on allocator.agents
  for each row
  execute function allocator.agents_unique_id();

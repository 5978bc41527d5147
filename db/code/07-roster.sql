--------------------------------------------------------------------------------------------------------------------
-- Roster: Qiscus's list of agents, pulled by the listeners, is the truth about who is online and how many rooms
-- each holds.
--------------------------------------------------------------------------------------------------------------------

-- The count of rooms an agent holds that we did not assign, after a pull that found `by_hand` of them (Qiscus's
-- count less `counted`, our rooms it surely counted: see sync_agents).
-- - A late landing whose service the assign answer named (sessions.late_service_id) surely holds the agent until
--   that service's resolution arrives, which frees it (accept_close_request), or until a pull that subtracted no
--   room of ours shows it gone. A pull that did subtract rooms of ours may have subtracted one that Qiscus no
--   longer has, whose resolution is late; during an outage of the web app it is late for many pulls, not one.
-- - A room whose assign call may have landed (hand_slot_to_qiscus) is counted until a pull that started after the
--   call ended: a pull begun before it was handed lowers nothing, and until the end of a call that may still land
--   (its lease: external_hold_until) the count does not fall below the rooms so held (external_held). The agent's
--   other by-hand rooms fall as the rules below say.
-- - The count rises at once. It falls at once too when the pull subtracted no room of ours (counted = 0): then it
--   cannot undercount. Otherwise it falls only as far as the previous pull's lowest possible count
--   (external_seen) agrees: a room of ours that Qiscus resolved a moment before the pull, whose webhook we have not
--   stored yet, is subtracted from a count that no longer has it, and that dip must not let the agent be given
--   one room too many.
create function allocator.external_after_pull(a allocator.agents, by_hand integer, counted integer,
                                              started_at timestamptz)
returns integer
language sql stable
as $$
  select case
           when by_hand >= a.external_load then by_hand  -- a rise, or no change: no rule to check (the usual case)
           else greatest(by_hand,
                         case when counted > 0
                              then greatest(least(a.external_load, a.external_seen),
                                            (select count(*)::integer from allocator.sessions s
                                             where s.late_service_id is not null and s.agent_id = a.id))
                              else 0 end,
                         case when started_at <= a.external_handed_at then a.external_load
                              when a.external_hold_until >= started_at then least(a.external_held, a.external_load)
                              else 0 end)
         end
$$;

-- Applies one pull of Qiscus's agent list (the `data.agents` objects of every page, as one jsonb array).
-- `started_at` is when the pull began: our assignments confirmed before it are surely in Qiscus's counts, so
--   external_load = current_customer_count - our rooms that Qiscus already counted
-- is the number of rooms assigned by hand. Rooms Qiscus may or may not count (see `ours` below) are not
-- subtracted: counted twice until the next pull, too careful, never too loose. See external_after_pull for how
-- the count may fall.
-- With `complete` (every page was read) agents missing from the list are marked as no longer present.
create function allocator.sync_agents(roster jsonb, started_at timestamptz, complete boolean default true)
returns integer
language plpgsql
as $$
declare
  n      integer;
  added  integer;
  todo   jsonb;             -- the new agents and the changed rows (see `changed`)
  adding boolean;           -- any new agent among them
  gone   bigint[] := '{}';  -- present agents a complete pull does not list
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
  -- Our rooms of each agent, as the pull may have seen them:
  --   counted    confirmed before the pull started and still open: in Qiscus's count (unless Qiscus resolved it
  --              and its webhook has not reached us yet: the two-pull rule of external_after_pull is for that)
  --   uncertain  in Qiscus's count or not, we cannot tell (Qiscus read the count at some moment between
  --              started_at and now): a call in flight (reserved), whenever it was made; a room confirmed at or
  --              after started_at, whenever it was reserved (its call may have landed before or after the read); a
  --              room resolved at or after started_at that Qiscus may have held until then (it was assigned, or
  --              resolved while its call was in flight: that attempt ended 'resolved'); a room resolved with its call
  --              still out; a room waiting for its retry after an ambiguous failure (holds_slot: the first call may
  --              have landed). Not a late landing whose service we know: that room is counted as held without us
  --              (external_after_pull), and subtracting it from `seen` as well let a later pull drop it.
  --              A call reserved after the pull started is no less uncertain than one in flight when it started:
  --              left out of both sets, a room that landed before Qiscus read the count was counted twice (ours
  --              and by hand), and since `seen` kept it too, the two-pull rule kept the phantom through the next
  --              pull as well: the agent looked full for two sync periods.
  ours as (
    select s.agent_id,
           count(*) filter (where s.state = 'assigned' and s.assigned_at < started_at)::integer as counted,
           count(*) filter (where s.state = 'reserved'
                               or (s.state = 'waiting' and s.holds_slot)
                               or (s.state = 'assigned' and s.assigned_at >= started_at)
                               or (s.state = 'resolved' and s.late_service_id is null
                                   and (s.attempt_id is not null
                                        or (s.resolved_at >= started_at
                                            and (s.assigned_at is not null
                                                 or exists (select from allocator.attempts t
                                                            where t.session_id = s.id and t.outcome = 'resolved'))))))
             ::integer as uncertain
    from allocator.sessions s
    where s.agent_id in (select id from incoming)
      and (s.state in ('assigned', 'reserved')
           or (s.state = 'waiting' and s.holds_slot)
           or (s.state = 'resolved' and (s.resolved_at >= started_at or s.attempt_id is not null)))
    group by s.agent_id
  ),
  pulled as (
    -- by_hand: Qiscus's count less our rooms it surely counts (too careful: an uncertain room that Qiscus counts is
    -- counted here too, until the next pull). seen: the same less the uncertain ones as well, the count as low as
    -- it can truly be, which is what the next pull compares with (see external_after_pull).
    -- Why a larger `uncertain` is safe: this pull's external_load comes from by_hand, which does not depend on it
    -- (an upper bound, as before). `seen` only bounds how far the NEXT pull, if it subtracts rooms of ours, may
    -- lower the count, and the two-pull rule takes it as the lowest count this pull allows: every room in
    -- `uncertain` is one whose absence from Qiscus's count is possible, so `seen` is still that lowest count (it is
    -- only now truly the lowest: a call made during the pull and counted by Qiscus used to stay in it). The cost is
    -- the one the rule already paid for calls in flight at started_at: if such a room was not in the count after
    -- all, `seen` is below the true by-hand count, and a next pull that also misses a room of ours (resolved in
    -- Qiscus, webhook not stored yet) may lower external_load one room too far until the pull after it.
    select i.*, coalesce(o.counted, 0) as counted, greatest(i.qiscus_load - coalesce(o.counted, 0), 0) as by_hand,
           greatest(i.qiscus_load - coalesce(o.counted, 0) - coalesce(o.uncertain, 0), 0) as seen
    from incoming i left join ours o on o.agent_id = i.id
  ),
  -- Only new agents and changed rows are written: a sync holding every agent's row locked would make reserve() pass
  -- over them (SKIP LOCKED) for as long as the sync runs. A row changed meanwhile by another sync is still updated
  -- from its latest version below; one the filter left out keeps the other sync's newer values.
  changed as (
    select p.*
    from pulled p
    left join allocator.agents a on a.id = p.id
    where a.id is null
       or (a.name, a.email, a.type, a.is_available, a.force_offline, a.present, a.qiscus_load, a.external_load,
           a.external_seen, a.pulled_ours)
          is distinct from
          (p.name, p.email, p.type, p.is_available, p.force_offline, true, p.qiscus_load,
           allocator.external_after_pull(a, p.by_hand, p.counted, started_at), p.seen, p.counted)
  )
  select coalesce(jsonb_agg(to_jsonb(c) order by c.id), '[]'), coalesce(bool_or(c.new), false)
  into todo, adding
  from (select changed.*, not exists (select from allocator.agents a where a.id = changed.id) as new
        from changed) c;
  -- Agents that left Qiscus (a complete pull does not list them).
  if complete then
    gone := array(select a.id from allocator.agents a
                  where a.present
                    and a.id not in (select allocator.json_bigint(x -> 'id') from jsonb_array_elements(roster) x
                                     where allocator.json_bigint(x -> 'id') is not null));
  end if;

  -- Locks, always in this order: the lock for adding agents first (1367, 5; only when there are new ones: one sync
  -- at a time adds agents, and each looks again under that lock, since agents.id has no unique index: see
  -- agents_unique_id), then every agent row this sync changes, in id order as report() locks them. So two syncs,
  -- a sync and a report, or a sync and a DBA's insert never wait on each other in a circle.
  if adding then
    perform pg_advisory_xact_lock(1367, 5);
  end if;
  perform allocator.lock_agents(array(select (x ->> 'id')::bigint from jsonb_array_elements(todo) x) || gone);

  update allocator.agents a
  set name = c.name, email = c.email, type = c.type, is_available = c.is_available,
      force_offline = c.force_offline, present = true, qiscus_load = c.qiscus_load,
      external_load = allocator.external_after_pull(a, c.by_hand, c.counted, started_at),
      external_seen = c.seen, pulled_ours = c.counted, synced_at = now()
  from jsonb_to_recordset(todo) as c(id bigint, name text, email text, type text, is_available boolean,
                                     force_offline boolean, qiscus_load integer, by_hand integer, seen integer,
                                     counted integer)
  where a.id = c.id;
  get diagnostics n = row_count;
  if adding then
    insert into allocator.agents (id, name, email, type, is_available, force_offline, present, qiscus_load,
                                  external_load, external_seen, pulled_ours, synced_at)
    select c.id, c.name, c.email, c.type, c.is_available, c.force_offline, true, c.qiscus_load, c.by_hand, c.seen,
           c.counted, now()
    from jsonb_to_recordset(todo) as c(id bigint, name text, email text, type text, is_available boolean,
                                       force_offline boolean, qiscus_load integer, by_hand integer, seen integer,
                                       counted integer)
    where not exists (select from allocator.agents a where a.id = c.id)
    order by c.id;
    get diagnostics added = row_count;
    n := n + added;
  end if;

  if complete then
    update allocator.agents a set present = false, synced_at = now() where a.id = any (gone) and a.present;
    -- The newest complete pull wins: two listeners' pulls may commit in either order.
    update allocator.roster_pulls
    set started_at = greatest(roster_pulls.started_at, sync_agents.started_at),
        agents = case when roster_pulls.started_at > sync_agents.started_at then roster_pulls.agents
                      else jsonb_array_length(roster) end;
  end if;
  return n;
end;
$$;

-- Did a complete roster pull begin less than `max_age_seconds` ago (the database's clock)? A listener that starts
-- then serves at once from the roster in the database, as a running listener serves between its pulls, and pulls
-- beside its first calls; otherwise it pulls first (see allocator.roster_pulls).
create function allocator.roster_fresh(max_age_seconds double precision)
returns boolean
language sql stable
as $$
  select coalesce(p.started_at > clock_timestamp() - make_interval(secs => max_age_seconds), false)
  from allocator.roster_pulls p
$$;

-- A pull that starts now cannot lower the agent's by-hand count: all of it is held until a pull after a call that
-- may still land (external_held, external_hold_until: see external_after_pull). The listeners pull for it once that
-- moment passes.
create function allocator.pull_cannot_lower(a allocator.agents)
returns boolean
language sql stable
as $$ select coalesce(a.external_hold_until >= now() and a.external_load <= a.external_held, false) $$;

-- Would a roster pull now let a waiting room start? True when an agent is full only because of a by-hand count
-- held for want of evidence (external_load above external_seen, the lowest it can truly be: the last pull ran
-- during a call of ours, or a resolution came during a call), and one of the first waiting rooms that agent may
-- serve has no other agent free to take it. The first pull that starts after those calls ended settles the count,
-- so the listeners pull again at once instead of at the next AGENT_SYNC_SECONDS (invariant 9: evidence, not
-- waiting). Rooms another free agent will take, agents nobody waits for, and agents whose count no pull can lower
-- yet (pull_cannot_lower) are no reason to pull: a busy roster
-- of thousands, where every pull runs during some call, would otherwise pull without end.
-- (PL/pgSQL: it runs every second, and PL/pgSQL keeps its plans.) The held agents come first, through their own
-- partial index (agents_held_for_evidence): nearly always there are none, and then nothing else is read. Without
-- enable_seqscan = off the planner, which guesses a third of the agents for `external_load > external_seen`, read
-- every agent row instead (10,000 agents during a drain: 2,700 buffers, 13 ms, every second in every listener).
create function allocator.evidence_pull_due()
returns boolean
language plpgsql stable
set enable_seqscan = off
as $$
begin
  if not exists (select from allocator.agents a
                 where a.external_load > a.external_seen and a.accepting and not allocator.pull_cannot_lower(a)) then
    return false;
  end if;
  return exists (
    with held as (
      select a.division_ids
      from allocator.agents a
      where a.accepting and a.external_load > a.external_seen and not allocator.pull_cannot_lower(a)
        and a.total_load >= allocator.capacity(a.max_load)
        and a.total_load - (a.external_load - a.external_seen) < allocator.capacity(a.max_load)
    ),
    heads as (
      select q.division_ids, q.overflow_at
      from allocator.sessions q
      where q.in_queue and not q.holds_slot and q.next_attempt_at <= now()
      order by q.priority desc, q.queued_at, q.id
      limit 20
    )
    select from heads q
    where exists (select from held h where allocator.may_serve(q.division_ids, q.overflow_at, h.division_ids))
      and not exists (select from allocator.eligible_agents e
                      where allocator.may_serve(q.division_ids, q.overflow_at, e.division_ids)));
end;
$$;

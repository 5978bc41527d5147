--------------------------------------------------------------------------------------------------------------------
-- Views for people (psql, the dashboard, metrics), and the invariant check. Live views read only the open rows
-- (partial indexes); history views read recent windows through timestamp indexes, so they stay cheap with millions
-- of past sessions.
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
         s.id as session_id,
         case when s.overflow_at <= now() then null else s.division_ids end as division_ids
  from allocator.sessions s
  where s.in_queue
  order by position;
comment on view allocator.queue is 'Waiting rooms in serving order. next_attempt_at in the future means backing off '
  '(or, as last_error says, waiting for the answer of a call made for the room''s previous session); '
  'division_ids: the divisions that may serve the room now (null: any agent).';

-- Per agent: can it take rooms, how many it holds, how many it may hold.
create view allocator.agent_load as
  select a.id,
         a.name,
         a.accepting as available,
         a.total_load as load,
         allocator.capacity(a.max_load) as capacity,
         a.our_load,
         a.external_load,
         a.qiscus_load,
         a.paused,
         a.last_assigned_at,
         a.division_ids
  from allocator.agents a
  order by a.id;
comment on view allocator.agent_load is 'Per agent: available (online, not paused), load (ours + assigned by hand), capacity.';
comment on column allocator.agent_load.available is 'agents.accepting: online in Qiscus and not paused, so it may be '
  'given new rooms (a paused agent still gets the retry of a room whose slot it holds).';
comment on column allocator.agent_load.load is 'agents.total_load: our rooms (our_load) + rooms assigned by hand in '
  'Qiscus (external_load), what capacity bounds.';

-- Per division: its waiting rooms, the longest wait, its agents online and their free slots.
create view allocator.division_queue as
  select d.id, d.name,
         w.waiting, w.longest_wait,
         g.agents_online, g.free_slots
  from allocator.divisions d
  cross join lateral (
    select count(*) as waiting, now() - min(s.queued_at) as longest_wait
    from allocator.sessions s
    where s.in_queue and s.division_ids @> array[d.id] and coalesce(s.overflow_at > now(), true)) w
  cross join lateral (
    select count(*) as agents_online,
           coalesce(sum(greatest(allocator.capacity(a.max_load) - a.total_load, 0)), 0) as free_slots
    from allocator.agents a
    where a.accepting and a.division_ids @> array[d.id]) g
  order by d.id;
comment on view allocator.division_queue is 'Per division: rooms waiting for it (not yet overflowed), longest wait, '
  'agents online (not paused) and their free slots.';

-- Listeners alive now (each holds its advisory lock), with the reservations in their hands.
create view allocator.listeners as
  select l.objid::integer as id,
         p.pid,
         p.client_addr,
         p.backend_start as connected_at,
         (select count(*) from allocator.sessions s where s.owner = l.objid::integer and s.lease_expires_at is not null)
           as calls_in_flight
  from pg_locks l
  join pg_stat_activity p on p.pid = l.pid
  where l.locktype = 'advisory' and l.classid = 1365 and l.objsubid = 2 and l.granted and l.mode = 'ExclusiveLock'
    and l.database = (select oid from pg_database where datname = current_database());
comment on view allocator.listeners is 'Listener processes connected now, and how many assign calls each has in flight.';

-- Is Qiscus answering? (see 09-qiscus-health.sql)
create view allocator.qiscus_status as
  select case when h.down_since is null then 'up' else 'down' end as status,
         h.down_since, now() - h.down_since as down_for, h.probe_at as next_probe_at, h.calls_while_down,
         h.changed_at
  from allocator.qiscus_health h;
comment on view allocator.qiscus_status is 'Qiscus up, or down since when (then rooms wait without spending attempts).';

-- Health check for tests and for a worried DBA: every row here is a broken invariant. Empty means healthy.
create function allocator.check_invariants()
returns table (problem text, detail text)
language sql stable
as $$
  select 'load counter differs from open sessions',
         format('agent %s: our_load %s, open sessions %s', a.id, a.our_load, coalesce(c.n, 0))
  from allocator.agents a
  left join (select s.agent_id, count(*) as n from allocator.sessions s
             where s.state in ('reserved', 'assigned') or s.holds_slot
                or (s.state = 'resolved' and s.attempt_id is not null)
             group by s.agent_id) c on c.agent_id = a.id
  where a.our_load <> coalesce(c.n, 0)
  union all
  select 'room with more than one open session', format('room %s: %s open', s.room_id, count(*))
  from allocator.sessions s
  where s.open
  group by s.room_id
  having count(*) > 1
  union all
  select 'agent id listed twice', format('agent %s: %s rows', a.id, count(*))  -- kept unique by agents_unique_id
  from allocator.agents a
  group by a.id
  having count(*) > 1;
$$;

-- One row: the state of the contact centre right now.
create view allocator.stats_live as
  select
    (select count(*) from allocator.sessions where in_queue)                             as waiting,
    (select count(*) from allocator.sessions  -- only a room reserved before backs off
     where state = 'waiting' and (reserved_at is not null or priority <> 0) and next_attempt_at > now())
                                                                                         as backing_off,
    (select room_id from allocator.sessions where in_queue order by queued_at, id limit 1)
                                                                                         as oldest_room_id,
    (select now() - min(queued_at) from allocator.sessions where in_queue)               as oldest_wait,
    (select count(*) from allocator.sessions where state = 'reserved')                   as assigning,
    (select count(*) from allocator.sessions where state = 'assigned')                   as assigned_open,
    (select count(*) from allocator.eligible_agents)                                     as agents_free,
    (select count(*) from allocator.agents where accepting and total_load >= allocator.capacity(max_load)) as agents_full,
    -- listed agents that may not be given new rooms: offline in Qiscus, or paused (free + full + offline = all)
    (select count(*) from allocator.agents g
      where not g.accepting and g.type = 'agent' and g.present)                          as agents_offline,
    (select coalesce(sum(capacity), 0) from allocator.agent_load where available)        as capacity_online,
    (select coalesce(sum(load), 0) from allocator.agent_load where available)            as load_online,
    -- How long the oldest open snapshot of the cluster has held back the cleanup of old row versions (a DBA's
    -- transaction left open, a long report): under one, each room served makes the agents' rows dearer to read
    -- (README, "An old snapshot"). Other roles' sessions count only where the reader has pg_read_all_stats.
    (select now() - min(a.xact_start) from pg_stat_activity a
      where a.backend_xmin is not null and a.pid <> pg_backend_pid())                   as oldest_snapshot;
comment on view allocator.stats_live is 'Now: rooms waiting and the oldest, assignments in flight, agents free/full/offline, '
  'the oldest open snapshot.';

-- Time from arrival to assignment (p50, p90) over the last hour and the last day.
create view allocator.stats_time_to_assign as
  select w.label as period,
         count(s.id) as assigned,
         percentile_cont(0.5) within group (order by s.assigned_at - s.queued_at) as p50,
         percentile_cont(0.9) within group (order by s.assigned_at - s.queued_at) as p90,
         max(s.assigned_at - s.queued_at) as max
  from (values ('last hour', interval '1 hour'), ('last day', interval '1 day')) w(label, span)
  left join allocator.sessions s on s.assigned_at >= now() - w.span
  group by w.label, w.span
  order by w.span;
comment on view allocator.stats_time_to_assign is 'Time to assign, p50 and p90, over the last hour and day.';

-- Rooms each agent was given today (server time zone; `set time zone` in psql to change "today").
create view allocator.stats_agents_today as
  select a.id, a.name, count(s.id) as assigned_today,
         count(s.id) filter (where s.state = 'resolved') as resolved_today,
         a.total_load as load_now
  from allocator.agents a
  left join allocator.sessions s on s.agent_id = a.id and s.assigned_at >= date_trunc('day', now())
  where a.type = 'agent'
  group by a.id, a.name, a.total_load
  order by assigned_today desc, a.id;
comment on view allocator.stats_agents_today is 'Assignments per agent since midnight.';

-- Reservations that did not end in an assignment over the last day, by outcome and reason.
create view allocator.stats_failures as
  select a.outcome, a.error, count(*) as times, count(distinct a.session_id) as rooms, max(a.finished_at) as last_seen
  from allocator.attempts a
  where a.finished_at >= now() - interval '1 day' and a.outcome <> 'assigned'
  group by a.outcome, a.error
  order by times desc;
comment on view allocator.stats_failures is 'Failed reservations in the last day, by outcome (transient, refused, '
  'expired, released, stale, resolved) and error.';

-- How long rooms wait: rooms assigned in the last day by time to assign, and rooms waiting now by time so far.
create view allocator.stats_wait_buckets as
  with buckets(bucket, lo, hi) as (
    values ('< 10 s', interval '0', interval '10 seconds'),
           ('10-30 s', interval '10 seconds', interval '30 seconds'),
           ('30 s - 1 min', interval '30 seconds', interval '1 minute'),
           ('1-5 min', interval '1 minute', interval '5 minutes'),
           ('5-15 min', interval '5 minutes', interval '15 minutes'),
           ('> 15 min', interval '15 minutes', interval '100 years'))
  select b.bucket,
         (select count(*) from allocator.sessions s
           where s.assigned_at >= now() - interval '1 day'
             and s.assigned_at - s.queued_at >= b.lo and s.assigned_at - s.queued_at < b.hi) as assigned_last_day,
         (select count(*) from allocator.sessions s
           where s.in_queue and now() - s.queued_at >= b.lo and now() - s.queued_at < b.hi) as waiting_now
  from buckets b
  order by b.lo;
comment on view allocator.stats_wait_buckets is 'Waiting-time histogram: assigned in the last day, and waiting now.';

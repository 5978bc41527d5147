--! Previous: sha1:d653da38a9f392c7012ba97f44efa8340f719014
--! Hash: sha1:bc0d1075638c4eccc790c2bec7a892fedab68279
--! Message: rules and stats

--------------------------------------------------------------------------------------------------------------------
-- Rules a DBA tunes in SQL, and statistics views for psql. Every rule is read by the next reservation: no restart.
--
--   capacity        update allocator.settings set value = '3' where key = 'default_max_load';
--                   update allocator.agents set max_load = 4 where id = 1001;
--   pause           update allocator.agents set paused = true where id = 1001;
--   priority        insert into allocator.source_priority values ('wa', 10);
--   max wait        update allocator.settings set value = '900' where key = 'max_wait_seconds';
--   agent choice    create or replace function allocator.agent_preference() ... (see migration 1)
--------------------------------------------------------------------------------------------------------------------

--------------------------------------------------------------------------------------------------------------------
-- Priority by channel source: rooms from a higher-priority source are served first, then in arrival order.
--------------------------------------------------------------------------------------------------------------------

create table allocator.source_priority (
  source   text primary key,           -- Qiscus channel source as sent in the webhook: qiscus, wa, line, fb, ...
  priority integer not null default 0  -- higher is served first; sources not listed have 0
);
comment on table allocator.source_priority is 'Higher priority sources are served first. A change re-orders the rooms '
  'already waiting at once.';

create function allocator.priority_of(room_source text)
returns integer
language sql stable
as $$ select coalesce((select p.priority from allocator.source_priority p where p.source = room_source), 0) $$;

-- A new session takes its source's priority (the queue index orders by it).
create function allocator.set_session_priority()
returns trigger
language plpgsql
as $$
begin
  new.priority := allocator.priority_of(new.source);
  return new;
end;
$$;

create trigger set_session_priority
  before insert on allocator.sessions
  for each row execute function allocator.set_session_priority();

-- A priority change applies to the rooms already waiting, so the next reservation sees the new order.
create function allocator.reprioritise_waiting()
returns trigger
language plpgsql
as $$
begin
  update allocator.sessions s
  set priority = allocator.priority_of(s.source), updated_at = now()
  where s.state = 'waiting'
    and s.source in (select x from unnest(array[
                       case when tg_op <> 'INSERT' then old.source end,
                       case when tg_op <> 'DELETE' then new.source end]) x where x is not null);
  return null;
end;
$$;

create trigger reprioritise_waiting
  after insert or update or delete on allocator.source_priority
  for each row execute function allocator.reprioritise_waiting();

--------------------------------------------------------------------------------------------------------------------
-- Maximum waiting time: a room waiting longer leaves the queue as cancelled, with the reason. The customer's next
-- message (the allocation webhook again) queues the room afresh.
--------------------------------------------------------------------------------------------------------------------

insert into allocator.settings (key, value, description) values
  ('max_wait_seconds', '0', 'a room waiting longer is cancelled (0: no limit)');

create index sessions_waiting_since on allocator.sessions (queued_at) where state = 'waiting';

-- Cancels the rooms waiting longer than max_wait_seconds; returns how many.
create function allocator.cancel_overdue()
returns integer
language plpgsql
as $$
declare
  max_wait numeric := allocator.setting_num('max_wait_seconds', 0);
  s        allocator.sessions;
  n        integer := 0;
begin
  if max_wait <= 0 then
    return 0;
  end if;
  for s in
    select * from allocator.sessions q
    where q.state = 'waiting' and q.queued_at < now() - make_interval(secs => max_wait)
    order by q.queued_at
    for update skip locked
  loop
    if s.holds_slot then
      perform allocator.release_slot(s.agent_id);
    end if;
    update allocator.sessions
    set state = 'cancelled', cancelled_at = now(), holds_slot = false, updated_at = now(),
        last_error = format('waited %s, longer than max_wait_seconds (%s s)',
                            date_trunc('second', now() - s.queued_at), max_wait)
    where id = s.id;
    n := n + 1;
  end loop;
  return n;
end;
$$;

-- The periodic housekeeping the listeners run every few seconds (any of them; they skip each other's rows).
create function allocator.sweep(out rescued integer, out cancelled integer)
language plpgsql
as $$
begin
  rescued := allocator.rescue_expired();
  cancelled := allocator.cancel_overdue();
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Statistics for psql. Live views read only the open rows (partial indexes); history views read recent windows
-- through timestamp indexes, so they stay cheap with millions of past sessions.
--------------------------------------------------------------------------------------------------------------------

create index sessions_assigned_at on allocator.sessions (assigned_at) where assigned_at is not null;
create index attempts_finished_at on allocator.attempts (finished_at) where finished_at is not null;

-- One row: the state of the contact centre right now.
create view allocator.stats_live as
  select
    (select count(*) from allocator.sessions where state = 'waiting')                    as waiting,
    (select count(*) from allocator.sessions where state = 'waiting' and next_attempt_at > now())
                                                                                         as backing_off,
    (select room_id from allocator.sessions where state = 'waiting' order by queued_at, id limit 1)
                                                                                         as oldest_room_id,
    (select now() - min(queued_at) from allocator.sessions where state = 'waiting')      as oldest_wait,
    (select count(*) from allocator.sessions where state = 'reserved')                   as assigning,
    (select count(*) from allocator.sessions where state = 'assigned')                   as assigned_open,
    (select count(*) from allocator.eligible_agents)                                     as agents_free,
    (select count(*) from allocator.agent_load where available and load >= capacity)     as agents_full,
    (select count(*) from allocator.agent_load a join allocator.agents g using (id)
      where not a.available and g.type = 'agent' and g.present)                          as agents_offline,
    (select coalesce(sum(capacity), 0) from allocator.agent_load where available)        as capacity_online,
    (select coalesce(sum(load), 0) from allocator.agent_load where available)            as load_online;
comment on view allocator.stats_live is 'Now: rooms waiting and the oldest, assignments in flight, agents free/full/offline.';

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
         a.load + a.external_load as load_now
  from allocator.agents a
  left join allocator.sessions s on s.agent_id = a.id and s.assigned_at >= date_trunc('day', now())
  where a.type = 'agent'
  group by a.id
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
           where s.state = 'waiting' and now() - s.queued_at >= b.lo and now() - s.queued_at < b.hi) as waiting_now
  from buckets b
  order by b.lo;
comment on view allocator.stats_wait_buckets is 'Waiting-time histogram: assigned in the last day, and waiting now.';

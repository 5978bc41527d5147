--------------------------------------------------------------------------------------------------------------------
-- Outages of Qiscus, told from a room's own trouble. When the last `outage_failures` calls all failed transiently
-- (5xx, 429, timeout, network) and were for at least two rooms, Qiscus is down for everyone: rooms stop spending
-- attempts and growing backoffs, and reserve() lets one call out per `probe_seconds` (the probe). The first
-- answer from Qiscus (an assignment, or a refusal) ends the outage; every room that waited only because of it is
-- due already, so it is served at once. A room's own trouble (refused, or failing while others succeed) keeps its
-- per-room backoff and attempts.
--------------------------------------------------------------------------------------------------------------------

-- May a call to Qiscus go out now? Always while it is up; while it is down, once per probe interval across all
-- listeners (the first caller moves probe_at on; the others see it moved).
create function allocator.may_call_qiscus()
returns boolean
language plpgsql
as $$
begin
  if not exists (select from allocator.qiscus_health h where h.down_since is not null) then
    return true;
  end if;
  update allocator.qiscus_health
  set probe_at = now() + allocator.probe_interval(), calls_while_down = calls_while_down + 1
  where down_since is not null and probe_at <= now();
  return found;
end;
$$;

-- Records a transient failure of `attempt` (before the attempt itself is finished). Returns true when Qiscus is
-- down, now or already. While down, a Retry-After pushes the next probe back.
create function allocator.qiscus_failed(attempt bigint, retry_after_seconds integer)
returns boolean
language plpgsql
as $$
declare
  h       allocator.qiscus_health;
  window_ integer := allocator.outage_failures() - 1;  -- the latest finished calls, besides this one
  recent  bigint[];
  rooms   integer;
begin
  select * into h from allocator.qiscus_health for update;
  if h.down_since is not null then
    update allocator.qiscus_health
    set probe_at = greatest(probe_at, now() + make_interval(secs => coalesce(retry_after_seconds, 0)))
    where singleton;
    return true;
  end if;

  -- The latest calls that Qiscus answered or failed (not rescues or hand-backs), newest first.
  select array_agg(r.id), count(distinct r.session_id)
  into recent, rooms
  from (select a.id, a.session_id, a.outcome
        from allocator.attempts a
        where a.finished_at is not null and a.outcome in ('assigned', 'refused', 'transient')
        order by a.finished_at desc
        limit window_) r
  where r.outcome = 'transient';
  if coalesce(cardinality(recent), 0) < window_
     or (rooms < 2 and not exists (select from allocator.attempts a
                                   where a.id = attempt
                                     and a.session_id <> all (select x.session_id from allocator.attempts x
                                                              where x.id = any (recent)))) then
    return false;
  end if;

  update allocator.qiscus_health
  set down_since = now(), probe_at = now() + allocator.probe_interval(), calls_while_down = 0, changed_at = now()
  where singleton;
  -- The rooms whose failures revealed the outage get their attempt back and wait no longer than the probe.
  update allocator.sessions s
  set attempts = greatest(s.attempts - 1, 0), next_attempt_at = now(), updated_at = now()
  where s.state = 'waiting' and s.next_attempt_at > now()
    and s.id in (select a.session_id from allocator.attempts a where a.id = any (recent));
  perform pg_notify('allocator', 'qiscus');
  return true;
end;
$$;

-- Qiscus answered (an assignment or a refusal): if it was down, it is up again. Cheap when it was up: one read.
create function allocator.qiscus_answered()
returns void
language plpgsql
as $$
begin
  if exists (select from allocator.qiscus_health h where h.down_since is not null) then
    update allocator.qiscus_health set down_since = null, probe_at = null, changed_at = now()
    where down_since is not null;
    perform pg_notify('allocator', 'qiscus');
  end if;
end;
$$;

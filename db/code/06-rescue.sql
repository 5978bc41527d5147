--------------------------------------------------------------------------------------------------------------------
-- Rescue and housekeeping. A reservation whose listener died is put back within a second (rescue_abandoned, run
-- by every listener each second and at start); the lease (rescue_expired) is the last resort for a listener that
-- hangs while still connected. Either way the room keeps its agent's slot and is retried with that agent first:
-- the call may have landed, and the repeat is harmless where a second agent is not.
--------------------------------------------------------------------------------------------------------------------

-- Is listener `owner` alive? Each listener holds the session-level advisory lock (1365, owner) on a connection of
-- its own for as long as it runs; PostgreSQL drops it the moment that connection or process dies. Trying the
-- lock in shared mode fails exactly while the owner holds it (a success holds it until this transaction ends,
-- harmless). A reservation without owner (a DBA's hand call) is left to its lease.
create function allocator.listener_alive(owner integer)
returns boolean
language sql volatile
as $$ select owner is null or not pg_try_advisory_xact_lock_shared(1365, owner) $$;

-- Puts back one reservation that will not be reported: `how` says why (abandoned, expired). A room resolved while
-- its call was in flight is settled as "the call may have landed" (counted until a roster pull shows it). A dead
-- listener's call got no answer and may still land until its lease ends (unanswered); an expired lease is over.
create function allocator.rescue(s allocator.sessions, how text, reason text)
returns void
language plpgsql
as $$
begin
  if s.state = 'resolved' then
    perform allocator.settle_resolved_in_flight(s, true, null, unanswered => how = 'abandoned');
  else
    -- counts as an attempt: a room that kills listeners ends as failed
    perform allocator.requeue(s, s.attempt_id, how, reason, now(), hold => true, unanswered => how = 'abandoned');
  end if;
end;
$$;

-- Rescues the reservations of listeners that are gone. Cheap enough to run every second: it reads the few rows
-- under a lease (sessions_leases) and tries one lock per listener. Returns how many were rescued.
create function allocator.rescue_abandoned()
returns integer
language plpgsql
set enable_seqscan = off  -- see "Plans" in 00-basics.sql: every listener runs it every second, for days
as $$
declare
  s       allocator.sessions;
  rescued integer := 0;
begin
  for s in
    select q.* from allocator.sessions q
    where q.lease_expires_at is not null
      and q.owner in (select distinct o.owner from allocator.sessions o
                      where o.lease_expires_at is not null and o.owner is not null
                        and not allocator.listener_alive(o.owner))
    for update skip locked
  loop
    perform allocator.rescue(s, 'abandoned', 'its listener died with the call in flight');
    rescued := rescued + 1;
  end loop;
  return rescued;
end;
$$;

-- Puts back every reservation whose lease ran out (its listener hangs while connected, or its call outlived the
-- lease). Returns how many were rescued.
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
    where q.lease_expires_at < now()
    order by q.lease_expires_at
    for update skip locked
  loop
    perform allocator.rescue(s, 'expired', 'lease expired before the assignment was confirmed');
    rescued := rescued + 1;
  end loop;
  return rescued;
end;
$$;

-- The periodic housekeeping.
create function allocator.sweep(out rescued integer, out cancelled integer, out pruned integer)
language plpgsql
set enable_seqscan = off  -- see "Plans" in 00-basics.sql (what it calls inherits it)
as $$
begin
  rescued := allocator.rescue_abandoned() + allocator.rescue_expired();
  cancelled := allocator.cancel_overdue();
  pruned := allocator.prune_history();
end;
$$;

-- When the listener should look again at the latest, if nothing wakes it before: the next backoff to end, lease
-- to expire, routed room to overflow to anyone, or probe of a Qiscus that is down. Null when nothing is pending.
create function allocator.next_due_at()
returns timestamptz
language sql stable
as $$
  select least(
    (select min(next_attempt_at) from allocator.sessions  -- a fresh room is due when queued (see room_due)
     where state = 'waiting' and (reserved_at is not null or priority <> 0) and next_attempt_at > now()),
    (select min(lease_expires_at) from allocator.sessions where lease_expires_at is not null),
    (select min(overflow_at) from allocator.sessions where state = 'waiting' and overflow_at > now()),
    (select probe_at from allocator.qiscus_health where down_since is not null));
$$;

--------------------------------------------------------------------------------------------------------------------
-- Reporting the outcome of a reservation: confirm (Qiscus assigned), fail_transient (try again later),
-- fail_for_agent (Qiscus refused this agent), release_reservation (handed back, not the room's fault).
--------------------------------------------------------------------------------------------------------------------

-- The session a reservation is for, locked, if that reservation is still the current one. A reservation that was
-- rescued, resolved or superseded meanwhile is stale and must change nothing, except that a room resolved while
-- its call was in flight is settled now (see settle_resolved_in_flight): `maybe_landed` says whether the call may
-- have put the agent in the room, `service` is the service id Qiscus's answer named. Every outcome function starts
-- here: a null id means "stale, already settled". `unanswered`: the call got no answer (see attempts.unanswered).
create function allocator.current_reservation(attempt bigint, maybe_landed boolean, service bigint default null,
                                              unanswered boolean default false)
returns allocator.sessions
language plpgsql
as $$
declare
  s allocator.sessions;
begin
  -- By primary keys only, the session's conditions checked here on the locked row: written as one query with
  -- `state = 'reserved'` in its WHERE, the planner took the partial index of open sessions whenever its statistics
  -- were older than a burst of assignments, and walked every open session for each report (bench/drainplans.ts).
  select q.* into s
  from allocator.sessions q
  where q.id = (select a.session_id from allocator.attempts a where a.id = attempt)
  for no key update;
  if s.attempt_id is distinct from attempt then
    -- rescued or superseded: its outcome is stale. But an answer, however late, says the call is over: it can no
    -- longer land (may_land_until)
    if not unanswered then
      update allocator.attempts set unanswered = false where id = attempt and attempts.unanswered;
    end if;
    return null;
  end if;
  if s.state = 'resolved' then
    perform allocator.settle_resolved_in_flight(s, maybe_landed, service, unanswered);
    return null;
  end if;
  return case when s.state = 'reserved' then s end;
end;
$$;

-- A room resolved while its assign call was in flight keeps the agent's slot until the call reports back (see
-- accept_close_request), and is settled by what Qiscus said:
--   the call did not reach Qiscus (`maybe_landed` false)             the slot is free
--   the assign answer names the service that was resolved            it landed, then was resolved: free
--   the answer names a new service whose resolution is stored already  it landed, then was resolved: free
--   otherwise (it landed after the resolution, or we cannot know)    the agent may hold the room:
--     - if the customer wrote again meanwhile (a newer session waits, see follow_late_call), the agent serves that
--       session: it takes over the slot, held for that agent (hold_for), so its call goes to that agent first, a
--       harmless repeat if the call did land. Any other agent would be refused while that one is in the room.
--       (Not when the newer session's webhook named this service as its latest: the customer wrote after it was
--       resolved, so no agent is in the room.)
--     - else it is counted as a room Qiscus shows the agent holding (external_load): a named service until its
--       resolution arrives, an unknown one until the first roster pull that started after the call ended, which
--       sees Qiscus's own count (see external_after_pull). A call that got no answer (`unanswered`: cut by a
--       listener's death, or given up by our client) may still be in Qiscus's hands and land seconds later: it
--       ends, for this rule, when its lease does.
-- A newer session that waited for this answer (follow_late_call) and did not take the slot is due at once.
-- `s`: the session, locked, resolved while its reservation (s.attempt_id) was out.
create function allocator.settle_resolved_in_flight(s allocator.sessions, maybe_landed boolean, service bigint default null,
                                                    unanswered boolean default false)
returns void
language plpgsql
as $$
declare
  newer allocator.sessions;
begin
  -- first, so that may_land_until sees this call among the room's
  update allocator.attempts
  set finished_at = now(), outcome = 'resolved', error = 'resolved while the call was in flight',
      unanswered = settle_resolved_in_flight.unanswered
  where id = s.attempt_id;
  select q.* into newer from allocator.sessions q
  where q.room_id = s.room_id and q.id > s.id and q.state = 'waiting' and not q.holds_slot
  order by q.id desc
  limit 1
  for no key update;
  if maybe_landed and (service is null or service is distinct from s.service_id)
     and not exists (select from allocator.webhooks w
                     where w.room_id = s.room_id and w.kind = 'close_request'
                       and allocator.json_bigint(w.payload -> 'service' -> 'id') = service) then
    if newer.id is not null and (service is null or newer.prior_service_id is distinct from service) then
      perform allocator.hold_for(newer.id, s.agent_id);
      update allocator.sessions set late_landing_at = now() where id = s.id;  -- the history: where the slot came from
      newer := null;
    else
      perform allocator.hand_slot_to_qiscus(s.agent_id, allocator.may_land_until(s));
      -- the new service, if the answer named it: its own resolution frees the count (accept_close_request); and
      -- when, for a session the customer opens before the next pull (follow_late_call)
      update allocator.sessions set late_service_id = service, late_landing_at = now() where id = s.id;
    end if;
  else
    perform allocator.free_slot(s.agent_id);
  end if;
  update allocator.sessions set next_attempt_at = now(), last_error = null, updated_at = now()
  where id = newer.id and next_attempt_at > now() and reserved_at is null;
  update allocator.sessions set attempt_id = null, lease_expires_at = null, owner = null, updated_at = now()
  where id = s.id;
end;
$$;

-- A slot of `agent` that we counted for a room of ours (our_load) becomes a room Qiscus may show the agent holding
-- without us (external_load), because a call of ours may have put the agent in a room we no longer serve. The
-- count stays at least until the first roster pull that starts after now, or after `until` if later (the moment
-- Qiscus can no longer be applying the call; see external_after_pull), which sees Qiscus's own count.
create function allocator.hand_slot_to_qiscus(agent bigint, until timestamptz default null)
returns void
language plpgsql
as $$
declare
  place tid := allocator.lock_agent(agent);  -- its latest version, as every slot update finds it
begin
  update allocator.agents a
  set our_load = a.our_load - 1, external_load = a.external_load + 1, version = a.version + 1,
      -- `until` later than now: this count is held until a pull after it (the others already held, unless their
      -- hold has passed, with it)
      external_held = case when until > now()
                           then case when a.external_hold_until >= now() then a.external_held else 0 end + 1
                           else a.external_held end,
      external_hold_until = greatest(a.external_hold_until, now(), until),
      external_handed_at = now()
  where a.ctid = place;
end;
$$;

-- Until when a call of ours for room `s.room_id` to agent `s.agent_id` may still land: the latest lease end of
-- those that got no answer (attempts.unanswered: cut by a listener's death, or given up by our client) and whose
-- lease has not ended; null when none may. Qiscus may apply such a call seconds after its client has gone, but not
-- after its lease (the longest a call may run, above the client's timeouts). The room's earlier sessions count
-- too: a returning customer's session may hold the slot a late call left (follow_late_call). `resolver`: the agent
-- that resolved the room; when it is this one and the room had only this one call to it, that call had landed.
-- (A call that was answered, a 5xx too, is over: whatever it did, it did before its answer.)
create function allocator.may_land_until(s allocator.sessions, resolver bigint default null)
returns timestamptz
language sql stable
as $$
  with calls as (
    select a.reserved_at, a.unanswered
    from allocator.sessions q
    join allocator.attempts a on a.session_id = q.id
    where q.room_id = s.room_id and a.agent_id = s.agent_id
  )
  select max(c.reserved_at) + allocator.lease()
  from calls c
  where c.unanswered and c.reserved_at + allocator.lease() > now()
    and not (coalesce(resolver = s.agent_id, false) and (select count(*) from calls) = 1)
$$;

-- Session `s` lets go of the slot it holds on its agent (its room resolved, cancelled, given up, passed over): the
-- slot is free, unless a call of ours for the room to that agent may still land (may_land_until) and put the agent
-- back in a room nobody serves. Then, until a roster pull after that, the slot is a count Qiscus may show
-- (hand_slot_to_qiscus), which a returning customer's session of a resolved room may take over (late_landing_at,
-- follow_late_call).
create function allocator.let_go_slot(s allocator.sessions, resolver bigint default null)
returns void
language plpgsql
as $$
declare
  held_until timestamptz := allocator.may_land_until(s, resolver);
begin
  if held_until is null then
    perform allocator.free_slot(s.agent_id);
  else
    perform allocator.hand_slot_to_qiscus(s.agent_id, held_until);
    update allocator.sessions set late_landing_at = now() where id = s.id;
  end if;
end;
$$;

-- Waiting session `session` takes a slot of `agent` the caller has already counted for it (our_load) and holds it
-- as a room that may already be the agent's: the next call goes to that agent first (reserve_held), as the retry
-- of an ambiguous call does (requeue with hold).
create function allocator.hold_for(session bigint, agent bigint)
returns void
language sql
as $$
  update allocator.sessions
  set holds_slot = true, uncertain = true, agent_id = agent, last_agent_id = agent, next_attempt_at = now(),
      updated_at = now()
  where id = session
$$;

-- The sessions Qiscus assigned, each with the service id its answer named (null: keep the one it has), paired by
-- position: the one place the `assigned` state is written (confirm() for one, report() for a batch).
create function allocator.mark_assigned(ids bigint[], services bigint[])
returns void
language plpgsql
as $$
begin
  update allocator.sessions s
  set state = 'assigned', assigned_at = now(), updated_at = now(), lease_expires_at = null, attempt_id = null,
      owner = null, holds_slot = false, uncertain = false, service_id = coalesce(x.service, s.service_id),
      last_error = null
  from unnest(ids, services) x(id, service)
  where s.id = x.id;
end;
$$;

-- Qiscus accepted the assignment (`service`: the service id its answer named). Returns false if the reservation
-- is no longer current. Then the answer is still evidence: a room resolved meanwhile is settled by it, and a room
-- whose reservation was rescued (its listener was thought dead) and now waits for a retry with this same agent is
-- assigned, since the retry would only repeat this call.
create function allocator.confirm(attempt bigint, service bigint default null)
returns boolean
language plpgsql
as $$
declare
  s allocator.sessions := allocator.current_reservation(attempt, maybe_landed => true, service => service);
begin
  perform allocator.qiscus_answered();
  if s.id is null then
    update allocator.attempts set outcome = 'stale', finished_at = now()
    where id = attempt and outcome is null;
    select q.* into s from allocator.sessions q
    join allocator.attempts a on a.session_id = q.id and a.id = attempt
    where q.state = 'waiting' and q.holds_slot and q.agent_id = a.agent_id
    for no key update of q;
    if s.id is null then
      return false;
    end if;
  else
    update allocator.attempts set finished_at = now(), outcome = 'assigned' where id = attempt;
  end if;
  perform allocator.mark_assigned(array[s.id], array[service]);
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
    least(allocator.retry_max_seconds(),
          allocator.retry_base_seconds() * power(2, least(greatest(attempts - 1, 0), 30)))
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
                                  hold boolean default false, unanswered boolean default false)
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
  update allocator.attempts set finished_at = now(), outcome = how, error = reason, unanswered = requeue.unanswered
  where id = attempt;

  if tries >= allocator.max_attempts() then
    give_up := format('gave up after %s attempts; last error: %s', tries, reason);
  elsif cardinality(excluded) > 0
        and not exists (select 1 from allocator.agents a
                        where a.type = 'agent' and a.present and a.id <> all (excluded)) then
    give_up := format('refused by every agent; last error: %s', reason);
  end if;

  if give_up is not null or not keep then
    perform allocator.let_go_slot(s);  -- this call, or an earlier one to the agent, may still land
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
      attempt_id = null, lease_expires_at = null, owner = null, updated_at = now()
  where id = s.id;
  return case when give_up is null then 'waiting' else 'failed' end;
end;
$$;

-- Qiscus failed in a way worth retrying (5xx, 429, timeout, network). The room keeps its place and is not
-- retried before its backoff (or Qiscus's Retry-After, whichever is later). The agent's slot is freed meanwhile,
-- unless `maybe_assigned`: the call may have gone through (a timeout, a 5xx), so the slot stays held and the
-- retry goes to the same agent (see requeue). `unanswered`: no answer came at all (a timeout, a dropped
-- connection): the call may still land (attempts.unanswered). While Qiscus is down for everyone (09-qiscus-health.sql) the
-- failure is not the room's: no attempt is spent and no backoff grows; the probe paces the calls instead.
-- Returns the session's new state ('waiting' or 'failed'), or null when the reservation was stale.
create function allocator.fail_transient(attempt bigint, reason text, retry_after_seconds integer default null,
                                         maybe_assigned boolean default false, unanswered boolean default false)
returns text
language plpgsql
as $$
declare
  no_answer boolean            := maybe_assigned and unanswered;
  s         allocator.sessions := allocator.current_reservation(attempt, maybe_assigned, null, no_answer);
  down      boolean;
begin
  if s.id is null then
    return null;
  end if;
  down := allocator.qiscus_failed(attempt, retry_after_seconds);
  if down then
    return allocator.requeue(s, attempt, 'transient', reason, now(), count_attempt => false, hold => maybe_assigned,
                             unanswered => no_answer);
  end if;
  return allocator.requeue(s, attempt, 'transient', reason,
    now() + greatest(allocator.backoff(s.attempts), make_interval(secs => coalesce(retry_after_seconds, 0))),
    hold => maybe_assigned, unanswered => no_answer);
end;
$$;

-- Qiscus refused this agent for this room (a 4xx): the room never goes to that agent again and may go to
-- another one at once.
create function allocator.fail_for_agent(attempt bigint, reason text)
returns text
language plpgsql
as $$
declare
  s allocator.sessions := allocator.current_reservation(attempt, maybe_landed => false);
begin
  perform allocator.qiscus_answered();
  if s.id is null then
    return null;
  end if;
  return allocator.requeue(s, attempt, 'refused', reason, now(), exclude => s.agent_id);
end;
$$;

-- Hands a reservation back without counting it as an attempt: the listener is shutting down, or Qiscus rejected
-- our credentials (not the room's fault). The room may be retried after `delay_seconds`. `maybe_assigned` as in
-- fail_transient (a call cut short at shutdown may have reached Qiscus).
create function allocator.release_reservation(attempt bigint, reason text, delay_seconds integer default 0,
                                              maybe_assigned boolean default false)
returns text
language plpgsql
as $$
declare
  -- a call that may have gone through is still out (a listener shutting down): unanswered
  s allocator.sessions := allocator.current_reservation(attempt, maybe_assigned, null, maybe_assigned);
begin
  if s.id is null then
    return null;
  end if;
  return allocator.requeue(s, attempt, 'released', reason, now() + make_interval(secs => delay_seconds),
                           count_attempt => false, hold => maybe_assigned, unanswered => maybe_assigned);
end;
$$;

-- Many outcomes in one round trip: `outcomes` is a JSON array of
--   {"attempt": 1, "outcome": "assigned", "service": 115830999}
--   {"attempt": 2, "outcome": "transient", "reason": "HTTP 503", "retry_after": 3, "maybe_assigned": true,
--    "unanswered": false}
--   {"attempt": 3, "outcome": "refused", "reason": "HTTP 400 ..."}
--   {"attempt": 4, "outcome": "released", "reason": "...", "delay": 30, "maybe_assigned": false}
-- each applied by the function of its kind above, all in one transaction. Returns each attempt with the result of
-- its function as text (confirm: true/false; the others: the room's new state, null when stale).
-- Locks are taken in one order (the rooms by id, then their agents by id, as everyone else does: room, then
-- agent), so two batches, or a batch and a webhook, cannot deadlock over agents they share.
create function allocator.report(outcomes jsonb)
returns table (attempt_id bigint, result text)
language plpgsql
set enable_seqscan = off set enable_bitmapscan = off  -- see "Plans" in 00-basics.sql
set plan_cache_mode = force_generic_plan
as $$
declare
  o        jsonb;
  reported bigint[] := array(select (x ->> 'attempt')::bigint from jsonb_array_elements(outcomes) x);
  confirmed bigint[];  -- the attempts confirmed by the set-based step, and their sessions and services
  ids       bigint[];
  services  bigint[];
begin
  -- `= any (array(...))`, not `in (select ...)`: the planner cannot tell how many rows a jsonb array holds and,
  -- guessing a hundred, read the whole table instead of its primary key.
  perform from allocator.sessions s
  where s.id = any (array(select a.session_id from allocator.attempts a where a.id = any (reported)))
  order by s.id
  for no key update of s;
  perform allocator.lock_agents(array(select a.agent_id from allocator.attempts a where a.id = any (reported)));

  -- The usual outcome, set-based: an assignment whose reservation is still current (what confirm() does when
  -- current_reservation() finds the room reserved by this attempt), in one statement for the batch instead of
  -- four per room. Every other outcome, and an assignment that is stale or whose room was resolved meanwhile,
  -- goes through the functions below. The rows are locked above, so what is read here stays true.
  select array_agg(a.id), array_agg(s.id), array_agg((x ->> 'service')::bigint)
  into confirmed, ids, services
  from jsonb_array_elements(outcomes) x
  join allocator.attempts a on a.id = (x ->> 'attempt')::bigint
  join allocator.sessions s on s.id = a.session_id
  where x ->> 'outcome' = 'assigned' and s.attempt_id = a.id and s.state = 'reserved';
  if confirmed is not null then
    update allocator.attempts set finished_at = now(), outcome = 'assigned' where id = any (confirmed);
    perform allocator.mark_assigned(ids, services);
    perform allocator.qiscus_answered();
  end if;

  for o in select x from jsonb_array_elements(outcomes) x loop
    attempt_id := (o ->> 'attempt')::bigint;
    if o ->> 'outcome' = 'assigned' and attempt_id = any (confirmed) then
      confirmed := array_remove(confirmed, attempt_id);  -- the same attempt listed twice is stale the second time
      result := 'true';
      return next;
      continue;
    end if;
    result := case o ->> 'outcome'
      when 'assigned' then allocator.confirm(attempt_id, (o ->> 'service')::bigint)::text
      when 'transient' then allocator.fail_transient(attempt_id, o ->> 'reason', (o ->> 'retry_after')::integer,
                                                      coalesce((o ->> 'maybe_assigned')::boolean, false),
                                                      coalesce((o ->> 'unanswered')::boolean, false))
      when 'refused' then allocator.fail_for_agent(attempt_id, o ->> 'reason')
      when 'released' then allocator.release_reservation(attempt_id, o ->> 'reason',
                                                         coalesce((o ->> 'delay')::integer, 0),
                                                         coalesce((o ->> 'maybe_assigned')::boolean, false))
    end;
    if o ->> 'outcome' not in ('assigned', 'transient', 'refused', 'released') then
      raise exception 'report: unknown outcome %', o ->> 'outcome' using errcode = 'invalid_parameter_value';
    end if;
    return next;
  end loop;
end;
$$;

--------------------------------------------------------------------------------------------------------------------
-- Webhooks in: the Custom Agent Allocation webhook queues a room, the Mark-as-Resolved webhook closes it. Each is
-- stored raw in allocator.webhooks in the same transaction as its effect, so a webhook is either here and applied,
-- or was never acknowledged.
--------------------------------------------------------------------------------------------------------------------

-- Serialises all work on one room (webhooks of both kinds), so "is there an open session?" and "open one" cannot
-- interleave. Transaction-scoped: released at commit.
create function allocator.lock_room(room text)
returns void
language sql
as $$ select pg_advisory_xact_lock(1364, hashtext(room)) $$;

-- A returning customer's session `session`, just opened by a webhook whose latest service is `prior`, whose room's
-- previous session `previous` was resolved while an assign call of ours was out for it: that call may put its agent
-- in the room after the resolution (Qiscus then opens a new service with the agent in it,
-- settle_resolved_in_flight), and the agent then serves the customer who wrote meanwhile. Any other agent asked for the room would be refused ("room already has the
-- maximum number of agents"), one after another. So:
--   the call is still out        the new session waits for its answer, until a second after its lease ends at
--                                most (the listeners rescue an expired lease 20 ms after it ends, next_due_at, and
--                                the rescue settles it): the answer settles it (settle_resolved_in_flight gives it
--                                the slot, or wakes it)
--   it landed late, on service L  the new session takes over the count L added on the agent, as a slot it holds:
--                                its call goes to that agent first (reserve_held), a harmless repeat. Not when
--                                the webhook names L as its latest service: then L was resolved before the
--                                customer wrote (its resolution has not reached us yet), and no agent is in the
--                                room.
--   it may have landed late, Qiscus named no service (a timeout, a 5xx, a rescue), and no roster pull began since
--                                the same: the count added on the agent is still this room's (a pull would have
--                                made it a count of Qiscus's, which may be another room's)
-- The previous session is locked first, as report() does: its answer cannot be settled unseen between our read
-- and our commit.
create function allocator.follow_late_call(session bigint, prior bigint, previous bigint)
returns void
language plpgsql
as $$
declare
  p     allocator.sessions;
  place tid;
begin
  select q.* into p from allocator.sessions q where q.id = previous for no key update;
  if p.attempt_id is not null then
    update allocator.sessions
    set next_attempt_at = greatest(p.lease_expires_at + interval '1 second', now()),
        last_error = 'waiting for the answer of the assign call made for the previous session'
    where id = session;
  elsif (p.late_service_id is not null and prior is distinct from p.late_service_id)
        or (p.late_service_id is null and p.late_landing_at is not null
            and p.late_landing_at > coalesce((select r.started_at from allocator.roster_pulls r), '-infinity')) then
    -- guarded as take_slot is: the count moves from external_load to our_load, the sum stays (an agent counted
    -- above its capacity by a pull keeps the count where it is, and the session queues as any other)
    place := allocator.lock_agent(p.agent_id);  -- its latest version, as every slot update finds it
    update allocator.agents a
    set our_load = a.our_load + 1, external_load = a.external_load - 1, version = a.version + 1
    where a.ctid = place and a.external_load > 0 and a.total_load <= allocator.capacity(a.max_load);
    if found then
      -- late_landing_at stays, as history: the new session, now the room's last, is the one read from here on
      update allocator.sessions set late_service_id = null where id = p.id;
      perform allocator.hold_for(session, p.agent_id);
    end if;
  end if;
end;
$$;

-- Custom Agent Allocation webhooks, many in one call. Qiscus sends one on every customer message while the room has
-- no agent, so most are repeats and must change nothing. `requests` is a JSON array of
-- {"payload": {...}, "request_id": "..."}; one row per element, `ord` its place in the array (from 1):
--   queued            a new waiting session was opened (new or returning customer)
--   already_queued    the room is already waiting
--   already_assigned  the room is reserved or assigned
--   duplicate         a late copy of a webhook that opened one of the room's sessions, since resolved
-- Set-based: per round, one SELECT that tells what each webhook is, one INSERT of the new sessions (when there are
-- any) and one of the webhooks. A statement on allocator.sessions sets up its indexes, check constraints, generated
-- column and triggers before its first row; one statement per webhook paid that setup for each, and it was most of
-- a webhook's cost (PostgreSQL CPU per webhook: 103 us in batches of 16, against 60 us set-based). A room's webhooks
-- apply in their order, as if one after another: its first in the first round, its second (a repeat in the same
-- batch) in the second, and so on; a batch rarely needs more than one round. Rooms are locked first, in the batch's
-- order (the caller sorts it by room: see accept_requests). An error in any webhook fails the call
-- (accept_requests then applies them one at a time).
create function allocator.accept_new_requests(requests jsonb)
returns table (ord integer, outcome text, session_id bigint, webhook_id bigint)
language plpgsql
set enable_seqscan = off  -- see "Plans" in 00-basics.sql
as $$
declare
  rooms        text[];
  priors       bigint[];
  payloads     jsonb[];
  request_ids  text[];
  nths         integer[];  -- its place among the batch's webhooks of its room (1: the first)
  rounds       integer;    -- the most webhooks of one room
  round        integer := 1;
  o_ords       integer[] := '{}';  -- the results, round after round
  o_outcomes   text[] := '{}';
  o_sessions   bigint[] := '{}';
  o_hooks      bigint[] := '{}';
  r_ords       integer[];          -- one round's
  r_outcomes   text[];
  r_sessions   bigint[];
  r_hooks      bigint[];
  r_last       bigint[];           -- the room's last session before this webhook
  r_call_out   boolean[];          -- ... resolved while a call of ours was out for it
  follow       bigint[];           -- new sessions whose room's previous session was resolved with a call out,
  follow_prior bigint[];           -- the latest service their webhook named,
  follow_prev  bigint[];           -- and that previous session
begin
  select array_agg(x.room order by x.n), array_agg(x.prior order by x.n), array_agg(x.payload order by x.n),
         array_agg(x.request_id order by x.n),
         array_agg(x.nth order by x.n), coalesce(max(x.nth), 0)
  into rooms, priors, payloads, request_ids, nths, rounds
  from (select r.*, row_number() over (partition by r.room order by r.n)::integer as nth
        from (select t.n, t.e -> 'payload' as payload, t.e ->> 'request_id' as request_id,
                     nullif(btrim(t.e -> 'payload' ->> 'room_id'), '') as room,
                     allocator.json_bigint(t.e -> 'payload' -> 'latest_service' -> 'id') as prior
              from jsonb_array_elements(requests) with ordinality as t(e, n)) r) x;
  if array_position(rooms, null) is not null then
    raise exception 'room_id is required' using errcode = 'invalid_parameter_value';
  end if;
  perform allocator.lock_room(u.room) from unnest(rooms) with ordinality as u(room, n) order by u.n;

  while round <= rounds loop
    -- What each of the round's webhooks is (rooms are unique within a round)
    select array_agg(c.ord order by c.ord), array_agg(c.outcome order by c.ord), array_agg(c.known order by c.ord),
           array_agg(c.last_id order by c.ord), array_agg(c.last_call_out order by c.ord)
    into r_ords, r_outcomes, r_sessions, r_last, r_call_out
    from (select b.ord, last.id as last_id,
                 last.state = 'resolved' and (last.attempt_id is not null or last.late_landing_at is not null) as last_call_out,
                 case when last.state = 'waiting' then 'already_queued'
                      when last.state in ('reserved', 'assigned') then 'already_assigned'
                      when dup.id is not null then 'duplicate'
                      else 'queued' end as outcome,
                 case when last.state in ('waiting', 'reserved', 'assigned') then last.id else dup.id end as known
          from (select u.n::integer as ord, u.room, u.prior
                from unnest(rooms, priors, nths) with ordinality as u(room, prior, nth, n)
                where u.nth = round) b
          left join lateral (select s.id, s.state, s.attempt_id, s.late_landing_at
                             from allocator.sessions s where s.room_id = b.room
                             order by s.id desc limit 1) last on true
          -- Same latest_service as the webhook that opened a session since resolved: a redelivery, not a new
          -- customer message (a returning customer's webhook names the service that was just resolved, which no
          -- earlier session was opened after).
          left join lateral (select r.id from allocator.sessions r
                             where last.state not in ('waiting', 'reserved', 'assigned')
                               and r.room_id = b.room and r.state = 'resolved'
                               and r.prior_service_id is not distinct from b.prior
                             order by r.id desc limit 1) dup on true) c;

    -- New sessions, when the round has any: a statement on sessions takes the intake lock until commit (see
    -- take_intake_lock), which repeats have no need to hold.
    if 'queued' = any (r_outcomes) then
      with fresh as (
        insert into allocator.sessions (room_id, source, channel_id, prior_service_id)
        select rooms[u.o], nullif(payloads[u.o] ->> 'source', ''), allocator.json_bigint(payloads[u.o] -> 'channel' -> 'id'),
               priors[u.o]
        from unnest(r_ords, r_outcomes) as u(o, outcome)
        where u.outcome = 'queued'
        order by u.o
        returning id, room_id
      )
      select array_agg(coalesce(u.known, f.id) order by u.o) into r_sessions
      from unnest(r_ords, r_sessions) as u(o, known)
      left join fresh f on f.room_id = rooms[u.o];
    end if;

    with hooks as (
      insert into allocator.webhooks (kind, room_id, request_id, outcome, session_id, payload)
      select 'new_request', rooms[u.o], request_ids[u.o], u.outcome, u.session, payloads[u.o]
      from unnest(r_ords, r_outcomes, r_sessions) as u(o, outcome, session)
      order by u.o
      returning webhooks.id, webhooks.room_id
    )
    select array_agg(h.id order by u.o) into r_hooks
    from unnest(r_ords) as u(o) join hooks h on h.room_id = rooms[u.o];

    -- Returning customers whose previous session was resolved while a call of ours was out (rare): their previous
    -- sessions locked first, then those sessions' agents, each in id order, as report() and batches of resolutions
    -- lock them.
    select array_agg(u.session), array_agg(priors[u.o]), array_agg(u.last)
    into follow, follow_prior, follow_prev
    from unnest(r_ords, r_outcomes, r_sessions, r_last, r_call_out) as u(o, outcome, session, last, call_out)
    where u.outcome = 'queued' and u.call_out;
    if follow is not null then
      perform from allocator.sessions p where p.id = any (follow_prev) order by p.id for no key update;
      perform allocator.lock_agents(array(select p.agent_id from allocator.sessions p where p.id = any (follow_prev)));
      perform allocator.follow_late_call(f.session, f.prior, f.previous)
      from unnest(follow, follow_prior, follow_prev) as f(session, prior, previous);
    end if;

    o_ords := o_ords || r_ords;
    o_outcomes := o_outcomes || r_outcomes;
    o_sessions := o_sessions || r_sessions;
    o_hooks := o_hooks || r_hooks;
    round := round + 1;
  end loop;

  return query select u.o, u.outcome, u.s, u.w from unnest(o_ords, o_outcomes, o_sessions, o_hooks) as u(o, outcome, s, w)
               order by u.o;
end;
$$;

-- One Custom Agent Allocation webhook (see accept_new_requests).
create function allocator.accept_new_request(payload jsonb, request_id text default null)
returns table (outcome text, session_id bigint, webhook_id bigint)
language sql
as $$
  select a.outcome, a.session_id, a.webhook_id
  from allocator.accept_new_requests(jsonb_build_array(jsonb_build_object('payload', payload, 'request_id', request_id))) a
$$;

-- Mark-as-Resolved webhook: closes the room's open session and frees its agent's slot, whatever state it was in.
--   resolved          an open session was closed
--   already_resolved  the room's last session is resolved already (a repeat)
--   unknown_room      we never had this room
create function allocator.accept_close_request(payload jsonb, request_id text default null)
returns table (outcome text, session_id bigint, webhook_id bigint)
language plpgsql
set enable_seqscan = off  -- see "Plans" in 00-basics.sql
as $$
declare
  room      text   := nullif(btrim(payload -> 'service' ->> 'room_id'), '');
  service   bigint := allocator.json_bigint(payload -> 'service' -> 'id');
  resolver  bigint := allocator.json_bigint(payload -> 'resolved_by' -> 'id');
  last      allocator.sessions;
  late_agent bigint;
  place     tid;
  landed    boolean;
  in_flight boolean;
  late_freed boolean := false;
  v_outcome text;
begin
  if room is null then
    raise exception 'service.room_id is required' using errcode = 'invalid_parameter_value';
  end if;
  perform allocator.lock_room(room);

  select * into last from allocator.sessions s where s.room_id = room order by s.id desc limit 1 for update;

  if service is not null
     and exists (select from allocator.sessions r where r.room_id = room and r.late_service_id = service) then
    -- The resolution of a service a late assign call opened (see settle_resolved_in_flight): the agent no longer
    -- holds the room, so the count it added goes at once. The resolution then applies like any other: a session
    -- still open was queued by a message sent while the room had no agent, i.e. before that service was resolved
    -- (one queued after names it as prior_service_id, below), so the room it waits for is the one just resolved
    -- in Qiscus, and left waiting it would be given a second agent in a room nobody waits in.
    for late_agent in select r.agent_id from allocator.sessions r
                      where r.room_id = room and r.late_service_id = service loop
      place := allocator.lock_agent(late_agent);  -- its latest version, as every slot update finds it
      update allocator.agents a set external_load = greatest(a.external_load - 1, 0), version = a.version + 1
      where a.ctid = place;
    end loop;
    update allocator.sessions r set late_service_id = null, late_landing_at = null
    where r.room_id = room and r.late_service_id = service;
    late_freed := true;
  end if;

  if last.id is null then
    v_outcome := 'unknown_room';
  elsif service is not null
        and (last.prior_service_id = service
             or exists (select from allocator.sessions r
                        where r.room_id = room and r.state = 'resolved' and r.service_id = service)) then
    -- A repeat of a resolution already applied: the open session, if any, is a returning customer's new one
    -- (opened after that service was resolved), so it must stay open.
    v_outcome := 'already_resolved';
  elsif service is not null and last.state = 'assigned' and service < last.service_id then
    -- The resolution of an earlier service than the one the agent holds now (Qiscus numbers services in order):
    -- after it, a call of ours opened a newer one (the retry of a rescued reservation whose first call had landed
    -- and been resolved before its webhook reached us). Closing the session would free a slot Qiscus still counts;
    -- the resolution of last.service_id will close it.
    v_outcome := 'earlier_service';
  elsif last.state in ('waiting', 'reserved', 'assigned') then
    -- A reserved room's call is in flight. If the agent we reserved resolved the room, and this call is the only
    -- one that can have put it there, the assignment landed before the resolution: the slot is free now. (Not
    -- for the retry of an ambiguous call, `uncertain`: the agent may hold the room from the first call, and the
    -- retry may land after the resolution.) Otherwise the room keeps the slot (and its attempt and lease) until
    -- the call reports back: settle_resolved_in_flight() then decides from Qiscus's answer.
    landed := last.state = 'reserved' and not last.uncertain and resolver is not null and resolver = last.agent_id;
    if last.holds_slot then
      perform allocator.let_go_slot(last, resolver);  -- waiting to retry a call that may still land
    elsif last.state = 'assigned' or landed then
      -- Qiscus's answer says the agent is in the room: the call that put it there is over. (An earlier call to the
      -- agent that got no answer may in theory land after this resolution; holding every such slot until that
      -- call's lease would cost an agent a slot for 30 s after each listener kill, and is not done.)
      perform allocator.free_slot(last.agent_id);
    end if;
    if landed then
      update allocator.attempts set finished_at = now(), outcome = 'resolved',
                                    error = 'resolved by the agent while the call was in flight'
      where id = last.attempt_id;
    end if;
    in_flight := last.state = 'reserved' and not landed;
    update allocator.sessions
    set state = 'resolved', resolved_at = now(), updated_at = now(), holds_slot = false, uncertain = false,
        attempt_id = case when in_flight then last.attempt_id end,
        lease_expires_at = case when in_flight then last.lease_expires_at end,
        owner = case when in_flight then last.owner end,
        service_id = coalesce(service, sessions.service_id)
    where id = last.id;
    v_outcome := 'resolved';
  else
    v_outcome := 'already_resolved';
  end if;
  if late_freed then
    v_outcome := 'resolved';  -- the late service's count was freed, whether or not a session was closed
  end if;

  insert into allocator.webhooks (kind, room_id, request_id, outcome, session_id, payload)
  values ('close_request', room, request_id, v_outcome, last.id, payload)
  returning id into webhook_id;

  outcome := v_outcome;
  session_id := last.id;
  return next;
end;
$$;

-- A room that became due wakes the listeners: a waiting one updated here ...
create trigger notify_room_waiting
  after update of state, next_attempt_at on allocator.sessions
  for each row when (new.state = 'waiting' and new.next_attempt_at <= now())
  execute function allocator.notify('room');

-- ... and new ones, once per statement (sessions_queued), as the queue head is moved back for fresh rooms queued
-- behind it (queue_fresh_room): one call for a batch of webhooks, not one each. Never disable this trigger for a
-- bulk load: rooms queued behind the head would stay hidden from reserve() until a room is queued before them.
create function allocator.sessions_queued()
returns trigger
language plpgsql
as $$
begin
  perform allocator.queue_fresh_room(min(n.queued_at))
  from new_sessions n
  where n.state = 'waiting' and n.reserved_at is null and n.priority = 0
  having count(*) > 0;
  if exists (select from new_sessions n where n.state = 'waiting' and n.next_attempt_at <= now()) then
    perform pg_notify('allocator', 'room');
  end if;
  return null;
end;
$$;

create trigger sessions_queued
  after insert on allocator.sessions
  referencing new table as new_sessions
  for each statement execute function allocator.sessions_queued();

-- Many webhooks of one kind in one round trip: the web app's group commit (the webhooks that arrived while its
-- previous call of that kind ran). `kind` is 'new_request' or 'close_request'; `requests` is a JSON array of
-- {"payload": {...}, "request_id": "..."}: allocation webhooks applied set-based by accept_new_requests,
-- resolutions one after another by accept_close_request; one that fails (odd data that got past validation)
-- affects no other: its row carries the error (error_code, error) instead. All commit together, so each webhook is still answered only once its row is committed.
-- Lock order, so that batches never deadlock with each other or with the listeners: the caller orders the batch by
-- room, and rooms are locked in that order (both kinds). Resolutions also lock rows: all their rooms first, then
-- the rooms' sessions, then those sessions' agents, each in id order, as report() does (sessions, then agents);
-- taken one resolution at a time, an agent locked before the next room's session would cross a report's order.
create function allocator.accept_requests(kind text, requests jsonb)
returns table (ord integer, outcome text, session_id bigint, webhook_id bigint, error_code text, error text)
language plpgsql
set enable_seqscan = off  -- see "Plans" in 00-basics.sql
as $$
declare
  r        jsonb;
  rooms    text[];
  room     text;
  held     bigint[];
  o        text;
  sid      bigint;
  wid      bigint;
  outcomes text[] := '{}';
  sessions bigint[] := '{}';
  hooks    bigint[] := '{}';
  os       text[];
  ss       bigint[];
  ws       bigint[];
  codes    text[] := '{}';
  errors   text[] := '{}';
  alone    boolean := false;
  total    integer;
  i        integer;
  k        integer;
  upto     integer;
begin
  if kind not in ('new_request', 'close_request') then
    raise exception 'accept_requests: unknown kind %', kind using errcode = 'invalid_parameter_value';
  end if;
  if kind = 'close_request' then
    rooms := array(select nullif(btrim(x -> 'payload' -> 'service' ->> 'room_id'), '')
                   from jsonb_array_elements(requests) with ordinality as t(x, n)
                   order by n);
    foreach room in array rooms loop
      if room is not null then
        perform allocator.lock_room(room);
      end if;
    end loop;
    -- the rows accept_close_request writes: each room's last session, the sessions of late landings, their agents
    -- (not the rooms' older sessions: retention deletes those, in an order of its own)
    held := array(select (select q.id from allocator.sessions q where q.room_id = u.room order by q.id desc limit 1)
                  from unnest(rooms) as u(room))
            || array(select q.id from allocator.sessions q where q.room_id = any (rooms) and q.late_service_id is not null);
    perform from allocator.sessions s where s.id = any (held) order by s.id for update;
    perform allocator.lock_agents(array(select s.agent_id from allocator.sessions s where s.id = any (held)));
  end if;

  -- All in one subtransaction first: one per webhook cost a subtransaction id and its bookkeeping for every
  -- webhook (a third of PostgreSQL's time per webhook in a batch of 64). Only when one fails is the batch done
  -- again (`alone`), each webhook in a subtransaction of its own: the block below then covers one webhook.
  -- Allocation webhooks go in one set-based call (accept_new_requests), resolutions one call each. (One call site
  -- per kind, not a helper function: with a PL/pgSQL function between them, a call in progress while `npm run
  -- migrate` re-applied db/code failed with "cache lookup failed for function", test/sql/code.test.ts.)
  total := jsonb_array_length(requests);
  i := 0;
  while i < total loop
    upto := case when alone then i else total - 1 end;
    begin
      if kind = 'new_request' then
        select array_agg(a.outcome order by a.ord), array_agg(a.session_id order by a.ord),
               array_agg(a.webhook_id order by a.ord)
        into os, ss, ws
        from allocator.accept_new_requests(case when alone then jsonb_build_array(requests -> i) else requests end) a;
        outcomes := outcomes || os;
        sessions := sessions || ss;
        hooks := hooks || ws;
        codes := codes || array_fill(null::text, array[upto - i + 1]);
        errors := errors || array_fill(null::text, array[upto - i + 1]);
      else
        for k in i .. upto loop
          r := requests -> k;
          select a.outcome, a.session_id, a.webhook_id into o, sid, wid
          from allocator.accept_close_request(r -> 'payload', r ->> 'request_id') a;
          outcomes := outcomes || o;
          sessions := sessions || sid;
          hooks := hooks || wid;
          codes := codes || null::text;
          errors := errors || null::text;
        end loop;
      end if;
      i := upto + 1;
    exception when others then
      if alone then  -- this webhook alone failed: its row carries the error
        outcomes := outcomes || null::text;
        sessions := sessions || null::bigint;
        hooks := hooks || null::bigint;
        codes := codes || sqlstate;
        errors := errors || sqlerrm;
        i := i + 1;
      else  -- the batch was rolled back: start again, one webhook at a time
        alone := true;
        outcomes := '{}'; sessions := '{}'; hooks := '{}'; codes := '{}'; errors := '{}';
        i := 0;
      end if;
    end;
  end loop;
  return query select u.n::integer, u.o, u.s, u.w, u.c, u.e
               from unnest(outcomes, sessions, hooks, codes, errors) with ordinality as u(o, s, w, c, e, n);
end;
$$;

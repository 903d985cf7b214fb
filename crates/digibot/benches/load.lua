-- wrk script of the load benchmark (host/benches/load.rs, scripts/bench-load).
--
--   WRK_IDS_OUT=FILE [WRK_DELAY_MS=N] wrk ... -s load.lua URL -- TEMPLATE TOKEN TAG CONVERSATIONS
--
-- Posts the webhook in TEMPLATE (one line of JSON, from the shared fixtures)
-- with a unique message id per request, `TAG-THREAD-N-SENTUS`, whose last
-- field is the send time (CLOCK_REALTIME, microseconds): the benchmark joins
-- it to the Messages API request that reaches the fake (its Idempotency-Key
-- carries the event id) for webhook-to-API latency. `@ID@` and `@CONV@` in
-- the template are replaced; conversations rotate over CONVERSATIONS.
--
-- Every 2xx answer is counted; digibot's carries `event_id`, which is kept,
-- and done() writes the acknowledged ids to $WRK_IDS_OUT (one a line), the run's
-- summary as one JSON line to stdout.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_us()
    ffi.C.clock_gettime(0, clock) -- CLOCK_REALTIME: comparable across processes
    return tonumber(clock.tv_sec) * 1000000 + math.floor(tonumber(clock.tv_nsec) / 1000)
end

-- WRK_DELAY_MS > 0 paces each connection (a steady rate instead of as
-- fast as answers come). Read here, in every state: wrk asks the main
-- state whether delay() exists.
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
if delay_ms > 0 then
    function delay()
        return delay_ms
    end
end

local threads = {}
local thread_count = 0

-- Main state: number the threads.
function setup(thread)
    thread:set("thread_no", thread_count)
    thread_count = thread_count + 1
    table.insert(threads, thread)
end

local pieces, slots, headers = {}, {}, {}
local tag, conversations = "run", 1000
-- Globals, so that done() can read them from each thread.
n, acked, refused, ids = 0, 0, 0, {}

-- Thread state.
function init(args)
    local file = assert(io.open(args[1], "r"))
    local template = file:read("*l")
    file:close()
    headers["Content-Type"] = "application/json"
    if args[2] ~= nil and args[2] ~= "" then
        headers["Authorization"] = "Bearer " .. args[2]
    end
    tag = args[3] or tag
    conversations = tonumber(args[4] or conversations)
    -- Split the template once at its @NAME@ markers.
    local pos = 1
    while true do
        local s, e, name = template:find("@(%u+)@", pos)
        if not s then break end
        table.insert(pieces, template:sub(pos, s - 1))
        table.insert(slots, name)
        pos = e + 1
    end
    table.insert(pieces, template:sub(pos))
end

function request()
    n = n + 1
    local values = {
        -- %.0f: a plain concatenation would print 1.7e+15.
        ID = string.format("%s-%d-%d-%.0f", tag, thread_no, n, now_us()),
        CONV = "conv_load_" .. ((thread_no * 7919 + n) % conversations),
    }
    local parts = {}
    for i = 1, #slots do
        parts[#parts + 1] = pieces[i]
        parts[#parts + 1] = values[slots[i]]
    end
    parts[#parts + 1] = pieces[#pieces]
    return wrk.format("POST", "/webhooks/digishare", headers, table.concat(parts))
end

function response(status, _, body)
    if status >= 200 and status < 300 then
        acked = acked + 1
        local id = body and body:match('"event_id":"([^"]+)"')
        if id then ids[#ids + 1] = id end
    else
        refused = refused + 1
    end
end

-- Main state, after the run.
function done(summary, latency, _)
    local out = io.open(os.getenv("WRK_IDS_OUT") or "/dev/null", "w")
    local total_acked, total_refused, total_sent = 0, 0, 0
    for _, thread in ipairs(threads) do
        total_acked = total_acked + thread:get("acked")
        total_refused = total_refused + thread:get("refused")
        total_sent = total_sent + thread:get("n")
        if out then
            for _, id in ipairs(thread:get("ids")) do out:write(id, "\n") end
        end
    end
    if out then out:close() end
    local e = summary.errors
    io.write(string.format(
        '{"duration_us":%d,"requests":%d,"sent":%d,"acked":%d,"refused":%d,' ..
        '"socket_errors":%d,"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
        summary.duration, summary.requests, total_sent, total_acked, total_refused,
        e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency.max, latency.mean))
end

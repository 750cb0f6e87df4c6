-- One request, repeated over keep-alive connections: METHOD, BODY, TOKEN and
-- CONTENT_TYPE come from the environment; PATHS, comma separated, are requested in
-- turn instead of the URL's path. Prints the summary as one JSON line.
wrk.method = os.getenv("METHOD") or "GET"
wrk.body = os.getenv("BODY")
if os.getenv("TOKEN") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
end
if os.getenv("CONTENT_TYPE") then
  wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
end

local paths = {}
for path in string.gmatch(os.getenv("PATHS") or "", "[^,]+") do
  table.insert(paths, path)
end
local turn = 0

if #paths > 0 then
  function request()
    turn = turn % #paths + 1
    return wrk.format(nil, paths[turn])
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "non2xx": %d, ' ..
    '"socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50),
    latency:percentile(99), errors.status,
    errors.connect + errors.read + errors.write + errors.timeout))
end

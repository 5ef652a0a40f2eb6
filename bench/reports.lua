-- wrk script: realistic CSP reports (legacy report-uri shape, as Firefox and
-- Chromium send them), 1,000 distinct documents and 50 blocked hosts, so the
-- store both inserts new rows and adds to the counts of identical ones.
-- BENCH_DISTINCT=1: every report distinct (a new row each: inserts only).
local counter = 0
local distinct = os.getenv("BENCH_DISTINCT") == "1"
local template = '{"csp-report":{"document-uri":"https://app.example/page/%d?session=abc%d",'
  .. '"referrer":"https://app.example/","violated-directive":"script-src-elem",'
  .. '"effective-directive":"script-src-elem",'
  .. '"original-policy":"default-src \'self\'; script-src \'self\'; report-uri /__cspreport__",'
  .. '"disposition":"enforce","blocked-uri":"https://cdn%d.example/lib.js?v=%d",'
  .. '"line-number":%d,"column-number":12,"source-file":"https://app.example/static/app.js",'
  .. '"status-code":200,"script-sample":""}}'
local headers = {
  ["Content-Type"] = "application/csp-report",
  ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
}

request = function()
  counter = counter + 1
  local n = counter % 1000
  local line = distinct and counter or n
  local body = string.format(template, n, counter, n % 50, counter, line)
  return wrk.format("POST", "/__cspreport__", headers, body)
end

done = function(summary, latency, requests)
  local codes = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration, codes.status,
    codes.connect + codes.read + codes.write + codes.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end

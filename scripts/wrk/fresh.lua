-- Every request is new: its own Idempotency-Key and its own user, so neither
-- the HTTP layer nor create_order's business key ever replays.
local run = os.time() % 100000
local n = 0
request = function()
  n = n + 1
  local user = run * 100000000 + n
  local body = string.format('{"user_id":"u-%d","product_id":"SKU-0001","quantity":1}', user)
  return wrk.format("POST", "/orders", {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("fresh-%d-%d", run, n),
  }, body)
end

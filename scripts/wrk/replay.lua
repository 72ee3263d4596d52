-- The same request again and again. bench-http.sh sends it once first (so no
-- request meets it in flight); every request wrk sends is then a replay.
local body = '{"user_id":"u-424242","product_id":"SKU-0001","quantity":1}'
request = function()
  return wrk.format("POST", "/orders", {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "replay-1",
  }, body)
end

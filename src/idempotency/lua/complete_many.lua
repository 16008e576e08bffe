local ttl = ARGV[#KEYS + 1]
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v == ARGV[i] then
    redis.call('SET', key, 'done', 'PX', ttl)
    out[i] = 1
  elseif v == 'done' then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out

local lease = ARGV[#KEYS + 1]
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i], 'NX', 'PX', lease) then
    out[i] = 1
  else
    local v = redis.call('GET', key)
    if v == 'done' then out[i] = 2 elseif v == ARGV[i] then out[i] = 1 else out[i] = 3 end
  end
end
return out

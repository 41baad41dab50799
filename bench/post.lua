-- wrk script: POST the JSON bodies of BODIES_FILE (one a line, in turn) with the
-- API key INGEST_KEY. Used by bench/ingest.py.
local bodies = {}
for line in io.lines(os.getenv("BODIES_FILE")) do bodies[#bodies + 1] = line end
local next_body = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("INGEST_KEY")

request = function()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end

--- `:checkhealth codefill`: the Neovim version and mode, the server command, the model, the running client.
local M = {}

function M.check()
  local health = vim.health
  local codefill = require("codefill")
  health.start("codefill")

  local v = vim.version()
  local version = ("%d.%d.%d"):format(v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.10") == 0 then
    health.error("Neovim " .. version .. " is too old: codefill needs 0.10+")
  elseif vim.lsp.inline_completion then
    health.ok("Neovim " .. version .. ": inline completion (vim.lsp.inline_completion)")
  else
    health.warn(
      "Neovim " .. version .. ": no vim.lsp.inline_completion, using the completion menu",
      { "Neovim 0.12+ shows suggestions as ghost text" }
    )
  end
  health.info("mode: " .. codefill.mode())

  local cmd = codefill.cmd()
  if vim.fn.executable(cmd[1]) == 1 then
    health.ok("server command: " .. table.concat(cmd, " "))
  else
    health.error(cmd[1] .. " is not executable", { "pip install the codefill project, or set `cmd` in setup()" })
  end
  local model = codefill.config.model or vim.env.CODEFILL_MODEL
  if codefill.config.cmd then
    health.info("model: given by `cmd`")
  elseif not model then
    health.error("no model", { "setup({ model = '/path/to/MODEL_DIR' }) or export CODEFILL_MODEL" })
  elseif vim.fn.isdirectory(vim.fn.expand(model)) == 0 then
    health.error("model directory not found: " .. model)
  else
    health.ok("model: " .. model)
  end

  local clients = vim.lsp.get_clients({ name = codefill.name })
  if #clients == 0 then
    health.info("no codefill client running (open a file the server attaches to)")
    return
  end
  local stats, err = codefill.stats()
  if not stats then
    health.error("codefill/stats failed: " .. tostring(err))
    return
  end
  local worker = stats.worker or {}
  if worker.up then
    health.ok("worker up")
  elseif type(worker.down_reason) == "string" then
    health.warn("worker down: " .. worker.down_reason)
  else
    health.info("worker not connected yet (the server connects on the first request)")
  end
  health.info("stats: " .. vim.inspect(stats, { newline = " ", indent = "" }))
end

return M

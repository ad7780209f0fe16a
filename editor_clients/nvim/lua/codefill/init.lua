--- codefill for Neovim: a thin client for `codefill serve --stdio`.
---
--- All completion logic (prompt, debounce, cancellation, caching, stop rules) lives in the server; this file
--- starts it, turns on Neovim's own LSP inline completion (0.12+) or LSP completion (0.10-0.11), and maps
--- the keys. Requests are cancelled by Neovim itself when the cursor moves ($/cancelRequest).
local M = {}

--- The one defaults table; `setup(opts)` merges `opts` over it (see `:help codefill-config`).
M.defaults = {
  -- The server command; nil: { "codefill", "serve", "--stdio", "--model", model } (+ "--endpoint", endpoint).
  cmd = nil,
  -- MODEL_DIR of a converted checkpoint (tokenizer.model, config.json, weights); nil: $CODEFILL_MODEL.
  model = nil,
  -- A running worker (ipc://PATH, tcp://127.0.0.1:PORT); nil: the server starts one on `model`.
  endpoint = nil,
  -- Filetypes to attach to; nil: every buffer with a filetype (the server's `languages` setting filters too).
  filetypes = nil,
  -- Files whose directory is the workspace root; the first found upwards from the buffer wins.
  root_markers = { ".git", "pyproject.toml", "package.json" },
  -- Server settings (lsp/settings.py keys: max_new_tokens, temperature, debounce_min_ms, ...), sent as
  -- initializationOptions; change them later with require("codefill").configure({...}).
  settings = {},
  -- "inline" (virtual text, Neovim 0.12+), "completion" (the completion menu), or nil: inline where available.
  mode = nil,
  -- Insert-mode keys; false disables one. `accept` falls back to its own key when no suggestion is shown.
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    next = "<M-]>",
    prev = "<M-[>",
    dismiss = "<C-]>",
    -- completion mode only: open the menu now (inline mode asks by itself as you type)
    trigger = "<M-\\>",
  },
}

M.config = vim.deepcopy(M.defaults)
M.name = "codefill"

--- `client:method(...)` on 0.11+, `client.method(...)` on 0.10 (where methods were plain fields).
local function call(client, method, ...)
  if vim.fn.has("nvim-0.11") == 1 then
    return client[method](client, ...)
  end
  return client[method](...)
end

local function has_inline()
  return vim.lsp.inline_completion ~= nil
end

--- The mode in force: "inline" or "completion".
function M.mode()
  if M.config.mode then
    return M.config.mode
  end
  return has_inline() and "inline" or "completion"
end

--- The server command line.
function M.cmd()
  if M.config.cmd then
    return M.config.cmd
  end
  local model = M.config.model or vim.env.CODEFILL_MODEL
  local cmd = { "codefill", "serve", "--stdio" }
  if model then
    vim.list_extend(cmd, { "--model", vim.fn.expand(model) })
  end
  if M.config.endpoint then
    vim.list_extend(cmd, { "--endpoint", M.config.endpoint })
  end
  return cmd
end

--- The codefill client attached to `bufnr` (0: current), or nil.
function M.client(bufnr)
  return vim.lsp.get_clients({ name = M.name, bufnr = bufnr or 0 })[1]
end

--- Neovim inserts only the first word of a plain-text item; insert the suggestion's whole first line instead
--- (the menu's info shows all of it, and the server's cache offers the rest at once after accepting).
local function menu_item(item)
  local text = item.textEdit and item.textEdit.newText or item.insertText
  return text and { word = text:match("^[^\n]*") } or {}
end

local function on_attach(client, bufnr)
  if M.mode() == "inline" then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  elseif vim.lsp.completion then
    vim.lsp.completion.enable(true, client.id, bufnr, { autotrigger = true, convert = menu_item })
  else
    vim.bo[bufnr].omnifunc = "v:lua.vim.lsp.omnifunc"
  end
end

--- `t` as a JSON object: Neovim encodes an empty Lua table as an array, which the server would refuse.
local function as_object(t)
  return next(t) == nil and vim.empty_dict() or t
end

local function lsp_config()
  return {
    name = M.name,
    cmd = M.cmd(),
    filetypes = M.config.filetypes,
    root_markers = M.config.root_markers,
    init_options = as_object(M.config.settings),
    on_attach = on_attach,
  }
end

--- Insert `text` at the cursor and put the cursor after it.
local function insert_at_cursor(text)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local lines = vim.split(text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(0, row - 1, col, row - 1, col, lines)
  local last = #lines == 1 and col + #lines[1] or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + #lines - 1, last })
end

--- The part of a suggestion that `accept_word` / `accept_line` take: its first word (with the spaces before
--- it) or the rest of its first line (its line break, if the suggestion starts with one).
function M.part(text, unit)
  if unit == "word" then
    return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
  end
  return text:match("^\n?[^\n]*") or text
end

local function inline_item_text(item)
  local t = item.insert_text
  return type(t) == "string" and t or t.value
end

--- Accept the shown suggestion: all of it, or `unit` ("word"/"line") of it. Returns false if none is shown.
--- A partial accept leaves the server's cache to show the rest at once.
function M.accept(unit)
  if M.mode() ~= "inline" then
    return false
  end
  if not unit then
    return vim.lsp.inline_completion.get()
  end
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      insert_at_cursor(M.part(inline_item_text(item), unit))
    end,
  })
end

--- Hide the shown suggestion and tell the server (`codefill.dismiss`, for its acceptance statistics).
function M.dismiss()
  if M.mode() ~= "inline" then
    return false
  end
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      local client = vim.lsp.get_client_by_id(item.client_id)
      local args = item.command and item.command.arguments
      if client and args then
        call(client, "request", "workspace/executeCommand", { command = "codefill.dismiss", arguments = { args[1] } })
      end
    end,
  })
end

local function map_keys()
  local k = M.config.keymaps
  local function imap(lhs, rhs, desc, opts)
    if lhs then
      vim.keymap.set("i", lhs, rhs, vim.tbl_extend("force", { desc = "codefill: " .. desc }, opts or {}))
    end
  end
  if M.mode() == "inline" then
    local function or_key(fn, key)
      return function()
        if not fn() then
          return vim.keycode(key)
        end
      end
    end
    imap(k.accept, or_key(M.accept, k.accept or ""), "accept the suggestion", { expr = true })
    imap(
      k.accept_word,
      or_key(function()
        return M.accept("word")
      end, k.accept_word or ""),
      "accept a word",
      { expr = true }
    )
    imap(
      k.accept_line,
      or_key(function()
        return M.accept("line")
      end, k.accept_line or ""),
      "accept a line",
      { expr = true }
    )
    imap(k.next, function()
      vim.lsp.inline_completion.select({ count = 1 })
    end, "next suggestion")
    imap(k.prev, function()
      vim.lsp.inline_completion.select({ count = -1 })
    end, "previous suggestion")
    imap(k.dismiss, or_key(M.dismiss, k.dismiss or ""), "dismiss the suggestion", { expr = true })
  else
    imap(k.trigger, function()
      if vim.lsp.completion then
        vim.lsp.completion.get()
      else
        vim.api.nvim_feedkeys(vim.keycode("<C-x><C-o>"), "n", false)
      end
    end, "open the completion menu")
  end
end

--- Send new server settings (workspace/didChangeConfiguration); the server refuses bad ones with a message.
function M.configure(settings)
  M.config.settings = vim.tbl_extend("force", M.config.settings, settings)
  for _, client in ipairs(vim.lsp.get_clients({ name = M.name })) do
    local params = { settings = { codefill = as_object(M.config.settings) } }
    call(client, "notify", "workspace/didChangeConfiguration", params)
  end
end

--- Turn suggestions on or off everywhere (the server keeps running).
function M.toggle()
  if M.mode() == "inline" then
    local on = not vim.lsp.inline_completion.is_enabled()
    vim.lsp.inline_completion.enable(on)
    vim.notify("codefill: suggestions " .. (on and "on" or "off"))
  else
    vim.notify("codefill: toggle needs inline mode (Neovim 0.12+)", vim.log.levels.WARN)
  end
end

--- The server's `codefill/stats` (latency percentiles, cache hit rate, acceptance counts), or nil and an error.
function M.stats(timeout_ms)
  local client = M.client(0) or vim.lsp.get_clients({ name = M.name })[1]
  if not client then
    return nil, "no codefill client is running"
  end
  local res, err = call(client, "request_sync", "codefill/stats", {}, timeout_ms or 2000)
  if not res then
    return nil, err
  end
  if res.err then
    return nil, res.err.message
  end
  return res.result
end

--- Start (or attach to) the server for matching buffers, turn on suggestions and map the keys.
function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  local mode = M.config.mode
  if mode ~= nil and mode ~= "inline" and mode ~= "completion" then
    error(('codefill: mode = %s: expected "inline", "completion" or nil'):format(vim.inspect(mode)))
  end
  if M.mode() == "inline" and not has_inline() then
    error("codefill: mode = 'inline' needs Neovim 0.12+ (vim.lsp.inline_completion)")
  end
  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(M.name, lsp_config())
    vim.lsp.enable(M.name)
  else -- Neovim 0.10: start (or reuse) the client per buffer
    vim.api.nvim_create_autocmd("FileType", {
      group = vim.api.nvim_create_augroup("codefill", { clear = true }),
      pattern = M.config.filetypes or "*",
      callback = function(ev)
        local config = lsp_config()
        config.root_dir = vim.fs.root(ev.buf, M.config.root_markers) or vim.fn.getcwd()
        vim.lsp.start(config, { bufnr = ev.buf })
      end,
    })
  end
  map_keys()
  vim.api.nvim_create_user_command("CodefillToggle", M.toggle, { desc = "codefill: suggestions on/off" })
  vim.api.nvim_create_user_command("CodefillStats", function()
    local stats, err = M.stats()
    print(stats and vim.inspect(stats) or ("codefill: " .. tostring(err)))
  end, { desc = "codefill: the server's statistics" })
end

return M

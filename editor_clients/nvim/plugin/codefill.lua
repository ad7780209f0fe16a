-- Nothing starts until require("codefill").setup({...}) is called (see :help codefill).
if vim.fn.has("nvim-0.10") == 0 then
  vim.notify_once("codefill needs Neovim 0.10+", vim.log.levels.WARN)
end

"""The language server: editor cursor context -> FIM prompt -> worker request -> completion items."""

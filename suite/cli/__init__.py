"""The gistress command line: the entry point (main) and one module per subcommand (commands/).

Top layer: may import anything in suite; nothing in suite imports it."""

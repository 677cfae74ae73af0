"""The `mkd` command line (installed as the import package `mkd_cli`). Thin: parse, call mkd_tf, print."""
